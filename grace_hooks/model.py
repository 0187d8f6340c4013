"""EditableModel: a Hugging Face causal LM plus a stack of edit packs applied by forward hooks."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from .bases.architectures import Site
from .bases.embedded import edit_defaults
from .bases.hooks import HookOwner
from .bases.loading import load_base
from .config import DEFAULT_METHOD, make_config
from .conflicts import THIS_EDIT, Conflict, FactIndex, find_conflicts
from .engine.health import site_health
from .engine.loaded import EditControls, LoadedView
from .engine.memo import WeightMemo
from .engine.runtime import EditRuntime
from .errors import ArchitectureError, EditError, PackError
from .explain import MAX_LEFT_OUT, Explanation, explain
from .methods import EditContext, get_method
from .requests import EditRequest, as_requests
from .store.header import Superseded
from .store.packs import (BaseInfo, EditPack, base_fingerprint, check_base, delete_pack_dir, load_pack, reading,
                          save_pack, validate_pack_name)
from .version import __version__

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackInfo:
    name: str
    method: str
    n_edits: int
    nbytes: int
    sites: tuple[str, ...]
    created_at: str
    conflicts: tuple[Conflict, ...] = ()  # from edit(): requests about the same fact as a loaded request


class EditableModel:
    """A base model whose weights are never written, plus loaded edit packs (oldest first)."""

    def __init__(self, model, tokenizer, name: str | None = None) -> None:
        self.base_model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self._runtime = EditRuntime(model)
        self._packs: dict[str, EditPack] = {}
        self._rank = 0  # grows with every pack applied: newer packs win where keys overlap
        self._fact_index: dict[str, tuple[EditPack, FactIndex]] = {}  # pack id -> (pack, its requests by subject)
        self.memo = WeightMemo(model)  # what derives from the base weights (fingerprints, prefixes, C0), per weight version

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, base: Any, adapters: str | Path | None = None, tokenizer: Any = None,
                        force: bool = False, **hf_kwargs) -> "EditableModel":
        """``base``: hub id, local HF folder, .gguf file, ``"smollm2-135m"`` or a loaded PreTrainedModel.
        ``adapters``: a folder of packs, loaded oldest first."""
        model, tok, name = load_base(base, tokenizer=tokenizer, **hf_kwargs)
        self = cls(model, tok, name)
        if adapters is not None:
            try:
                self.load_adapters(adapters, force=force)
            except BaseException:
                self.close()  # no hook of a half-loaded stack survives
                raise
        return self

    # ------------------------------------------------------------------ packs
    @property
    def packs(self) -> list[PackInfo]:
        return [self._info(p) for p in list(self._packs.values())]  # a copy first: another thread may change the stack

    @staticmethod
    def _info(p: EditPack) -> PackInfo:
        return PackInfo(p.name, p.method, p.n_edits, p.nbytes, tuple(p.sites), p.created_at)

    def pack(self, name: str) -> EditPack:
        if name not in self._packs:
            raise PackError(f"no pack named {name!r} is loaded; loaded: {list(self._packs)}")
        return self._packs[name]

    def _validate(self, pack: EditPack) -> None:
        """Check ``pack`` against the loaded packs and its method's schema on this model (nothing is applied)."""
        if pack.name in self._packs:
            raise PackError(f"a pack named {pack.name!r} is already loaded; remove it first or choose another name")
        twin = next((p.name for p in self._packs.values() if p.pack_id == pack.pack_id), None)
        if twin is not None:
            raise PackError(f"pack {pack.name!r} has the same pack_id as the loaded pack {twin!r}: one is a copy of the "
                            "other, and loading both would tie their edits together (removing one would remove both). "
                            "Keep one of them, or re-create the copy with grace-hooks edit")
        try:
            dims = {s: Site.parse(s).dims(self.base_model) for s in pack.sites}
        except ArchitectureError as exc:
            raise PackError(f"pack {pack.name!r} does not fit this model: {exc}") from None
        get_method(pack.method).validate(pack, dims)

    def _apply(self, pack: EditPack) -> None:
        """Validate, then apply at every site or at none (a failure leaves the model as it was)."""
        with self._runtime.lock:
            self._validate(pack)
            self._place(pack)
            self._packs[pack.name] = pack

    def _place(self, pack: EditPack) -> None:
        """Add ``pack`` to the runtime above every pack there, with the earlier keys it supersedes held off."""
        self._runtime.add_pack(pack.pack_id, self._rank + 1, get_method(pack.method).contributions(pack))
        try:
            self._runtime.suppress(pack.pack_id, [(s.site, s.pack_id, s.key) for s in pack.supersedes])
        except BaseException:
            self._runtime.remove_pack(pack.pack_id)
            raise
        self._rank += 1

    def method_config(self, config_class: type, overrides: dict | None = None):
        """``config_class`` with this model's defaults (an embedded model may change some, see
        :func:`~grace_hooks.bases.embedded.edit_defaults`), then ``overrides``."""
        return make_config(config_class, overrides, base=edit_defaults(self.name, config_class))

    def edit(self, requests: Iterable[EditRequest | dict], method: str = DEFAULT_METHOD, pack: str | None = None,
             supersede: bool = False, **config_overrides) -> PackInfo:
        """Compute an edit with ``method`` and apply it as a new pack (active at once). Forwards from
        other threads wait while it is computed (they never see it half done). ``supersede``: the loaded
        requests this edit conflicts with (:attr:`PackInfo.conflicts`) stop acting while the new pack is
        loaded (their router keys never fire); removing it brings them back."""
        reqs = as_requests(requests)
        impl = get_method(method)
        conflicts = tuple(find_conflicts(reqs, [(p.name, self._facts(p)) for p in list(self._packs.values())]))
        superseded = self._superseded(conflicts) if supersede else []
        for c in conflicts:
            log.warning("edit: %s; %s (see docs/usage.md#conflicting-edits)", c.describe(),
                        "the earlier one is superseded" if supersede and c.pack != THIS_EDIT else "both act where both fire")
        cfg = self.method_config(impl.config_class, config_overrides)
        name = validate_pack_name(pack if pack is not None else f"{method}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}")
        with self._runtime.lock:
            if name in self._packs:
                raise PackError(f"a pack named {name!r} is already loaded; choose another name")
            with self.edit_context() as ctx:
                computed = impl.compute(ctx, reqs, cfg)
            new = EditPack(
                name=name, method=method, config=cfg, sites=computed.sites,
                base=BaseInfo(self.name, self.base_model.config.model_type, self._fingerprint(computed.sites)),
                requests=[r.to_dict() for r in reqs], tensors=computed.tensors, routing=computed.routing,
                state=impl.state_class() if computed.state is None else computed.state,
                metrics=computed.metrics, library_version=__version__, supersedes=superseded,
            )
            try:
                self._apply(new)  # validated like a pack read from disk: a non-finite solve is refused here
            except PackError as exc:
                raise EditError(f"the {method} edit was computed but is not usable, so it was not applied: {exc}. "
                                "Try other options (e.g. a lower learning rate or fewer requests per call)") from None
        return dataclasses.replace(self._info(new), conflicts=conflicts)

    def _facts(self, pack: EditPack) -> FactIndex:
        """``pack``'s requests indexed by subject, made once per pack object (a new version of a pack is
        another object): at 10,000 loaded edits reading them all again took 0.12 s an edit."""
        held = self._fact_index.get(pack.pack_id)
        if held is None or held[0] is not pack:
            held = self._fact_index[pack.pack_id] = (pack, FactIndex(pack.requests))
        return held[1]

    def _superseded(self, conflicts: tuple[Conflict, ...]) -> list[Superseded]:
        """The router keys of loaded packs that serve only requests the new edit conflicts with."""
        gone: dict[str, dict[int, int]] = {}  # pack -> its request -> the new request that supersedes it
        for c in conflicts:
            if c.pack != THIS_EDIT:
                gone.setdefault(c.pack, {}).setdefault(c.earlier, c.request)
        out = []
        for name, requests in gone.items():
            old = self._packs[name]
            if not old.routing.key_requests:
                raise EditError(f"pack {name!r} ({old.method}) has no router keys: it acts everywhere, so a new edit "
                                "cannot supersede one of its requests. Remove the pack, or edit without supersede")
            out += [Superseded(old.pack_id, site, k, requests[served[0]]) for site, keys in old.routing.key_requests.items()
                    for k, served in enumerate(keys) if served and set(served) <= set(requests)]
        return out

    @contextlib.contextmanager
    def edit_context(self) -> Iterator[EditContext]:
        """What a method gets to compute an edit (see :class:`~grace_hooks.methods.EditContext`): the
        loaded packs as a read-only view, staging, caches. Forwards of other threads wait inside the
        block; temporary hooks made through it are gone after it. ``edit`` uses it; so may a caller
        that computes an edit without applying it."""
        with self._runtime.lock, HookOwner().scoped() as scope:
            yield EditContext(self.base_model, self.tokenizer, self.loaded, EditControls.of(self._runtime), scope, self.memo)

    @property
    def loaded(self) -> LoadedView:
        """A read-only view of what the loaded packs place at each site (what methods see)."""
        return LoadedView(self._runtime)

    def _fingerprint(self, sites: list[str]) -> str:
        """The base fingerprint at ``sites``, hashed once per weight version (loading 1,000 packs hashes once)."""
        key = ("fingerprint",) + tuple(sorted(sites))
        return self.memo.get(key, lambda: base_fingerprint(self.base_model, sites))

    def save_pack(self, name: str, directory: str | Path, overwrite: bool = False) -> Path:
        return save_pack(self.pack(name), directory, name=name, overwrite=overwrite)

    def load_pack(self, path: str | Path, force: bool = False) -> PackInfo:
        """Read, validate and apply one pack folder; on any error the model is exactly as before."""
        return self.add_pack(load_pack(path), force=force)

    def add_pack(self, pack: EditPack, force: bool = False) -> PackInfo:
        """Validate and apply a pack held in memory (e.g. one computed on another copy of this base);
        on any error the model is exactly as before. The pack is shared, not copied: packs are immutable."""
        check_base(pack, self.base_model, self.name, force=force, actual=self._fingerprint(pack.sites))
        self._apply(pack)
        return self._info(pack)

    def load_adapters(self, directory: str | Path, force: bool = False, exclude: Iterable[str] = ()) -> list[PackInfo]:
        """Load every pack in ``directory`` oldest first, except those named in ``exclude``. All or
        nothing: if one pack fails, the packs this call applied are removed again and the error says which."""
        directory = Path(directory)
        if not directory.is_dir():
            raise PackError(f"adapters directory {str(directory)!r} does not exist")
        skip = set(exclude)
        with reading(directory) as paths:  # no writer renames a pack while it is read
            packs = [load_pack(p) for p in paths if p.name not in skip]
        for pack in packs:
            check_base(pack, self.base_model, self.name, force=force, actual=self._fingerprint(pack.sites))
        applied: list[str] = []
        try:
            for pack in packs:
                self._apply(pack)
                applied.append(pack.name)
        except BaseException:
            for name in reversed(applied):
                self.remove_pack(name)
            raise
        return [self._info(p) for p in packs]

    def remove_pack(self, name: str) -> None:
        """Rollback: the pack's effect is gone; outputs equal those before it was applied."""
        with self._runtime.lock:
            pack = self.pack(name)
            self._runtime.remove_pack(pack.pack_id)
            del self._packs[name]
            self._fact_index.pop(pack.pack_id, None)

    def remove_request(self, name: str, index: int) -> PackInfo:
        """Roll back one edit: pack ``name`` without its request ``index``, in its place in the stack
        (its method takes out what served only that request and keeps the rest as it is; earlier keys it
        superseded for that request act again). Refused where a method cannot, for the last request
        (remove the pack), and while later packs shrink or supersede keys of this one."""
        with self._runtime.lock:
            pack = self.pack(name)
            if not 0 <= index < pack.n_edits:
                raise EditError(f"pack {name!r} has requests 0 to {pack.n_edits - 1}, not {index}")
            if pack.n_edits == 1:
                raise EditError(f"{index} is the only request of pack {name!r}: remove the pack instead")
            holders = [p.name for p in self._packs.values() if p.pack_id in self._runtime.overriders(pack.pack_id)]
            if holders:
                raise EditError(f"pack(s) {holders} shrink or supersede keys of {name!r}, by their index, which taking "
                                f"a request out would shift: remove them first, then the request, then load them again")
            new = get_method(pack.method).without_request(pack, index)
            new.supersedes = [dataclasses.replace(s, request=s.request if s.request is None else s.request - (s.request > index))
                              for s in pack.supersedes if s.request != index]  # what it superseded for that request acts again
            get_method(new.method).validate(new, {s: Site.parse(s).dims(self.base_model) for s in new.sites})
            tail = self._from(pack)
            self._swap(tail, [new] + tail[1:])
            self._packs[name] = new
        return self._info(new)

    def squash_packs(self, names: list[str], into: str) -> PackInfo:
        """Replace the loaded chain ``names`` (oldest first, in load order) by one pack ``into`` with
        the same outputs (methods with the "squash" capability: comeba_hk and the routed weight deltas)."""
        packs = [self.pack(n) for n in names]
        order = [n for n in self._packs if n in set(names)]
        if order != list(names):
            raise PackError(f"squash the chain in the order it was loaded: {order}, not {list(names)}")
        new = get_method(packs[0].method).squash(packs, validate_pack_name(into))
        if into in self._packs and into not in names:
            raise PackError(f"a pack named {into!r} is already loaded; choose another name")
        with self._runtime.lock:
            get_method(new.method).validate(new, {s: Site.parse(s).dims(self.base_model) for s in new.sites})
            for n in names:
                self.remove_pack(n)
            self._apply(new)
        return self._info(new)

    @staticmethod
    def delete_pack(name: str, directory: str | Path) -> None:
        """Remove a pack folder from disk (under the folder's lock; a crash never leaves half a pack)."""
        delete_pack_dir(name, directory)

    def health(self, texts: Iterable[str] | None = None, max_tokens: int = 512) -> dict[str, dict[str, float]]:
        """Per site carrying weight deltas: |W0 + sum dW|_F / |W0|_F (global deltas, and all of them)
        and the activation-norm ratio and drift against the base on a reference text (the shipped
        unrelated paragraphs by default). See :mod:`grace_hooks.engine.health`."""
        return site_health(self.base_model, self.tokenizer, self._runtime, None if texts is None else list(texts), max_tokens)

    # ------------------------------------------------------------------ pass-through
    @contextlib.contextmanager
    def disabled(self) -> Iterator["EditableModel"]:
        """The pure base model inside the block."""
        with self._runtime.disabled():
            yield self

    @contextlib.contextmanager
    def exclusive(self) -> Iterator["EditableModel"]:
        """Inside the block this thread has the model to itself: other threads' forwards and every
        change to the loaded packs wait, so a whole generation sees one stack of packs (a forward
        alone already does)."""
        with self._runtime.lock:
            yield self

    @contextlib.contextmanager
    def routes(self, every: bool = False) -> Iterator[list[tuple[str, int, int, str, int]]]:
        """Record the router hits of the forwards inside the block: (site, batch row, position,
        pack name, key index in that pack), one per in-scope position (its winning key), or with
        ``every`` one per key that acts there. Filled when the block exits."""
        names = {p.pack_id: p.name for p in self._packs.values()}
        out: list[tuple[str, int, int, str, int]] = []
        with self._runtime.tracing(every) as hits:
            yield out
        out.extend((site, row, pos, names.get(pid, pid), key) for site, row, pos, pid, key in hits)

    @contextlib.contextmanager
    def without(self, name: str) -> Iterator["EditableModel"]:
        """Inside the block the stack acts as if pack ``name`` had never been loaded (every later pack
        is re-applied over the earlier ones without it, shrinks of earlier keys included); after the
        block the stack is as before. Other threads wait until the block ends (it holds the lock)."""
        with self._runtime.lock:
            tail = self._from(self.pack(name))
            self._swap(tail, tail[1:])
            try:
                yield self
            finally:
                self._swap(tail[1:], tail)

    def _from(self, pack: EditPack) -> list[EditPack]:
        """``pack`` and every pack loaded after it, in load order."""
        order = list(self._packs.values())
        return order[order.index(pack):]

    def _swap(self, applied: list[EditPack], instead: list[EditPack]) -> None:
        """Take the top of the stack ``applied`` out of the runtime and apply ``instead`` (packs already
        validated) in its place; if that fails, ``applied`` is put back and the error raised."""
        for p in applied:
            self._runtime.remove_pack(p.pack_id)
        try:
            for p in instead:
                self._place(p)
        except BaseException:
            for p in instead:
                self._runtime.remove_pack(p.pack_id)
            for p in applied:
                self._place(p)
            raise

    def explain(self, prompt: str, max_new_tokens: int = 20, stop_ids: tuple[int, ...] = (),
                add_special_tokens: bool = True, max_left_out: int = MAX_LEFT_OUT) -> Explanation:
        """Why the greedy answer to ``prompt`` is what it is: per generated token, the packs that acted
        (site, input position, key, the requests it serves), and the answer with each acting pack left
        out (at most ``max_left_out`` generations). See :mod:`grace_hooks.explain`."""
        ids = {p.pack_id: p.name for p in self._packs.values()}
        with self._runtime.lock:
            keyless = tuple(dict.fromkeys(ids[pid] for rt in self._runtime.sites.values()
                                          for pid in sorted(rt.packs - set(rt.ids)) if pid in ids))
        return explain(self, prompt, max_new_tokens, stop_ids, add_special_tokens, keyless, max_left_out)

    def __call__(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self):
        return next(self.base_model.parameters()).device

    def close(self) -> None:
        """Remove every hook; the base model is left exactly as it was loaded."""
        self._runtime.close()
        self._packs.clear()
        self._fact_index.clear()

    def __enter__(self) -> "EditableModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EditableModel({self.name!r}, packs={[p.name for p in self.packs]})"


"""What an edit method is: a config class, a ``compute`` step that never changes the model, and
a mapping from a stored pack to what it contributes at each site."""
from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..bases.architectures import Site
from ..bases.hooks import HookOwner, frozen_parameters
from ..engine.loaded import EditControls, LoadedView
from ..engine.memo import WeightMemo
from ..engine.runtime import SiteContribution
from ..engine.spans import KeyRouting
from ..errors import ConfigError, EditError, PackError
from ..requests import EditRequest
from ..store.packs import EditPack, NoState
from ..store.schema import TensorSpec, site_problems
from ..tokens import TextTokens


class EditContext:
    """What a method may use while computing an edit: the model with every loaded pack active
    (read-only), its tokenizer, read-only views of what is loaded (``loaded``), a hook owner for
    temporary hooks, the model's cache of what derives from its weights (``memo``), and explicit
    calls for what it may change for a while: an edit staged above the loaded packs, the loaded
    packs off, the real positions of a replay, an effect layer's option. ``tokens`` tokenises each
    text the edit reads once (:class:`~grace_hooks.tokens.TextTokens`): pass it wherever a tokenizer
    is asked for. Made by
    :meth:`EditableModel.edit_context`; it holds no runtime, site runtime or effect layer, only the
    views and the four calls (:mod:`grace_hooks.engine.loaded`)."""

    def __init__(self, model: nn.Module, tokenizer: Any, loaded: LoadedView, controls: EditControls, hooks: HookOwner,
                 memo: WeightMemo) -> None:
        self.model, self.tokenizer, self.hooks = model, tokenizer, hooks
        self.tokens = TextTokens(tokenizer)  # one edit's texts, each tokenised once
        self.loaded = loaded
        self.memo = memo  # the model's results derived from its weights (prefixes, C0, ...): ``memo.get(key, make)``
        self._controls = controls

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def staged(self, contributions: dict[str, SiteContribution]) -> contextlib.AbstractContextManager:
        """``contributions`` (site -> what an edit being computed places there) act inside the block,
        above every loaded pack, then are gone (measure a layer with the earlier layers applied)."""
        return self._controls.staged(contributions)

    def disabled(self) -> contextlib.AbstractContextManager:
        """The base model inside the block: no loaded pack acts (for this thread)."""
        return self._controls.disabled()

    def attention_mask(self, mask: torch.Tensor | None, input_ids: torch.Tensor | None = None
                       ) -> contextlib.AbstractContextManager:
        """Which positions are real (and which tokens they hold) for blocks run directly rather than
        through the model's forward, e.g. by a layer replay."""
        return self._controls.attention_mask(mask, input_ids)

    def option(self, name: str, value: Any) -> contextlib.AbstractContextManager:
        """This thread's forwards see option ``name`` = ``value`` inside the block (an effect layer's
        switch, e.g. COMEBA-HK's hook layers acting everywhere while it solves)."""
        return self._controls.option(name, value)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Base parameters stop asking for gradients for the duration (restored afterwards)."""
        with frozen_parameters(self.model):
            yield

    def capture(self, site: Site, **model_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output) of ``site`` for one forward, with every loaded pack active (the output its
        effects change: ``Site.written``)."""
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        with self.hooks.scoped() as scope, torch.no_grad():
            site.hook(scope, self.model, lambda x, y: captured.append((x.detach(), y.detach())))
            self.model(**model_inputs)
        return captured[0]


@dataclass
class ComputedEdit:
    """A method's result, not yet applied: tensors named ``tensor_name(site, part)`` plus small state
    (an instance of the method's ``state_class``; None: the class's defaults)."""

    sites: list[str]
    tensors: dict[str, torch.Tensor]
    state: Any = None
    routing: KeyRouting = field(default_factory=KeyRouting)  # what its router keys stand for (requests, spans)
    metrics: dict[str, Any] = field(default_factory=dict)


class EditMethod(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type]  # a dataclass of the method's options (a pack's ``config``)
    state_class: ClassVar[type] = NoState  # a dataclass of its packs' own small data (a pack's ``state``)
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def compute(self, ctx: EditContext, requests: list[EditRequest], config: Any) -> ComputedEdit:
        """Compute an edit. Must leave the model exactly as it found it."""

    @abstractmethod
    def contributions(self, pack: EditPack) -> dict[str, SiteContribution]:
        """What a stored pack places at each of its sites (called only on a pack that passed :meth:`validate`)."""

    @abstractmethod
    def site_layouts(self, config: Any) -> list[dict[str, TensorSpec]]:
        """The tensors a pack made with ``config`` holds at each site: one or more alternative layouts."""

    def check_state(self, pack: EditPack, config: Any) -> list[str]:
        """Problems with ``pack.state`` beyond its types (e.g. one label per key; what ``contributions`` reads)."""
        return []

    def config_of(self, pack: EditPack) -> Any:
        """The pack's config, checked to be this method's typed config (a pack read from disk has its
        stored ``method_config`` read through ``config_class``: options it predates take the class's
        defaults)."""
        if pack.method != self.name:
            raise PackError(f"pack {pack.name!r} was made with {pack.method!r}, not {self.name!r}")
        for part, cls in (("config", self.config_class), ("state", self.state_class)):
            if type(getattr(pack, part)) is not cls:
                raise PackError(f"pack {pack.name!r}: its {part} is a {type(getattr(pack, part)).__name__}, not the "
                                f"{cls.__name__} of method {self.name!r} (its {part}_class: what its compute gives "
                                "and what load_pack reads a stored pack's into)")
        return pack.config

    def validate(self, pack: EditPack, dims: dict[str, tuple[int, int]]) -> Any:
        """Check a pack against this method's schema before anything of it is applied: its config and
        state as this method's classes, each site's tensors (names, shapes against the site's
        ``(d_in, d_out)`` in ``dims``, finite values, sane radii) and its state. Returns the config;
        raises :class:`PackError` listing every problem found."""
        config = self.config_of(pack)
        problems = [f"{site}: {p}" for site in pack.sites
                    for p in site_problems(pack.site_tensors(site), self.site_layouts(config),
                                           {"d_in": dims[site][0], "d_out": dims[site][1]})]
        if not problems:  # the state check reads the tensors, so only once their layout holds
            problems = self.check_state(pack, config)
        if problems:
            raise PackError(f"pack {pack.name!r} does not hold what a {self.name!r} pack holds: " + "; ".join(problems[:8])
                            + ("; ..." if len(problems) > 8 else "") + ". The pack is corrupt, or was relabelled or "
                            "made by another version; re-create it from its requests (grace-hooks edit)")
        return config

    @staticmethod
    def rebuilt_without(pack: EditPack, index: int, tensors: dict[str, torch.Tensor], routing: KeyRouting,
                        state: Any = None) -> EditPack:
        """``pack`` with request ``index`` gone from its requests, and the given tensors, routing (and
        state): the same name and pack_id, so later packs' references to it stay valid."""
        return dataclasses.replace(pack, requests=pack.requests[:index] + pack.requests[index + 1:], tensors=tensors,
                                   routing=routing, state=pack.state if state is None else state)

    def without_request(self, pack: EditPack, index: int) -> EditPack:
        """``pack`` with request ``index`` removed and everything else kept as it is (same name and
        pack_id): what ``EditableModel.remove_request`` applies. Methods that can say so in
        ``capabilities`` ("remove_request"); the others refuse."""
        from .registry import method_names, method_class  # the registry imports this module

        able = [n for n in method_names() if "remove_request" in method_class(n).capabilities]
        raise EditError(f"a {self.name!r} pack cannot lose one request and keep the others as they are (its requests "
                        f"share one solved update); remove the whole pack and edit the rest again. Methods whose packs "
                        f"can: {able}")

    def squash(self, packs: list[EditPack], name: str) -> EditPack:
        """One pack with the same effect as the chain ``packs`` (methods with the "squash" capability)."""
        from .registry import method_names, method_class  # the registry imports this module

        able = [n for n in method_names() if "squash" in method_class(n).capabilities]
        raise ConfigError(f"method {self.name!r} cannot squash packs; methods that can: {able}")

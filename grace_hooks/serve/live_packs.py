"""The packs a server answers with, kept equal to its adapters folder.

- A new pack is computed on the *workshop*, a second copy of the same base that mirrors the serving
  stack, so requests go on being answered while it is computed; it is then saved atomically into
  the folder and applied to the serving model between two requests. Without a workshop (to save
  memory) the pack is computed on the serving model, and requests wait meanwhile.
- Removing a pack deletes its folder and rolls it back.
- Other processes may add, replace or delete packs in the folder (replicas sharing it):
  :meth:`LivePacks.sync_with_folder` makes the loaded stack equal the folder's packs, oldest first,
  and a background thread calls it every few seconds. A pack that cannot be loaded is left out,
  logged and listed; the rest of the stack keeps serving.
- Locks: one edit is computed at a time; changes to the serving stack (apply, roll back, sync)
  take turns; and each generation holds the model, so a stack change waits for the requests in
  flight, while requests that arrive meanwhile wait for it (:meth:`LivePacks.changing`,
  :mod:`grace_hooks.serve.generation`). The folder's own lock (adapters_dir) orders the writes of
  all processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import make_config
from ..errors import EditRequestError, GraceHooksError, PackError
from ..methods import get_method
from ..model import EditableModel, PackInfo
from ..requests import EditRequest, as_requests
from ..store.packs import EditPack, delete_pack_dir, load_pack, read_header, reading, save_pack, validate_pack_name
from ..timing import PhaseClock
from .errors import ApiError
from .turns import Turns

log = logging.getLogger(__name__)


@dataclass
class Restacked:
    """What bringing a stack in line changed: packs removed (newest first), added, and those left out."""

    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def restack(model: EditableModel, wanted: list[tuple[str, str]], fetch: Callable[[str], EditPack]) -> Restacked:
    """Make ``model``'s loaded packs equal ``wanted`` ((name, pack id), oldest first): the longest
    common prefix stays, the packs after it are rolled back newest first, and the rest of ``wanted``
    is applied in order (packs stack, so a pack is never slipped under a loaded one). A pack that
    ``fetch`` cannot give or the model refuses is left out and reported."""
    loaded = [(p.name, model.pack(p.name).pack_id) for p in model.packs]
    keep = 0
    while keep < min(len(loaded), len(wanted)) and loaded[keep] == wanted[keep]:
        keep += 1
    done = Restacked()
    for name, _ in reversed(loaded[keep:]):
        model.remove_pack(name)
        done.removed.append(name)
    for name, _ in wanted[keep:]:
        try:
            model.add_pack(fetch(name))
            done.added.append(name)
        except GraceHooksError as exc:
            done.failed[name] = str(exc)
    return done


@dataclass(frozen=True)
class NewPack:
    """A request to compute a pack: ``requests`` in any layout ``grace-hooks edit`` reads, method
    ``options`` as ``edit()`` takes them."""

    name: str
    method: str
    requests: list[Any]
    options: dict[str, Any]
    supersede: bool = False


def _checked(spec: NewPack) -> list[EditRequest]:
    """The cheap checks, before anything slow: the name, the method, its options; the requests, read."""
    validate_pack_name(spec.name)
    make_config(get_method(spec.method).config_class, spec.options)
    try:
        return as_requests(spec.requests)
    except (KeyError, TypeError, AttributeError) as exc:  # a record of a known layout with a part missing
        raise EditRequestError(f"malformed edit record ({type(exc).__name__}: {exc}); see the layouts "
                               "`grace-hooks edit --help` reads") from None


class LivePacks:
    """The serving model's packs and the adapters folder, changed together (see the module doc)."""

    def __init__(self, model: EditableModel, adapters: str | Path, workshop: EditableModel | None = None) -> None:
        self.model, self.workshop = model, workshop
        self.adapters = Path(adapters)
        self._edit_lock = threading.Lock()
        self._stack_lock = threading.Lock()
        self._failed: dict[str, tuple[str, str]] = {}  # name -> (pack id on disk, why it is not loaded)
        self._seen: tuple | None = None  # the folder's entries at the last sync that went through
        self.folder_error: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.turns = Turns()  # generations and changes of the serving stack take turns on the model

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Inside the block this thread changes the serving stack: after the generation in flight,
        before any that has not started (:mod:`grace_hooks.serve.turns`)."""
        with self.turns.change(), self.model.exclusive():
            yield

    # ------------------------------------------------------------------ reading
    @staticmethod
    def describe(info: PackInfo) -> dict[str, Any]:
        """One pack as ``GET /v1/packs`` lists it (``created`` in Unix seconds, as OpenAI objects give it)."""
        try:
            created = int(datetime.fromisoformat(info.created_at).timestamp()) if info.created_at else 0
        except ValueError:
            created = 0
        return {"name": info.name, "object": "edit_pack", "method": info.method, "edits": info.n_edits,
                "created": created, "created_at": info.created_at, "sites": list(info.sites), "bytes": info.nbytes}

    def listing(self) -> dict[str, Any]:
        """The loaded packs, oldest first, with what kept any pack of the folder out."""
        failed = dict(self._failed)
        return {"object": "list", "data": [self.describe(p) for p in self.model.packs],
                "not_loaded": [{"name": n, "error": why} for n, (_, why) in sorted(failed.items())],
                "folder_error": self.folder_error}

    # ------------------------------------------------------------------ writing
    def create(self, spec: NewPack) -> dict[str, Any]:
        """Compute a pack, save it into the folder and make it active; on any error nothing changed."""
        reqs = _checked(spec)
        clock = PhaseClock()
        with self._edit_lock:
            self._refuse_taken(spec.name)
            if self.workshop is None:
                with self._stack_lock:  # requests wait while it is computed: it is live as soon as it exists
                    with clock("compute"):
                        with self.changing():
                            info = self.model.edit(reqs, method=spec.method, pack=spec.name, supersede=spec.supersede,
                                                   **spec.options)
                    self._save_or_undo(self.model, spec.name, clock)
            else:
                self._mirror()
                with clock("compute"):
                    info = self.workshop.edit(reqs, method=spec.method, pack=spec.name, supersede=spec.supersede,
                                              **spec.options)
                with self._stack_lock:
                    self._refuse_taken(spec.name, computed=True)
                    self._save_or_undo(self.workshop, spec.name, clock)
                    try:
                        with clock("activate"), self.changing():
                            self.model.add_pack(self.workshop.pack(spec.name))
                    except BaseException:
                        delete_pack_dir(spec.name, self.adapters)
                        raise
        log.info("pack %s is live: %s", spec.name, clock.report())
        pack = (self.workshop or self.model).pack(spec.name)
        metrics = json.loads(json.dumps(pack.metrics, default=str))  # as the pack file holds them
        conflicts = [dataclasses.asdict(c) for c in info.conflicts]  # same subject and prompt/relation as a loaded request
        return self.describe(info) | {"metrics": metrics, "timings_s": clock.report(), "conflicts": conflicts}

    def _refuse_taken(self, name: str, computed: bool = False) -> None:
        """A name already loaded or present in the folder is refused (409), before or after computing."""
        taken = name in {p.name for p in self.model.packs} or (self.adapters / name).exists()
        if taken:
            if computed and self.workshop is not None:
                self.workshop.remove_pack(name)
            raise ApiError(409, f"a pack named {name!r} already exists (loaded or in {self.adapters}); "
                                f"DELETE /v1/packs/{name} first or choose another name")

    def _save_or_undo(self, source: EditableModel, name: str, clock: PhaseClock) -> None:
        try:
            with clock("save"):
                save_pack(source.pack(name), self.adapters)
        except BaseException:
            source.remove_pack(name)
            raise

    def _mirror(self) -> None:
        """Bring the workshop's stack in line with the serving model's (the packs are shared: immutable)."""
        with self._stack_lock:
            packs = {p.name: self.model.pack(p.name) for p in self.model.packs}
        done = restack(self.workshop, [(n, p.pack_id) for n, p in packs.items()], packs.__getitem__)
        if done.failed:
            raise ApiError(500, f"the workshop copy of the model refused packs the serving model holds: {done.failed}; "
                                "it must be the same base", "server_error")

    def delete(self, name: str) -> dict[str, Any]:
        """Roll a pack back and remove its folder (whichever of the two exists; 404 when neither)."""
        validate_pack_name(name)
        with self._stack_lock:
            loaded = name in {p.name for p in self.model.packs}
            on_disk = (self.adapters / name).is_dir()
            if not loaded and not on_disk:
                raise ApiError(404, f"no pack named {name!r} is loaded or in {self.adapters}", param="name")
            if on_disk:
                delete_pack_dir(name, self.adapters)
            if loaded:
                with self.changing():
                    self.model.remove_pack(name)
            self._failed.pop(name, None)
        log.info("pack %s rolled back and deleted", name)
        return {"name": name, "object": "edit_pack.deleted", "deleted": True}

    # ------------------------------------------------------------------ the folder
    def _entries(self) -> tuple:
        """What the folder holds now, cheaply (names, inodes, times): unchanged means no sync is needed.
        A save renames a new folder in, so a replaced pack changes its inode."""
        try:
            with os.scandir(self.adapters) as it:
                return tuple(sorted((e.name, e.inode(), e.stat(follow_symlinks=False).st_mtime_ns)
                                    for e in it if not e.name.startswith(".")))
        except FileNotFoundError:
            return ()

    def sync_with_folder(self, force: bool = False) -> Restacked:
        """Make the loaded packs equal the folder's (oldest first). Cheap when nothing changed."""
        seen = self._entries()
        if seen == self._seen and not force:
            return Restacked()
        with self._stack_lock:
            try:
                done = self._sync_locked()
            except PackError as exc:  # the folder as a whole cannot be read (e.g. a stray folder in it)
                if str(exc) != self.folder_error:
                    log.warning("adapters folder %s not synced, the loaded packs stay as they are: %s", self.adapters, exc)
                self.folder_error = str(exc)
                return Restacked()
            self.folder_error, self._seen = None, seen
        for name, why in done.failed.items():
            log.warning("pack %s in %s is not loaded: %s", name, self.adapters, why)
        if done.added or done.removed:
            log.info("synced with %s: removed %s, added %s", self.adapters, done.removed or "none", done.added or "none")
        return done

    def _sync_locked(self) -> Restacked:
        current = {p.name: self.model.pack(p.name) for p in self.model.packs}
        wanted: list[tuple[str, str]] = []
        fresh: dict[str, EditPack] = {}
        failed: dict[str, str] = {}
        with reading(self.adapters) as paths:  # no writer swaps a pack while it is read
            on_disk = [(p, read_header(p).pack_id) for p in paths]
            disk_ids = {p.name: pid for p, pid in on_disk}
            self._failed = {n: v for n, v in self._failed.items() if n in disk_ids}
            for path, pid in on_disk:
                name = path.name
                if pid and self._failed.get(name, ("",))[0] == pid:
                    continue  # refused before and unchanged since
                if name not in current or current[name].pack_id != pid:
                    try:
                        fresh[name] = load_pack(path)
                    except PackError as exc:
                        failed[name] = str(exc)
                        self._failed[name] = (pid, str(exc))
                        continue
                wanted.append((name, (fresh.get(name) or current[name]).pack_id))
        if wanted == [(n, p.pack_id) for n, p in current.items()]:
            return Restacked(failed=failed)  # nothing to change: requests need not wait
        with self.changing():
            done = restack(self.model, wanted, lambda n: fresh.get(n) or current[n])
        for name, why in done.failed.items():
            self._failed[name] = (disk_ids[name], why)
        done.failed |= failed
        return done

    def watch(self, every_s: float) -> None:
        """Sync with the folder every ``every_s`` seconds in a background thread, until :meth:`stop`."""
        if every_s <= 0 or self._watcher is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.sync_with_folder()
                except Exception:  # noqa: BLE001 - the watcher must outlive one bad sync; it says why
                    log.exception("syncing with %s failed; trying again in %.1f s", self.adapters, every_s)

        self._watcher = threading.Thread(target=loop, name="grace-hooks-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None

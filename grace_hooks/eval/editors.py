"""How the lifelong harness edits a model: through edit packs (every registered method), or with
one of the two baselines, ``none`` (the unedited model) and ``ft`` (in-place fine-tuning of one
MLP matrix per edit, the classic destructive baseline; it writes the base weights on purpose, and
keeps one copy of the original matrix so that the base can be measured beside it)."""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from ..bases.architectures import Site, relative_layer
from ..bases.hooks import frozen_parameters
from ..config import make_config, option
from ..engine.effects import is_gate_label
from ..engine.health import summarize
from ..errors import ConfigError
from ..locate.replay import LayerReplay
from ..methods import get_method
from ..methods.grace.config import DEFAULT_RELATIVE_DEPTH
from ..model import EditableModel
from ..requests import EditRequest
from ..tokens import build_edit_batch, score_targets, scored_positions
from .metrics import Hit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """``name`` or ``name:key=value,key=value`` (config overrides), e.g. ``grace:key=subject_last``."""

    method: str
    overrides: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        name, _, rest = text.partition(":")
        pairs = []
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"bad method spec {text!r}: expected name:key=value,key=value")
            pairs.append((key.strip(), value.strip()))
        return cls(name.strip(), tuple(pairs))

    @property
    def label(self) -> str:
        return "-".join([self.method] + [f"{k}={v}" for k, v in self.overrides])

    def config(self, config_class):
        return make_config(config_class, dict(self.overrides))


class Editor(ABC):
    """One method's edits on one model; the harness never asks which method it is."""

    routed = False  # whether router hits are meaningful (recall, false fires)

    def __init__(self, model: EditableModel, spec: MethodSpec) -> None:
        self.model, self.spec = model, spec

    @abstractmethod
    def edit(self, requests: list[EditRequest], index: int) -> None:
        """Apply batch number ``index`` of the stream."""

    def disabled(self) -> contextlib.AbstractContextManager:
        """The base model inside the block."""
        return self.model.disabled()

    def save(self, workdir: Path, index: int) -> None:
        """Persist what batch ``index`` added (called after every batch)."""

    def snapshot(self, workdir: Path) -> None:
        """Persist the state at a checkpoint, so that :meth:`restore` can resume from it."""

    def restore(self, workdir: Path, n_batches: int) -> None:
        """Bring back the state after the first ``n_batches`` batches."""

    def serves(self, index: int, row: int) -> Callable[[Hit], bool] | None:
        """A test for router hits that belong to request ``row`` of batch ``index``."""
        return None

    def health(self, texts: list[str]) -> dict[str, float]:
        """Weight-norm growth and activation drift against the base, largest over the sites."""
        return summarize(self.model.health(texts))

    def bytes_in_memory(self) -> int:
        return 0

    def load_seconds(self, workdir: Path) -> float | None:
        """Seconds to load everything saved so far onto the base (None if nothing is loaded)."""
        return None

    def config(self) -> dict:
        return {}

    def close(self) -> None:
        """Leave the model as it was before the editor touched it."""


class NoEdit(Editor):
    """The unedited model: every figure is the base's."""

    def edit(self, requests, index) -> None:
        pass


class PackEditor(Editor):
    """Each batch becomes one edit pack named ``e<batch>``, saved into ``<workdir>/adapters``."""

    routed = True

    def __init__(self, model, spec):
        super().__init__(model, spec)
        self.impl = get_method(spec.method)
        self.cfg = model.method_config(self.impl.config_class, dict(spec.overrides))

    @staticmethod
    def pack_name(index: int) -> str:
        return f"e{index:05d}"

    def edit(self, requests, index) -> None:
        self.model.edit(requests, method=self.spec.method, pack=self.pack_name(index), **vars(self.cfg))

    def save(self, workdir, index) -> None:
        self.model.save_pack(self.pack_name(index), workdir / "adapters", overwrite=True)

    def restore(self, workdir, n_batches) -> None:
        keep = {self.pack_name(i) for i in range(n_batches)}
        adapters = workdir / "adapters"
        for path in sorted(adapters.glob("e*")) if adapters.is_dir() else []:
            if path.name not in keep:  # made after the last checkpoint: it is redone
                shutil.rmtree(path)
        if n_batches:
            self.model.load_adapters(adapters)

    def serves(self, index, row):
        name = self.pack_name(index)
        owners = self.model.pack(name).routing.key_requests

        def test(hit: Hit) -> bool:
            site, pack, key = hit
            if is_gate_label(pack):  # no key says whose edit fired (a z-score gate): any such fire counts
                return owners is None
            keys = (owners or {}).get(site)
            return pack == name and (keys is None or row in keys[key])

        return test

    def bytes_in_memory(self) -> int:
        return sum(p.nbytes for p in self.model.packs)

    def load_seconds(self, workdir) -> float | None:
        fresh = EditableModel(self.model.base_model, self.model.tokenizer, self.model.name)
        t0 = time.perf_counter()
        try:
            fresh.load_adapters(workdir / "adapters")
            return time.perf_counter() - t0
        finally:
            fresh.close()

    def config(self) -> dict:
        return vars(self.cfg)

    def close(self) -> None:
        for info in list(self.model.packs):
            self.model.remove_pack(info.name)


@dataclass
class FineTuneConfig:
    layer: int | None = option(None, "block whose MLP output matrix is fine-tuned (default: GRACE's, 0.73 of the depth)")
    point: str = option("mlp_out", "hook point whose weight is trained")
    lr: float = option(5e-4, "Adam learning rate (EasyEdit FT-L's)")
    n_iter: int = option(25, "at most this many steps per batch; stops once every target is the argmax")


class FineTune(Editor):
    """Adam on one weight matrix, in place, on each batch's target NLL (FT-L without a norm bound)."""

    def __init__(self, model, spec):
        super().__init__(model, spec)
        self.cfg = spec.config(FineTuneConfig)
        base = model.base_model
        self.site = Site(self.cfg.layer if self.cfg.layer is not None else relative_layer(base, DEFAULT_RELATIVE_DEPTH),
                         self.cfg.point)
        self.weight = self.site.module(base).weight
        self.original = self.weight.detach().clone()

    def edit(self, requests, index) -> None:
        base = self.model.base_model
        batch = build_edit_batch(self.model.tokenizer, requests, device=self.model.device)
        index_, scored = scored_positions(batch)
        # blocks below the trained matrix do not change: run them once (as GRACE's training does)
        replay = LayerReplay(base, self.site.layer, batch.input_ids, batch.attention_mask)
        with frozen_parameters(base):
            self.weight.requires_grad_(True)  # the one trained matrix; its flag is restored on exit
            opt = torch.optim.Adam([self.weight], lr=self.cfg.lr)
            try:
                for _ in range(self.cfg.n_iter):
                    scores = score_targets(replay.logits(index_), scored)
                    if bool(scores.correct.all()):
                        break
                    opt.zero_grad(set_to_none=True)
                    scores.nll.mean().backward()
                    opt.step()
            finally:
                self.weight.grad = None

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        with torch.no_grad():
            edited = self.weight.detach().clone()
            self.weight.copy_(self.original)
        try:
            yield
        finally:
            with torch.no_grad():
                self.weight.copy_(edited)

    def disabled(self):
        return self._swapped()

    def _file(self, workdir: Path) -> Path:
        return workdir / "ft_weight.safetensors"

    def snapshot(self, workdir) -> None:
        tmp = self._file(workdir).with_suffix(".tmp")
        save_file({"weight": self.weight.detach().contiguous()}, str(tmp))
        tmp.replace(self._file(workdir))

    def restore(self, workdir, n_batches) -> None:
        if n_batches:
            with torch.no_grad():
                self.weight.copy_(load_file(str(self._file(workdir)))["weight"])

    def health(self, texts: list[str]) -> dict[str, float]:
        ratio = float(torch.linalg.matrix_norm(self.weight.detach().double()) / torch.linalg.matrix_norm(self.original.double()))
        return {"weight_norm_ratio_max": ratio, "weight_norm_ratio_all_max": ratio}

    def bytes_in_memory(self) -> int:
        return self.original.numel() * self.original.element_size()  # the copy kept to measure the base

    def config(self) -> dict:
        return asdict(self.cfg) | {"site": self.site.name}

    def close(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)


BASELINES: dict[str, type[Editor]] = {"none": NoEdit, "ft": FineTune}


def make_editor(model: EditableModel, spec: MethodSpec) -> Editor:
    """A baseline by its name, otherwise the registered edit method of that name (through packs)."""
    return BASELINES.get(spec.method, PackEditor)(model, spec)

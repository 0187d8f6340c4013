"""Architecture facts as data: where the blocks are and where each hook point lives.

Adding an architecture is one entry in :data:`ARCHITECTURES` plus a row in the test matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ArchitectureError
from .hooks import HookOwner


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path of the ModuleList of decoder blocks
    points: dict[str, str]  # hook point name -> module path inside one block
    final_norm: str  # dotted path of the norm between the last block and the output embedding
    transposed: frozenset[str] = field(default_factory=frozenset)  # points stored (d_in, d_out), GPT-2 Conv1D
    # the blocks give the same outputs when earlier columns come from a cache (replay.LayerReplay's ``start``)
    cached_suffix: bool = True
    # point -> path (inside one block) of the module whose output the point's effects change, where
    # that is not the point's own module. Gemma 2/3 normalise the MLP output before adding it to the
    # residual stream (gains up to ~740 on Gemma 3 270M): an effect keyed on the MLP's hidden
    # activations is added after that norm, so what it writes reaches the residual stream as is (a
    # solve aimed through the norm landed 6 of 20 edits, one written after it 20 of 20:
    # benchmarks/results-pages/models.md). Its global deltas then have no LoRA form on the point's weight.
    written_at: dict[str, str] = field(default_factory=dict)
    written_since: str = ""  # the library version from which written_at holds (older packs acted elsewhere)
    # consecutive blocks a spread (MEMIT-style) update covers by default: on Gemma 3 an update spread
    # over 5 blocks overshoots through the blocks above (2 of 20 landed), over 3 it lands (20 of 20)
    spread_blocks: int = 5


_GEMMA_MLP_NORM = {"mlp_out": "post_feedforward_layernorm"}
_LLAMA_LIKE = ArchSpec(layers="model.layers", points={"mlp_out": "mlp.down_proj"}, final_norm="model.norm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    # Gemma 2's sliding-window layers give other outputs from a cache (tests/test_replay.py)
    "gemma2": ArchSpec(layers="model.layers", points={"mlp_out": "mlp.down_proj"}, final_norm="model.norm",
                       cached_suffix=False, written_at=_GEMMA_MLP_NORM, written_since="0.2.0",
                       spread_blocks=3),
    "gemma3_text": ArchSpec(layers="model.layers", points={"mlp_out": "mlp.down_proj"}, final_norm="model.norm",
                            written_at=_GEMMA_MLP_NORM, written_since="0.2.0", spread_blocks=3),
    "gemma3": ArchSpec(layers="model.language_model.layers", points={"mlp_out": "mlp.down_proj"},
                       final_norm="model.language_model.norm", written_at=_GEMMA_MLP_NORM,
                       written_since="0.2.0", spread_blocks=3),
    "gpt2": ArchSpec(layers="transformer.h", points={"mlp_out": "mlp.c_proj"}, final_norm="transformer.ln_f",
                     transposed=frozenset({"mlp_out"})),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", points={"mlp_out": "mlp.dense_4h_to_h"}, final_norm="gpt_neox.final_layer_norm"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ArchitectureError(
            f"architecture {model_type!r} is not supported yet; supported: {sorted(ARCHITECTURES)}. "
            "Add an ArchSpec entry to grace_hooks.bases.architectures.ARCHITECTURES."
        )
    return ARCHITECTURES[model_type]


def num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(arch_spec(model).layers))


@dataclass(frozen=True)
class Site:
    """Where an edit acts: hook point ``point`` of block ``layer``. Named ``L<layer>.<point>``."""

    layer: int
    point: str = "mlp_out"

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.point}"

    @classmethod
    def parse(cls, name: str) -> "Site":
        try:
            layer, point = name.split(".", 1)
            if not layer.startswith("L"):
                raise ValueError
            return cls(int(layer[1:]), point)
        except ValueError:
            raise ArchitectureError(f"bad site name {name!r}: expected 'L<layer>.<point>', e.g. 'L22.mlp_out'") from None

    def module(self, model: nn.Module) -> nn.Module:
        spec = arch_spec(model)
        if self.point not in spec.points:
            raise ArchitectureError(
                f"hook point {self.point!r} is not defined for {model.config.model_type!r}; known: {sorted(spec.points)}"
            )
        n = num_layers(model)
        if not 0 <= self.layer < n:
            raise ArchitectureError(f"layer {self.layer} is out of range: the model has {n} layers (0..{n - 1})")
        return model.get_submodule(self.path(spec))

    def path(self, spec: ArchSpec) -> str:
        """The dotted module path of this site in a model of architecture ``spec``."""
        if self.point not in spec.points:
            raise ArchitectureError(f"hook point {self.point!r} is not defined here; known: {sorted(spec.points)}")
        return f"{spec.layers}.{self.layer}.{spec.points[self.point]}"

    def written(self, model: nn.Module) -> nn.Module:
        """The module whose output this site's effects change: the site's own module, or the one the
        architecture table names after it (Gemma's post-MLP norm), which then runs right after it."""
        spec = arch_spec(model)
        path = spec.written_at.get(self.point)
        return self.module(model) if path is None else model.get_submodule(f"{spec.layers}.{self.layer}.{path}")

    def hook(self, owner: HookOwner, model: nn.Module, fn: Callable, inputs: Callable[[], dict] | None = None) -> list:
        """Register ``fn(x, y)`` (x: the site module's input, y: the output the effects change; it
        returns the new y, or None for unchanged) with ``owner`` and return the handles. Where that
        output is another module's, x waits in the dict ``inputs()`` gives (keyed by site name; give
        each thread its own when forwards of several threads may interleave) until that module runs."""
        read, write = self.module(model), self.written(model)
        if read is write:
            return [owner.forward(read, lambda m, a, o: fn(a[0], o))]
        own: dict = {}
        inputs = inputs or (lambda: own)
        name = self.name

        def keep(module, args, output):
            inputs()[name] = args[0]

        def change(module, args, output):
            x = inputs().pop(name, None)
            return None if x is None else fn(x, output)

        return [owner.forward(read, keep), owner.forward(write, change)]

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The site's weight as (d_out, d_in), whatever the storage layout."""
        w = self.module(model).weight
        return w.t() if self.point in arch_spec(model).transposed else w

    def dims(self, model: nn.Module) -> tuple[int, int]:
        d_out, d_in = self.weight(model).shape
        return d_in, d_out


def deepest(model: nn.Module, sites) -> nn.Module:
    """The module of the site in the highest block (a forward that only reads ``sites`` can stop after it)."""
    return max(sites, key=lambda s: s.layer).module(model)


def relative_layer(model: nn.Module, fraction: float) -> int:
    """The block at ``fraction`` of the depth (0 = first, 1 = last)."""
    n = num_layers(model)
    return min(n - 1, max(0, round(fraction * n)))

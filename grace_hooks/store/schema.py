"""What a method declares its packs hold at each site, and the check of a pack against it.

A method gives one or more alternative layouts (name -> :class:`TensorSpec`). A layout names every
tensor a site may hold, with its shape in dimension names: ``d_in`` and ``d_out`` are the site's
widths on the loaded model; any other name (``n``, ``r``...) is bound by the first tensor that
uses it and must agree in the others. Every tensor must be finite in float32 (as the runtime keeps
it), with no entry beyond MAX_ABS in magnitude: real packs stay many orders below it, and larger
values only overflow the model's activations or the router's squared distances. (A negative radius
is valid: GRACE's split of two equal keys leaves one, and it never fires.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_ABS = 1e6  # keys, values and factors of real packs are below 1e2


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[str | int, ...]  # dimension names (or fixed sizes)
    required: bool = True


def layout_problems(tensors: dict[str, torch.Tensor], layout: dict[str, TensorSpec], dims: dict[str, int]) -> list[str]:
    """Every way ``tensors`` (one site's, names without the site prefix) differ from ``layout``."""
    problems = []
    missing = [k for k, spec in layout.items() if spec.required and k not in tensors]
    if missing:
        problems.append(f"missing tensors {missing}")
    unknown = sorted(set(tensors) - set(layout))
    if unknown:
        problems.append(f"unexpected tensors {unknown}")
    bound = dict(dims)
    for name, spec in layout.items():
        t = tensors.get(name)
        if t is None:
            continue
        if not t.is_floating_point():
            problems.append(f"{name} has dtype {t.dtype}, not a float dtype")
            continue
        if t.dim() != len(spec.shape):
            problems.append(f"{name} has shape {tuple(t.shape)}, expected {len(spec.shape)} dimensions {spec.shape}")
            continue
        for axis, (size, want) in enumerate(zip(t.shape, spec.shape)):
            expected = want if isinstance(want, int) else bound.setdefault(want, size)
            if size != expected:
                problems.append(f"{name} has size {size} on axis {axis} ({want}); expected {expected}")
        values = t.float()  # as the runtime keeps it
        if not bool(torch.isfinite(values).all()):
            problems.append(f"{name} holds NaN or infinite values (in float32)")
        elif values.numel() and float(values.abs().max()) > MAX_ABS:
            problems.append(f"{name} holds values beyond +-{MAX_ABS:g} (max |x| {float(values.abs().max()):g})")
    return problems


def site_problems(tensors: dict[str, torch.Tensor], layouts: list[dict[str, TensorSpec]], dims: dict[str, int]) -> list[str]:
    """[] when ``tensors`` fit one of ``layouts``; else the problems against the closest one."""
    best: list[str] | None = None
    for layout in layouts:
        problems = layout_problems(tensors, layout, dims)
        if not problems:
            return []
        if best is None or len(problems) < len(best):
            best = problems
    return best or []


def is_finite_number(value, low: float = -math.inf, high: float = math.inf) -> bool:
    """A real JSON number (not a bool) within [low, high]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high


__all__ = ["MAX_ABS", "TensorSpec", "is_finite_number", "layout_problems", "site_problems"]

"""What a method declares its packs hold at each site, the check of a pack against it, and the
names of a pack's tensors (:func:`tensor_name`, :func:`split_tensor_name`: every method, squash,
loading and the pack mutations name them through these).

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
SEPARATOR = "/"  # a pack's tensors are named '<site>/<part>', e.g. 'L3.mlp_out/U'


def tensor_name(site: str, part: str) -> str:
    """The name in a pack of the tensor ``part`` ('keys', 'U', ...) at ``site``."""
    return f"{site}{SEPARATOR}{part}"


def split_tensor_name(name: str) -> tuple[str, str]:
    """(site, part) of a pack's tensor name ('' for the part of a name without one)."""
    site, _, part = name.partition(SEPARATOR)
    return site, part


def site_tensors(tensors: dict[str, torch.Tensor], site: str) -> dict[str, torch.Tensor]:
    """The tensors of ``site`` among a pack's ``tensors``, by part name."""
    return {part: t for (at, part), t in ((split_tensor_name(k), t) for k, t in tensors.items()) if at == site}


def named(by_site: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors given per site (site -> part name -> tensor) under their names in a pack."""
    return {tensor_name(site, part): t for site, parts in by_site.items() for part, t in parts.items()}


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
    return problems


def value_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """NaN, infinite or out-of-range values (in float32, as the runtime keeps them): one pass over each
    tensor (the largest |x| is NaN where any value is: amax propagates NaN)."""
    problems = []
    for name in sorted(tensors):
        t = tensors[name]
        largest = float(t.detach().float().abs().amax()) if t.numel() else 0.0
        if not math.isfinite(largest):
            problems.append(f"{name} holds NaN or infinite values (in float32)")
        elif largest > MAX_ABS:
            problems.append(f"{name} holds values beyond +-{MAX_ABS:g} (max |x| {largest:g})")
    return problems


def site_problems(tensors: dict[str, torch.Tensor], layouts: list[dict[str, TensorSpec]], dims: dict[str, int]) -> list[str]:
    """[] when ``tensors`` fit one of ``layouts`` (names, shapes, dtypes) and hold sane values; else the
    problems against the closest layout. The values are read once, for the layout that fits."""
    best: list[str] | None = None
    for layout in layouts:
        problems = layout_problems(tensors, layout, dims)
        if not problems:
            return value_problems(tensors)
        if best is None or len(problems) < len(best):
            best = problems
    return best or []


__all__ = ["MAX_ABS", "SEPARATOR", "TensorSpec", "layout_problems", "named", "site_problems", "value_problems",
           "site_tensors", "split_tensor_name", "tensor_name"]

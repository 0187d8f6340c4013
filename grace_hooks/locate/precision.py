"""The one place where an edit's arithmetic meets the model's activations, whatever their dtype.

A model may run in bfloat16 (8 significant bits) or float16 (11). What an edit computes must not
inherit that precision, so every part says its dtype where it is made:

- float64: C0 accumulation, the normal matrix and its solve, residuals (``covariance``, ``linalg``);
- float32: what is optimised (target-vector deltas, GRACE values, with their Adam state), keys,
  radii and distances, and every tensor a pack stores;
- the effect added to an activation: computed in (at least) float32 from the activation, added to it
  in that precision and rounded once to the activation's dtype (:func:`lowrank_change`,
  :func:`dense_change`, :func:`add_to`).

For a float32 model each helper runs the very operations, in the same order, that the callers ran
before they existed, so float32 results are bit-identical.
"""
from __future__ import annotations

import torch

EFFECT_DTYPE = torch.float32  # the least precision an effect is computed in


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision activation; the activation's own dtype when it is wider."""
    return torch.promote_types(dtype, EFFECT_DTYPE)


def lowrank_change(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(x V) U^T, the change a low-rank update U V^T makes at the rows of ``x`` (..., d_in), in
    :func:`working_dtype` on x's device. The factors are kept as float32 on the CPU; in bfloat16 the
    product would keep 3 significant digits of a change that is often small beside the output."""
    xw = x.to(working_dtype(x.dtype))
    return (xw @ V.to(xw)) @ U.to(xw).T


def dense_change(x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """x D^T (D: d_out x d_in) in :func:`working_dtype` on x's device (see :func:`lowrank_change`)."""
    xw = x.to(working_dtype(x.dtype))
    return xw @ D.to(xw).T


def add_to(y: torch.Tensor, *changes: torch.Tensor) -> torch.Tensor:
    """``y`` plus each of ``changes`` in turn, in the widest of their dtypes, rounded once to ``y``'s
    dtype (and kept on y's device): adding in bfloat16 would round each change, then each sum."""
    out = y
    for change in changes:
        out = out + change.to(y.device)
    return out.to(y.dtype)


__all__ = ["EFFECT_DTYPE", "add_to", "dense_change", "lowrank_change", "working_dtype"]

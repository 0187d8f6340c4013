"""Closed-form weight updates and subspace projections, solved in float64.

MEMIT (Meng et al. 2023, eq. 14): dW = R K^T (lambda C0 + K K^T)^-1, with R (d_out x n) the
residuals the update must produce at the n keys K (d_in x n) and C0 the keys' second moment over
other text. ENCORE (Gupta et al. 2025) adds lambda_N I and the keys of earlier edits to the
matrix being inverted. The update is returned as exact rank-n factors, dW = U V^T with U = R and
V = M^-1 K (M is symmetric), so nothing of size d_out x d_in is ever stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """dW = U V^T; U: (d_out, r), V: (d_in, r)."""

    U: torch.Tensor
    V: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.U @ self.V.T

    @property
    def rank(self) -> int:
        return self.U.shape[1]


@dataclass(frozen=True)
class PreservationTerms:
    """What a method puts in P = lambda C0 + lambda_N I + Kp Kp^T: the weights of C0 and of the
    identity (fixed for a model, site and corpus) and the keys of earlier edits (columns, or None)."""

    c0_weight: float
    identity_weight: float = 0.0
    previous_keys: torch.Tensor | None = None


def preservation_matrix(d_in: int, c0: torch.Tensor | None = None, lam: float = 1.0, lam_identity: float = 0.0,
                        previous_keys: torch.Tensor | None = None) -> torch.Tensor:
    """lambda C0 + lambda_N I + Kp Kp^T (the part of M that does not depend on the new keys), float64."""
    m = torch.zeros(d_in, d_in, dtype=torch.float64)
    if c0 is not None:
        m += lam * c0.to(torch.float64)
    if lam_identity:
        m.diagonal().add_(lam_identity)
    if previous_keys is not None and previous_keys.numel():
        kp = previous_keys.to(torch.float64)
        m += kp @ kp.T
    return m


RIDGE_SCALES = (1.0, 1e2, 1e4, 1e6)  # the ridge's steps, times _ridge's


def _ridge(mean_diagonal: float) -> float:
    """What keeps a singular lambda C0 (fewer tokens than dimensions, no lambda_N) invertible: 1e-9 of its
    mean diagonal."""
    return 1e-9 * mean_diagonal


class CholeskyPart:
    """The fixed part F = lambda C0 + lambda_N I held as its Cholesky factor (F = L L^T, float64)."""

    def __init__(self, factor: torch.Tensor) -> None:
        self.factor = factor

    def solve(self, w: torch.Tensor) -> torch.Tensor:
        """F^-1 W."""
        return torch.cholesky_solve(w, self.factor)

    def dense(self) -> torch.Tensor:
        return self.factor @ self.factor.T


class RowsPart:
    """F = a X^T X + b I with X the (N, d) rows of a C0 measured on N < d tokens (a = lambda / N), solved
    through an N x N factor (Woodbury): F^-1 = (I - X^T (b/a I + X X^T)^-1 X) / b. On Qwen's 8,960-wide MLP
    input and 1,024 tokens that replaces a 32 s factorisation of five 8,960 x 8,960 matrices."""

    def __init__(self, rows: torch.Tensor, a: float, b: float) -> None:
        self.x, self.a = rows.to(torch.float64), a
        self.b = b if b > 0 else _ridge(a * float((self.x * self.x).sum()) / self.x.shape[1])
        inner = self.x @ self.x.T
        inner.diagonal().add_(self.b / a)
        self.inner = torch.linalg.cholesky(inner)

    def solve(self, w: torch.Tensor) -> torch.Tensor:
        return (w - self.x.T @ torch.cholesky_solve(self.x @ w, self.inner)) / self.b

    def dense(self) -> torch.Tensor:
        m = self.a * (self.x.T @ self.x)
        m.diagonal().add_(self.b)
        return m


def fixed_part(terms: PreservationTerms, c0: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> CholeskyPart | RowsPart:
    """F = lambda C0 + lambda_N I, made once per model, site and corpus, from C0 (``c0``, d x d) or from
    the rows it was measured on (``rows``, N x d, C0 = X^T X / N: see ``SecondMoment.thin``). Without
    lambda_N a C0 of fewer tokens than dimensions is singular: a ridge of 1e-9 of its mean diagonal is added,
    grown by RIDGE_SCALES until the factor exists."""
    if rows is not None and terms.c0_weight > 0:
        return RowsPart(rows, terms.c0_weight / rows.shape[0], terms.identity_weight)
    d_in = rows.shape[1] if rows is not None else c0.shape[0]  # rows with no C0 weight: C0 plays no part
    fixed = preservation_matrix(d_in, c0 if rows is None else None, terms.c0_weight, terms.identity_weight)
    factor, info = torch.linalg.cholesky_ex(fixed)
    mean_diagonal = float(fixed.diagonal().mean())
    for scale in RIDGE_SCALES:
        if not int(info):
            break
        # a C0 summed in float32 can be singular by more than 1e-9 of its diagonal: a larger ridge, step by step
        factor, info = torch.linalg.cholesky_ex(fixed + _ridge(mean_diagonal) * scale * torch.eye(d_in, dtype=fixed.dtype))
    if int(info):
        raise torch.linalg.LinAlgError(f"the preservation matrix stays singular after a ridge of "
                                       f"{_ridge(mean_diagonal) * RIDGE_SCALES[-1]:.3g}; give C0 more tokens")
    return CholeskyPart(factor)


class Preservation:
    """P = F + Kp Kp^T with the fixed part F = lambda C0 + lambda_N I made once per model, site and corpus
    (:func:`fixed_part`): each solve then costs O(d^2 m) (O(d N m) from rows) for m new and earlier keys
    instead of a d x d factorisation per site and edit (on Qwen's 8,960-wide MLP input the one
    factorisation took 32 s for 5 sites on 2 threads: benchmarks/results/first_edit_qwen_quiet.json)."""

    def __init__(self, fixed: CholeskyPart | RowsPart, previous_keys: torch.Tensor | None = None) -> None:
        self.fixed = fixed
        self.previous_keys = previous_keys if previous_keys is not None and previous_keys.numel() else None

    def dense(self) -> torch.Tensor:
        m = self.fixed.dense()
        if self.previous_keys is not None:
            kp = self.previous_keys.to(torch.float64)
            m += kp @ kp.T
        return m

    def solve(self, keys: torch.Tensor) -> torch.Tensor:
        """(P + K K^T)^-1 K. Woodbury over W = [Kp, K]: with B = F^-1 W and S = I + W^T B,
        (F + W W^T)^-1 = F^-1 - B S^-1 B^T, so the result is B_K - B S^-1 (W^T B_K)."""
        k64 = keys.to(torch.float64)
        w = k64 if self.previous_keys is None else torch.cat([self.previous_keys.to(torch.float64), k64], 1)
        if w.shape[1] * 2 > w.shape[0]:  # as many keys as dimensions: the dense solve is the cheaper one
            return torch.linalg.solve(self.dense() + k64 @ k64.T, k64)
        b = self.fixed.solve(w)
        b_k = b[:, -k64.shape[1]:]
        s = torch.eye(w.shape[1], dtype=torch.float64) + w.T @ b
        return b_k - b @ torch.linalg.solve(s, w.T @ b_k)


def closed_form_update(residuals: torch.Tensor, keys: torch.Tensor, preserve: torch.Tensor | Preservation,
                       orthogonal_to: torch.Tensor | None = None) -> LowRank:
    """dW = R K^T (P + K K^T)^-1 as factors: R (d_out, n), K (d_in, n), P (d_in, d_in) or a
    :class:`Preservation` (the same P, solved through its factor).

    ``orthogonal_to`` (d_in, b), orthonormal columns B: the same least-squares problem solved over
    updates with dW B = 0 only (O-Edit: the new update's row space is orthogonal to span B). With
    Q = I - B B^T that is dW = R (QK)^T (Q M Q)^+, computed as a solve with B B^T filling the
    excluded block (it keeps the matrix invertible and cannot reach Q K)."""
    r64, k64 = residuals.to(torch.float64), keys.to(torch.float64)
    if r64.shape[1] != k64.shape[1]:
        raise ValueError(f"residuals have {r64.shape[1]} columns but keys have {k64.shape[1]}")
    if isinstance(preserve, Preservation):
        if orthogonal_to is None or not orthogonal_to.numel():
            return LowRank(U=r64, V=preserve.solve(k64))
        preserve = preserve.dense()
    m = preserve.to(torch.float64) + k64 @ k64.T
    if orthogonal_to is not None and orthogonal_to.numel():
        b = orthogonal_to.to(torch.float64)
        q = torch.eye(m.shape[0], dtype=torch.float64) - b @ b.T
        m, k64 = q @ m @ q + b @ b.T, q @ k64
    v = torch.linalg.solve(m, k64)  # M^-1 K (M symmetric positive definite when P is)
    return LowRank(U=r64, V=v)


def orthonormal_basis(vectors: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """An orthonormal basis (columns) of the span of ``vectors`` (columns), float64."""
    if vectors.numel() == 0:
        return vectors.to(torch.float64)
    u, s, _ = torch.linalg.svd(vectors.to(torch.float64), full_matrices=False)
    return u[:, s > tol * max(float(s[0]), 1.0)]


def project_out(vectors: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``vectors`` (columns) minus their component in span(``basis``), the orthonormal columns of basis."""
    v = vectors.to(torch.float64)
    if basis is None or basis.numel() == 0:
        return v
    b = basis.to(torch.float64)
    return v - b @ (b.T @ v)

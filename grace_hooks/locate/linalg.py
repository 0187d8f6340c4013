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


def preservation_matrix(d_in: int, c0: torch.Tensor | None = None, lam: float = 1.0, lam_identity: float = 0.0,
                        previous_keys: torch.Tensor | None = None) -> torch.Tensor:
    """lambda C0 + lambda_N I + Kp Kp^T (the part of M that does not depend on the new keys), float64."""
    m = torch.zeros(d_in, d_in, dtype=torch.float64)
    if c0 is not None:
        m += lam * c0.to(torch.float64)
    if lam_identity:
        m += lam_identity * torch.eye(d_in, dtype=torch.float64)
    if previous_keys is not None and previous_keys.numel():
        kp = previous_keys.to(torch.float64)
        m += kp @ kp.T
    return m


def closed_form_update(residuals: torch.Tensor, keys: torch.Tensor, preserve: torch.Tensor,
                       orthogonal_to: torch.Tensor | None = None) -> LowRank:
    """dW = R K^T (P + K K^T)^-1 as factors: R (d_out, n), K (d_in, n), P (d_in, d_in).

    ``orthogonal_to`` (d_in, b), orthonormal columns B: the same least-squares problem solved over
    updates with dW B = 0 only (O-Edit: the new update's row space is orthogonal to span B). With
    Q = I - B B^T that is dW = R (QK)^T (Q M Q)^+, computed as a solve with B B^T filling the
    excluded block (it keeps the matrix invertible and cannot reach Q K)."""
    r64, k64 = residuals.to(torch.float64), keys.to(torch.float64)
    if r64.shape[1] != k64.shape[1]:
        raise ValueError(f"residuals have {r64.shape[1]} columns but keys have {k64.shape[1]}")
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

#!/usr/bin/env python
"""How much the weight deltas of a folder of packs overlap, site by site (checks O-Edit at scale).

For every edited site: the rank of each pack's delta dW = U V^T, the dimension of the span of all
the packs' row spaces (the input directions used up; O-Edit's constraint leaves d_in minus this
for later updates), the largest share of a pack's row space that lies in the span of the earlier
packs' (0 for O-Edit with `orthogonal_to="updates"`), and the largest |cos| between two packs'
deltas as matrices, <dW_i, dW_j>_F / (|dW_i|_F |dW_j|_F), and the first and last packs' |dW|_F.
Reads only the packs; no model is loaded. Prints a markdown table and writes it beside the
adapters folder as subspace.md.

    python benchmarks/delta_subspace.py benchmarks/results/delta/cf1000-b100-oedit-global/oedit-mode=global/adapters
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from grace_hooks.locate.linalg import orthonormal_basis, project_out
from grace_hooks.store.packs import load_pack, pack_dirs


def frobenius_gram(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """G[i, j] = <U_i V_i^T, U_j V_j^T>_F = sum((U_i^T U_j) * (V_i^T V_j)), never forming dW."""
    n = len(factors)
    g = torch.zeros(n, n, dtype=torch.float64)
    for i, (ui, vi) in enumerate(factors):
        for j, (uj, vj) in enumerate(factors[: i + 1]):
            g[i, j] = g[j, i] = ((ui.T @ uj) * (vi.T @ vj)).sum()
    return g


def site_overlap(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    basis, in_earlier = None, 0.0
    for _, v in factors:
        if basis is not None:
            q = orthonormal_basis(v)  # the pack's row space; its share inside span(earlier)
            in_earlier = max(in_earlier, float((q - project_out(q, basis)).norm() / q.norm()))
        basis = orthonormal_basis(v if basis is None else torch.cat([basis, v], 1))
    g = frobenius_gram(factors)
    d = g.diagonal().sqrt()
    cos = (g / torch.outer(d, d)).abs().fill_diagonal_(0)
    return {"packs": len(factors), "d_in": factors[0][1].shape[0], "ranks": sum(v.shape[1] for _, v in factors),
            "span": basis.shape[1], "in_earlier": in_earlier, "cos": float(cos.max()),
            "norm_first": float(d[0]), "norm_last": float(d[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", type=Path, help="a folder of edit packs (weight-delta methods)")
    args = p.parse_args()
    packs = [load_pack(d) for d in pack_dirs(args.adapters)]
    if not packs:
        raise SystemExit(f"no edit packs in {args.adapters}: pass the adapters folder of a delta run")
    rows = [f"{len(packs)} packs in {args.adapters}",
            "", "| site | d_in | sum of ranks | span of row spaces | max share of a row space in earlier ones "
            "| max \\|cos\\| between deltas | \\|dW\\|_F, first pack -> last |", "|---|---:|---:|---:|---:|---:|---:|"]
    for site in packs[0].sites:
        if any("V" not in pk.site_tensors(site) for pk in packs):
            raise SystemExit(f"a pack in {args.adapters} has no low-rank delta at {site}: only weight-delta packs have one")
        f = [(t["U"].to(torch.float64), t["V"].to(torch.float64)) for t in (pk.site_tensors(site) for pk in packs)]
        s = site_overlap(f)
        rows.append(f"| {site} | {s['d_in']} | {s['ranks']} | {s['span']} | {s['in_earlier']:.2e} | {s['cos']:.2e} "
                    f"| {s['norm_first']:.3g} -> {s['norm_last']:.3g} |")
    text = "\n".join(rows) + "\n"
    (args.adapters.parent / "subspace.md").write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()

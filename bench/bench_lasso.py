"""Lasso coding: gig's batched FISTA against scikit-learn's coordinate descent
(`sklearn.decomposition.sparse_encode(algorithm="lasso_cd")`) on the same PFV-like problem,
measured in the same run: time ratio and objective gap.

    python bench/bench_lasso.py [--positions 2000] [--k 320] [--c 40]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.decomposition import sparse_encode

from gig.lasso import LassoEncoder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=2000)
    parser.add_argument("--k", type=int, default=320)
    parser.add_argument("--c", type=int, default=40)
    parser.add_argument("--lam", type=float, default=0.5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    V = torch.randn(args.k, args.c, generator=g)
    X = (
        torch.randn(args.positions, args.k, generator=g).relu()
        * (torch.rand(args.positions, args.k, generator=g) < 0.05)
    ) @ V
    X += 0.1 * torch.randn(X.shape, generator=g)

    enc = LassoEncoder(V, args.lam, max_iter=300)
    start = time.perf_counter()
    U = enc.encode(X)
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    # sparse_encode's lasso_cd minimises 1/(2 C)‖x − uV‖² + α‖u‖₁ per row: α = λ / C.
    U_sk = sparse_encode(
        X.numpy().astype(np.float64),
        V.numpy().astype(np.float64),
        algorithm="lasso_cd",
        alpha=args.lam / args.c,
        max_iter=1000,
    )
    t_sk = time.perf_counter() - start

    ours = enc.objective(X, U).mean()
    theirs = enc.objective(X, torch.from_numpy(U_sk).float()).mean()
    print(f"problem: {args.positions} positions, K={args.k}, C={args.c}, lambda={args.lam}")
    print(f"sklearn lasso_cd: {t_sk:.2f} s, mean objective {float(theirs):.5f}")
    print(f"gig FISTA:        {t_ours:.2f} s, mean objective {float(ours):.5f}")
    print(
        f"speed-up: {t_sk / t_ours:.1f}x; objective gap (ours - sklearn) / sklearn: "
        f"{float((ours - theirs) / theirs):+.2e}"
    )


if __name__ == "__main__":
    main()

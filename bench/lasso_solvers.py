"""Lasso solvers for the decompose stage, on a run's own dictionaries, PFVs and λ.

    OMP_NUM_THREADS=1 python bench/lasso_solvers.py RUN [--rows 4000] [--check 200] [--fista-iters 100 300 3000]

For each layer: the relative objective gap to scikit-learn's ``Lasso`` (coordinate descent, tol
1e-10, one fit per row, on ``--check`` rows) and the seconds per 1000 rows (on ``--rows`` rows,
one thread each) of

* gig's batched FISTA (``LassoEncoder(solver="fista")``, no early stop) at 100, 300 and 3000
  iterations;
* SPAMS's LARS-Lasso with the Gram matrix precomputed (``spams.lasso``, PyPI ``spams-bin``),
  an exact homotopy solver, when installed: one call in float64 and one in float32;
* gig's LARS encoder (``LassoEncoder(solver="lars")``: float32 first, then float64 and FISTA
  for the rows without a duality-gap certificate), when SPAMS is installed.

The λ is the run's recorded one per layer (``decompose`` summary).

Objective: ``½‖x − uV‖² + λ‖u‖₁`` per row (scikit-learn's is the same divided by C).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gig.collect import load_samples
from gig.concepts import load_dictionary
from gig.lasso import LassoEncoder, lars_available
from gig.store import RunStore


def objective(X: np.ndarray, U: np.ndarray, V: np.ndarray, lam: float) -> np.ndarray:
    return 0.5 * ((X - U @ V) ** 2).sum(1) + lam * np.abs(U).sum(1)


def sklearn_reference(X: np.ndarray, V: np.ndarray, lam: float, nonnegative: bool) -> np.ndarray:
    from sklearn.linear_model import Lasso

    C = V.shape[1]
    model = Lasso(alpha=lam / C, fit_intercept=False, tol=1e-10, max_iter=200_000, positive=nonnegative)
    rows = []
    for x in X:
        model.fit(V.T, x)
        rows.append(model.coef_.copy())
    return np.stack(rows)


def spams_codes(X: np.ndarray, V: np.ndarray, lam: float, nonnegative: bool, dtype: type) -> np.ndarray:
    """One ``spams.lasso`` call in ``dtype`` (the Gram matrix computed in it too), codes in float64."""
    import spams

    D = np.asfortranarray(V.T.astype(dtype))
    Xf = np.asfortranarray(X.T.astype(dtype))
    A = spams.lasso(
        Xf,
        D=D,
        Q=np.asfortranarray(D.T @ D),
        q=np.asfortranarray(D.T @ Xf),
        lambda1=lam,
        mode=2,
        pos=nonnegative,
        numThreads=1,
        max_length_path=4 * min(D.shape),
    )
    return np.asarray(A.todense(), dtype=np.float64).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--check", type=int, default=200)
    parser.add_argument("--layers", nargs="*")
    parser.add_argument("--fista-iters", nargs="*", type=int, default=[100, 300, 3000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = RunStore.open(args.run)
    alphas = store.summary("decompose").get("alpha", {})
    have_spams = lars_available()
    print("| layer | K×C | λ | solver | gap median | gap max | s / 1000 rows | l0 |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in args.layers or store.config.layers:
        V = load_dictionary(store, layer).float()
        pfv = load_samples(store, layer)["pfv"].float()
        g = torch.Generator().manual_seed(1)
        pfv = pfv[torch.randperm(pfv.shape[0], generator=g)[: args.rows]]
        lam = float(alphas[layer])
        nonneg = store.config.nonnegative
        Vn, Xn = V.double().numpy(), pfv.double().numpy()
        check = Xn[: args.check]
        ref = objective(check, sklearn_reference(check, Vn, lam, nonneg), Vn, lam)

        def gig_codes(X: np.ndarray, **kw) -> np.ndarray:
            return LassoEncoder(V, lam, nonneg, **kw).encode(torch.from_numpy(X).float()).double().numpy()

        solvers = {
            f"FISTA {it}": (lambda X, it=it: gig_codes(X, solver="fista", max_iter=it, tol=0.0))
            for it in args.fista_iters
        }
        if have_spams:
            solvers["SPAMS LARS float64"] = lambda X: spams_codes(X, Vn, lam, nonneg, np.float64)
            solvers["SPAMS LARS float32"] = lambda X: spams_codes(X, Vn, lam, nonneg, np.float32)
            solvers["gig LARS (certified)"] = lambda X: gig_codes(X, solver="lars")
        for name, solve in solvers.items():
            gap = (objective(check, solve(check), Vn, lam) - ref) / ref
            start = time.perf_counter()
            U = solve(Xn)
            per_1000 = (time.perf_counter() - start) / len(Xn) * 1000
            print(
                f"| {layer} | {V.shape[0]}×{V.shape[1]} | {lam:.3g} | {name} | {np.median(gap):.2e} | "
                f"{gap.max():.2e} | {per_1000:.2f} | {(U != 0).mean():.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

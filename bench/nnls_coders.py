"""NNLS coders on a run's ``nmf`` (or ``activation: nnls``) basis layer: SciPy's active-set NNLS,
row by row (gig's coder, :func:`gig.basis.nnls_codes`), against scikit-learn's coordinate
descent (NMF's own transform) at two tolerances: milliseconds per PFV, the relative residual, how
far each is from optimal (the largest violation of the optimality conditions, relative to the
scale of ``x Hᵀ``) and the codes' density.

    OMP_NUM_THREADS=1 python bench/nnls_coders.py RUN LAYER [--rows 200]

The rows are the layer's first sampled PFVs (``collect/LAYER.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from gig.artefacts import load_basis, load_samples
from gig.basis import nnls_codes
from gig.store import RunStore


def _cd(X: torch.Tensor, H: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    from sklearn.decomposition import non_negative_factorization

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W, _, _ = non_negative_factorization(
            X.numpy(), H=H.numpy(), n_components=H.shape[0], update_H=False, tol=tol, max_iter=max_iter, random_state=0
        )
    return torch.from_numpy(W)


def _figures(X: torch.Tensor, H: torch.Tensor, Z: torch.Tensor, seconds: float) -> dict:
    g = (Z @ H - X) @ H.T
    scale = float((X @ H.T).abs().max())
    kkt = max(float((-g).clamp_min(0).max()), float((g.abs() * (Z > 0)).max())) / scale
    residual = ((X - Z @ H).norm(dim=1) ** 2 / X.norm(dim=1).clamp_min(1e-12) ** 2).mean()
    return {
        "ms_per_pfv": round(1e3 * seconds / X.shape[0], 2),
        "relative_residual": float(residual),
        "optimality_violation": kkt,
        "active_per_pfv": float((Z > 0).sum(1).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("layer")
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    store = RunStore.open(args.run)
    basis = load_basis(store, args.layer)
    if basis is None or basis.activation != "nnls":
        raise SystemExit(f"{args.layer} of {args.run} has no nnls basis")
    H = basis.V.double()
    X = load_samples(store, args.layer)["pfv"][: args.rows].double()
    result = {"layer": args.layer, "K": int(H.shape[0]), "C": int(H.shape[1]), "rows": int(X.shape[0])}
    result["condition_number"] = float(torch.linalg.cond(H))
    coders = {
        "scipy_active_set": lambda: nnls_codes(X, H).double(),
        "sklearn_cd_tol1e-4": lambda: _cd(X, H, 1e-4, 400),
        "sklearn_cd_tol1e-8": lambda: _cd(X, H, 1e-8, 2000),
    }
    for name, code in coders.items():
        start = time.perf_counter()
        Z = code()
        result[name] = _figures(X, H, Z, time.perf_counter() - start)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

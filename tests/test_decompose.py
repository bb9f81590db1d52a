"""Lasso decomposition: objective against scikit-learn, calibration, sparse storage, fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from gig.decompose import FidelityMeter, LassoEncoder, calibrate_alpha, from_sparse_rows, relative_error, to_sparse_rows


def _problem(k=24, c=10, p=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(k, c, generator=g)
    U_true = torch.randn(p, k, generator=g) * (torch.rand(p, k, generator=g) < 0.2)
    X = U_true @ V + 0.05 * torch.randn(p, c, generator=g)
    return X, V


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("k", [8, 24])  # Gram-matrix path (K ≤ 2C) and direct path (K > 2C)
def test_lasso_objective_matches_sklearn(nonnegative, k):
    X, V = _problem(k=k)
    lam = 0.3
    enc = LassoEncoder(V, lam, nonnegative=nonnegative, max_iter=5000, tol=1e-9)
    U = enc.encode(X)
    # sklearn minimises 1/(2 n) ‖y − Dw‖² + α‖w‖₁ with n = C samples: α = λ / C.
    sk = Lasso(alpha=lam / V.shape[1], fit_intercept=False, positive=nonnegative, max_iter=100000, tol=1e-10)
    U_sk = np.stack([sk.fit(V.T.numpy().astype(np.float64), x.numpy().astype(np.float64)).coef_ for x in X])
    ours = enc.objective(X, U)
    theirs = enc.objective(X, torch.from_numpy(U_sk).float())
    assert torch.all(ours <= theirs + 1e-4 * (1 + theirs.abs()))
    assert float((ours - theirs).abs().max()) < 1e-3 * float(theirs.abs().max())
    if nonnegative:
        assert float(U.min()) >= 0


def test_calibration_reaches_target_error():
    X, V = _problem(k=24, p=200)
    alpha, err = calibrate_alpha(X, V, target_rel_error=0.2)
    U = LassoEncoder(V, alpha).encode(X)
    assert relative_error(X, U @ V) == pytest.approx(err, abs=1e-4)
    assert 0.15 < err <= 0.2
    # A larger λ gives a larger error and sparser codes.
    U_big = LassoEncoder(V, alpha * 4).encode(X)
    assert relative_error(X, U_big @ V) > err
    assert (U_big != 0).float().mean() < (U != 0).float().mean()


def test_sparse_rows_round_trip():
    U = torch.randn(30, 12) * (torch.rand(30, 12) < 0.3)
    parts = to_sparse_rows(U)
    torch.testing.assert_close(from_sparse_rows(parts["indptr"], parts["indices"], parts["values"], 12), U)


def test_fidelity_meter_merge_equals_one_pass():
    X, V = _problem(p=60)
    U = LassoEncoder(V, 0.2).encode(X)
    whole = FidelityMeter(X.shape[1])
    whole.add(X, U @ V, U)
    parts = []
    for s in (slice(0, 25), slice(25, 60)):
        m = FidelityMeter(X.shape[1])
        m.add(X[s], U[s] @ V, U[s])
        parts.append(m.state())
    merged = FidelityMeter.merge(parts).result()
    for key, value in whole.result().items():
        assert merged[key] == pytest.approx(value, rel=1e-6)
    # R² against a direct computation.
    resid = ((X - U @ V) ** 2).sum()
    total = ((X - X.mean(0)) ** 2).sum()
    assert merged["r2"] == pytest.approx(float(1 - resid / total), rel=1e-5)

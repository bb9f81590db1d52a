"""Lasso solvers against scikit-learn's optimum, the duality-gap certificate, the least-squares
refit against numpy/scipy, and the solver choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from sklearn.linear_model import Lasso

from gig.lasso import LassoEncoder, lambda_max, lars_available, refit_on_support, resolve_solver

SOLVERS = ["fista"] + (["lars"] if lars_available() else [])


def _sklearn_codes(X, V, lam, nonnegative):
    # sklearn minimises 1/(2 n) ‖y − Dw‖² + α‖w‖₁ with n = C samples: α = λ / C.
    sk = Lasso(alpha=lam / V.shape[1], fit_intercept=False, positive=nonnegative, max_iter=200000, tol=1e-12)
    return torch.from_numpy(np.stack([sk.fit(V.T.double().numpy(), x.double().numpy()).coef_.copy() for x in X]))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("k", [8, 24])  # FISTA's Gram-matrix path (K ≤ 2C) and direct path (K > 2C)
def test_objective_within_1e3_of_sklearn(solver, nonnegative, k, lasso_problem):
    X, V = lasso_problem(k=k)
    lam = 0.3
    enc = LassoEncoder(V, lam, nonnegative=nonnegative, solver=solver)  # default tolerance
    U = enc.encode(X)
    ours = float(enc.objective(X, U).sum())
    theirs = float(enc.objective(X, _sklearn_codes(X, V, lam, nonnegative)).sum())
    assert abs(ours - theirs) <= 1e-3 * theirs
    if nonnegative:
        assert float(U.min()) >= 0


@pytest.mark.parametrize("nonnegative", [False, True])
def test_duality_gap_bounds_the_suboptimality(nonnegative, lasso_problem):
    X, V = lasso_problem(k=24, p=30)
    lam = 0.3
    enc = LassoEncoder(V, lam, nonnegative=nonnegative)
    U_opt = _sklearn_codes(X, V, lam, nonnegative)
    best = enc.objective(X, U_opt).double()
    assert float(enc.duality_gap(X, U_opt).max()) < 1e-6 * float(best.max())  # zero at the optimum
    g = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0):  # perturbed codes: the gap is an upper bound on P(u) − P(u*)
        U = U_opt + scale * torch.randn(U_opt.shape, generator=g, dtype=U_opt.dtype)
        U = U.clamp_min(0) if nonnegative else U
        excess = enc.objective(X, U).double() - best
        assert torch.all(enc.duality_gap(X, U) >= excess - 1e-6 * best)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lambda_max_zeroes_every_code(solver, lasso_problem):
    X, V = lasso_problem()
    top = lambda_max(X, V)
    assert not bool(LassoEncoder(V, top * 1.001, solver=solver).encode(X).any())
    assert bool(LassoEncoder(V, top * 0.9, solver=solver).encode(X).any())


def test_fista_warm_start_reaches_the_same_optimum(lasso_problem):
    X, V = lasso_problem(k=24)
    enc = LassoEncoder(V, 0.3, solver="fista")
    cold = enc.encode(X)
    warm = enc.encode(X, init=LassoEncoder(V, 0.6, solver="fista").encode(X))
    a, b = float(enc.objective(X, cold).sum()), float(enc.objective(X, warm).sum())
    assert abs(a - b) <= 2e-4 * a


def test_refit_matches_least_squares_on_the_support(lasso_problem):
    X, V = lasso_problem(k=24, p=60)
    U = LassoEncoder(V, 0.3, solver="fista", tol=1e-9, max_iter=20000).encode(X)
    R = refit_on_support(U, X, V)
    assert torch.equal(R != 0, U != 0)  # the support stays
    for i in range(X.shape[0]):
        S = torch.nonzero(U[i]).flatten()
        if S.numel():
            ref = np.linalg.lstsq(V[S].double().numpy().T, X[i].double().numpy(), rcond=None)[0]
            np.testing.assert_allclose(R[i, S].double().numpy(), ref, rtol=1e-4, atol=1e-5)
    # The refit never rebuilds worse than the Lasso codes it started from.
    assert float(((X - R @ V) ** 2).sum()) < float(((X - U @ V) ** 2).sum())


def test_nonnegative_refit_matches_nnls(lasso_problem):
    X, V = lasso_problem(k=24, p=40)
    U = LassoEncoder(V, 0.3, nonnegative=True, solver="fista", tol=1e-9, max_iter=20000).encode(X)
    R = refit_on_support(U, X, V, nonnegative=True)
    assert float(R.min()) >= 0 and not bool((R != 0)[U == 0].any())
    for i in range(X.shape[0]):
        S = torch.nonzero(U[i]).flatten()
        if S.numel():
            ref, _ = nnls(V[S].double().numpy().T, X[i].double().numpy())
            np.testing.assert_allclose(R[i, S].double().numpy(), ref, rtol=1e-3, atol=1e-4)


def test_debiased_encoder_refits_its_own_support(lasso_problem):
    X, V = lasso_problem(k=24)
    plain = LassoEncoder(V, 0.3).encode(X)
    debiased = LassoEncoder(V, 0.3, debias=True).encode(X)
    torch.testing.assert_close(debiased, refit_on_support(plain, X, V))


def test_solver_choice():
    assert resolve_solver("fista", "cpu") == "fista"
    assert resolve_solver("auto", "cpu") == ("lars" if lars_available() else "fista")
    with pytest.raises(ValueError, match="lasso solver"):
        resolve_solver("cd", "cpu")


@pytest.mark.parametrize("solver", SOLVERS)
def test_unit_atoms_solve_the_lasso_of_the_normalised_atoms(solver, lasso_problem):
    """Against scikit-learn on the unit-norm atoms: the codes returned are theirs divided by the
    atom norms (same reconstruction), and the weighted objective is theirs."""
    X, V = lasso_problem(k=24)
    V = V * torch.linspace(0.2, 3.0, V.shape[0])[:, None]  # atoms of very different norms
    norms = V.norm(dim=1)
    enc = LassoEncoder(V, 0.3, solver=solver, unit_atoms=True)
    U = enc.encode(X)
    ref = _sklearn_codes(X, V / norms[:, None], 0.3, False)
    plain = LassoEncoder(V / norms[:, None], 0.3, solver="fista")
    ours, theirs = float(enc.objective(X, U).sum()), float(plain.objective(X, ref).sum())
    assert abs(ours - theirs) <= 1e-3 * theirs
    torch.testing.assert_close((U * norms) @ (V / norms[:, None]), U @ V)
    assert float(enc.duality_gap(X, U).sum()) <= 1e-3 * theirs
    # A different problem from the plain Lasso on V: the large atoms are cheaper there.
    assert not torch.equal(LassoEncoder(V, 0.3, solver=solver).encode(X) != 0, U != 0)


@pytest.mark.parametrize("unit_atoms", [False, True])
def test_with_alpha_equals_a_fresh_encoder(unit_atoms, lasso_problem):
    X, V = lasso_problem(k=24)
    moved = LassoEncoder(V, 2.0, solver="fista", unit_atoms=unit_atoms).with_alpha(0.3)
    fresh = LassoEncoder(V, 0.3, solver="fista", unit_atoms=unit_atoms)
    torch.testing.assert_close(moved.encode(X), fresh.encode(X))
    torch.testing.assert_close(moved.objective(X, fresh.encode(X)), fresh.objective(X, fresh.encode(X)))


@pytest.mark.skipif(not lars_available(), reason="SPAMS (spams-bin) not installed")
@pytest.mark.parametrize("failing", [("float32",), ("float32", "float64")])
def test_lars_rows_without_a_certificate_are_solved_again(failing, lasso_problem, monkeypatch):
    # A LARS pass that leaves rows unsolved (here: all-zero codes, as a float32 homotopy that
    # stopped early would leave them far from the optimum) must not reach the caller: the rows
    # are solved again in float64, then by FISTA, and the result still meets the optimum.
    X, V = lasso_problem(k=24)
    lam = 0.3
    enc = LassoEncoder(V, lam, solver="lars")
    real = enc._lars_pass
    dtypes = []

    def flaky(rows, dtype):
        dtypes.append(np.dtype(dtype).name)
        U = real(rows, dtype)
        return torch.zeros_like(U) if np.dtype(dtype).name in failing else U

    monkeypatch.setattr(enc, "_lars_pass", flaky)
    U = enc.encode(X)
    assert dtypes == ["float32", "float64"]
    theirs = float(enc.objective(X, _sklearn_codes(X, V, lam, False)).sum())
    assert abs(float(enc.objective(X, U).sum()) - theirs) <= 1e-3 * theirs

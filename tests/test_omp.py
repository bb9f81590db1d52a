"""The OMP coder against scikit-learn's OMP, its λ stop, and its edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

from gig.config import Config, ConfigError
from gig.omp import OMPEncoder


def _sklearn_omp(X: torch.Tensor, V: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """scikit-learn's OMP with ``n_atoms`` atoms on the unit atoms, as codes of ``V``'s atoms."""
    norms = V.double().norm(dim=1)
    unit = V.double() / norms[:, None]
    coef = orthogonal_mp_gram((unit @ unit.T).numpy(), (X.double() @ unit.T).numpy().T, n_nonzero_coefs=n_atoms)
    return torch.from_numpy(np.asarray(coef).reshape(V.shape[0], -1).T) / norms


@pytest.mark.parametrize("k, c, lam", [(24, 10, 0.5), (60, 20, 0.5), (120, 48, 0.05)])
def test_codes_equal_sklearn_omp_with_the_same_support_size(k, c, lam, lasso_problem):
    """Row by row, our codes are scikit-learn's OMP run for as many atoms as ours chose (the
    greedy path is the same up to where we stopped), with atoms of unequal norms; the last case
    grows the buffers past their first 16 atoms."""
    X, V = lasso_problem(k=k, c=c, p=120)
    V = V * torch.linspace(0.3, 3.0, k)[:, None]
    U = OMPEncoder(V, lam, chunk=50).encode(X)  # several chunks
    sizes = (U != 0).sum(1)
    assert sizes.max() > sizes.min() + 2  # the stop varies by row
    assert c < 48 or sizes.max() > 24
    for n_atoms in sizes.unique().tolist():
        if not n_atoms:
            continue  # no atom correlates by more than λ: zero codes (the next test checks the stop)
        rows = torch.nonzero(sizes == n_atoms).flatten()
        torch.testing.assert_close(U[rows].double(), _sklearn_omp(X[rows], V, n_atoms), rtol=1e-4, atol=1e-5)


def test_stop_is_the_first_support_whose_residual_correlates_at_most_lambda(lasso_problem):
    X, V = lasso_problem(k=40, c=12, p=80)
    lam = 0.4
    U = OMPEncoder(V, lam).encode(X)
    unit = V / V.norm(dim=1, keepdim=True)
    corr = ((X - U @ V) @ unit.T).abs().amax(1)
    assert bool((corr <= lam * (1 + 1e-5)).all())
    # One atom fewer (scikit-learn's path) still leaves an atom correlating by more than λ.
    sizes = (U != 0).sum(1)
    for n_atoms in set(sizes.tolist()) - {0}:
        rows = torch.nonzero(sizes == n_atoms).flatten()
        fewer = _sklearn_omp(X[rows], V, n_atoms - 1).float() if n_atoms > 1 else torch.zeros(len(rows), V.shape[0])
        assert bool((((X[rows] - fewer @ V) @ unit.T).abs().amax(1) > lam).all())


def test_lambda_max_zeroes_every_code_and_zero_lambda_fits_exactly(lasso_problem):
    X, V = lasso_problem(k=30, c=10, p=50)
    unit = V / V.norm(dim=1, keepdim=True)
    top = float((X @ unit.T).abs().max())
    assert bool((OMPEncoder(V, top * 1.0001).encode(X) == 0).all())
    U = OMPEncoder(V, 0.0).encode(X)
    assert int((U != 0).sum(1).max()) <= 10  # at most C atoms: then the fit is exact
    torch.testing.assert_close(U @ V, X, rtol=0, atol=1e-4)


def test_dependent_atoms_stop_the_row_instead_of_breaking_it():
    """A dictionary with duplicated atoms and one of rank 1: codes stay finite, fits as good as
    the span allows."""
    V = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    X = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 1.0, 0.0]])
    U = OMPEncoder(V, 0.0).encode(X)
    assert bool(torch.isfinite(U).all())
    torch.testing.assert_close(U @ V, torch.tensor([[3.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))


def test_with_alpha_equals_a_fresh_encoder(lasso_problem):
    X, V = lasso_problem(k=24, p=30)
    base = OMPEncoder(V, 2.0)
    torch.testing.assert_close(base.with_alpha(0.3).encode(X), OMPEncoder(V, 0.3).encode(X))
    assert base.alpha == 2.0


def test_config_rejects_omp_with_nonnegative_codes():
    with pytest.raises(ConfigError, match="coder='omp' with nonnegative"):
        Config(coder="omp", nonnegative=True)
    with pytest.raises(ConfigError, match="coder"):
        Config(coder="k-svd")


def test_memory_budget_bounds_the_rows_coded_at_once(lasso_problem):
    """A budget smaller than 1024 rows' worst case codes fewer rows at a time, with equal codes."""
    X, V = lasso_problem(k=30, c=10, p=70)
    small = OMPEncoder(V, 0.3, max_bytes=7 * (8 * 10 * 12 + 4 * 30))  # 7 rows of 10 atoms, K = 30
    assert small.rows_per_chunk == 7
    torch.testing.assert_close(small.encode(X), OMPEncoder(V, 0.3).encode(X))


@pytest.mark.parametrize("hi, lo", [(2.0, 0.4), (0.4, 0.4), (50.0, 0.0), (0.6, 0.0)])
def test_resuming_from_sparser_codes_gives_the_codes_from_scratch(hi, lo, lasso_problem):
    """Codes at λ_lo resumed from those at λ_hi ≥ λ_lo are scikit-learn's OMP for as many atoms
    (the greedy path does not depend on λ); rows join the pursuit at their own support sizes."""
    X, V = lasso_problem(k=40, c=12, p=90)
    V = V * torch.linspace(0.5, 2.0, 40)[:, None]
    sparser = OMPEncoder(V, hi, chunk=40).encode(X)
    U = OMPEncoder(V, lo, chunk=40).encode(X, sparser)
    sizes = (U != 0).sum(1)
    assert bool(((sparser != 0) <= (U != 0)).all())  # the supports only grow
    for n_atoms in set(sizes.tolist()) - {0}:
        rows = torch.nonzero(sizes == n_atoms).flatten()
        torch.testing.assert_close(U[rows].double(), _sklearn_omp(X[rows], V, n_atoms), rtol=1e-4, atol=1e-5)


def test_a_support_omp_cannot_reach_is_not_resumed():
    """A start on two copies of one atom (singular Gram) restarts that row from scratch."""
    V = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    X = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 4.0]])
    bad = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    U = OMPEncoder(V, 0.0).encode(X, bad)
    torch.testing.assert_close(U @ V, X)
    assert int((U[0] != 0).sum()) == 3

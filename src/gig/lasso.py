"""Lasso coding against a fixed dictionary, with a certificate of convergence.

``u_p = argmin_u ½‖x_p − uV‖² + λ‖u‖₁`` for every row ``x_p`` of ``X (P, C)`` and a dictionary
``V (K, C)`` (optionally ``u ≥ 0``). Two solvers, one contract (:class:`LassoEncoder`):

* ``"lars"`` — SPAMS's LARS-Lasso homotopy with the Gram matrix precomputed (PyPI ``spams-bin``,
  multi-threaded C++): exact, and fast when the codes are sparse, since its cost grows with the
  number of active atoms. The CPU default where SPAMS installs.
* ``"fista"`` — batched FISTA in torch (one matrix product per iteration for all rows, on any
  device): stops when the duality gap, an upper bound on the distance to the optimum, is within
  ``tol`` of the objective. The GPU default, and the CPU fallback without SPAMS.

``debias=True`` refits the coefficients by least squares on the support the Lasso selected (the
relaxed Lasso): the support, and so the sparsity, stays; the shrinkage of the kept coefficients
goes. The Lasso objective then no longer applies to the codes; the reconstruction improves.
"""

from __future__ import annotations

import copy
import importlib.util
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

SOLVERS = ("auto", "lars", "fista")


def lars_available() -> bool:
    """Whether SPAMS (``spams-bin``) is importable."""
    return importlib.util.find_spec("spams") is not None


def resolve_solver(solver: str, device: str | torch.device | None) -> str:
    """``"auto"`` → LARS on CPU where SPAMS is installed, else FISTA."""
    if solver not in SOLVERS:
        raise ValueError(f"lasso solver must be one of {', '.join(SOLVERS)}, not {solver!r}")
    if solver != "auto":
        return solver
    on_cpu = device is None or torch.device(device).type == "cpu"
    return "lars" if on_cpu and lars_available() else "fista"


class LassoEncoder:
    """Lasso codes of rows against a fixed dictionary ``V (K, C)``.

    ``encode(X (P, C)) → U (P, K)``. ``objective`` and ``duality_gap`` measure any codes against
    this problem. Fitted state: ``gram_ (K, K)``, ``lipschitz_``, ``solver_`` (the solver used).

    ``unit_atoms=True`` solves with the atoms scaled to unit norm (so the penalty weighs every
    atom alike: ``λ Σ_q ‖v_q‖ |u_q|`` in the original atoms' units) and returns the codes of the
    original atoms (``U V`` unchanged); ``objective`` and ``duality_gap`` are then that weighted
    problem's.
    """

    def __init__(
        self,
        dictionary: torch.Tensor,
        alpha: float,
        nonnegative: bool = False,
        max_iter: int = 1000,
        tol: float = 1e-3,
        chunk: int = 8192,
        device: str | torch.device | None = None,
        solver: str = "auto",
        debias: bool = False,
        unit_atoms: bool = False,
    ):
        if not float(alpha) >= 0:
            raise ValueError(f"alpha must be a number ≥ 0, not {alpha!r}")
        self.V = dictionary.float().to(device) if device is not None else dictionary.float()
        self.alpha = float(alpha)
        self.nonnegative = nonnegative
        self.max_iter = max_iter
        self.tol = tol
        self.chunk = chunk
        self.debias = debias
        self.solver_ = resolve_solver(solver, self.V.device)
        self.gram_ = self.V @ self.V.T
        self._lipschitz: float | None = None
        self._spams_gram: dict = {}  # SPAMS's D and Q per numpy dtype (shared by with_alpha copies)
        self.unit_atoms = unit_atoms
        self._unit: LassoEncoder | None = None  # the same problem on unit-norm atoms
        if unit_atoms:
            self.atom_norms_ = self.V.norm(dim=1).clamp_min(1e-12)
            self._unit = LassoEncoder(
                self.V / self.atom_norms_[:, None], alpha, nonnegative, max_iter, tol, chunk, solver=solver
            )

    @property
    def lipschitz_(self) -> float:
        """Lipschitz constant of the smooth part's gradient, the Gram matrix's largest eigenvalue:
        FISTA's step. Computed on first use (LARS never needs it)."""
        if self._lipschitz is None:
            self._lipschitz = float(torch.linalg.eigvalsh(self.gram_.double()).max().clamp_min(1e-12))
        return self._lipschitz

    def with_alpha(self, alpha: float) -> "LassoEncoder":
        """The same encoder at another λ, sharing the Gram matrix and its eigenvalue (a λ path
        builds them once)."""
        if not float(alpha) >= 0:
            raise ValueError(f"alpha must be a number ≥ 0, not {alpha!r}")
        other = copy.copy(self)
        other.alpha = float(alpha)
        if self._unit is not None:
            other._unit = self._unit.with_alpha(alpha)
        return other

    # ------------------------------------------------------------------ public
    def encode(self, X: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``U (P, K)`` of ``X (P, C)``. ``init (P, K)``: a warm start for FISTA (e.g. the
        codes at a neighbouring λ); LARS, an exact homotopy, ignores it."""
        X = X.float().to(self.V.device)
        if not X.shape[0]:
            return X.new_zeros(0, self.V.shape[0])
        if self._unit is not None:
            norms = self.atom_norms_
            U = self._unit.encode(X, None if init is None else init.to(X) * norms) / norms
            return refit_on_support(U, X, self.V, self.nonnegative) if self.debias else U
        parts = []
        for s in range(0, X.shape[0], self.chunk):
            x = X[s : s + self.chunk]
            u0 = None if init is None else init[s : s + self.chunk].to(x)
            u = self._lars(x) if self.solver_ == "lars" else self._fista(x, u0)
            parts.append(refit_on_support(u, x, self.V, self.nonnegative) if self.debias else u)
        return torch.cat(parts)

    def objective(self, X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """Per-row objective ``½‖x − uV‖² + λ‖u‖₁``, shape ``(P,)``."""
        if self._unit is not None:
            return self._unit.objective(X, U.to(self.V) * self.atom_norms_)
        X, U = X.to(self.V), U.to(self.V)
        return 0.5 * ((X - U @ self.V) ** 2).sum(1) + self.alpha * U.abs().sum(1)

    def duality_gap(self, X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """Per-row duality gap ``P(u) − D(θ) ≥ P(u) − P(u*) ≥ 0`` at the dual point ``θ`` obtained by
        rescaling the residual into the dual feasible set, shape ``(P,)``. Zero at the optimum."""
        if self._unit is not None:
            return self._unit.duality_gap(X, U.to(self.V) * self.atom_norms_)
        X, U = X.double().to(self.V.device), U.double().to(self.V.device)
        V = self.V.double()
        R = X - U @ V
        corr = R @ V.T  # (P, K): the dual constraint is |corr| ≤ λ (corr ≤ λ for u ≥ 0)
        worst = corr.clamp_min(0).amax(1) if self.nonnegative else corr.abs().amax(1)
        scale = torch.clamp(worst / max(self.alpha, 1e-300), min=1.0)
        theta = R / scale[:, None]
        primal = 0.5 * (R**2).sum(1) + self.alpha * U.abs().sum(1)
        dual = 0.5 * (X**2).sum(1) - 0.5 * ((X - theta) ** 2).sum(1)
        return (primal - dual).clamp_min(0)

    # ------------------------------------------------------------------ solvers
    def _lars(self, X: torch.Tensor) -> torch.Tensor:
        """SPAMS's LARS-Lasso, first in float32 (1.2–1.6× faster than float64 on the four
        dictionaries of an 800-image EfficientNet-Lite0 run, K = 320–2 560, at an objective within
        2e-10 of scikit-learn's: ``bench/lasso_solvers.py``), then in float64 for the rows whose
        duality gap is above ``tol``, and FISTA, warm-started at the LARS codes, for any row still
        above it. The homotopy path is capped at 4·min(K, C) steps (uncapped, it can cycle on
        degenerate problems at tiny λ). The gap certifies every row, whatever solved it."""
        U = self._lars_pass(X, np.float32)
        loose = self._loose(X, U)
        if loose.numel():
            U[loose] = self._lars_pass(X[loose], np.float64)
            loose = loose[self._loose(X[loose], U[loose])]
        if loose.numel():
            U[loose] = self._fista(X[loose], U[loose]).to(U)
        return U

    def _loose(self, X: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """Indices of the rows whose duality gap is above ``tol`` of their objective."""
        gap = self.duality_gap(X, U)
        return torch.nonzero(gap > self.tol * (self.objective(X, U).double() - gap).clamp_min(1e-30)).flatten()

    def _lars_pass(self, X: torch.Tensor, dtype: type) -> torch.Tensor:
        """One SPAMS LARS call on the rows of ``X`` in ``dtype``; codes ``(P, K)`` in float32."""
        import spams

        if dtype not in self._spams_gram:
            Vn = self.V.double().cpu().numpy().astype(dtype)
            self._spams_gram[dtype] = (np.asfortranarray(Vn.T), np.asfortranarray(Vn @ Vn.T))
        D, Q = self._spams_gram[dtype]
        Xf = np.asfortranarray(X.double().cpu().numpy().T.astype(dtype))  # (C, P): SPAMS takes columns
        A = spams.lasso(
            Xf,
            D=D,
            Q=Q,
            q=np.asfortranarray(D.T @ Xf),
            lambda1=self.alpha,
            mode=2,
            pos=self.nonnegative,
            numThreads=torch.get_num_threads(),
            max_length_path=4 * min(D.shape),
        )
        A = A.tocoo()  # (K, P) sparse
        U = torch.zeros(X.shape[0], self.V.shape[0], dtype=torch.float32)
        U[torch.from_numpy(A.col.astype(np.int64)), torch.from_numpy(A.row.astype(np.int64))] = torch.from_numpy(
            A.data.astype(np.float32)
        )
        return U.to(self.V.device)

    def _shrink(self, z: torch.Tensor, threshold: float) -> torch.Tensor:
        if self.nonnegative:
            return (z - threshold).clamp_min(0)
        return torch.sign(z) * (z.abs() - threshold).clamp_min(0)

    def _gradient(self, y: torch.Tensor, X: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # (yV − x)Vᵀ: through the Gram matrix when K ≤ 2C (P·K² flops), else through V (2·P·K·C).
        if self.V.shape[0] <= 2 * self.V.shape[1]:
            return y @ self.gram_ - b
        return (y @ self.V - X) @ self.V.T

    def _fista(self, X: torch.Tensor, u0: torch.Tensor | None = None, check_every: int = 10) -> torch.Tensor:
        """FISTA with adaptive restart; stops once the summed duality gap is
        within ``tol`` of the summed objective (checked every ``check_every`` iterations)."""
        step = 1.0 / self.lipschitz_
        b = X @ self.V.T  # (P, K)
        u = torch.zeros_like(b) if u0 is None else self._shrink(u0, 0.0)
        y = u
        t = torch.ones(X.shape[0], 1, dtype=b.dtype, device=b.device)  # momentum clock, per row
        for it in range(1, self.max_iter + 1):
            u_next = self._shrink(y - step * self._gradient(y, X, b), self.alpha * step)
            # Adaptive restart (O'Donoghue & Candès): where the step opposes the momentum, the
            # momentum overshoots; reset that row's clock.
            restart = ((y - u_next) * (u_next - u)).sum(1, keepdim=True) > 0
            t = torch.where(restart, torch.ones_like(t), t)
            t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
            y = u_next + ((t - 1) / t_next) * (u_next - u)
            u, t = u_next, t_next
            if it % check_every == 0:
                # gap ≤ tol · (P − gap) ≤ tol · P*: the objective is within tol of the optimum.
                gap = float(self.duality_gap(X, u).sum())
                if gap <= self.tol * max(float(self.objective(X, u).sum()) - gap, 1e-30):
                    break
        return u


def refit_on_support(
    U: torch.Tensor,
    X: torch.Tensor,
    V: torch.Tensor,
    nonnegative: bool = False,
    rtol: float = 1e-6,
    max_bytes: int = 1 << 27,
) -> torch.Tensor:
    """Least-squares coefficients on each row's support: ``argmin ‖x − uV‖²`` over ``u`` with the
    zeros of ``U (P, K)`` kept (``u ≥ 0`` as well when ``nonnegative``).

    Signed: rows are grouped by support size ``s`` and each group's ``s × s`` normal equations
    ``G_SS u_S = (Vx)_S`` are solved in one batched call (float64, at most ``max_bytes`` of
    systems at a time; a ridge of 1e-10·mean diag(G) keeps duplicate atoms solvable).
    Non-negative: accelerated projected gradient on the support, warm-started at the Lasso codes,
    until its optimality residual is within ``rtol`` of the largest ``|(Vx)_S|``.
    Returns ``(P, K)`` in ``U``'s dtype and device.
    """
    if not U.shape[0] or not bool((U != 0).any()):
        return U
    V64 = V.double().to(U.device)
    G = V64 @ V64.T
    b = X.double().to(U.device) @ V64.T
    mask = U != 0
    if nonnegative:
        return _nonnegative_refit(U.double() * mask, G, b, mask.double(), rtol, 20000).to(U.dtype)
    ridge = 1e-10 * float(G.diagonal().mean())
    out = torch.zeros_like(U, dtype=torch.float64)
    sizes = mask.sum(1)
    with _one_thread_on_cpu(G.device):
        for s in sizes.unique().tolist():
            _refit_group(out, mask, sizes, s, G, b, ridge, max_bytes)
    return out.to(U.dtype)


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """torch 2.14's batched CPU ``linalg.solve`` with several intra-op threads was seen to hang, or
    to fail with "Pivots given to lu_solve must all be greater or equal to 1", on a batch of
    well-conditioned 100-150-dimensional systems that solve fine one thread at a time."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _refit_group(
    out: torch.Tensor,
    mask: torch.Tensor,
    sizes: torch.Tensor,
    s: int,
    G: torch.Tensor,
    b: torch.Tensor,
    ridge: float,
    max_bytes: int,
) -> None:
    """Least squares for the rows whose support has ``s`` atoms, written into ``out``."""
    if s == 0:
        return
    rows = torch.nonzero(sizes == s).flatten()
    step = max(1, max_bytes // (8 * s * s))
    eye = ridge * torch.eye(s, dtype=G.dtype, device=G.device)
    for lo in range(0, rows.numel(), step):
        r = rows[lo : lo + step]
        idx = mask[r].nonzero()[:, 1].reshape(r.numel(), s)  # (n, s) support columns
        Gs = G[idx[:, :, None], idx[:, None, :]] + eye
        out[r[:, None], idx] = torch.linalg.solve(Gs, b[r[:, None], idx])


def _nonnegative_refit(
    u: torch.Tensor, G: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, rtol: float, max_iter: int
) -> torch.Tensor:
    """Accelerated projected gradient with adaptive restart for ``min ‖x − uV‖²``, ``u ≥ 0`` on
    the support; stops when the projected-gradient optimality residual is below ``rtol``."""
    step = 1.0 / float(torch.linalg.eigvalsh(G).max().clamp_min(1e-12))
    scale = (mask * b).abs().amax(1).clamp_min(1e-30)
    y, t = u, torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)
    for it in range(max_iter):
        nxt = ((y - step * (y @ G - b)) * mask).clamp_min(0)
        restart = ((y - nxt) * (nxt - u)).sum(1, keepdim=True) > 0
        t = torch.where(restart, torch.ones_like(t), t)
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        y = nxt + ((t - 1) / t_next) * (nxt - u)
        u, t = nxt, t_next
        if it % 20 == 19:
            grad = mask * (u @ G - b)
            # KKT: zero gradient where u > 0, non-negative gradient where u = 0.
            resid = torch.where(u > 0, grad.abs(), (-grad).clamp_min(0)).amax(1)
            if bool((resid <= rtol * scale).all()):
                break
    return u


def lambda_max(X: torch.Tensor, V: torch.Tensor, nonnegative: bool = False) -> float:
    """The smallest λ at which every code of ``X (P, C)`` is zero: ``max |X Vᵀ|``."""
    corr = X.float() @ V.float().T
    return float(corr.clamp_min(0).max() if nonnegative else corr.abs().max())

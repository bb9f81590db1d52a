"""Orthogonal matching pursuit (OMP) coding against a fixed dictionary, batched in torch.

For every row ``x_p`` of ``X (P, C)`` and a dictionary ``V (K, C)``: start from the empty support;
repeatedly add the atom whose unit direction ``v_q / ‖v_q‖`` correlates most with the residual
and refit every coefficient on the support by least squares; stop once no atom correlates with
the residual by more than ``λ`` (``max_q |⟨r_p, v_q⟩| / ‖v_q‖ ≤ λ``), or when the support holds
``min(K, C)`` atoms or its next atom is linearly dependent on it.

λ plays the part it plays for the Lasso: its optimality condition is the same bound on the
residual's correlations (``|⟨r, v_q⟩| ≤ λ``, with equality on the support), every code is zero at
``λ ≥ max |X Vᵀ|`` (unit atoms), and smaller λ gives denser, more faithful codes. OMP differs in
how it chooses the support: greedily, one atom at a time, with the coefficients on the support
always the least-squares ones. On dictionaries of many similar atoms, such as the bisecting
k-means centroids of a layer, that chooses far better sparse supports than the Lasso's ℓ1
penalty (``bench/front_variants.py`` measures both fronts on a run).

:class:`OMPEncoder` has :class:`gig.lasso.LassoEncoder`'s contract (``encode``, ``with_alpha``,
``V``, ``alpha``, ``solver_``), so the decompose stage and every consumer of a run's codes build
either through :func:`gig.decompose.encoder_for`.
"""

from __future__ import annotations

import copy

import torch


class OMPEncoder:
    """OMP codes of rows against a fixed dictionary ``V (K, C)``, stopped at correlation ``λ``.

    ``encode(X (P, C)) → U (P, K)``: the codes of the original atoms (``U V`` is the least-squares
    fit of each row on its support). Fitted state: ``unit_ (K, C)`` (the atoms at unit norm),
    ``atom_norms_ (K,)``, ``gram_ (K, K)`` (the unit atoms' Gram matrix, float64), ``solver_``
    ("omp"). Up to ``chunk`` rows are coded at a time, fewer where a row's worst case (a support
    of ``max_atoms = min(K, C)`` atoms: its Cholesky factor and atoms, ``max_atoms · (max_atoms +
    C) · 8`` bytes) times the rows would pass ``max_bytes``.
    """

    solver_ = "omp"

    def __init__(self, dictionary: torch.Tensor, alpha: float, chunk: int = 1024,
                 device: str | torch.device | None = None, max_atoms: int | None = None,
                 max_bytes: int = 1 << 30):
        if not float(alpha) >= 0:
            raise ValueError(f"alpha must be a number ≥ 0, not {alpha!r}")
        self.V = dictionary.float().to(device) if device is not None else dictionary.float()
        self.alpha = float(alpha)
        self.atom_norms_ = self.V.norm(dim=1).clamp_min(1e-12)
        self.unit_ = (self.V / self.atom_norms_[:, None]).double()
        self.gram_ = self.unit_ @ self.unit_.T
        self._unit32 = self.unit_.float()  # the correlations that choose atoms: float32 is 2× faster
        cap = min(self.V.shape)
        self.max_atoms = cap if max_atoms is None else max(1, min(int(max_atoms), cap))
        worst_row = 8 * self.max_atoms * (self.max_atoms + self.V.shape[1])
        self.rows_per_chunk = max(1, min(int(chunk), max_bytes // worst_row))

    def with_alpha(self, alpha: float) -> "OMPEncoder":
        """The same encoder at another λ, sharing the unit atoms and their Gram matrix."""
        if not float(alpha) >= 0:
            raise ValueError(f"alpha must be a number ≥ 0, not {alpha!r}")
        other = copy.copy(self)
        other.alpha = float(alpha)
        return other

    def encode(self, X: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``U (P, K)`` (float32) of ``X (P, C)``. ``init`` is accepted for the Lasso
        encoder's contract and ignored: OMP's greedy path starts from the empty support."""
        X = X.to(self.V.device)
        U = torch.zeros(X.shape[0], self.V.shape[0], dtype=torch.float32, device=self.V.device)
        for s in range(0, X.shape[0], self.rows_per_chunk):
            rows, cols, coef = self._pursue(X[s : s + self.rows_per_chunk].double())
            U[rows + s, cols] = (coef / self.atom_norms_.double()[cols]).float()
        return U

    def _pursue(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """OMP of the rows of ``X (P, C)`` on the unit atoms; returns the non-zeros as
        ``(row, atom, coefficient)`` triples.

        Every row still running at step ``t`` has exactly ``t`` atoms, so the rows are kept packed:
        support ``S (R, t)``, lower Cholesky factor ``L (R, t, t)`` of ``G_SS`` and the support's
        atoms ``D (R, t, C)``, in buffers that double when full. A row that stops is recorded and
        rides along (its later values are ignored) until a quarter of the pack has stopped, when
        the pack is compacted. Per step and row: the residual ``x − γ D`` and its correlations
        with every atom (``C·K``, float32), two triangular solves (float64).
        """
        unit, G = self.unit_, self.gram_
        n, c = X.shape
        rows = torch.arange(n, device=X.device)  # each packed row's row in X
        live = torch.ones(n, dtype=torch.bool, device=X.device)
        b = X @ unit.T  # (P, K) correlations of the rows with every atom
        x, corr = X, b.float()
        # Numerical floor for "no atom correlates by more than λ": the correlations of an exact
        # fit are rounding noise of the size of ‖x‖·1e-10, not zero.
        threshold = (1e-10 * X.norm(dim=1)).clamp_min(self.alpha)
        cap = min(16, self.max_atoms)
        S = torch.zeros(n, cap, dtype=torch.long, device=X.device)
        L = X.new_zeros(n, cap, cap)
        D = X.new_zeros(n, cap, c)
        gamma = X.new_zeros(n, 0)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for t in range(self.max_atoms + 1):
            best, q = corr.abs().max(1)
            stop = live & (best.double() <= threshold)
            if t == self.max_atoms:
                stop = live
            else:
                # Cholesky update for the new atom: L w = G_Sq, d² = G_qq − ‖w‖² (= 1 − ‖w‖²).
                w = torch.linalg.solve_triangular(L[:, :t, :t], G[S[:, :t], q[:, None]][:, :, None],
                                                  upper=False)[:, :, 0]
                d2 = 1.0 - (w * w).sum(1)
                stop |= live & (d2 <= 1e-10)  # the atom lies in the support's span: nothing to gain
            if t and bool(stop.any()):
                found.append((rows[stop][:, None].expand(-1, t).reshape(-1), S[stop, :t].reshape(-1),
                              gamma[stop].reshape(-1)))
            live &= ~stop
            n_live = int(live.sum())
            if not n_live:
                break
            if n_live <= 0.75 * live.numel():
                keep = live
                rows, live, x, b, S, L, D, threshold, q, w, d2 = (
                    a[keep] for a in (rows, live, x, b, S, L, D, threshold, q, w, d2))
            if t == cap:
                cap = min(2 * cap, self.max_atoms)
                S, L, D = _grown(S, (cap,)), _grown(L, (cap, cap)), _grown(D, (cap, c))
            S[:, t] = q
            L[:, t, :t] = w
            L[:, t, t] = d2.clamp_min(1e-10).sqrt()  # the floor only touches stopped rows
            D[:, t] = unit[q]
            gamma = torch.cholesky_solve(b.gather(1, S[:, : t + 1])[:, :, None], L[:, : t + 1, : t + 1],
                                         upper=False)[:, :, 0]
            residual = x - torch.bmm(gamma[:, None, :], D[:, : t + 1])[:, 0]
            # Correlations only choose the next atom and test the stop, so float32 does (its
            # relative rounding, 1e-7, is far below any λ step); least squares stay in float64.
            corr = residual.float() @ self._unit32.T
        if not found:
            empty = torch.zeros(0, dtype=torch.long, device=X.device)
            return empty, empty, X.new_zeros(0)
        return tuple(torch.cat(parts) for parts in zip(*found))


def _grown(buffer: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``buffer (R, ...)`` copied into zeros of shape ``(R, *shape)``."""
    out = buffer.new_zeros(buffer.shape[0], *shape)
    out[(slice(None),) + tuple(slice(0, k) for k in buffer.shape[1:])] = buffer
    return out

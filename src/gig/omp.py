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
from dataclasses import dataclass

import torch


class OMPEncoder:
    """OMP codes of rows against a fixed dictionary ``V (K, C)``, stopped at correlation ``λ``.

    ``encode(X (P, C)) → U (P, K)``: the codes of the original atoms (``U V`` is the least-squares
    fit of each row on its support). Fitted state: ``unit_ (K, C)`` (the atoms at unit norm),
    ``atom_norms_ (K,)``, ``gram_ (K, K)`` (the unit atoms' Gram matrix, float64), ``solver_``
    ("omp"). Up to ``chunk`` rows are coded at a time, fewer where a row's worst case (a support
    of ``max_atoms = min(K, C)`` atoms: its inverse Cholesky factor, support and coordinates,
    ``8 · max_atoms · (max_atoms + 2)`` bytes, and its correlations with every atom, ``4 K``)
    times the rows would pass ``max_bytes``.
    """

    solver_ = "omp"

    def __init__(
        self,
        dictionary: torch.Tensor,
        alpha: float,
        chunk: int = 1024,
        device: str | torch.device | None = None,
        max_atoms: int | None = None,
        max_bytes: int = 1 << 30,
    ):
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
        worst_row = 8 * self.max_atoms * (self.max_atoms + 2) + 4 * self.V.shape[0]
        self.rows_per_chunk = max(1, min(int(chunk), max_bytes // worst_row))

    def with_alpha(self, alpha: float) -> "OMPEncoder":
        """The same encoder at another λ, sharing the unit atoms and their Gram matrix."""
        if not float(alpha) >= 0:
            raise ValueError(f"alpha must be a number ≥ 0, not {alpha!r}")
        other = copy.copy(self)
        other.alpha = float(alpha)
        return other

    def encode(self, X: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``U (P, K)`` (float32) of ``X (P, C)``.

        ``init (P, K)``: codes of the same rows by OMP on this dictionary at a λ **at least** this
        encoder's (a sparser point of a λ walk, such as the front's). The greedy path does not
        depend on λ, only where it stops does, so the pursuit resumes from their supports and
        gives exactly the codes it would from scratch, without repeating the steps to get there.
        Codes at a smaller λ (a denser point) would already satisfy the stop and come back as
        they are: pass only sparser ones."""
        X = X.to(self.V.device)
        U = torch.zeros(X.shape[0], self.V.shape[0], dtype=torch.float32, device=self.V.device)
        for s in range(0, X.shape[0], self.rows_per_chunk):
            start = None if init is None else init[s : s + self.rows_per_chunk].to(self.V.device) != 0
            rows, cols, coef = self._pursue(X[s : s + self.rows_per_chunk].double(), start)
            U[rows + s, cols] = (coef / self.atom_norms_.double()[cols]).float()
        return U

    def _resumed_supports(self, start: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The supports of ``start (P, K)`` (bool) to resume from, by size:
        ``{t: (row indices (n,), supports S (n, t), inverse Cholesky factors L⁻¹ of G_SS (n, t, t))}``.
        A support OMP cannot have reached here (more than ``max_atoms`` atoms, or linearly
        dependent ones) is left out: that row starts afresh."""
        sizes = start.sum(1)
        groups = {}
        for t in sizes[(sizes > 0) & (sizes <= self.max_atoms)].unique().tolist():
            idx = torch.nonzero(sizes == t).flatten()
            S = torch.nonzero(start[idx])[:, 1].reshape(-1, t)  # row-major: each row's t atoms
            L, info = torch.linalg.cholesky_ex(self.gram_[S[:, :, None], S[:, None, :]])
            ok = info == 0
            if bool(ok.any()):
                eye = torch.eye(t, dtype=L.dtype, device=L.device).expand(int(ok.sum()), t, t)
                groups[t] = (idx[ok], S[ok], torch.linalg.solve_triangular(L[ok], eye, upper=False))
        return groups

    def _pursue(
        self,
        X: torch.Tensor,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """OMP of the rows of ``X (P, C)`` on the unit atoms, resuming rows from the supports in
        ``start (P, K)`` (bool) where given; returns the non-zeros as ``(row, atom, coefficient)``
        triples.

        Per row: its support ``S`` (``count`` atoms), the inverse ``M = L⁻¹`` of the lower
        Cholesky factor of ``G_SS`` and the row's coordinates ``z = M b_S`` in the support's
        orthonormalised basis, zero-padded in ``(R, m)``, ``(R, m, m)`` and ``(R, m)`` buffers that
        grow by half when full. Adding atom ``q`` appends a row to ``M`` (``w = M G_Sq``,
        ``d = √(1 − ‖w‖²)``: ``[−wᵀM/d, 1/d]``) and to ``z``; the least-squares coefficients are
        ``γ = Mᵀ z``: batched products only, no triangular solve, and rows of different support
        sizes (resumed ones) step together. A row that stops is recorded and rides along (its later
        values are ignored) until a tenth of the pack has stopped, when the pack is compacted. Per
        step and row: the residual ``x − Σ_j γ_j u_{S_j}`` (an ``embedding_bag`` over the unit
        atoms: no ``(R, t, C)`` copy of the support's atoms) and its correlations with every atom
        (``C·K``, float32); the rest is ``O(m²)`` in float64.
        """
        pack, corr = self._packed(X, start)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        while True:
            m = int(pack.count[pack.live].max()) + 1  # working width: the longest live support and a new atom
            q, w, d2, stop = self._next_atoms(pack, corr, m)
            if bool(stop.any()):
                found.append(pack.stopped_codes(stop, m))
            pack.live &= ~stop
            n_live = int(pack.live.sum())
            if not n_live:
                break
            if n_live <= 0.9 * pack.live.numel():
                q, w, d2 = pack.compact(q, w, d2)
            corr = self._add_atoms(pack, q, w, d2)
        if not found:
            empty = torch.zeros(0, dtype=torch.long, device=X.device)
            return empty, empty, X.new_zeros(0)
        return tuple(torch.cat(parts) for parts in zip(*found))

    def _packed(self, X: torch.Tensor, start: torch.Tensor | None) -> tuple[_Pack, torch.Tensor]:
        """The pack of every row of ``X (P, C)`` (float64) before its first step, with the
        supports of ``start (P, K)`` (bool, where given) resumed, and the correlations
        ``(P, K)`` (float32) of each row's residual with every unit atom."""
        unit = self.unit_
        n = X.shape[0]
        groups = {} if start is None else self._resumed_supports(start)
        cap = _capacity(min(16, self.max_atoms), max(groups, default=0) + 1, self.max_atoms)
        count = torch.zeros(n, dtype=torch.long, device=X.device)  # atoms on each row's support
        S = torch.zeros(n, cap, dtype=torch.long, device=X.device)
        M = X.new_zeros(n, cap, cap)
        Z = X.new_zeros(n, cap)
        for t, (idx, S_t, M_t) in groups.items():
            S[idx, :t], M[idx, :t, :t], count[idx] = S_t, M_t, t
            b_S = (X[idx][:, None, :] * unit[S_t]).sum(-1)  # (n, t) correlations with the support
            Z[idx, :t] = torch.bmm(M_t, b_S[:, :, None])[:, :, 0]
        gamma = torch.bmm(Z[:, None, :], M)[:, 0]  # γ = Mᵀ z
        x, rows = X, torch.arange(n, device=X.device)  # each packed row's row in X
        corr = (x - _combination(unit, S, gamma) if groups else x).float() @ self._unit32.T
        live = torch.ones(n, dtype=torch.bool, device=X.device)
        # Numerical floor for "no atom correlates by more than λ": the correlations of an exact
        # fit are rounding noise of the size of ‖x‖·1e-10, not zero.
        threshold = (1e-10 * x.norm(dim=1)).clamp_min(self.alpha)
        return _Pack(rows, live, x, count, S, M, Z, gamma, threshold, cap), corr

    def _next_atoms(
        self, pack: _Pack, corr: torch.Tensor, m: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each packed row's best next atom and whether the row stops, from ``corr (R, K)`` (its
        residual's correlations with every unit atom; taken in place by ``abs_``) at working width
        ``m``: ``(q (R,), w (R, m), d2 (R,), stop (R,) bool)``, with ``w = L⁻¹ G_Sq`` and ``d2 =
        1 − ‖w‖²`` the new atom against the support. Only live rows stop."""
        best, q = corr.abs_().max(1)  # in place: only the choice and the stop read it
        stop = pack.live & ((best.double() <= pack.threshold) | (pack.count >= self.max_atoms))
        # The new atom against the support: w = L⁻¹ G_Sq, d² = G_qq − ‖w‖² (= 1 − ‖w‖²); the
        # padding of M zeroes every padded entry of w.
        w = torch.bmm(pack.M[:, :m, :m], self.gram_[pack.S[:, :m], q[:, None]][:, :, None])[:, :, 0]
        d2 = 1.0 - (w * w).sum(1)
        stop |= pack.live & (d2 <= 1e-10)  # the atom lies in the support's span: nothing to gain
        return q, w, d2, stop

    def _add_atoms(self, pack: _Pack, q: torch.Tensor, w: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """Append atom ``q (R,)`` to every packed row's support (``w (R, m)``, ``d2 (R,)`` from
        :meth:`_next_atoms`), growing the buffers where full, and refit: the new row of ``M``
        (``[−wᵀM/d, 1/d]``) and of ``z``, then ``γ = Mᵀ z``. Returns the correlations ``(R, K)``
        (float32) of each row's new residual with every unit atom."""
        unit = self.unit_
        top = int(pack.count[pack.live].max())
        if top >= pack.cap:
            pack.cap = _capacity(pack.cap, top + 1, self.max_atoms)
            w = pack.grow(w)
        S, M, Z, count, x, cap = pack.S, pack.M, pack.Z, pack.count, pack.x, pack.cap
        m = top + 1
        d = d2.clamp_min(1e-10).sqrt()  # the floor only touches stopped rows
        at = torch.arange(count.numel(), device=x.device)
        pos = count.clamp_max(cap - 1)  # a stopped row riding along may be full: its values are ignored
        S[at, pos] = q
        M[at, pos, :m] = -torch.bmm(w[:, None, :m], M[:, :m, :m])[:, 0] / d[:, None]
        M[at, pos, pos] = 1.0 / d
        b_q = (x * unit[q]).sum(1)  # the row's correlation with the new atom, in float64
        Z[at, pos] = (b_q - (w[:, :m] * Z[:, :m]).sum(1)) / d
        pack.count = count + 1
        pack.gamma = torch.bmm(Z[:, None, :m], M[:, :m, :m])[:, 0]
        residual = x - _combination(unit, S[:, :m], pack.gamma)
        # Correlations only choose the next atom and test the stop, so float32 does (its
        # relative rounding, 1e-7, is far below any λ step); least squares stay in float64.
        return residual.float() @ self._unit32.T


@dataclass
class _Pack:
    """The rows :meth:`OMPEncoder._pursue` is coding, packed: ``R`` rows, ``cap`` the width of the
    support buffers. Stopped rows ride along (their later values are ignored) until
    :meth:`compact` drops them."""

    rows: torch.Tensor  # (R,) each packed row's row in X
    live: torch.Tensor  # (R,) bool: not stopped yet
    x: torch.Tensor  # (R, C) float64, the rows themselves
    count: torch.Tensor  # (R,) atoms on each row's support
    S: torch.Tensor  # (R, cap) the support's atoms, zero-padded
    M: torch.Tensor  # (R, cap, cap) float64 L⁻¹, the inverse Cholesky factor of G_SS, zero-padded
    Z: torch.Tensor  # (R, cap) float64 z = M b_S, the coordinates in the orthonormalised support
    gamma: torch.Tensor  # (R, ≤ cap) float64 least-squares coefficients γ = Mᵀ z
    threshold: torch.Tensor  # (R,) float64 the stop: no atom correlates by more than this
    cap: int

    def stopped_codes(self, stop: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The non-zeros of the rows in ``stop (R,)`` (bool) as ``(row, atom, coefficient)``
        triples, their supports held in the first ``m − 1`` columns."""
        held = torch.arange(m - 1, device=self.x.device) < self.count[stop][:, None]
        return (
            self.rows[stop][:, None].expand(-1, m - 1)[held],
            self.S[stop, : m - 1][held],
            self.gamma[stop, : m - 1][held],
        )

    def compact(self, *step: torch.Tensor) -> list[torch.Tensor]:
        """Drop the stopped rows from the pack and from the step's per-row tensors ``step``
        (each ``(R, ...)``); returns those, compacted."""
        keep = self.live  # the mask before it is compacted itself
        for name in ("rows", "live", "x", "S", "M", "Z", "count", "gamma", "threshold"):
            setattr(self, name, getattr(self, name)[keep])
        return [a[keep] for a in step]

    def grow(self, w: torch.Tensor) -> torch.Tensor:
        """Widen the support buffers to ``cap`` columns, and ``w (R, m)`` with them."""
        self.S, self.M, self.Z = (
            _grown(self.S, (self.cap,)),
            _grown(self.M, (self.cap, self.cap)),
            _grown(self.Z, (self.cap,)),
        )
        return _grown(w, (self.cap,))


def _capacity(cap: int, need: int, most: int) -> int:
    """Buffer width: ``cap`` grown by half (at least one) until it holds ``need``, at most ``most``."""
    while cap < need:
        cap = max(cap + 1, cap + cap // 2)
    return min(cap, most)


def _combination(atoms: torch.Tensor, support: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``Σ_j coef[r, j] · atoms[support[r, j]]`` per row: ``(R, C)`` for ``atoms (K, C)``,
    ``support`` and ``coef (R, t)``, without building the ``(R, t, C)`` gathered atoms."""
    if support.shape[1] == 0:
        return atoms.new_zeros(support.shape[0], atoms.shape[1])
    return torch.nn.functional.embedding_bag(support, atoms, per_sample_weights=coef.to(atoms.dtype), mode="sum")


def _grown(buffer: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``buffer (R, ...)`` copied into zeros of shape ``(R, *shape)``."""
    out = buffer.new_zeros(buffer.shape[0], *shape)
    out[(slice(None),) + tuple(slice(0, k) for k in buffer.shape[1:])] = buffer
    return out

"""The GIG method (gig.method): against closed forms and Captum, completeness on real layers, batching invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gig.hooks import ModelHandle
from gig.method import GIG, gig_maps, quadrature
from gig.models import wrap_module
from gig.readouts import ClassLogit, ClassProbability, ConceptReadout, concept_readout


class QuadraticHead(nn.Module):
    """``body`` (a fixed conv) then logits ``z_j = Σ_{p,c} A[j,c] · x[c,p]²``."""

    def __init__(self, channels: int = 5, classes: int = 3):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Conv2d(3, channels, 3, padding=1)
        self.A = nn.Parameter(torch.randn(classes, channels))

    def forward(self, x):
        h = self.body(x)
        return torch.einsum("jc,nchw->nj", self.A, h**2)


def test_quadrature_rules_integrate_polynomials():
    for rule, n, degree in (("gauss-legendre", 4, 7), ("riemann-midpoint", 64, 2), ("trapezoid", 64, 2)):
        a, w = quadrature(n, rule)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
        approx = float((w * a.double() ** degree).sum())
        assert approx == pytest.approx(1 / (degree + 1), rel=1e-3)


def test_gig_matches_closed_form_on_quadratic_network():
    """For z = Σ A_c x_c², IG at zero baseline is exact: GIG[q] = Σ_p U[p,q] Σ_c A_c X[p,c] V[q,c]."""
    model = QuadraticHead()
    handle = ModelHandle(wrap_module(model, "quad", input_size=8))
    x = torch.randn(2, 3, 8, 8)
    K, C, P = 7, 5, 64
    torch.manual_seed(2)
    V = torch.randn(K, C)
    U = torch.randn(2, P, K).relu()
    X = U @ V  # (N, P, C)
    target = torch.tensor([0, 2])
    res = GIG(handle, "body", V, n_steps=3, quadrature_rule="gauss-legendre").attribute(x, U, target)  # exact here
    A = model.A.detach()[target]  # (N, C)
    expected = torch.einsum("npq,npc,nc,qc->nq", U, X, A, V)
    torch.testing.assert_close(res.attributions[:, 0], expected, rtol=1e-4, atol=1e-4)
    # Completeness: Σ_q GIG = z(X̃) − z(0) exactly here.
    assert res.relative_residual.max() < 1e-4


def test_gig_on_linear_network_is_coefficient_times_weight():
    lin = nn.Sequential()
    lin.body = nn.Identity()
    lin.pool = nn.Flatten(1)
    lin.fc = nn.Linear(2 * 4 * 4, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 2, 1)
            self.fc = lin.fc

        def forward(self, x):
            return self.fc(self.body(x).flatten(1))

    net = Net()
    handle = ModelHandle(wrap_module(net, "lin", input_size=4))
    V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    U = torch.rand(1, 16, 3)
    res = GIG(handle, "body", V, n_steps=1).attribute(torch.randn(1, 3, 4, 4), U, torch.tensor([1]))
    W = net.fc.weight.detach()[1].view(2, 16).T  # (P, C): weight of channel c at position p
    expected = torch.einsum("pq,pc,qc->q", U[0], W, V)
    torch.testing.assert_close(res.attributions[0, 0], expected, rtol=1e-5, atol=1e-5)


def test_batching_does_not_change_results(lite0_handle):
    handle = lite0_handle
    x = torch.randn(2, 3, 224, 224)
    _, grids = handle.capture(x, ["_blocks.11"])
    codes = grids["_blocks.11"].flatten(2).transpose(1, 2)  # channel basis
    V = torch.eye(codes.shape[2])
    gig = GIG(handle, "_blocks.11", V, n_steps=4)
    targets = torch.tensor([[1, 2], [3, 4]])
    Vb = torch.randn(6, 192)
    a = gig.attribute(x, codes, targets, read_layer="_blocks.13", read_vectors=Vb, internal_batch_size=3)
    b = gig.attribute(x, codes, targets, read_layer="_blocks.13", read_vectors=Vb, internal_batch_size=64)
    torch.testing.assert_close(a.attributions, b.attributions, rtol=1e-4, atol=1e-5)
    # Output difference equals the readout at the full reconstruction minus at zero.
    with torch.no_grad():
        full = handle.run_from(x, "_blocks.11", grids["_blocks.11"], read="_blocks.13")
        zero = handle.run_from(x, "_blocks.11", torch.zeros_like(grids["_blocks.11"]), read="_blocks.13")
    for n in range(2):
        for t in range(2):
            v = Vb[targets[n, t]][None]
            diff = concept_readout(full[n : n + 1], v) - concept_readout(zero[n : n + 1], v)
            assert float(a.output_diff[n, t]) == pytest.approx(float(diff), rel=1e-4, abs=1e-5)


def test_completeness_on_real_layers(lite0, lite0_handle):
    """Concept → class GIG on ImageNet weights: Σ GIG ≈ logit(X̃) − logit(0) with 32 steps."""
    from gig.images import EmbeddedSource

    source = EmbeddedSource()
    names = [r for r in source.records if r.label is not None][:2]
    x = torch.stack([lite0.preprocess(source.load(r)) for r in names])
    logits, grids = lite0_handle.capture(x, ["_blocks.11"])
    codes = grids["_blocks.11"].flatten(2).transpose(1, 2)
    gig = GIG(lite0_handle, "_blocks.11", torch.eye(codes.shape[2]), n_steps=32)
    res = gig.attribute(x, codes, logits.argmax(1), return_gradients=True)
    assert float(res.relative_residual.max()) < 0.05
    # The spatial maps sum back to the attributions of the chosen concepts.
    chosen = res.attributions[:, 0].topk(3).indices
    maps = gig_maps(codes, res.integrated_gradients, torch.eye(codes.shape[2]), chosen)
    torch.testing.assert_close(maps.sum(-1)[:, 0], res.attributions[:, 0].gather(1, chosen), rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    handle = ModelHandle(wrap_module(QuadraticHead(), "quad", input_size=8))
    gig = GIG(handle, "body", torch.randn(4, 5))
    with pytest.raises(ValueError, match="do not fit"):
        gig.attribute(torch.randn(1, 3, 8, 8), torch.randn(1, 64, 3), torch.tensor([0]))
    with pytest.raises(ValueError):
        quadrature(4, "simpson")
    assert np.isfinite(quadrature(8)[0].numpy()).all()


# ---------------------------------------------------------------------------- error control
class KinkedHead(nn.Module):
    """``body`` (a fixed conv, the analysed layer) then ``z_j = Σ_{c,p} W[j,c,p] relu(h[c,p] − B[c,p])``.

    Along ``α ↦ α·h`` the gradient w.r.t. ``h[c,p]`` is the step ``W[j,c,p] · 1[α h > B]``: the
    integrand jumps at ``α = B / h``, as a ReLU network's does, and its integral is known."""

    def __init__(self, thresholds: torch.Tensor, classes: int = 3, channels: int = 4, side: int = 6):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Conv2d(3, channels, 3, padding=1)
        self.W = nn.Parameter(torch.randn(classes, channels, side, side))
        self.register_buffer("B", thresholds)

    def forward(self, x):
        return torch.einsum("jchw,nchw->nj", self.W, (self.body(x) - self.B).relu())


def _kinked_case(n_images=3):
    """Model, inputs, codes, dictionary, and thresholds putting kinks at chosen α of each image's path."""
    torch.manual_seed(4)
    K, C, side = 6, 4, 6
    V = torch.randn(K, C)
    U = torch.rand(n_images, side * side, K) * (torch.rand(n_images, side * side, K) < 0.5)
    X = (U @ V).transpose(1, 2).reshape(n_images, C, side, side)  # the reconstructions
    kinks = torch.rand(C, side, side) * 0.8 + 0.1  # α* in (0.1, 0.9), per position
    B = kinks * X[0]  # the first image's path crosses each threshold at its α*
    model = KinkedHead(B, channels=C, side=side)
    return model, torch.randn(n_images, 3, side, side), U, V, X


def _kinked_closed_form(model, U, V, X, target):
    """``Ḡ[c,p] = W · |{α ∈ [0, 1]: α X > B}|`` in closed form, then GIG."""
    B = model.B
    with torch.no_grad():
        ratio = B / torch.where(X == 0, torch.full_like(X, 1e-30), X)
        length = torch.where(X > 0, (1 - ratio).clamp(0, 1), torch.where(B < 0, ratio.clamp(0, 1), torch.zeros_like(X)))
        length = torch.where((X == 0), (B < 0).float(), length)
        W = model.W.detach()[target]  # (N, T, C, H, W)
        g_bar = W * length[:, None]
    return torch.einsum("npk,ntcp,kc->ntk", U, g_bar.flatten(3), V)


def test_error_control_meets_tolerance_on_kinked_network():
    """Discontinuous integrand with known integral: every attribution within its tolerance, the
    estimate honest (at least half the true error), completeness within half the tolerance."""
    model, x, U, V, X = _kinked_case()
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    target = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    expected = _kinked_closed_form(model, U, V, X, target)
    for tol in (0.05, 0.01, 0.002):
        res = GIG(handle, "body", V, tol=tol, max_steps=8192, internal_batch_size=256).attribute(x, U, target)
        true = (res.attributions - expected).norm(dim=-1) / expected.norm(dim=-1)
        assert float(true.max()) <= tol, (tol, true)
        assert bool((res.error_estimate <= tol).all())
        assert bool((res.error_estimate >= 0.5 * true).all()), (res.error_estimate, true)
        # converged = both criteria met; completeness then holds to half the tolerance
        done = res.converged
        assert float(done.float().mean()) >= 0.75, res.n_evaluations
        assert float(res.relative_residual[done].max()) <= tol / 2 + 1e-6
        assert int(res.n_evaluations.min()) >= 17  # at least the first nested pair, 8 and 16 intervals
    # Tighter tolerances cost more evaluations: error control at work, not a fixed grid.
    loose = GIG(handle, "body", V, tol=0.05, max_steps=4096).attribute(x, U, target).n_evaluations
    tight = GIG(handle, "body", V, tol=0.002, max_steps=4096).attribute(x, U, target).n_evaluations
    assert int(tight.sum()) > int(loose.sum())


def test_cap_is_recorded_as_unconverged():
    model, x, U, V, X = _kinked_case(1)
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    res = GIG(handle, "body", V, tol=1e-5, max_steps=32).attribute(x, U, torch.tensor([[0, 1]]))
    assert res.n_evaluations.tolist() == [[33, 33]]
    assert not bool(res.converged.any()) and bool((res.error_estimate > 1e-5).all())


class SmoothTwoStage(nn.Module):
    """``body`` → ``mid`` (conv, softplus, pooled to one position) → linear head: smooth along
    the path (one position, so the concept readout's max over positions is smooth too)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Conv2d(3, 5, 3, padding=1)
        self.mid = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.Softplus(beta=3.0), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.body(x)))).flatten(1))


def test_error_control_on_smooth_network_against_fine_reference():
    model = SmoothTwoStage()
    handle = ModelHandle(wrap_module(model, "smooth", input_size=8))
    torch.manual_seed(6)
    x = torch.randn(2, 3, 8, 8)
    K = 7
    V = torch.randn(K, 5)
    U = torch.randn(2, 64, K) * 2
    Vb = torch.randn(9, 6)
    cases = [
        ({}, torch.tensor([[0, 3], [1, 2]])),
        ({"read_layer": "mid", "read_vectors": Vb}, torch.tensor([[0, 4, 8], [1, 2, 3]])),
        ({"readout": ClassProbability()}, torch.tensor([[1], [2]])),
    ]
    for read, target in cases:
        ref = GIG(handle, "body", V, n_steps=4096).attribute(x, U, target, **read)
        res = GIG(handle, "body", V, tol=0.005).attribute(x, U, target, **read)
        true = (res.attributions - ref.attributions).norm(dim=-1) / ref.attributions.norm(dim=-1)
        assert float(true.max()) <= 0.005, (read, true)
        assert bool(res.converged.all()) and int(res.n_evaluations.max()) < 513
        assert bool((res.error_estimate >= 0.5 * true).all())
        torch.testing.assert_close(res.output_diff, ref.output_diff)


def test_results_do_not_depend_on_batching_or_target_grouping():
    """Batch sizes, the other images of a batch and the other targets of an image change nothing:
    every (image, target) path refines its own cells."""
    model, x, U, V, X = _kinked_case()
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    target = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    expected = _kinked_closed_form(model, U, V, X, target)
    tol = 0.003
    gig = GIG(handle, "body", V, tol=tol, max_steps=1024)
    whole = gig.attribute(x, U, target, internal_batch_size=512)
    small = gig.attribute(x, U, target, internal_batch_size=5)
    torch.testing.assert_close(small.attributions, whole.attributions, rtol=1e-5, atol=1e-6)
    assert torch.equal(small.n_evaluations, whole.n_evaluations)
    one = gig.attribute(x[1:2], U[1:2], target[1:2], internal_batch_size=3)  # an image alone
    torch.testing.assert_close(one.attributions[0], whole.attributions[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(one.n_evaluations[0], whole.n_evaluations[1])
    for t in range(3):  # each target alone: the same numbers, and within the tolerance of the closed form
        alone = gig.attribute(x, U, target[:, t], internal_batch_size=7)
        torch.testing.assert_close(alone.attributions[:, 0], whole.attributions[:, t], rtol=1e-5, atol=1e-6)
        assert torch.equal(alone.n_evaluations[:, 0], whole.n_evaluations[:, t])
        err = (alone.attributions[:, 0] - expected[:, t]).norm(dim=-1) / expected[:, t].norm(dim=-1)
        assert float(err.max()) <= tol, (t, err)


def test_error_control_gradients_give_back_the_attributions():
    """With error control, the kept integrated gradients (each path's nodes weighted by its own
    rule) projected on the concepts are the attributions, and the maps sum back to them."""
    from gig.method import project

    model, x, U, V, X = _kinked_case()
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    target = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    res = GIG(handle, "body", V, tol=0.003, max_steps=1024, internal_batch_size=8).attribute(
        x, U, target, return_gradients=True
    )
    assert int(res.n_evaluations.max()) > int(res.n_evaluations.min())  # paths refined differently
    g_bar = res.integrated_gradients.transpose(2, 3).reshape(3, 3, V.shape[1], 6, 6)
    torch.testing.assert_close(project(U, g_bar, V), res.attributions, rtol=1e-4, atol=1e-5)
    chosen = res.attributions[:, 0].topk(3).indices
    maps = gig_maps(U, res.integrated_gradients, V, chosen)
    torch.testing.assert_close(maps.sum(-1)[:, 0], res.attributions[:, 0].gather(1, chosen), rtol=1e-4, atol=1e-5)


def test_host_syncs_per_round_do_not_grow_with_images(monkeypatch):
    """The refinement state is stepped as tensors: one image and the same image eight times take
    the same rounds and exactly the same number of host synchronisations."""
    model, x, U, V, X = _kinked_case(1)
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    gig = GIG(handle, "body", V, tol=0.003, max_steps=1024, internal_batch_size=4096)
    syncs = {"n": 0}
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            syncs["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for copies in (1, 8):
        gig.attribute(x[:1], U[:1], torch.tensor([[0, 1, 2]]))  # warm: the run_from checks
        syncs["n"] = 0
        res = gig.attribute(
            x[:1].repeat(copies, 1, 1, 1), U[:1].repeat(copies, 1, 1), torch.tensor([[0, 1, 2]] * copies)
        )
        counts.append(syncs["n"])
        assert int(res.n_evaluations.max()) > 17  # several rounds of refinement
    assert counts[0] == counts[1], counts


def test_fixed_trapezoid_has_a_nested_error_estimate():
    model, x, U, V, X = _kinked_case(2)
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    target = torch.tensor([[0], [1]])
    expected = _kinked_closed_form(model, U, V, X, target)
    res = GIG(handle, "body", V, n_steps=64, quadrature_rule="trapezoid").attribute(x, U, target)
    assert res.n_evaluations.tolist() == [[65], [65]] and res.tol is None
    true = (res.attributions - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert bool((res.error_estimate >= 0.5 * true).all())
    mid = GIG(handle, "body", V, n_steps=64).attribute(x, U, target)  # midpoint: no estimate
    assert bool(mid.error_estimate.isnan().all())
    with pytest.raises(ValueError, match="even"):
        GIG(handle, "body", V, n_steps=63, quadrature_rule="trapezoid").attribute(x, U, target)


def test_readouts_match_their_formulas():
    torch.manual_seed(7)
    logits = torch.randn(4, 10)
    index = torch.tensor([[1, 2], [0, 9], [3, 3], [5, 4]])
    torch.testing.assert_close(ClassLogit().values(logits, index), logits.gather(1, index))
    torch.testing.assert_close(
        ClassProbability().values(logits, index), torch.nn.functional.softmax(logits, 1).gather(1, index)
    )
    grid = torch.randn(4, 3, 5, 5)
    vectors = torch.randn(6, 3)
    got = ConceptReadout("x", vectors).values(grid, index % 6)
    for m in range(4):
        for t in range(2):
            v = vectors[int(index[m, t]) % 6]
            want = max(float(grid[m, :, i, j] @ v) for i in range(5) for j in range(5)) / float(v.norm())
            assert float(got[m, t]) == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(
        concept_readout(grid, vectors[:4]), ConceptReadout("x", vectors).all(grid).diagonal()[:4]
    )


def test_progress_reports_every_round_and_adds_up():
    """The attribute stage's bar moves as attributions finish, not once per batch."""
    model, x, U, V, X = _kinked_case()
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    shares: list[float] = []
    res = GIG(handle, "body", V, tol=0.003, max_steps=1024).attribute(
        x, U, torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]]), progress=shares.append
    )
    assert int(res.n_evaluations.max()) > 17  # refined beyond the start grid
    assert len(shares) > 2 and all(s >= 0 for s in shares)
    assert sum(shares) == pytest.approx(1.0)
    fixed: list[float] = []
    GIG(handle, "body", V, n_steps=8).attribute(x, U, torch.tensor([0, 1, 2]), progress=fixed.append)
    assert sum(fixed) == pytest.approx(1.0)


def test_directions_ride_along_without_changing_the_concepts():
    """Directions attributed along the concepts' paths: the concepts' grids and numbers are the
    same with and without them; each direction's attribution matches its closed form ``Σ_p ⟨X_p, r̂⟩ ⟨Ḡ_p, r̂⟩``;
    over an orthonormal basis of the channels they add up to the concepts' total (completeness)."""
    from gig.method import random_directions

    model, x, U, V, X = _kinked_case()
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    target = torch.tensor([[0, 1], [2, 0], [1, 2]])
    gig = GIG(handle, "body", V, tol=0.002, max_steps=8192, internal_batch_size=256)
    plain = gig.attribute(x, U, target)
    dirs = random_directions([5, 6, 7], "body", 4, V.shape[1])
    assert torch.equal(dirs, random_directions([5, 6, 7], "body", 4, V.shape[1]))  # seeded per image
    assert not torch.equal(dirs[0], random_directions([6], "body", 4, V.shape[1])[0])
    res = gig.attribute(x, U, target, directions=dirs)
    # the same grids, so the same numbers up to the order of float sums
    torch.testing.assert_close(res.n_evaluations, plain.n_evaluations, rtol=0, atol=0)
    torch.testing.assert_close(res.attributions, plain.attributions, rtol=1e-6, atol=1e-6)
    # closed form: the kinked network's integrated gradient is known exactly
    B, W = model.B, model.W.detach()[target]
    ratio = B / torch.where(X == 0, torch.full_like(X, 1e-30), X)
    length = torch.where(X > 0, (1 - ratio).clamp(0, 1), torch.where(B < 0, ratio.clamp(0, 1), torch.zeros_like(X)))
    g_bar = (W * length[:, None]).flatten(3)  # (N, T, C, P)
    unit = torch.nn.functional.normalize(dirs, dim=-1)
    flat = X.flatten(2).transpose(1, 2)  # (N, P, C)
    expected = torch.einsum("npm,ntcp,nmc->ntm", flat @ unit.transpose(1, 2), g_bar, unit)
    scale = expected.abs().amax(-1, keepdim=True)
    assert float(((res.direction_attributions - expected).abs() / scale).max()) < 0.02
    # an orthonormal basis of the channels (Q from a QR) accounts for the whole change
    basis = torch.linalg.qr(torch.randn(V.shape[1], V.shape[1]))[0].T.expand(3, -1, -1)
    full = gig.attribute(x, U, target, directions=basis.contiguous())
    torch.testing.assert_close(full.direction_attributions.sum(-1), full.attributions.sum(-1), rtol=1e-4, atol=1e-5)
    fixed = GIG(handle, "body", V, n_steps=64, quadrature_rule="trapezoid").attribute(
        x, U, target, directions=basis.contiguous()
    )
    torch.testing.assert_close(fixed.direction_attributions.sum(-1), fixed.attributions.sum(-1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="directions"):
        gig.attribute(x, U, target, directions=torch.randn(3, 2, V.shape[1] + 1))


def test_gig_from_a_decoder_bias_matches_closed_form_and_captum():
    """A basis with a decoder bias ``b``: paths run from the zero-code reconstruction ``b``.
    Closed form on the quadratic network (``GIG[q] = Σ_p U[p,q] Σ_c A_c (2 b_c + X_pc) V_qc``),
    completeness against ``z(b + UV) − z(b)``, and Captum's integrated gradients on the codes of a
    ReLU head written out by hand (an independent implementation of the same integral)."""
    from captum.attr import IntegratedGradients

    model = QuadraticHead()
    handle = ModelHandle(wrap_module(model, "quad", input_size=8))
    x = torch.randn(2, 3, 8, 8)
    K, C, P = 7, 5, 64
    torch.manual_seed(2)
    V, b = torch.randn(K, C), torch.randn(C)
    U = torch.randn(2, P, K).relu()
    X = U @ V  # (N, P, C)
    target = torch.tensor([0, 2])
    res = GIG(handle, "body", V, n_steps=3, quadrature_rule="gauss-legendre", bias=b).attribute(x, U, target)
    A = model.A.detach()[target]  # (N, C)
    expected = torch.einsum("npq,npc,nc,qc->nq", U, 2 * b + X, A, V)
    torch.testing.assert_close(res.attributions[:, 0], expected, rtol=1e-4, atol=1e-4)
    z = lambda h: torch.einsum("nc,npc->n", A, h**2)  # noqa: E731  (the head on (N, P, C))
    torch.testing.assert_close(res.output_diff[:, 0], z(b + X) - z(b.expand_as(X)), rtol=1e-4, atol=1e-4)
    assert res.relative_residual.max() < 1e-4
    with pytest.raises(Exception, match="decoder bias"):
        GIG(handle, "body", V, bias=torch.zeros(C + 1))

    # A ReLU head: conv, ReLU, mean, linear; Captum integrates over the codes directly.
    torch.manual_seed(5)
    net = nn.Sequential()
    net.body = nn.Conv2d(3, C, 3, padding=1)
    net.conv = nn.Conv2d(C, 6, 3, padding=1)
    net.act = nn.ReLU()
    net.pool = nn.AdaptiveAvgPool2d(1)
    net.flat = nn.Flatten(1)
    net.fc = nn.Linear(6, 3)
    net.eval()
    handle = ModelHandle(wrap_module(net, "relu-head", input_size=8))
    gig = GIG(handle, "body", V, tol=0.002, max_steps=8192, bias=b).attribute(x, U, target)

    def head_from_codes(codes: torch.Tensor) -> torch.Tensor:  # (N, P, K) -> logits (N, 3)
        h = (codes @ V + b).transpose(1, 2).reshape(codes.shape[0], C, 8, 8)
        return net.fc(net.flat(net.pool(net.act(net.conv(h)))))

    reference = IntegratedGradients(head_from_codes).attribute(
        U, baselines=torch.zeros_like(U), target=target, n_steps=4000, method="riemann_trapezoid"
    )  # (N, P, K): per position and concept
    want = reference.sum(1)
    error = (gig.attributions[:, 0] - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(error.max()) < 0.01, error
    with torch.no_grad():
        delta = head_from_codes(U).gather(1, target[:, None]) - head_from_codes(torch.zeros_like(U)).gather(
            1, target[:, None]
        )
    torch.testing.assert_close(gig.output_diff, delta, rtol=1e-4, atol=1e-5)


def test_one_vmapped_backward_for_all_targets_meets_the_closed_form(monkeypatch):
    """``gig.method.BATCHED_TARGETS`` (one ``is_grads_batched`` backward for a chunk's targets,
    off by default): three targets per image on the kinked network, each attribution within its
    tolerance of the closed form."""
    import gig.method as method

    monkeypatch.setattr(method, "BATCHED_TARGETS", True)
    calls = []
    real = method._target_gradients
    monkeypatch.setattr(method, "_target_gradients", lambda *a: calls.append(1) or real(*a))
    model, x, U, V, X = _kinked_case()
    handle = ModelHandle(wrap_module(model, "kinked", input_size=6))
    target = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    expected = _kinked_closed_form(model, U, V, X, target)
    res = GIG(handle, "body", V, tol=0.01, max_steps=8192, internal_batch_size=256).attribute(x, U, target)
    true = (res.attributions - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert calls and float(true.max()) <= 0.01

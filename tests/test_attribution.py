"""GIG against closed forms, completeness on real layers, batching invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gig.attribution import GIG, concept_readout, gig_maps, quadrature
from gig.hooks import ModelHandle
from gig.models import wrap_module


class QuadraticHead(nn.Module):
    """``body`` (a fixed conv) then logits ``z_j = Σ_{p,c} A[j,c] · x[c,p]²``."""

    def __init__(self, channels: int = 5, classes: int = 3):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Conv2d(3, channels, 3, padding=1)
        self.A = nn.Parameter(torch.randn(classes, channels))

    def forward(self, x):
        h = self.body(x)
        return torch.einsum("jc,nchw->nj", self.A, h ** 2)


def test_quadrature_rules_integrate_polynomials():
    for rule, n, degree in (("gauss-legendre", 4, 7), ("riemann-midpoint", 64, 2)):
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
    res = GIG(handle, "body", V, n_steps=3).attribute(x, U, target)  # 3 GL nodes: exact for this degree
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

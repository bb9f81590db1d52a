"""ERF maps of PFVs (gig.erf): against the closed form of a one-convolution network, and one
forward per image with a backward per PFV against a fresh forward and backward per PFV."""

from __future__ import annotations

import torch
from torch import nn

from gig.erf import _erf_maps_batched, erf_box, erf_maps
from gig.hooks import ModelHandle
from gig.models import wrap_module


class OneConv(nn.Module):
    """``conv`` (5 channels, 3×3 kernel, no padding) then a pooled linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def _closed_form(model: OneConv, pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The ERF of the PFV at ``(h, w)`` of ``model.conv`` on one image ``pixels (3, S, S)``:
    the input gradient of ``⟨y_p, u⟩`` is ``Σ_o u_o W[o]`` on the 3×3 window at ``(h, w)``."""
    with torch.no_grad():
        y = model.conv(pixels[None])[0, :, h, w]
        u = y / y.norm()
        kernel = (u[:, None, None, None] * model.conv.weight).sum(0)  # (3, 3, 3)
    out = torch.zeros(pixels.shape[-2:])
    out[h : h + 3, w : w + 3] = kernel.abs().sum(0)
    return out


def test_erf_maps_equal_the_closed_form_of_one_convolution():
    model = OneConv()
    handle = ModelHandle(wrap_module(model, input_size=12, class_names=["a", "b"]))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 12, 12, generator=g)
    positions = torch.tensor([[0, 0], [4, 7], [9, 9], [2, 5], [4, 7]])
    image_index = torch.tensor([2, 0, 0, 1, 2])  # several PFVs of one image, in any order
    maps = erf_maps(handle, pixels, "conv", positions, image_index=image_index)
    batched = _erf_maps_batched(handle, pixels[image_index], "conv", positions, batch_size=2)
    for row, ((h, w), image) in enumerate(zip(positions.tolist(), image_index.tolist())):
        want = _closed_form(model, pixels[image], h, w)
        torch.testing.assert_close(maps[row], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched[row], want, rtol=1e-5, atol=1e-6)


def test_one_forward_per_image_equals_a_fresh_pass_per_pfv(tiny_bundle):
    """A ReLU network: each PFV's map from the shared forward equals the map of its own fresh
    forward and backward (written out here with ``torch.autograd.grad``), and its ERF box too."""
    handle = ModelHandle(tiny_bundle)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    positions = torch.tensor([[0, 0], [3, 2], [1, 3], [2, 2]])
    image_index = torch.tensor([1, 0, 1, 1])
    maps = erf_maps(handle, pixels, "block1", positions, image_index=image_index)
    for row, ((h, w), image) in enumerate(zip(positions.tolist(), image_index.tolist())):
        x = pixels[image : image + 1].clone().requires_grad_(True)
        pfv = tiny_bundle.model.block1(tiny_bundle.model.stem(x))[0, :, h, w]
        (grad,) = torch.autograd.grad((pfv * (pfv / pfv.norm()).detach()).sum(), x)
        want = grad[0].abs().sum(0)
        torch.testing.assert_close(maps[row], want, rtol=1e-5, atol=1e-7)
        assert erf_box(maps[row].numpy()) == erf_box(want.numpy())


def test_several_layers_of_one_image_take_one_forward_and_give_each_layers_maps():
    """:func:`gig.erf.image_erf_maps` runs the image forward once for PFVs of three layers and
    gives, bit for bit, the maps of one :func:`erf_maps` call per layer, although an in-place
    ReLU sits right above the first layer (its grid is the layer's output, not the ReLU's)."""
    from gig.erf import image_erf_maps

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(9)
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.act = nn.ReLU(inplace=True)
            self.b = nn.Conv2d(6, 6, 3, stride=2, padding=1)
            self.c = nn.Sequential(nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.c(self.b(self.act(self.a(x)))).mean((2, 3)))

    model = InPlace()
    handle = ModelHandle(wrap_module(model, input_size=16, class_names=["a", "b"]))
    pixels = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    positions = {
        "a": torch.tensor([[0, 0], [7, 9], [15, 3]]),
        "c": torch.tensor([[0, 3], [2, 1]]),
        "b": torch.tensor([[4, 4]]),
    }
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        both = image_erf_maps(handle, pixels, positions)
    finally:
        hook.remove()
    assert calls == []  # stopped after the last layer: the model's own forward never returned
    forwards = []
    hook = model.a.register_forward_hook(lambda *_: forwards.append(1))
    try:
        image_erf_maps(handle, pixels, positions)
    finally:
        hook.remove()
    assert len(forwards) == 1
    for layer, pos in positions.items():
        alone = erf_maps(handle, pixels[None], layer, pos, image_index=torch.zeros(len(pos), dtype=torch.long))
        assert torch.equal(both[layer], alone), layer
    assert float(both["a"].sum()) > 0


def test_erf_box_is_the_smallest_peak_centred_box_holding_the_mass():
    """Against the definition: grow a box around the peak one pixel at a time until it holds
    ``mass`` of the map (an ERF at an edge, one in the middle, a flat one)."""
    import numpy as np

    def grown(erf, mass):
        cy, cx = np.unravel_index(int(np.argmax(erf)), erf.shape)
        for radius in range(1, max(erf.shape) + 1):
            t, b = max(0, cy - radius), min(erf.shape[0], cy + radius + 1)
            l, r = max(0, cx - radius), min(erf.shape[1], cx + radius + 1)
            if erf[t:b, l:r].sum() >= mass * erf.sum():
                return l, t, r, b
        return 0, 0, erf.shape[1], erf.shape[0]

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :30]
    maps = [np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2)) for cy, cx, s in ((3, 27, 4), (20, 15, 9))]
    maps += [np.ones((40, 30)), rng.random((40, 30)) ** 8]
    for erf in maps:
        for mass in (0.5, 0.9, 0.99):
            assert erf_box(erf, mass) == grown(erf, mass)


def test_erf_crop_dims_the_context_of_the_box():
    """The crop equals the whole image dimmed outside the ERF box, then cut and resized."""
    import numpy as np
    from PIL import Image

    from gig.erf import erf_crop

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))
    yy, xx = np.mgrid[:50, :60]
    erf = np.exp(-((yy - 30) ** 2 + (xx - 12) ** 2) / 20.0)
    l, t, r, b = erf_box(erf)
    bw, bh = r - l, b - t
    cl, ct, cr, cb = (
        max(0, int(l - bw / 2)),
        max(0, int(t - bh / 2)),
        min(60, int(r + bw / 2)),
        min(50, int(b + bh / 2)),
    )
    shade = np.full((50, 60, 1), 0.35, dtype=np.float32)
    shade[t:b, l:r] = 1.0
    want = (np.asarray(image, dtype=np.float32) * shade).clip(0, 255).astype(np.uint8)[ct:cb, cl:cr]
    expected = Image.fromarray(want).resize((96, 96), Image.BICUBIC)
    assert np.array_equal(np.asarray(erf_crop(image, erf)), np.asarray(expected))


def _one_by_one(handle, pixels, layer, cells) -> torch.Tensor:
    """Each PFV's ERF from a forward and a backward pass of its own (no packing)."""
    maps = []
    for h, w in cells:
        x = pixels[None].clone().requires_grad_(True)
        pfv = handle.grid_until(x, layer)[0, :, h, w]
        (grad,) = torch.autograd.grad((pfv * (pfv / pfv.norm()).detach()).sum(), x)
        maps.append(grad[0].abs().sum(0))
    return torch.stack(maps)


def test_pfvs_reading_disjoint_pixels_share_a_backward_pass_and_keep_their_maps(lite0_handle, monkeypatch):
    """Lite0's ``_blocks.4`` (stride 8, each position reads 67×67 pixels, measured by NaN
    propagation): PFVs far enough apart are packed into one backward pass, and every map,
    corners and edges included (static same padding is asymmetric there), equals its own pass."""
    from gig.erf import receptive_fields

    fields = receptive_fields(lite0_handle, "_blocks.4", 224)
    assert fields is not None and fields.stride == 8 and (fields.lo_h, fields.hi_h) == (-26, 40)
    assert receptive_fields(lite0_handle, "_blocks.15", 224) is None  # every position reads the whole image
    cells = [(0, 0), (0, 27), (27, 0), (27, 27), (13, 14), (0, 13), (20, 5), (6, 21), (1, 1), (26, 12)]
    pixels = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(4))
    index = torch.zeros(10, dtype=torch.long)
    erf_maps(lite0_handle, pixels[None], "_blocks.4", torch.tensor(cells), image_index=index)  # checks the boxes once
    passes = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: passes.append(1) or real(*a, **k))
    maps = erf_maps(lite0_handle, pixels[None], "_blocks.4", torch.tensor(cells), image_index=index)
    monkeypatch.setattr(torch.autograd, "grad", real)
    assert len(passes) < len(cells)  # packed
    want = _one_by_one(lite0_handle, pixels, "_blocks.4", cells)
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-6 * float(want.max()))


def test_global_reads_are_never_packed():
    """A layer after a squeeze-excitation-like gate (a global mean) reads the whole image at every
    position: no boxes are claimed, and the maps are each PFV's own."""
    from gig.erf import receptive_fields

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gate = nn.Identity()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            y = self.gate(y * torch.sigmoid(y.mean((2, 3), keepdim=True)))
            return self.head(y.mean((2, 3)))

    handle = ModelHandle(wrap_module(Gated(), input_size=16, class_names=["a", "b"]))
    assert receptive_fields(handle, "conv", 16) is not None
    assert receptive_fields(handle, "gate", 16) is None
    pixels = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(6))
    cells = [(0, 0), (15, 15), (8, 3)]
    maps = erf_maps(handle, pixels[None], "gate", torch.tensor(cells), image_index=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(maps, _one_by_one(handle, pixels, "gate", cells), rtol=1e-5, atol=1e-7)


def test_boxes_measured_too_small_are_caught_by_the_maps_themselves():
    """A branch that swallows NaN (``where(y > 0, y, 0)``) hides part of what each position reads
    from the probe (it sees the 1×1 branch alone); the first packed group, checked against one
    pass per PFV, differs, so packing is turned off for the layer and every map is the PFV's own."""
    from gig.erf import receptive_fields

    class Swallowing(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(7)
            self.wide = nn.Conv2d(3, 4, 5, padding=2)
            self.narrow = nn.Conv2d(3, 4, 1)
            self.b = nn.Identity()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            y = self.wide(x)
            y = self.b(torch.where(y > 0, y, torch.zeros(())) + self.narrow(x))
            return self.head(y.mean((2, 3)))

    handle = ModelHandle(wrap_module(Swallowing(), input_size=24, class_names=["a", "b"]))
    fields = receptive_fields(handle, "b", 24)
    assert fields is not None and fields.hi_h - fields.lo_h + 1 == 1  # the true reach, 5, is hidden
    pixels = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(8))
    cells = [(0, 0), (5, 5), (10, 10), (15, 15), (20, 20), (3, 12)]
    maps = erf_maps(handle, pixels[None], "b", torch.tensor(cells), image_index=torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(maps, _one_by_one(handle, pixels, "b", cells), rtol=1e-5, atol=1e-7)
    assert receptive_fields(handle, "b", 24) is None

"""Layer access: captured activations equal a plain forward pass; errors name the layer."""

from __future__ import annotations

import pytest
import torch
import torchvision

from gig.hooks import LayerNotFoundError, LayerUsageError, ModelHandle
from gig.models import wrap_module


def _resnet_stepwise(model, x):
    """ResNet-50 forward written out by hand: every bottleneck output, in order."""
    outs = {}
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            h = block(h)
            outs[f"{stage}.{i}"] = h.clone()
    return outs, model.fc(torch.flatten(model.avgpool(h), 1))


def test_resnet50_capture_equals_plain_forward():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    handle = ModelHandle(wrap_module(model, "resnet50"))
    x = torch.randn(2, 3, 64, 64)
    layers = ["layer1.2", "layer2.3", "layer3.0", "layer3.5", "layer4.2"]
    logits, grids = handle.capture(x, layers)
    with torch.no_grad():
        ref, ref_logits = _resnet_stepwise(model, x)
    for name in layers:
        torch.testing.assert_close(grids[name], ref[name], rtol=0, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    # With gradients kept (the collect stage), values are the same too.
    _, kept = handle.capture(x, layers, keep_graph=True)
    for name in layers:
        torch.testing.assert_close(kept[name].detach(), ref[name], rtol=0, atol=0)


def test_resnet50_reused_relu_is_refused():
    handle = ModelHandle(wrap_module(torchvision.models.resnet50(weights=None), "resnet50"))
    with pytest.raises(LayerUsageError, match="ran 3 times"):
        handle.capture(torch.randn(1, 3, 64, 64), ["layer1.0.relu"])


def test_lite0_capture_equals_plain_forward(lite0, lite0_handle):
    from gig.images import EmbeddedSource

    source = EmbeddedSource()
    x = torch.stack([lite0.preprocess(source.load(r)) for r in source.records[:2]])
    model = lite0.model
    with torch.no_grad():
        h = model._swish(model._bn0(model._conv_stem(x)))
        ref = {}
        for i, block in enumerate(model._blocks):
            h = block(h)
            ref[f"_blocks.{i}"] = h.clone()
        plain = model(x)
    layers = ["_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15"]
    logits, grids = lite0_handle.capture(x, layers)
    for name in layers:
        torch.testing.assert_close(grids[name], ref[name], rtol=0, atol=0)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)


def test_unknown_layer_lists_closest_names(lite0_handle):
    with pytest.raises(LayerNotFoundError) as info:
        lite0_handle.module("_block.8")
    assert "_blocks.8" in str(info.value)


def test_run_from_with_own_output_is_identity(lite0_handle):
    x = torch.randn(2, 3, 224, 224)
    logits, grids = lite0_handle.capture(x, ["_blocks.8"])
    # Shared prefix: three replacements per image, all equal to the real output.
    wide = grids["_blocks.8"].repeat_interleave(3, 0)
    out = lite0_handle.run_from(x, "_blocks.8", wide)
    torch.testing.assert_close(out, logits.repeat_interleave(3, 0), rtol=1e-4, atol=1e-4)
    read = lite0_handle.run_from(x, "_blocks.8", grids["_blocks.8"], read="_blocks.11")
    _, later = lite0_handle.capture(x, ["_blocks.11"])
    torch.testing.assert_close(read, later["_blocks.11"], rtol=1e-4, atol=1e-4)
    with pytest.raises(LayerUsageError, match="runs before"):
        lite0_handle.run_from(x, "_blocks.8", grids["_blocks.8"], read="_blocks.4")


def test_run_from_stand_in_is_exact_and_refused_where_the_images_matter(lite0_handle):
    """After a first checked call, one blank image runs the network before the layer; a skip
    connection around the layer keeps the real images."""
    handle = lite0_handle
    x = torch.randn(2, 3, 224, 224)
    logits, grids = handle.capture(x, ["_blocks.11"])
    seen = []
    hook = handle.module("_conv_stem").register_forward_hook(lambda _m, i, _o: seen.append(tuple(i[0].shape)))
    try:
        for _ in range(2):
            seen.clear()
            out = handle.run_from(x, "_blocks.11", grids["_blocks.11"].repeat_interleave(2, 0))
            torch.testing.assert_close(out, logits.repeat_interleave(2, 0), rtol=1e-4, atol=1e-4)
    finally:
        hook.remove()
    assert seen == [(1, 3, 32, 32)]  # the second call: the stand-in alone
    model = _SkipAroundBlock2()
    skip = ModelHandle(wrap_module(model, "skip", input_size=16))
    x = torch.randn(2, 3, 16, 16)
    grid = torch.randn(4, 6, 16, 16)
    with torch.no_grad():
        h = model.block1(model.stem(x)).repeat_interleave(2, 0)
        want = model.fc((grid + h).mean((2, 3)))  # block2's output replaced, the skip kept
        for _ in range(2):
            torch.testing.assert_close(skip.run_from(x, "block2", grid), want)
    assert skip._stand_in[("block2", None)] is False


def test_vit_tokens_as_grid_with_class_token_apart():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64).eval()
    handle = ModelHandle(wrap_module(model, "vit", input_size=64))
    x = torch.randn(2, 3, 64, 64)
    logits, grids = handle.capture(x, ["blocks.5"])
    assert grids["blocks.5"].shape == (2, 192, 4, 4)  # 16 patch tokens + class token kept apart
    info = {i.name: i for i in handle.layer_info()}
    assert info["blocks.5"].grid == (192, 4, 4) and info["blocks.5"].prefix_tokens == 1
    # Replacing the grid by itself keeps the logits; replacing it by zeros changes them.
    same = handle.run_from(x, "blocks.5", grids["blocks.5"].repeat_interleave(2, 0))
    torch.testing.assert_close(same, logits.repeat_interleave(2, 0), rtol=1e-4, atol=1e-4)
    zero = handle.run_from(x, "blocks.5", torch.zeros_like(grids["blocks.5"]))
    assert not torch.allclose(zero, logits)
    # Several token layers replaced in one shared pass, class tokens kept: as separate passes.
    layers = ["blocks.2", "blocks.5"]
    want_logits, want = _separate_passes(handle, x, layers, _halved_plus_shift)
    for _ in range(2):
        got_logits, got = handle.run_replacing_each(x, layers, _halved_plus_shift)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        for layer in layers:
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-4)
    assert handle._shares_prefix[("each", *layers)]  # the shared pass was right, and kept


def test_execution_order(lite0_handle):
    assert lite0_handle.execution_order(["_blocks.11", "_blocks.4"]) == ["_blocks.4", "_blocks.11"]


def test_gradient_copy_folds_batchnorm_and_keeps_outputs(lite0, lite0_handle):
    """The copy used for GIG: batch norms and symmetric static paddings folded, channels-last,
    same layer outputs and logits; the original model is untouched."""
    layers = ["_blocks.8", "_blocks.11"]
    fast = lite0_handle.for_gradients(layers)
    assert fast.folded_batchnorms > 40 and fast.memory_format == torch.channels_last
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0_handle.model.modules())

    def zero_pads(model):
        return sum(type(getattr(m, "static_padding", None)) is torch.nn.ZeroPad2d for m in model.modules())

    assert fast.folded_paddings >= 10
    assert zero_pads(fast.model) == zero_pads(lite0_handle.model) - fast.folded_paddings
    # Seeded: on some inputs a ReLU6 of the folded copy sits within rounding of its clip and
    # flips, moving the gradient at that single point by up to ~1 % (integrated attributions agree
    # far below the GIG tolerance, see test_attribution); elsewhere they agree to ~1e-7.
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_logits, want = lite0_handle.capture(x, layers)
        got_logits, got = fast.capture(x, layers)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
    # Gradients through the folded copy equal those through the original (run from a layer).
    grid = want["_blocks.8"].clone().requires_grad_(True)
    (g_want,) = torch.autograd.grad(lite0_handle.run_from(x, "_blocks.8", grid)[:, 3].sum(), grid)
    grid2 = want["_blocks.8"].clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    (g_got,) = torch.autograd.grad(fast.run_from(x, "_blocks.8", grid2)[:, 3].sum(), grid2)
    assert float((g_got - g_want).norm() / g_want.norm()) < 1e-3


class _PreNormReadElsewhere(torch.nn.Module):
    """A conv whose pre-norm output is also added after the norm: folding would change it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        self.body = torch.nn.Identity()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(self.body(self.bn(h) + h).mean((2, 3)))


def test_gradient_copy_refuses_a_wrong_fold():
    handle = ModelHandle(wrap_module(_PreNormReadElsewhere().eval(), "prenorm", input_size=8))
    fast = handle.for_gradients(["body"])
    assert fast.folded_batchnorms == 0
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.model.modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fast.capture(x, ["body"])[0], handle.capture(x, ["body"])[0])


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("torchvision:resnet18", ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
        ("torchvision:resnet50", ["layer1.2", "layer2.3", "layer3.5", "layer4.2"]),
        ("timm:vit_tiny_patch16_224", ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]),
        ("efficientnet-lite0", ["_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15"]),
    ],
)
def test_default_layers_are_the_last_block_of_each_stage(spec, expected):
    """The architecture's own stage ends (ResNet: the last bottleneck of layer1..4; a ViT keeps
    one resolution, so its 12 blocks are spread evenly); lite0 keeps its documented choice."""
    from gig.models import load_model

    handle = ModelHandle(load_model(spec, "none"))
    assert handle.default_layers() == expected
    assert handle.execution_order(expected) == expected


def test_no_blocks_means_no_guess():
    handle = ModelHandle(wrap_module(torchvision.models.vgg11(weights=None), "vgg11"))
    with pytest.raises(LayerUsageError, match="name the layers"):
        handle.default_layers()


def test_prefix_tokens_found_per_layer():
    """A ViT's patch embedding has 196 tokens and no class token; its blocks have 197."""
    from gig.models import load_model

    handle = ModelHandle(load_model("timm:vit_tiny_patch16_224", "none"))
    infos = {i.name: i for i in handle.layer_info()}
    assert infos["patch_embed"].prefix_tokens == 0 and infos["patch_embed"].grid == (192, 14, 14)
    assert infos["blocks.3"].prefix_tokens == 1 and infos["blocks.3"].grid == (192, 14, 14)
    x = torch.randn(1, 3, 224, 224)
    _, grids = handle.capture(x, ["patch_embed", "blocks.3"])
    with torch.no_grad():
        tokens = handle.model.patch_embed(x)  # (1, 196, 192), the grid in row-major order
    torch.testing.assert_close(grids["patch_embed"], tokens.transpose(1, 2).reshape(1, 192, 14, 14))


def test_reused_layer_refused_before_any_image_is_read(tmp_path):
    """The pipeline checks layers on a dummy image: the image folder is never opened."""
    from gig.config import Config
    from gig.pipeline import Pipeline

    bundle = wrap_module(torchvision.models.resnet18(weights=None), "resnet18")
    with pytest.raises(LayerUsageError, match="ran 2 times"):
        Pipeline(
            Config(layers=["layer1.0.relu"], images=str(tmp_path / "missing")),
            tmp_path / "r",
            model=bundle,
            progress=False,
        )
    assert not (tmp_path / "r").exists()


def _separate_passes(handle, x, layers, replace):
    """The reference for run_replacing_each: capture, then one run_from per layer."""
    logits, grids = handle.capture(x, layers)
    return logits, {layer: handle.run_from(x, layer, replace(layer, grids[layer])) for layer in layers}


def _halved_plus_shift(layer, grid):
    return 0.5 * grid + 0.1


def _counting_forwards(handle):
    calls = []
    handle.model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_run_replacing_each_equals_separate_passes_in_one_forward(lite0):
    handle = ModelHandle(lite0)
    layers = ["_blocks.4", "_blocks.8", "_blocks.15"]
    x = torch.randn(3, 3, 224, 224)
    want_logits, want = _separate_passes(handle, x, layers, _halved_plus_shift)
    assert not torch.allclose(want["_blocks.8"], want_logits)  # the replacement matters
    forwards = _counting_forwards(handle)
    for call in range(2):  # the first call checks the shared pass; the second only runs it
        seen = []
        logits, got = handle.run_replacing_each(x, layers, lambda l, g: seen.append(l) or _halved_plus_shift(l, g))
        assert seen == layers  # each replacement asked for once, on the unmodified output
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        for layer in layers:
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-4)
    assert len(forwards) - (2 + len(layers)) == 1  # after the check: one forward for every layer


class _SkipAroundBlock2(torch.nn.Module):
    """block2's input is read again after it: a widened batch cannot go through."""

    def __init__(self, mix_batch: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.block1 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.block2 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 3)
        self.mix_batch = mix_batch

    def forward(self, x):
        h = self.block1(self.stem(x))
        if self.mix_batch:  # goes through widened, but each image's output depends on the others
            return self.fc((self.block2(h) - self.block2(h).mean(0)).mean((2, 3)))
        return self.fc((self.block2(h) + h).mean((2, 3)))


@pytest.mark.parametrize("mix_batch", [False, True])
def test_run_replacing_each_falls_back_where_sharing_is_wrong(mix_batch):
    handle = ModelHandle(wrap_module(_SkipAroundBlock2(mix_batch), "skip", input_size=16))
    layers = ["stem", "block1"] if mix_batch else ["block1", "block2"]
    x = torch.randn(4, 3, 16, 16)
    want_logits, want = _separate_passes(handle, x, layers, _halved_plus_shift)
    for call in range(2):
        seen = []
        logits, got = handle.run_replacing_each(x, layers, lambda l, g: seen.append(l) or _halved_plus_shift(l, g))
        assert sorted(seen) == sorted(layers)
        torch.testing.assert_close(logits, want_logits)
        for layer in layers:
            torch.testing.assert_close(got[layer], want[layer])

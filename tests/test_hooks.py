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


def test_execution_order(lite0_handle):
    assert lite0_handle.execution_order(["_blocks.11", "_blocks.4"]) == ["_blocks.4", "_blocks.11"]

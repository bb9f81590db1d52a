"""Model loading: offline default, safe weight files, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gig.models import ModelLoadError, load_model, read_state_dict


def test_lite0_default_is_imagenet_trained(lite0):
    from gig.images import EmbeddedSource

    src = EmbeddedSource()
    labelled = {r.path.split(":")[1]: r for r in src.records if r.label is not None}
    rec = labelled["coffee"]
    with torch.no_grad():
        logits = lite0.model(lite0.preprocess(src.load(rec))[None])
    assert int(logits.argmax()) == 967  # espresso
    assert lite0.class_name(967).lower().startswith("espresso")
    assert lite0.input_size == 224 and lite0.crop_fraction == pytest.approx(224 / 256)


def test_local_state_dict_files(tmp_path, tiny_bundle):
    state = tiny_bundle.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = read_state_dict(tmp_path / name)
        assert set(loaded) == set(state)
    with pytest.raises(ModelLoadError, match="not found"):
        read_state_dict(tmp_path / "missing.pt")


def test_mismatched_weights_are_an_error(tmp_path):
    save_file({"nonsense": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model("efficientnet-lite0", weights=str(tmp_path / "bad.safetensors"))


def test_weights_of_another_shape_are_one_line(tmp_path):
    """The model's own names with a 10-class head (issue 25): one line naming the tensors and
    both shapes, not load_state_dict's multi-line RuntimeError."""
    state = {k: v.clone() for k, v in load_model("efficientnet-lite0").model.state_dict().items()}
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(10, state["_fc.weight"].shape[1]), torch.zeros(10)
    save_file(state, str(tmp_path / "head10.safetensors"))
    with pytest.raises(ModelLoadError) as info:
        load_model("efficientnet-lite0", weights=str(tmp_path / "head10.safetensors"))
    message = str(info.value)
    assert "2 tensor(s) of another shape" in message and "_fc.weight (10, 1280) (model (1000, 1280))" in message
    assert "\n" not in message


def test_unknown_models():
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("resnet-9000")
    with pytest.raises(ModelLoadError, match="no model"):
        load_model("torchvision:not_a_model", weights="none")


def test_torchvision_and_timm_by_name_without_weights():
    rn = load_model("torchvision:resnet18", weights="none")
    assert rn.name == "torchvision:resnet18" and len(rn.class_names) == 1000
    vit = load_model("timm:vit_tiny_patch16_224", weights="none")
    assert vit.input_size == 224 and vit.mean == pytest.approx((0.5, 0.5, 0.5))


def test_torchvision_preprocessing_follows_the_weights():
    """ResNet-50's default (V2) weights resize to 232 bilinear and crop 224: the bundle's
    preprocessing equals torchvision's own ``weights.transforms()`` on a photo (up to resampling
    inside one resize rather than two), where the old fixed 224/256 bicubic crop did not."""
    import torchvision
    from PIL import Image
    from skimage import data

    from gig.models import ModelBundle, load_model

    photo = Image.fromarray(data.astronaut())
    bundle = load_model("torchvision:resnet50", "none")
    assert (bundle.input_size, bundle.interpolation) == (224, "bilinear")
    assert bundle.crop_fraction == pytest.approx(224 / 232)
    want = torchvision.models.ResNet50_Weights.DEFAULT.transforms()(photo)
    assert float((bundle.preprocess(photo) - want).abs().mean()) < 0.02
    fixed = ModelBundle(model=bundle.model, name="fixed")  # the former one-size-fits-all crop
    assert float((fixed.preprocess(photo) - want).abs().mean()) > 0.3
    assert load_model("torchvision:inception_v3", "none").input_size == 299


def test_class_index_by_synset_or_name(lite0):
    """Folder names map to the model's classes by ImageNet synset id or class name, checked
    against the ImageNet sample's labels.csv convention (synset n01443537 is class 1)."""
    assert lite0.class_index("n01443537") == 1 and lite0.class_index("N01440764") == 0
    assert lite0.class_index("tench") == 0 and lite0.class_index("Great_White_Shark") == 2
    assert lite0.class_index("not a class") is None


def test_random_weights_are_the_same_in_every_process():
    """``weights="none"`` builds one fixed random model, so separate stage commands, torchrun
    ranks and a resumed run agree on its fingerprint; the caller's random stream is untouched."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("torchvision:resnet18", "none").model.state_dict()
    after = torch.rand(3)
    b = load_model("torchvision:resnet18", "none").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(after, expected_next)

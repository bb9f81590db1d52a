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


# ---------------------------------------------------------------------------- a probe as the head
def _probe_file(path, outputs: int, features: int, names: list[str] | None = None, seed: int = 0):
    import json

    g = torch.Generator().manual_seed(seed)
    tensors = {"weight": torch.randn(outputs, features, generator=g), "bias": torch.randn(outputs, generator=g)}
    save_file(tensors, str(path), metadata={"names": json.dumps(names)} if names else None)
    return tensors


def test_a_probe_head_equals_the_model_with_the_probe_as_its_classifier(tmp_path, tiny_bundle):
    """TinyNet's classifier (``head``, Linear(16, 4)) replaced by a probe file: the same outputs as
    TinyNet built with that Linear(16, 3) in its place, the probe's names as class names; the
    original bundle is left as it was."""
    from gig.models import with_head

    probe = _probe_file(tmp_path / "probe.safetensors", 3, 16, ["cat", "dog", "other"])
    got = with_head(tiny_bundle, tmp_path / "probe.safetensors")
    want = tiny_bundle.model.__class__()
    want.head = torch.nn.Linear(16, 3)
    with torch.no_grad():
        want.head.weight.copy_(probe["weight"])
        want.head.bias.copy_(probe["bias"])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got.model(x), want.eval()(x))
        assert tiny_bundle.model(x).shape == (5, 4)
    assert got.class_names == ["cat", "dog", "other"] and got.name == "tiny"
    assert got.fingerprint() != tiny_bundle.fingerprint()


def test_a_probe_after_a_backbone_without_classifier(tmp_path, tiny_bundle):
    """A backbone whose output is its pooled features gets the probe after it (forward hook): the
    model's layer names stay as they were; outputs are named ``output I`` without names."""
    from torch import nn

    from gig.models import with_head, wrap_module

    class Backbone(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.stem, self.block1, self.block2 = net.stem, net.block1, net.block2

        def forward(self, x):
            return self.block2(self.block1(self.stem(x))).mean((2, 3))

    backbone = wrap_module(Backbone(tiny_bundle.model), name="bb", input_size=32)
    probe = _probe_file(tmp_path / "p.safetensors", 2, 16)
    got = with_head(backbone, tmp_path / "p.safetensors")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got.model(x), backbone.model(x) @ probe["weight"].T + probe["bias"])
    assert got.class_names == ["output 0", "output 1"]
    assert {n for n, _ in backbone.model.named_modules()} <= {n for n, _ in got.model.named_modules()}


def test_a_head_that_does_not_fit_is_refused_before_compute(tmp_path, tiny_bundle):
    from gig.models import with_head

    _probe_file(tmp_path / "wide.safetensors", 3, 17)
    with pytest.raises(ModelLoadError, match="gives|does not fit"):
        with_head(tiny_bundle, tmp_path / "wide.safetensors")
    with pytest.raises(ModelLoadError, match="reads 17 features, but 'head' of tiny takes 16"):
        with_head(tiny_bundle, tmp_path / "wide.safetensors", at="head")
    _probe_file(tmp_path / "p.safetensors", 3, 16)
    with pytest.raises(ModelLoadError, match="head_at 'nope': no such module in tiny"):
        with_head(tiny_bundle, tmp_path / "p.safetensors", at="nope")
    _probe_file(tmp_path / "named.safetensors", 3, 16, ["a", "b"])
    with pytest.raises(ModelLoadError, match="2 names for 3 outputs"):
        with_head(tiny_bundle, tmp_path / "named.safetensors")
    with pytest.raises(ModelLoadError, match="head file not found"):
        with_head(tiny_bundle, tmp_path / "missing.safetensors")


def test_a_run_with_a_probe_head_ends_at_the_probes_outputs(tmp_path):
    """``head:`` in the config: Lite0 with a 2-output probe in place of its classifier runs every
    stage, the report and explain; every class graph's top node is one of the probe's named
    outputs, and the run's targets are the probe's argmax."""
    from typer.testing import CliRunner

    from gig.cli import app
    from gig.config import Config
    from gig.pipeline import Pipeline
    from gig.store import load_json

    _probe_file(tmp_path / "probe.safetensors", 2, 1280, ["animal", "thing"], seed=1)
    config = Config(
        head=str(tmp_path / "probe.safetensors"),
        layers=["_blocks.11", "_blocks.15"],
        max_images=4,
        n_steps=4,
        top_k=2,
        samples_per_image=8,
        calibration_size=200,
    )
    run = tmp_path / "run"
    Pipeline(config, run, progress=False).run()
    graphs = sorted((run / "graph").glob("class_*.json"))
    assert graphs
    for path in graphs:
        top = [n for n in load_json(path)["nodes"] if n.get("concept") is None]
        assert len(top) == 1 and top[0]["name"] in ("animal", "thing")
    targets = {i["target"] for i in load_json(run / "collect" / "images.json")["images"]}
    assert targets <= {0, 1}
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "animal" in page or "thing" in page
    # the page speaks of the probe's outputs, not of classes
    assert ">One output</button>" in page and ">Several outputs</button>" in page and ">One class<" not in page
    assert '"output_noun": "output"' in page or '"output_noun":"output"' in page
    from gig.images import EmbeddedSource

    embedded = EmbeddedSource()
    embedded.load(embedded.records[0]).save(tmp_path / "photo.png")
    result = CliRunner().invoke(app, ["explain", str(run), str(tmp_path / "photo.png"), "--out", str(tmp_path / "ex")])
    assert result.exit_code == 0, result.output
    explained = (tmp_path / "ex" / "index.html").read_text(encoding="utf-8")
    assert '"output_noun": "output"' in explained or '"output_noun":"output"' in explained


def test_the_probe_example_trains_a_head_that_its_config_reads_from_any_directory(tmp_path, monkeypatch):
    """docs/examples: train_probe.py writes a head of two named outputs on Lite0's 1280 pooled
    features; probe-head.yaml names it by a path relative to itself, which Config.load resolves
    from another working directory; the head then loads onto Lite0."""
    import importlib.util
    import shutil
    from pathlib import Path

    from gig.config import Config
    from gig.models import load_run_model, read_head

    examples = Path(__file__).resolve().parents[1] / "docs" / "examples"
    folder = tmp_path / "examples"
    shutil.copytree(examples, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    spec = importlib.util.spec_from_file_location("train_probe", folder / "train_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr("sys.argv", ["train_probe.py", "--out", str(folder / "probe.safetensors")])
    module.main()
    weight, bias, names = read_head(folder / "probe.safetensors")
    assert weight.shape == (2, 1280) and bias.shape == (2,) and names == ["animal", "thing"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = Config.load(folder / "probe-head.yaml")
    assert Path(config.head) == (folder / "probe.safetensors").resolve()
    bundle = load_run_model(config)
    assert bundle.class_names == ["animal", "thing"] and bundle.model._fc.out_features == 2

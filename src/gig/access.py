"""A finished run opened read-only with its model and images: what the report, ``gig explain``,
``gig ablate`` and the notebook API (``gig.open``) read a run through.

Unlike :class:`gig.pipeline.Pipeline`, opening writes nothing into the run (no config, no input
fingerprint, no lock), and the model and the images are loaded only when something needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .errors import InputError, RunMismatchError
from .store import RunStore, as_store  # noqa: F401  (as_store re-exported)


def inputs_key(source, bundle, max_images: int | None, content: bool = True) -> str:
    """The fingerprint of a run's inputs, recorded in its manifest: the images it uses (by
    content; with ``content=False`` by path, size and modification time, as runs before 0.3
    recorded it) and the model's weights (every parameter)."""
    import hashlib

    from .images import used_records

    records = used_records(source, max_images)
    images = source.content_fingerprint(records) if content else source.fingerprint(records)
    return hashlib.blake2b(f"{images}:{bundle.fingerprint()}".encode(), digest_size=8).hexdigest()


def inputs_changed(recorded: dict, source, bundle, max_images: int | None) -> tuple[bool, str]:
    """Whether the inputs differ from the ``recorded`` manifest entry, and the content key of the
    current ones. An entry from before content keys (no ``content``) is compared by its own,
    stat-based key."""
    content = inputs_key(source, bundle, max_images)
    if "content" in recorded:
        return recorded["content"] != content, content
    return recorded.get("key") != inputs_key(source, bundle, max_images, content=False), content


def inputs_differ(store: RunStore, source, bundle) -> bool:
    """Whether ``source``'s images or ``bundle``'s weights differ from the fingerprint the run's
    stages were computed from (False for runs that recorded none, or adopted one as legacy)."""
    recorded = store.manifest().get("inputs") or {}
    if not recorded.get("key") or recorded.get("legacy"):
        return False
    return inputs_changed(recorded, source, bundle, store.config.max_images)[0]


class RunAccess:
    """The run's store, model and images, loaded lazily.

    ``model``: a :class:`gig.models.ModelBundle` (or an ``nn.Module``, wrapped) to use instead of
    loading ``config.model`` (needed for runs made from Python with a user module); ``source``:
    the run's images if they moved; ``device``: instead of the config's; ``fast``: the handle
    folds batch norms as the attribute stage does (:meth:`gig.hooks.ModelHandle.for_gradients`),
    for many gradient or ablation passes."""

    def __init__(
        self, run: str | Path | RunStore, model=None, source=None, device: str | None = None, fast: bool = False
    ):
        self.store = as_store(run)
        self._bundle, self._source, self._handle = model, source, None
        self._device, self._fast = device, fast
        self._records: dict | None = None
        self._weights_checked = False
        self._dictionaries: dict[str, torch.Tensor] = {}
        self._biases: dict[str, torch.Tensor | None] = {}

    @property
    def bundle(self):
        if self._bundle is None:
            from .models import load_run_model

            self._bundle = load_run_model(self.store.config)
        elif isinstance(self._bundle, torch.nn.Module):
            from .models import wrap_module

            self._bundle = wrap_module(self._bundle)
        if not self._weights_checked:
            self._weights_checked = True
            self._verify_weights()
        return self._bundle

    def _verify_weights(self) -> None:
        """The model against the weights' fingerprint the run recorded (runs from 0.3 on), so that
        a reader that never loads the run's images (``gig explain`` of new photos) still refuses
        weights replaced under the same name."""
        recorded = (self.store.manifest().get("inputs") or {}).get("weights")
        if recorded is not None and recorded != self._bundle.fingerprint():
            raise RunMismatchError(
                f"{self.store.root}: the model's weights changed since its stages ran (same "
                f"name, other values): `gig run --out {self.store.root}` recomputes it"
            )

    @property
    def handle(self):
        if self._handle is None:
            from .hooks import ModelHandle, resolve_device

            self._handle = ModelHandle(self.bundle, resolve_device(self._device or self.store.config.device))
            if self._fast:
                self._handle = self._handle.for_gradients(list(self.store.config.layers))
        return self._handle

    @property
    def source(self):
        if self._source is None:
            from .images import open_source

            class_index = self.bundle.class_index if self.bundle.class_names else None
            self._source = open_source(self.store.config.images, class_index=class_index)
            self._verify_inputs()
        return self._source

    def _verify_inputs(self) -> None:
        """Is this still the run it claims to be? The run's own images and the model, against the
        fingerprint its stages were computed from (skipped for runs from before fingerprints,
        and where images are handed in because the run's moved)."""
        if inputs_differ(self.store, self._source, self.bundle):
            raise RunMismatchError(
                f"{self.store.root}: its images or model weights changed since its stages ran "
                f"(same paths, other contents): `gig run --out {self.store.root}` recomputes it"
            )

    @property
    def class_names(self) -> list[str]:
        return list(self.bundle.class_names)

    def class_name(self, index: int) -> str:
        return self.bundle.class_name(index)

    def dictionary(self, layer: str) -> torch.Tensor:
        """``V (K, C)`` of ``layer`` (read once)."""
        from .artefacts import load_dictionary

        if layer not in self._dictionaries:
            self._dictionaries[layer] = load_dictionary(self.store, layer)
        return self._dictionaries[layer]

    def decoder_bias(self, layer: str) -> torch.Tensor | None:
        """``b_dec (C,)`` of ``layer``'s basis, the reconstruction of the zero code (read once);
        None where the layer has no decoder bias."""
        from .artefacts import decoder_bias

        if layer not in self._biases:
            self._biases[layer] = decoder_bias(self.store, layer)
        return self._biases[layer]

    def images(self) -> dict[int, dict]:
        """``{image_id: images.json entry}`` of the run."""
        from .artefacts import load_images

        return {i["image_id"]: i for i in load_images(self.store)["images"]}

    def _record(self, image_ids: Sequence[int]) -> list:
        if self._records is None:
            self._records = {r.image_id: r for r in self.source.records}
        missing = [i for i in image_ids if i not in self._records]
        if missing:
            raise RunMismatchError(
                f"image id(s) {missing[:5]} are not in the run's image source {self.store.config.images}"
            )
        return [self._records[i] for i in image_ids]

    def display_image(self, image_id: int) -> Image.Image:
        """The crop the model sees of one of the run's images."""
        (record,) = self._record([image_id])
        return self.bundle.display_image(self.source.load(record))

    def run_pixels(self, image_ids: Sequence[int]) -> torch.Tensor:
        """Preprocessed pixels ``(N, 3, S, S)`` of run images, read from the run's image source."""
        from .collect import iter_image_batches

        records = self._record(image_ids)
        batches = list(iter_image_batches(self.source, records, self.handle, max(len(records), 1)))
        got = [r.image_id for b in batches for r in b.records]
        if got != list(image_ids):
            raise InputError(f"could not read run image(s) {sorted(set(image_ids) - set(got))[:5]}")
        return torch.cat([b.pixels for b in batches])

    def photo_pixels(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Photos outside the run, preprocessed as the run's model wants: ``(N, 3, S, S)``."""
        from .images import load_rgb

        return torch.stack([self.bundle.preprocess(load_rgb(p)) for p in paths])

    def crops(self, layer: str, samples: list[int]) -> list[Path]:
        """ERF crops of sampled PFVs of ``layer``: :meth:`layer_crops` of one layer."""
        return self.layer_crops({layer: samples})[layer]

    def layer_crops(
        self,
        wanted: dict[str, list[int]],
        on_made: Callable[[Path, Image.Image], None] | None = None,
        progress: bool = False,
    ) -> dict[str, list[Path]]:
        """ERF crops of sampled PFVs, ``wanted {layer: samples}`` → ``{layer: paths}``, from the
        run's ERF cache (:func:`gig.erf.layer_crops`: each image runs forward once for all its
        layers; ``on_made`` sees each crop made; ``progress``: a bar over the images). Where every
        one is cached, neither the run's images nor the model are touched (the images'
        fingerprint is checked only when one must be computed)."""
        from .artefacts import crop_paths

        paths = {layer: crop_paths(self.store, layer, samples) for layer, samples in wanted.items()}
        if all(p.exists() for layer_paths in paths.values() for p in layer_paths):
            return paths
        from .erf import layer_crops

        return layer_crops(self.store, self.handle, self.source, wanted, on_made=on_made, progress=progress)

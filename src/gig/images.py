"""Image sources for dataset-wide attribution runs.

A *source* is an ordered list of :class:`ImageRecord` plus a robust loader that always returns
an 8-bit RGB :class:`PIL.Image.Image`.  Three kinds exist:

* :class:`FolderSource` -- an ImageFolder tree (one sub-folder per class) or a flat folder;
* :class:`CsvSource` -- a CSV file list with optional labels;
* :class:`EmbeddedSource` -- a few real photos that ship inside installed pip packages
  (scikit-image, scikit-learn, matplotlib), so demos and tests run with no download.

Real image collections contain odd files (truncated downloads, CMYK JPEGs, 16-bit PNGs, text
saved as ``.jpg``); :func:`load_rgb` converts what it can and otherwise raises
:class:`ImageLoadError` naming the file, and :meth:`ImageSource.iter_loaded` skips such files.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import ImageLoadError, InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CsvSource",
    "EmbeddedSource",
    "FolderSource",
    "ImageLoadError",
    "ImageLoadWarning",
    "ImageRecord",
    "ImageSource",
    "center_crop_resize",
    "crop_box",
    "load_rgb",
    "open_source",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class ImageLoadWarning(UserWarning):
    """An image was loaded but only partly (e.g. truncated) or a file was skipped."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a source; ``image_id`` is its stable index within that source."""

    image_id: int
    path: str
    label: int | None
    label_name: str | None


# --------------------------------------------------------------------------------------------
# Robust loading
# --------------------------------------------------------------------------------------------

# PIL only offers a process-wide switch for tolerant decoding; the lock keeps two tolerant
# retries from restoring each other's value in the wrong order.
_TRUNCATED_LOCK = threading.Lock()


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _decode(path: str, tolerant: bool) -> Image.Image:
    """Open and fully decode ``path``; the result no longer holds the file open."""
    if not tolerant:
        with Image.open(path) as im:
            im.load()
            return _apply_exif(im)
    with _TRUNCATED_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with Image.open(path) as im:
                im.load()
                return _apply_exif(im)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _apply_exif(im: Image.Image) -> Image.Image:
    # Broken EXIF blocks are common in camera files; the pixels are still good, so a failing
    # transpose must not cost us the image.
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure is non-fatal
        out = None
    return out if out is not None and out is not im else im.copy()


def _wide_to_uint8(im: Image.Image) -> np.ndarray:
    """Map a 16/32-bit integer or float single-band image to uint8.

    Data already inside 0..255 (or 0..1 for floats) is kept as is, so 8-bit content stored in a
    wide mode keeps its contrast; anything else is stretched over its actual min..max, because
    dividing e.g. 12-bit data by 65535 would give a black picture and clipping a white one.
    """
    a = np.asarray(im).astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(finite, a, lo)
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif not (lo >= 0.0 and hi <= 255.0):
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _flatten_alpha(im: Image.Image) -> Image.Image:
    # Transparent regions are undefined colour; white is what a viewer shows and what web
    # images with transparency are usually designed against.
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_wide_to_uint8(im)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _flatten_alpha(im)
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV, RGBX ...


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Load ``path`` as an 8-bit RGB image with EXIF orientation applied.

    Truncated files are retried with PIL's tolerant decoder: a partial picture is accepted
    with an :class:`ImageLoadWarning`; a file from which nothing decodes raises.  Unsupported,
    empty, zero-sized or non-image files raise :class:`ImageLoadError` naming the file.
    """
    p = os.fspath(path)
    try:
        if os.path.getsize(p) == 0:
            raise ImageLoadError(p, "empty file")
    except OSError as exc:
        raise ImageLoadError(p, f"cannot read file ({exc.strerror or exc})") from exc
    try:
        im = _decode(p, tolerant=False)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(p, f"image too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(p, "not a recognised image file") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        first_error = exc
        try:
            im = _decode(p, tolerant=True)
        except Exception as exc2:  # noqa: BLE001 - any decoder failure means unreadable
            raise ImageLoadError(p, f"corrupt or truncated image ({first_error})") from exc2
        if im.width == 0 or im.height == 0 or _is_constant(im) or not _has_scan_data(p):
            # The tolerant decoder fills missing data with one grey/black value, so a uniform
            # result (or a JPEG cut before its scan data) means no real pixels were recovered.
            raise ImageLoadError(p, f"truncated image, no pixel data decoded ({first_error})") from None
        warnings.warn(
            f"{p}: image is truncated or corrupt ({first_error}); using the partly decoded pixels",
            ImageLoadWarning,
            stacklevel=2,
        )
    if im.width == 0 or im.height == 0:
        raise ImageLoadError(p, f"image has a zero dimension {im.size}")
    try:
        return _to_rgb(im)  # im is already a detached copy, so returning it as is is safe
    except (OSError, ValueError) as exc:
        raise ImageLoadError(p, f"cannot convert mode {im.mode} to RGB ({exc})") from exc


def _has_scan_data(path: str) -> bool:
    """False for a JPEG that ends before any entropy-coded data of its first scan.

    Walking the marker segments (rather than searching for the SOS marker) avoids being fooled
    by the SOS of an EXIF thumbnail embedded in APP1.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(b"\xff\xd8"):  # not a JPEG
        return True
    pos = 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return True  # unexpected layout: do not second-guess the decoder
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            pos += 2
            continue
        seg_end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # SOS: scan data follows its header
            return len(data) > seg_end
        pos = seg_end
    return False


def _is_constant(im: Image.Image) -> bool:
    extrema = im.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return all(lo == hi for lo, hi in bands)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _file_digest(path: str) -> str:
    """BLAKE2b of a file's bytes, read in 1 MiB blocks (``hashlib.file_digest`` needs 3.11)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ImageSource:
    """An ordered set of images with labels where known."""

    kind = "base"

    def __init__(self, records: list[ImageRecord], root: str | None = None) -> None:
        self.records: list[ImageRecord] = records
        self.root = root
        # Files that iter_loaded could not load, as (path, reason), across all iterations.
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.records)

    def load(self, record: ImageRecord) -> Image.Image:
        """Return the record's image as 8-bit RGB; raises :class:`ImageLoadError`."""
        return load_rgb(record.path)

    def iter_loaded(self, records: Iterable[ImageRecord] | None = None) -> Iterator[tuple[ImageRecord, Image.Image]]:
        """Yield ``(record, image)`` for every loadable record, warning about and recording
        (in :attr:`skipped`) each file that fails, so one bad file never stops a run."""
        for record in self.records if records is None else records:
            try:
                image = self.load(record)
            except Exception as exc:  # noqa: BLE001 - a bad file must never end the run
                self.note_skipped(record, skip_reason(exc))
                continue
            yield record, image

    def note_skipped(self, record: ImageRecord, reason: str) -> None:
        """Record and announce an image that could not be loaded (the run goes on without it)."""
        self.skipped.append((record.path, reason))
        warnings.warn(f"skipping {record.path}: {reason}", ImageLoadWarning, stacklevel=3)

    def fingerprint(self, records: list[ImageRecord] | None = None) -> str:
        """A cheap fingerprint of ``records`` (all by default): path, size and modification time
        of each file, without reading them. Runs before 0.3 recorded their images by it (see
        :func:`gig.access.inputs_changed`); :meth:`content_fingerprint` is what runs record now.
        Embedded photos are fixed by the package."""
        digest = hashlib.blake2b(digest_size=16)
        for record in self.records if records is None else records:
            try:
                info = os.stat(record.path)
                stamp = f"{info.st_size}:{info.st_mtime_ns}"
            except OSError:  # embedded:NAME, or a file that is gone (collect will skip it)
                stamp = "-"
            digest.update(f"{record.path}\t{stamp}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def content_fingerprint(self, records: list[ImageRecord] | None = None) -> str:
        """A fingerprint of ``records`` by content: every file's bytes (BLAKE2b), so a photo
        replaced by one of the same size with its modification time kept (``cp -p``,
        ``rsync -a``) changes it too. Reads every file once (about 1 GB/s); embedded photos are
        fixed by the package."""
        digest = hashlib.blake2b(digest_size=16)
        for record in self.records if records is None else records:
            try:
                stamp = _file_digest(record.path)
            except OSError:  # embedded:NAME, or a file that is gone (collect will skip it)
                stamp = "-"
            digest.update(f"{record.path}\t{stamp}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def describe(self) -> dict:
        """JSON-able summary for run manifests and reports."""
        labelled = sum(r.label is not None for r in self.records)
        return {
            "kind": self.kind,
            "root": self.root,
            "n": len(self.records),
            "n_labelled": labelled,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, n={len(self.records)})"


class FolderSource(ImageSource):
    """Images in a directory: ImageFolder layout (class sub-folders) or a flat folder.

    The layout is detected: if any sub-directory holds images, each such sub-directory (searched
    recursively) is a class, numbered by sorted folder name unless ``class_to_idx`` maps folder
    names to model class indices (unmapped folders get ``label=None``).  Otherwise the images
    directly in ``root`` form an unlabelled flat set.  Records are sorted by relative path.
    """

    kind = "folder"

    def __init__(
        self,
        root: str | os.PathLike,
        class_to_idx: dict[str, int] | None = None,
        class_index: Callable[[str], int | None] | None = None,
    ) -> None:
        root_path = Path(root)
        if not root_path.is_dir():
            raise InputError(f"image folder {os.fspath(root)!r} is not a directory")
        class_files, top_files = _scan_folder(root_path)
        records: list[ImageRecord] = []
        if class_files:
            self.layout = "imagefolder"
            self.classes = sorted(class_files)
            if top_files:
                warnings.warn(
                    f"{root_path}: ignoring {len(top_files)} image(s) at the top level of an "
                    "ImageFolder tree (they belong to no class folder)",
                    ImageLoadWarning,
                    stacklevel=2,
                )
            class_to_idx, mapping = _class_labels(root_path, self.classes, class_to_idx, class_index)
            items = [(f, c) for c in self.classes for f in class_files[c]]
            items.sort(key=lambda fc: fc[0].relative_to(root_path).as_posix())
            for i, (f, c) in enumerate(items):
                records.append(ImageRecord(i, os.path.abspath(f), mapping.get(c), c))
        else:
            self.layout = "flat"
            self.classes = []
            for i, f in enumerate(sorted(top_files, key=lambda f: f.name)):
                records.append(ImageRecord(i, os.path.abspath(f), None, None))
        if not records:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {root_path}")
        self.class_to_idx = class_to_idx
        super().__init__(records, os.path.abspath(root_path))

    def describe(self) -> dict:
        return {**super().describe(), "layout": self.layout, "n_classes": len(self.classes)}


def _scan_folder(root_path: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """The images of a folder: ``({class folder name: its images, searched recursively}, the
    images directly in it)``; hidden entries are skipped, folders without images left out."""
    class_files: dict[str, list[Path]] = {}
    top_files: list[Path] = []
    for entry in sorted(root_path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = _walk_images(entry)
            if files:
                class_files[entry.name] = files
        elif entry.is_file() and _is_image_file(entry.name):
            top_files.append(entry)
    return class_files, top_files


def _class_labels(
    root_path: Path,
    classes: list[str],
    class_to_idx: dict[str, int] | None,
    class_index: Callable[[str], int | None] | None,
) -> tuple[dict[str, int] | None, dict[str, int]]:
    """``(class_to_idx, folder name → label)`` of an ImageFolder tree's sorted ``classes``: by
    ``class_to_idx`` where given, else by the class each folder names (``class_index``), else by
    sorted position. Warns (for :class:`FolderSource`'s caller) about folders left unlabelled."""
    if class_to_idx is None and class_index is not None:
        # The model names its classes: a folder is labelled by the class it names (an
        # ImageNet synset id or a class name), never by its position in sorted order.
        class_to_idx = {c: i for c in classes if (i := class_index(c)) is not None}
    if class_to_idx is None:
        return None, {name: i for i, name in enumerate(classes)}
    mapping = dict(class_to_idx)
    unmapped = [c for c in classes if c not in mapping]
    if unmapped:
        warnings.warn(
            f"{root_path}: class folders that name no model class get no label: "
            + ", ".join(unmapped[:10])
            + (" ..." if len(unmapped) > 10 else ""),
            ImageLoadWarning,
            stacklevel=3,  # FolderSource's caller, as for the other warnings of the constructor
        )
    return class_to_idx, mapping


def _walk_images(directory: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / n for n in sorted(filenames) if _is_image_file(n))
    return found


class CsvSource(ImageSource):
    """A CSV file list, kept in file order.

    Columns: ``file`` or ``path`` (required; relative paths are resolved against the CSV's
    directory), ``label`` or ``class_index`` (optional int; an empty cell means unknown) and
    ``class_name`` or ``label_name`` (optional).  With ``class_to_idx``, a row without a numeric
    label gets one from its class name.
    """

    kind = "csv"

    def __init__(self, csv_path: str | os.PathLike, class_to_idx: dict[str, int] | None = None) -> None:
        path = Path(csv_path)
        if not path.is_file():
            raise InputError(f"CSV file list {os.fspath(csv_path)!r} does not exist")
        base = path.parent.resolve()
        # utf-8-sig: spreadsheets often prepend a BOM that would otherwise rename the first column.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = {(f or "").strip().lower(): f for f in (reader.fieldnames or [])}
            file_col = _first_col(fields, "file", "path")
            if file_col is None:
                raise InputError(f"{path}: needs a 'file' or 'path' column, has {list(fields)}")
            label_col = _first_col(fields, "label", "class_index")
            name_col = _first_col(fields, "class_name", "label_name")
            records: list[ImageRecord] = []
            for row in reader:
                rel = (row.get(file_col) or "").strip()
                if not rel:
                    continue
                name = ((row.get(name_col) or "").strip() or None) if name_col else None
                label = _parse_label(
                    row.get(label_col) if label_col else None,
                    name,
                    class_to_idx,
                    path,
                    reader.line_num,
                )
                file_path = Path(rel) if os.path.isabs(rel) else base / rel
                records.append(ImageRecord(len(records), os.fspath(file_path), label, name))
        if not records:
            raise InputError(f"{path}: no image rows")
        super().__init__(records, os.fspath(path.resolve()))


def _first_col(fields: dict[str, str], *names: str) -> str | None:
    return next((fields[n] for n in names if n in fields), None)


def _parse_label(
    raw: str | None, name: str | None, class_to_idx: dict[str, int] | None, path: Path, line: int
) -> int | None:
    raw = (raw or "").strip()
    if raw:
        try:
            return int(raw)
        except ValueError:
            if class_to_idx and raw in class_to_idx:
                return class_to_idx[raw]
            raise InputError(f"{path}:{line}: label {raw!r} is not an integer") from None
    if class_to_idx and name is not None:
        return class_to_idx.get(name)
    return None


# (name, package, path inside the package, ImageNet-1k index or None, ImageNet class name).
# Only real photos that ship in the wheels; scikit-image files that need a pooch download are
# left out.  Labels are given only where one ImageNet class clearly describes the photo.
_EMBEDDED: tuple[tuple[str, str, str, int | None, str | None], ...] = (
    ("astronaut", "skimage", "data/astronaut.png", None, None),
    ("brick", "skimage", "data/brick.png", None, None),
    ("camera", "skimage", "data/camera.png", 872, "tripod"),
    ("chelsea", "skimage", "data/chelsea.png", 281, "tabby, tabby cat"),
    ("coffee", "skimage", "data/coffee.png", 967, "espresso"),
    ("coins", "skimage", "data/coins.png", None, None),
    ("grass", "skimage", "data/grass.png", None, None),
    ("gravel", "skimage", "data/gravel.png", None, None),
    ("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg", None, None),
    ("ihc", "skimage", "data/ihc.png", None, None),
    ("moon", "skimage", "data/moon.png", None, None),
    ("motorcycle", "skimage", "data/motorcycle_left.png", None, None),
    ("page", "skimage", "data/page.png", None, None),
    ("retina", "skimage", "data/retina.jpg", None, None),
    ("rocket", "skimage", "data/rocket.jpg", 657, "missile"),
    ("text", "skimage", "data/text.png", None, None),
    ("china", "sklearn", "datasets/images/china.jpg", 698, "palace"),
    ("flower", "sklearn", "datasets/images/flower.jpg", None, None),
    (
        "grace_hopper",
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        652,
        "military uniform",
    ),
)


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it (sklearn/matplotlib imports are slow).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


class EmbeddedSource(ImageSource):
    """Real photos shipped inside installed packages; paths are ``embedded:<name>``.

    Photos whose package or file is missing are left out, so the set adapts to what is
    installed; ``files`` maps each name to its file on disk.
    """

    kind = "embedded"

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        records: list[ImageRecord] = []
        for name, package, rel, label, label_name in _EMBEDDED:
            pkg_dir = _package_dir(package)
            if pkg_dir is None or not (pkg_dir / rel).is_file():
                continue
            self.files[name] = os.fspath(pkg_dir / rel)
            records.append(ImageRecord(len(records), f"embedded:{name}", label, label_name))
        if not records:
            raise InputError("no embedded photos found: install scikit-image, scikit-learn or matplotlib")
        super().__init__(records, "embedded")

    def load(self, record: ImageRecord) -> Image.Image:
        name = record.path.removeprefix("embedded:")
        if name not in self.files:
            raise ImageLoadError(record.path, "unknown embedded photo")
        try:
            return load_rgb(self.files[name])
        except ImageLoadError as exc:
            raise ImageLoadError(record.path, f"{exc.reason} ({self.files[name]})") from exc


def used_records(source: ImageSource, max_images: int | None) -> list[ImageRecord]:
    """The records a run uses: the first ``max_images`` of ``source`` (all when None)."""
    return list(source.records[:max_images] if max_images else source.records)


def skip_reason(exc: Exception) -> str:
    """Why an image was skipped, for the warning and the run's record."""
    return exc.reason if isinstance(exc, ImageLoadError) else repr(exc)


def open_source(
    spec: str | os.PathLike | None,
    class_to_idx: dict[str, int] | None = None,
    class_index: Callable[[str], int | None] | None = None,
) -> ImageSource:
    """Open an image source: ``None``/``"embedded"`` -> :class:`EmbeddedSource`, a ``.csv``
    file -> :class:`CsvSource`, a directory -> :class:`FolderSource` (class folders labelled by
    ``class_index(folder name)`` where given); else ``ValueError``."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "embedded"):
        return EmbeddedSource()
    path = Path(spec)
    if path.suffix.lower() == ".csv" and path.is_file():
        return CsvSource(path, class_to_idx=class_to_idx)
    if path.is_dir():
        return FolderSource(path, class_to_idx=class_to_idx, class_index=class_index)
    raise InputError(
        f"image source {os.fspath(spec)!r} is neither 'embedded', an existing .csv file list nor a directory"
    )


# --------------------------------------------------------------------------------------------
# Preprocessing geometry
# --------------------------------------------------------------------------------------------


def crop_box(img_size: tuple[int, int], size: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """Box ``(left, top, right, bottom)`` of the centred square crop that
    :func:`center_crop_resize` takes from an image of ``img_size`` = (width, height), so that
    maps computed on the ``size`` x ``size`` model input can be placed back on the photo.

    The side is ``crop_fraction`` of the short side, which equals the usual
    "resize short side to size/crop_fraction, then centre-crop size" pipeline.
    """
    width, height = img_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {img_size}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    side = max(1, min(int(round(min(width, height) * crop_fraction)), width, height))
    # Same rounding as torchvision's CenterCrop, so offsets match torchvision pipelines.
    left = int(round((width - side) / 2.0))
    top = int(round((height - side) / 2.0))
    return left, top, left + side, top + side


def center_crop_resize(
    img: Image.Image, size: int = 224, crop_fraction: float = 224 / 256, interpolation: str = "bicubic"
) -> Image.Image:
    """Centre-crop ``crop_fraction`` of the short side (square) and resize to ``size`` x ``size``
    (``interpolation``: bicubic, bilinear or nearest, as the model's weights were trained)."""
    box = crop_box(img.size, size, crop_fraction)
    try:
        resample = Image.Resampling[interpolation.upper()]
    except KeyError:
        raise ValueError(f"interpolation {interpolation!r}: use bicubic, bilinear or nearest") from None
    # Resizing with box= avoids an intermediate crop copy and samples at sub-pixel accuracy.
    return img.resize((size, size), resample, box=box)

"""Tests for gig.images: robust loading, the three sources and crop geometry."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from gig.images import (
    CsvSource,
    EmbeddedSource,
    FolderSource,
    ImageLoadError,
    ImageRecord,
    center_crop_resize,
    crop_box,
    load_rgb,
    open_source,
)

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def _noise(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def _assert_rgb8(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


# ------------------------------------------------------------------------------ load_rgb


def test_truncated_jpeg_partial_decode_warns_and_restores_flag(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    Image.fromarray(_noise(64, 64)).save(full, quality=90)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.warns(UserWarning, match="cut.jpg"):
        img = load_rgb(cut)
    assert img.size == (64, 64)
    _assert_rgb8(img)
    # The tolerant mode must be local to the load, not left switched on for everybody.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg_without_scan_data_raises(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    Image.fromarray(_noise()).save(full)
    data = full.read_bytes()
    sos = data.find(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    for n, end in enumerate([header_end, sos, 200]):
        bad = tmp_path / f"head{n}.jpg"
        bad.write_bytes(data[:end])
        with pytest.raises(ImageLoadError, match=f"head{n}.jpg"):
            load_rgb(bad)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    Image.fromarray(_noise(64, 64)).save(full)
    data = full.read_bytes()
    part = tmp_path / "part.png"
    part.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="part.png"):
        img = load_rgb(part)
    arr = _assert_rgb8(img)
    # The top rows come from the real data, not the fill value.
    assert np.array_equal(arr[0], _noise(64, 64)[0])

    # Cut inside the first IDAT chunk header: nothing decodes.
    empty = tmp_path / "nopix.png"
    empty.write_bytes(data[: data.find(b"IDAT") + 4])
    with pytest.raises(ImageLoadError, match="nopix.png"):
        load_rgb(empty)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert _mode(path) == "CMYK"
    arr = _assert_rgb8(load_rgb(path))
    r, g, b = arr.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("lo,hi", [(0, 65535), (1000, 60000), (0, 4095)])
def test_16bit_png_gradient_scaled_by_range(tmp_path: Path, lo: int, hi: int) -> None:
    path = tmp_path / f"g16_{hi}.png"
    ramp = np.linspace(lo, hi, 200).astype(np.uint16)
    Image.fromarray(np.tile(ramp, (8, 1))).save(path)
    assert _mode(path).startswith("I")
    arr = _assert_rgb8(load_rgb(path))
    row = arr[0, :, 0].astype(int)
    assert row.min() <= 5 and row.max() >= 250  # spans the range, not clipped to white
    assert np.all(np.diff(row) >= 0)  # order of intensities preserved
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_wide_tiff_modes(tmp_path: Path, mode: str) -> None:
    dtype = {"I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]
    values = np.linspace(-3 if mode == "F" else 0, 5 if mode == "F" else 40000, 100)
    arr_in = np.tile(values.astype(dtype), (4, 1))
    path = tmp_path / f"wide_{mode.replace(';', '')}.tif"
    Image.fromarray(arr_in).save(path)
    assert _mode(path) == mode
    row = _assert_rgb8(load_rgb(path))[0, :, 0].astype(int)
    assert row[0] <= 5 and row[-1] >= 250 and np.all(np.diff(row) >= 0)


def test_8bit_content_in_wide_mode_keeps_values(tmp_path: Path) -> None:
    path = tmp_path / "small_i.tif"
    Image.fromarray(np.full((4, 4), 100, dtype=np.int32)).save(path)
    assert np.all(_assert_rgb8(load_rgb(path)) == 100)


def test_rgba_transparent_becomes_white(tmp_path: Path) -> None:
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[3:, :, 3] = 255  # bottom half opaque red, top half fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    arr = _assert_rgb8(load_rgb(path))
    assert np.all(arr[:3] == 255)
    assert np.all(arr[3:] == (200, 0, 0))


def test_palette_with_transparency_and_plain_palette(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=1)
    arr = _assert_rgb8(load_rgb(path))
    assert tuple(arr[0, 0]) == (255, 255, 255)  # transparent index -> white
    assert tuple(arr[1, 1]) == (255, 0, 0)
    gif = tmp_path / "pal.gif"
    pal.save(gif)
    assert tuple(_assert_rgb8(load_rgb(gif))[0, 0]) == (0, 0, 255)


@pytest.mark.parametrize(
    "mode,fill,expected",
    [("L", 77, 77), ("1", 1, 255), ("LA", (10, 255), 10), ("LA", (10, 0), 255)],
)
def test_gray_modes(tmp_path: Path, mode: str, fill, expected: int) -> None:
    path = tmp_path / f"gray_{mode}.png"
    Image.new(mode, (5, 3), fill).save(path)
    img = load_rgb(path)
    assert img.size == (5, 3)
    assert np.all(_assert_rgb8(img) == expected)


def test_tiny_images_accepted(tmp_path: Path) -> None:
    for size in [(1, 1), (5, 3)]:
        path = tmp_path / f"tiny_{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (9, 8, 7)).save(path)
        img = load_rgb(path)
        assert img.size == size
        assert center_crop_resize(img, 32).size == (32, 32)


@pytest.mark.parametrize(
    "name,content",
    [("garbage.jpg", b"this is not an image at all\n" * 20), ("empty.png", b"")],
)
def test_non_images_raise_naming_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=name) as info:
        load_rgb(path)
    assert info.value.path == str(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="nothere.jpg"):
        load_rgb(tmp_path / "nothere.jpg")


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    arr = np.asarray(out)
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # left stripe is now at the top


# ------------------------------------------------------------------------------ sources


def _save(path: Path, color: tuple[int, int, int] = (10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def test_imagefolder_labels_sorted(tmp_path: Path) -> None:
    _save(tmp_path / "dog" / "b.png")
    _save(tmp_path / "dog" / "sub" / "c.JPG")
    _save(tmp_path / "cat" / "a.png")
    _save(tmp_path / "cat" / "z.jpeg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_dir").mkdir()
    _save(tmp_path / ".hidden" / "x.png")
    src = FolderSource(tmp_path)
    rel = [Path(r.path).relative_to(tmp_path).as_posix() for r in src.records]
    assert rel == ["cat/a.png", "cat/z.jpeg", "dog/b.png", "dog/sub/c.JPG"]
    assert [r.image_id for r in src.records] == [0, 1, 2, 3]
    assert [(r.label, r.label_name) for r in src.records] == [
        (0, "cat"),
        (0, "cat"),
        (1, "dog"),
        (1, "dog"),
    ]
    assert src.describe() == {
        "kind": "folder",
        "root": str(tmp_path),
        "n": 4,
        "n_labelled": 4,
        "layout": "imagefolder",
        "n_classes": 2,
    }
    assert all(_assert_rgb8(src.load(r)).shape == (6, 8, 3) for r in src.records)


def test_imagefolder_class_to_idx(tmp_path: Path) -> None:
    _save(tmp_path / "tabby" / "a.png")
    _save(tmp_path / "espresso" / "b.png")
    _save(tmp_path / "unknown" / "c.png")
    with pytest.warns(UserWarning, match="unknown"):
        src = open_source(tmp_path, class_to_idx={"tabby": 281, "espresso": 967})
    labels = {r.label_name: r.label for r in src.records}
    assert labels == {"espresso": 967, "tabby": 281, "unknown": None}


def test_flat_folder(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.webp"]:
        _save(tmp_path / name)
    (tmp_path / "readme.md").write_text("x")
    src = FolderSource(tmp_path)
    assert src.layout == "flat"
    assert [Path(r.path).name for r in src.records] == ["a.jpg", "b.PNG", "c.webp"]
    assert all(r.label is None and r.label_name is None for r in src.records)
    assert len(src) == 3


def test_empty_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        FolderSource(tmp_path)


def test_csv_source_relative_paths_and_labels(tmp_path: Path) -> None:
    _save(tmp_path / "imgs" / "one.png", (255, 0, 0))
    _save(tmp_path / "imgs" / "two.png", (0, 255, 0))
    abs_img = tmp_path / "elsewhere" / "three.png"
    _save(abs_img)
    csv_path = tmp_path / "lists" / "list.csv"
    csv_path.parent.mkdir()
    with open(csv_path, "w", newline="", encoding="utf-8-sig") as fh:  # BOM like Excel writes
        w = csv.writer(fh)
        w.writerow(["file", "class_index", "class_name"])
        w.writerow(["../imgs/two.png", "5", "five, 5"])
        w.writerow(["../imgs/one.png", "", ""])
        w.writerow([str(abs_img), "7", "seven"])
    src = CsvSource(csv_path)
    assert [(r.image_id, r.label, r.label_name) for r in src.records] == [
        (0, 5, "five, 5"),
        (1, None, None),
        (2, 7, "seven"),
    ]
    assert tuple(np.asarray(src.load(src.records[0]))[0, 0]) == (0, 255, 0)
    assert src.describe()["kind"] == "csv" and src.describe()["n"] == 3


def test_csv_path_and_label_columns_with_class_to_idx(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    (tmp_path / "l.csv").write_text("path,label_name\na.png,tabby\nb.png,other\n")
    src = open_source(tmp_path / "l.csv", class_to_idx={"tabby": 281})
    assert isinstance(src, CsvSource)
    assert [(r.label, r.label_name) for r in src.records] == [(281, "tabby"), (None, "other")]
    (tmp_path / "bad.csv").write_text("image,label\na.png,1\n")
    with pytest.raises(ValueError, match="'file' or 'path'"):
        CsvSource(tmp_path / "bad.csv")
    (tmp_path / "badlabel.csv").write_text("file,label\na.png,cat\n")
    with pytest.raises(ValueError, match="badlabel.csv:2"):
        CsvSource(tmp_path / "badlabel.csv")


def test_embedded_source_loads_offline() -> None:
    src = EmbeddedSource()
    assert 12 <= len(src) <= 25
    names = [r.path for r in src.records]
    assert len(set(names)) == len(names) and all(n.startswith("embedded:") for n in names)
    assert [r.image_id for r in src.records] == list(range(len(src)))
    for rec in src.records:
        assert (rec.label is None) == (rec.label_name is None)
        assert rec.label is None or 0 <= rec.label < 1000
    labels = {r.path: r.label for r in src.records}
    assert labels.get("embedded:coffee") == 967
    loaded = list(src.iter_loaded())
    assert len(loaded) == len(src) and src.skipped == []
    for rec, img in loaded:
        arr = _assert_rgb8(img)
        assert min(img.size) >= 100 and arr.std() > 5, rec.path  # a real picture, not a stub
    assert src.describe() == {
        "kind": "embedded",
        "root": "embedded",
        "n": len(src),
        "n_labelled": sum(r.label is not None for r in src.records),
    }
    with pytest.raises(ImageLoadError, match="embedded:nope"):
        src.load(ImageRecord(99, "embedded:nope", None, None))


def test_open_source_dispatch_and_errors(tmp_path: Path) -> None:
    assert isinstance(open_source(None), EmbeddedSource)
    assert isinstance(open_source("embedded"), EmbeddedSource)
    _save(tmp_path / "d" / "x.png")
    assert isinstance(open_source(tmp_path / "d"), FolderSource)
    assert isinstance(open_source(str(tmp_path / "d")), FolderSource)
    (tmp_path / "x.txt").write_text("x")
    for spec in [tmp_path / "missing", tmp_path / "missing.csv", tmp_path / "x.txt"]:
        with pytest.raises(ValueError, match=spec.name):
            open_source(spec)


def test_iter_loaded_skips_bad_files(tmp_path: Path) -> None:
    _save(tmp_path / "a_good.png")
    (tmp_path / "b_bad.jpg").write_bytes(b"GIF? no, text")
    _save(tmp_path / "c_good.png")
    (tmp_path / "d_empty.png").write_bytes(b"")
    src = open_source(tmp_path)
    with pytest.warns(UserWarning) as record:
        got = list(src.iter_loaded())
    assert [Path(r.path).name for r, _ in got] == ["a_good.png", "c_good.png"]
    messages = [str(w.message) for w in record]
    assert any(m.startswith("skipping ") and "b_bad.jpg" in m for m in messages)
    assert any("d_empty.png" in m for m in messages)
    assert [Path(p).name for p, _ in src.skipped] == ["b_bad.jpg", "d_empty.png"]
    assert all(reason for _, reason in src.skipped)
    # A subset of records can be passed; skips accumulate across calls.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(src.iter_loaded(src.records[1:2])) == []
    assert len(src.skipped) == 3


# ------------------------------------------------------------------------------ geometry


def test_crop_box_geometry() -> None:
    assert crop_box((320, 256), 224, 224 / 256) == (48, 16, 272, 240)
    assert crop_box((256, 320), 224, 224 / 256) == (16, 48, 240, 272)
    assert crop_box((100, 100), 224, 1.0) == (0, 0, 100, 100)
    assert crop_box((1, 1), 224, 224 / 256) == (0, 0, 1, 1)
    with pytest.raises(ValueError):
        crop_box((10, 10), 224, 0.0)
    with pytest.raises(ValueError):
        crop_box((0, 10), 224, 0.5)


def test_center_crop_resize_takes_the_box() -> None:
    img = Image.new("RGB", (400, 300), (0, 0, 255))
    left, top, right, bottom = crop_box(img.size, 64, 0.5)
    assert (right - left, bottom - top) == (150, 150)
    img.paste((255, 0, 0), (left, top, right, bottom))  # red exactly inside the crop
    out = center_crop_resize(img, 64, 0.5)
    assert out.size == (64, 64)
    arr = np.asarray(out).astype(int)
    # Bicubic support reaches a pixel past the box, so only the interior is pure red; a box
    # off by a few pixels would leave whole blue rows or columns there.
    inner = arr[2:-2, 2:-2]
    assert np.all(inner[..., 0] >= 250) and np.all(inner[..., 2] <= 5)
    assert np.all(arr[..., 0] > arr[..., 2])  # even the edge pixels are mostly the crop


# ------------------------------------------------------------------------------ shared sample


def test_imagenet_sample_csv() -> None:
    labels_csv = SAMPLE_DIR / "labels.csv"
    if not labels_csv.is_file():
        pytest.skip(f"{SAMPLE_DIR} not present")
    src = open_source(labels_csv)
    assert isinstance(src, CsvSource)
    assert len(src) == 800
    assert all(r.label is not None and 0 <= r.label < 1000 for r in src.records)
    assert all(r.label_name for r in src.records)
    first = src.records[0]
    assert (first.label, first.label_name) == (0, "tench, Tinca tinca")
    assert Path(first.path).parent == SAMPLE_DIR
    for rec in src.records[::200]:
        img = src.load(rec)
        _assert_rgb8(img)
        assert min(img.size) >= 32

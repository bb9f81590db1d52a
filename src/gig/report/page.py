"""Rendering of gig's offline pages: asset files (or data URIs), safe JSON for the page's data
block, heatmap overlays, value formatting, and the page itself (jinja2 template + bundled static
files). Used by the run's report (:mod:`gig.report.builder`) and the explain pages
(:mod:`gig.explain`), so both show one viewer.

All text from a run (class names, file names, labels) reaches the page through jinja2
autoescaping or through a JSON block whose ``<``, ``>`` and ``&`` are escaped, and the page's
script writes it with ``textContent`` only.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from PIL import Image

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
STATIC_FILES = ("cytoscape.min.js", "report.js", "report.css")


# ------------------------------------------------------------------------------------ helpers
def safe_json(data: Any) -> Markup:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>``, ``&``, U+2028/9
    escaped so that no string inside can close the element or open markup; NaN/inf → null."""
    text = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, esc in (
        ("&", "\\u0026"),
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, esc)
    return Markup(text)


def utf8_text(text: str) -> str:
    """``text`` with every lone surrogate (an undecodable byte of a file name, PEP 383) shown as
    U+FFFD, so it can be written as UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # surrogates that did not come from a file name
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _finite(obj.item())
    return obj


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _script_safe(code: str) -> str:
    """A script body that cannot end its ``<script>`` element early."""
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE)


class Assets:
    """Files of the report: written under ``out`` (relative URLs) or inlined as data URIs."""

    MIME = {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".svg": "image/svg+xml",
        ".gif": "image/gif",
        ".webp": "image/webp",
    }

    def __init__(self, out: Path, inline: bool):
        self.out = out
        self.inline = inline

    def add_bytes(self, rel: str, data: bytes) -> str:
        if self.inline:
            mime = self.MIME.get(Path(rel).suffix.lower(), "application/octet-stream")
            return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return rel

    def add_file(self, rel: str, src: Path) -> str:
        if self.inline:
            return self.add_bytes(rel, Path(src).read_bytes())
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.exists() and path.resolve() == Path(src).resolve()):
            shutil.copyfile(src, path)
        return rel

    def add_image(self, rel: str, image: Image.Image, quality: int = 82) -> str:
        buf = io.BytesIO()
        if rel.endswith(".jpg"):
            image.convert("RGB").save(buf, format="JPEG", quality=quality)
        else:
            image.save(buf, format="PNG", optimize=True)
        return self.add_bytes(rel, buf.getvalue())


_HEAT = None


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB floats with matplotlib's ``inferno`` (dark → yellow)."""
    global _HEAT
    if _HEAT is None:
        import matplotlib

        _HEAT = matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3].astype(np.float32)
    return _HEAT[np.clip((values * 255).round().astype(int), 0, 255)]


def overlay_base(image: Image.Image, size: int) -> np.ndarray:
    """``(size, size, 3)`` floats in [0, 1]: the image as :func:`heatmap_overlay` blends over it
    (made once per image, not once per map)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def heatmap_overlay(base: np.ndarray, grid: np.ndarray) -> Image.Image:
    """``grid (H, W)`` (non-negative) upsampled bilinearly to ``base`` (:func:`overlay_base`) and
    blended over it.

    The map is normalised by its maximum and shown on a square-root scale; the image is dimmed where the map is low, so the
    concept's place reads as the bright, coloured part (as in the paper's localisation images).
    """
    size = base.shape[0]
    grid = np.clip(np.nan_to_num(grid.astype(np.float32)), 0, None)
    top = float(grid.max())
    norm = np.sqrt(grid / top) if top > 0 else grid  # square root: weaker places stay visible
    t = torch.from_numpy(norm)[None, None]
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    up = np.clip(up, 0, 1)
    alpha = (0.25 + 0.75 * up)[..., None]
    colour = heat_colours(up)
    mixed = base * (0.3 + 0.7 * up[..., None]) * (1 - 0.55 * alpha) + colour * 0.55 * alpha
    return Image.fromarray((np.clip(mixed, 0, 1) * 255).astype(np.uint8))


def jpeg_bytes(path: Path, quality: int = 88) -> bytes:
    """An ERF crop (PNG in the run's cache) as JPEG bytes: a quarter of the size in the report."""
    with Image.open(path) as im:
        return image_jpeg_bytes(im, quality)


def image_jpeg_bytes(image: Image.Image, quality: int = 88) -> bytes:
    """:func:`jpeg_bytes` of a crop in memory (the same bytes: a PNG holds the crop's exact pixels)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def fmt_value(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 10**6):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def render_page(
    out: Path,
    assets: Assets,
    context: dict[str, Any],
    class_name: Callable[[int], str],
    template: str = "report.html.j2",
) -> Path:
    """Write ``out/index.html`` from ``template`` with ``context`` (which holds ``page_data``, the
    page's JSON block) and the bundled viewer (cytoscape.js, report.js, report.css: copied under
    ``static/`` or inlined when ``assets.inline``). Returns the path of ``index.html``."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt_value
    env.filters["slug"] = slug
    env.globals["cname"] = class_name
    static = {}
    for name in STATIC_FILES:
        if assets.inline:
            static[name] = Markup(_script_safe((STATIC / name).read_text(encoding="utf-8")))
        else:
            static[name] = assets.add_file(f"static/{name}", STATIC / name)
            if name == "cytoscape.min.js":
                assets.add_file("static/cytoscape.LICENSE", STATIC / "cytoscape.LICENSE")
    html = env.get_template(template).render(
        data_json=safe_json(context["page_data"]),
        single_file=assets.inline,
        nonce=secrets.token_urlsafe(18),
        static=static,
        generated=time.strftime("%Y-%m-%d %H:%M"),
        **context,
    )
    index_path = out / "index.html"
    # A file name that is not valid UTF-8 reaches Python as lone surrogates (PEP 383); shown
    # with U+FFFD in its place rather than failing the whole page.
    index_path.write_text(utf8_text(html), encoding="utf-8")
    return index_path


def output_size(out: Path) -> dict[str, float]:
    """The size of a written page: ``index.html`` and the whole folder in MB, and its file count."""
    files = [f for f in out.rglob("*") if f.is_file()]
    return {
        "index_mb": round((out / "index.html").stat().st_size / 2**20, 2),
        "total_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2),
        "files": len(files),
    }

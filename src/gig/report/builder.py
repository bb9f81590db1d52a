"""Build the offline HTML report of a run: ``RUN/report/index.html``.

The page has four parts, all drawn from the run's own artefacts:

* **graph viewer** — the causal concept graphs (per class, several classes, global, one image),
  drawn by the bundled cytoscape.js from the graph JSON (``gig.graph/1``) embedded verbatim in the
  page: the page draws exactly the JSON's nodes and edges;
* **concept atlas** — per layer, the most important concepts with their top-1 and top-10 nearest
  PFVs as ERF crops (context dimmed), member counts, member classes, strongest parents/children;
* **localisation** — for a selection of images, where each top concept sits: its GIG map (or its
  Lasso coefficient) upsampled to the model's crop, over the image;
* **metrics** — reconstruction figures, completeness residuals, stage timings, and the evaluation
  (``RUN/evaluate/``: summary.json, markdown tables, plots) when it has run.

Images are written as files under ``RUN/report/`` and referenced by relative URLs (the page opens
from disk), or inlined as data URIs with ``single_file=True``. All text from the run (class names,
file names, labels) reaches the page through jinja2 autoescaping or through a JSON block whose
``<``, ``>`` and ``&`` are escaped, and the page's script writes it with ``textContent`` only.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from PIL import Image

from ..attribution import completeness_residuals, load_attributions
from ..collect import load_images, load_samples
from ..concepts import load_concept_cards
from ..decompose import CodeReader
from ..erf import erf_dir, exemplar_crops
from ..errors import RunMismatchError
from ..graph import build_graph, default_classes, edge_weights
from ..store import RunStore, load_json

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
STATIC_FILES = ("cytoscape.min.js", "report.js", "report.css")


@dataclass
class ReportOptions:
    """What goes into the report. Every field is also a ``gig report`` option."""

    #: concepts per layer in the atlas (the most important ones); 0 = every concept
    atlas_per_layer: int = 30
    #: nearest PFVs shown per concept (top-1 first), at most the run's exemplars (10)
    exemplars: int = 10
    #: classes with a class graph in the viewer: the run's graph classes, then the most frequent
    max_classes: int = 8
    #: explicit classes (overrides the automatic choice)
    classes: list[int] | None = None
    #: the first ``shared_classes`` classes get a shared graph for every subset of 2 or more
    shared_classes: int = 4
    #: images with a single-image graph and a localisation panel
    n_images: int = 12
    #: explicit image ids (overrides the automatic choice)
    image_ids: list[int] | None = None
    #: side of the localisation heatmaps and image crops, in pixels
    heatmap_size: int = 160
    #: inline every image, script and style into index.html (one file, larger)
    single_file: bool = False


# ------------------------------------------------------------------------------------ helpers
def safe_json(data: Any) -> Markup:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>``, ``&``, U+2028/9
    escaped so that no string inside can close the element or open markup; NaN/inf → null."""
    text = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                      ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _script_safe(code: str) -> str:
    """A script body that cannot end its ``<script>`` element early."""
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE)


class Assets:
    """Files of the report: written under ``out`` (relative URLs) or inlined as data URIs."""

    MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
            ".gif": "image/gif", ".webp": "image/webp"}

    def __init__(self, out: Path, inline: bool):
        self.out = out
        self.inline = inline
        self.n_files = 0

    def add_bytes(self, rel: str, data: bytes) -> str:
        if self.inline:
            mime = self.MIME.get(Path(rel).suffix.lower(), "application/octet-stream")
            return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.n_files += 1
        return rel

    def add_file(self, rel: str, src: Path) -> str:
        if self.inline:
            return self.add_bytes(rel, Path(src).read_bytes())
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.exists() and path.resolve() == Path(src).resolve()):
            shutil.copyfile(src, path)
        self.n_files += 1
        return rel

    def add_image(self, rel: str, image: Image.Image, quality: int = 82) -> str:
        import io

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


def heatmap_overlay(image: Image.Image, grid: np.ndarray, size: int) -> Image.Image:
    """``grid (H, W)`` (non-negative) upsampled bilinearly to the image and blended over it.

    The map is normalised by its maximum and shown on a square-root scale; the image is dimmed where the map is low, so the
    concept's place reads as the bright, coloured part (as in the paper's localisation images).
    """
    grid = np.clip(np.nan_to_num(grid.astype(np.float32)), 0, None)
    top = float(grid.max())
    norm = np.sqrt(grid / top) if top > 0 else grid  # square root: weaker places stay visible
    t = torch.from_numpy(norm)[None, None]
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    up = np.clip(up, 0, 1)
    base = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    alpha = (0.25 + 0.75 * up)[..., None]
    colour = heat_colours(up)
    mixed = base * (0.3 + 0.7 * up[..., None]) * (1 - 0.55 * alpha) + colour * 0.55 * alpha
    return Image.fromarray((np.clip(mixed, 0, 1) * 255).astype(np.uint8))


def _jpeg(path: Path, quality: int = 88) -> bytes:
    """An ERF crop (PNG in the run's cache) as JPEG bytes: a quarter of the size in the report."""
    import io

    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _n_images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def _short(path: str) -> str:
    """The file name of an image path (``embedded:NAME`` stays as it is)."""
    return path.rsplit("/", 1)[-1].rsplit("\\", 1)[-1] or path


def _class_name(names: list[str], c: int | None) -> str:
    if c is None:
        return "target logit"
    return names[c] if 0 <= c < len(names) else f"class {c}"


# -------------------------------------------------------------------------------- the model
class _ModelAccess:
    """The run's model and images, loaded only when something needs them (ERF crops, crops)."""

    def __init__(self, store: RunStore, model=None, source=None):
        self.store = store
        self._bundle = model
        self._source = source
        self._handle = None

    @property
    def bundle(self):
        if self._bundle is None:
            from ..models import load_model

            self._bundle = load_model(self.store.config.model, self.store.config.weights)
        return self._bundle

    @property
    def handle(self):
        if self._handle is None:
            from ..hooks import ModelHandle

            self._handle = ModelHandle(self.bundle, self.store.config.device)
        return self._handle

    @property
    def source(self):
        if self._source is None:
            from ..images import open_source

            self._source = open_source(self.store.config.images)
        return self._source

    def display_image(self, image_id: int) -> Image.Image:
        by_id = {r.image_id: r for r in self.source.records}
        return self.bundle.display_image(self.source.load(by_id[image_id]))

    def crops(self, layer: str, samples: list[int]) -> list[Path]:
        """ERF crops of sampled PFVs of ``layer``, from the run's ERF cache (:func:`gig.erf.exemplar_crops`)."""
        return exemplar_crops(self.store, self.handle, self.source, layer, samples)


# ---------------------------------------------------------------------------- aggregation
def _top_pairs(values: torch.Tensor, ids: list[str], k: int = 5) -> list[list]:
    """The ``k`` largest positive entries of ``values`` as ``[[id, weight], ...]``."""
    if values.numel() == 0:
        return []
    top = values.topk(min(k, values.numel()))
    return [[ids[int(i)], float(v)] for v, i in zip(top.values, top.indices) if float(v) > 0]


# ---------------------------------------------------------------------------------- builder
def build_report(run_dir: str | Path, out: str | Path | None = None, options: ReportOptions | None = None,
                 model=None, source=None, class_names: list[str] | None = None,
                 progress: bool = False) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``RUN/report``); returns
    the path of ``index.html``.

    ``model`` (a :class:`gig.models.ModelBundle`) and ``source`` override the run's configured
    model and images (as for :class:`gig.pipeline.Pipeline`); ``class_names`` overrides the
    model's class names.
    """
    started = time.perf_counter()
    opts = options or ReportOptions()
    store = RunStore.open(run_dir)
    store.require("graph")
    config = store.config
    layers = list(config.layers)
    out = Path(out) if out is not None else store.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("img", "figures", "eval", "static"):  # stale files of an earlier build
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    assets = Assets(out, opts.single_file)
    access = _ModelAccess(store, model, source)
    names = list(class_names) if class_names is not None else list(access.bundle.class_names)
    log = (lambda msg: print(f"report: {msg}", flush=True)) if progress else (lambda msg: None)

    images_info = load_images(store)["images"]
    by_image = {int(i["image_id"]): i for i in images_info}
    data = load_attributions(store)
    row_of = {int(i): r for r, i in enumerate(data["image_id"].tolist())}
    cards = {layer: load_concept_cards(store, layer) for layer in layers}
    samples = {layer: load_samples(store, layer) for layer in layers}

    # ---------------------------------------------------------------- graphs
    graph_dir = store.root / "graph"
    index = load_json(graph_dir / "index.json")
    run_classes = [int(c) for c in index.get("classes", [])]
    if opts.classes:
        classes = [int(c) for c in opts.classes]
    else:
        frequent = default_classes(store, n=max(opts.max_classes, len(run_classes)))
        classes = list(dict.fromkeys(run_classes + frequent))[: max(opts.max_classes, len(run_classes))]
    targets = {int(i["image_id"]): int(i["target"]) for i in images_info}
    classes = [c for c in classes if any(t == c for t in targets.values())]

    graphs: list[dict] = []
    for c in classes:
        file = index["files"]["class"].get(str(c))
        graph = load_json(graph_dir / file) if file else build_graph(store, "class", [c], class_names=names, data=data)
        graphs.append({"key": f"class:{c}", "mode": "class", "classes": [c], "file": file,
                       "label": f"{_class_name(names, c)} ({_n_images(graph['n_images'])})", "graph": graph})
    shared_pool = classes[: max(0, opts.shared_classes)]
    run_shared = index["files"].get("shared")
    for size in range(2, len(shared_pool) + 1):
        for combo in itertools.combinations(shared_pool, size):
            file = None
            if run_shared and sorted(combo) == sorted(run_classes):
                file = run_shared
                graph = load_json(graph_dir / file)
            else:
                graph = build_graph(store, "shared", list(combo), class_names=names, data=data)
            graphs.append({"key": "shared:" + ",".join(str(c) for c in sorted(combo)), "mode": "shared",
                           "classes": sorted(combo), "file": file,
                           "label": " + ".join(_class_name(names, c) for c in sorted(combo)), "graph": graph})
    if index["files"].get("global"):
        graph = load_json(graph_dir / index["files"]["global"])
        graphs.append({"key": "global", "mode": "global", "classes": [], "file": index["files"]["global"],
                       "label": f"all images ({graph['n_images']})", "graph": graph})
    image_ids = _choose_images(opts, images_info, classes, row_of)
    for image_id in image_ids:
        graph = build_graph(store, "image", image_id=image_id, class_names=names, data=data)
        info = by_image[image_id]
        graphs.append({"key": f"image:{image_id}", "mode": "image", "classes": [int(info["target"])],
                       "image_id": image_id, "file": None,
                       "label": f"#{image_id} {_short(info['path'])} → {_class_name(names, int(info['target']))}",
                       "graph": graph})
    log(f"{len(graphs)} graphs")

    # ---------------------------------------------------------------- concepts shown
    K = {layer: len(cards[layer]["concepts"]) for layer in layers}
    importance = {layer: data[f"{layer}/score"].mean(0) for layer in layers}
    atlas_ids: dict[str, list[int]] = {}
    for layer in layers:
        order = importance[layer].argsort(descending=True).tolist()
        atlas_ids[layer] = order[: opts.atlas_per_layer] if opts.atlas_per_layer > 0 else order
    shown: dict[str, set[int]] = {layer: set(atlas_ids[layer]) for layer in layers}
    for g in graphs:
        for node in g["graph"]["nodes"]:
            if node["layer"] in shown:
                shown[node["layer"]].add(int(node["concept"]))

    # ERF crops of the exemplars of every concept shown, one batched pass per layer
    n_ex = max(1, opts.exemplars)
    crop_url: dict[str, dict[int, str]] = {}
    for layer in layers:
        wanted = sorted({s for q in shown[layer] for s in cards[layer]["concepts"][q]["exemplars"][:n_ex]})
        t0 = time.perf_counter()
        paths = access.crops(layer, wanted)
        crop_url[layer] = {s: assets.add_bytes(f"img/erf/{_slug(layer)}/s{s}.jpg", _jpeg(p)) for s, p in zip(wanted, paths)}
        log(f"{layer}: {len(shown[layer])} concepts, {len(wanted)} ERF crops ({time.perf_counter() - t0:.1f}s)")

    # dataset-wide parents (lower layer) and children (upper layer or classes)
    edges = edge_weights(data, torch.arange(int(data["image_id"].numel())), layers)
    top = layers[-1]
    class_share = {}
    target_vec = torch.tensor([targets[int(i)] for i in data["image_id"].tolist()])
    for c in sorted(set(target_vec.tolist())):
        class_share[c] = data[f"{top}/score"][target_vec == c].mean(0)
    class_ids = sorted(class_share)
    class_matrix = torch.stack([class_share[c] for c in class_ids]) if class_ids else torch.zeros(0, K[top])

    concepts: dict[str, dict] = {}
    for position, layer in enumerate(layers):
        layer_cards = cards[layer]["concepts"]
        lower = layers[position - 1] if position > 0 else None
        upper = layers[position + 1] if position + 1 < len(layers) else None
        lower_ids = [f"{lower}:{q}" for q in range(K[lower])] if lower else []
        upper_ids = [f"{upper}:{q}" for q in range(K[upper])] if upper else [f"class:{c}" for c in class_ids]
        for q in sorted(shown[layer]):
            card = layer_cards[q]
            sims = card.get("exemplar_similarity", [])
            ex = []
            for j, s in enumerate(card["exemplars"][:n_ex]):
                ex.append({"s": int(s), "url": crop_url[layer].get(int(s)),
                           "image": int(samples[layer]["image_id"][s]), "cls": int(samples[layer]["target"][s]),
                           "sim": sims[j] if j < len(sims) else None})
            parents = _top_pairs(edges[lower][q], lower_ids) if lower else []
            if upper:
                children = _top_pairs(edges[layer][:, q], upper_ids)
            else:
                children = _top_pairs(class_matrix[:, q], upper_ids) if class_ids else []
            concepts[f"{layer}:{q}"] = {
                "layer": layer, "concept": q, "count": card["count"], "importance": float(importance[layer][q]),
                "rank": None, "top_classes": card["top_classes"], "exemplars": ex,
                "parents": parents, "children": children,
            }
        for rank, q in enumerate(importance[layer].argsort(descending=True).tolist()):
            if f"{layer}:{q}" in concepts:
                concepts[f"{layer}:{q}"]["rank"] = rank + 1

    # ---------------------------------------------------------------- localisation
    t0 = time.perf_counter()
    codes_of = {layer: read_codes(store, layer, image_ids) for layer in layers}
    size = opts.heatmap_size
    images: dict[str, dict] = {}
    for image_id in image_ids:
        info = by_image[image_id]
        view = access.display_image(image_id)
        entry = {"id": image_id, "path": info["path"], "label": info.get("label"),
                 "label_name": info.get("label_name"), "pred": info.get("pred"), "target": info["target"],
                 "target_prob": info.get("target_prob"),
                 "url": assets.add_image(f"img/images/{image_id}.jpg", view.resize((2 * size, 2 * size), Image.BICUBIC)),
                 "layers": []}
        row = row_of[image_id]
        for layer in reversed(layers):
            tops = data[f"{layer}/top"][row].tolist()
            imp = data[f"{layer}/importance"][row].tolist()
            maps = data[f"{layer}/maps"][row].numpy()  # (k, H, W)
            h, w = maps.shape[1:]
            codes = codes_of[layer][image_id]  # (H·W, K)
            cells = []
            for j, q in enumerate(tops):
                stem = f"img/loc/{image_id}/{_slug(layer)}_{q}"
                coef = codes[:, q].abs().reshape(h, w).numpy()
                cells.append({
                    "concept": q, "id": f"{layer}:{q}", "importance": imp[j],
                    "gig": assets.add_image(f"{stem}_gig.jpg", heatmap_overlay(view, maps[j], size)),
                    "coef": assets.add_image(f"{stem}_coef.jpg", heatmap_overlay(view, coef, size)),
                    "top1": concepts.get(f"{layer}:{q}", {}).get("exemplars", [{}])[0].get("url"),
                })
            entry["layers"].append({"layer": layer, "cells": cells})
        images[str(image_id)] = entry
    log(f"localisation: {len(images)} images ({time.perf_counter() - t0:.1f}s)")

    # ---------------------------------------------------------------- figures and metrics
    from .figure import draw_class_figure

    figures = []
    crop_dirs = {layer: erf_dir(store, layer) for layer in layers}  # one manifest read per layer
    for g in graphs:
        if g["mode"] != "class":
            continue
        thumbs = {}
        for node in g["graph"]["nodes"]:
            c = concepts.get(node["id"])
            if c and c["exemplars"]:
                thumbs[node["id"]] = crop_dirs[node["layer"]] / f"s{c['exemplars'][0]['s']}.png"
        stem = out / "figures" / f"class_{g['classes'][0]}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        svg, png = draw_class_figure(g["graph"], stem, thumbs)
        fig = {"label": g["label"], "svg": assets.add_file(f"figures/{svg.name}", svg),
               "png": assets.add_file(f"figures/{png.name}", png), "pipeline": []}
        if opts.single_file:  # figures/ then only holds what index.html already inlines
            svg.unlink()
            png.unlink()
        for ext in ("svg", "png"):
            original = graph_dir / f"class_{g['classes'][0]}.{ext}"
            if original.is_file():
                fig["pipeline"].append({"ext": ext, "url": assets.add_file(f"figures/pipeline_{original.name}", original)})
        figures.append(fig)
    if opts.single_file and (out / "figures").is_dir() and not any((out / "figures").iterdir()):
        (out / "figures").rmdir()

    metrics = _metrics(store, layers, assets)
    evaluation = _evaluation(store.root / "evaluate", assets)

    # ---------------------------------------------------------------- page
    referenced = set()
    for g in graphs:
        for node in g["graph"]["nodes"]:
            if node.get("class") is not None:
                referenced.add(int(node["class"]))
            for c, _ in node.get("top_classes", []):
                referenced.add(int(c))
            referenced.update(int(c) for c in node.get("in_top_of", []))
    for c in concepts.values():
        referenced.update(int(x) for x, _ in c["top_classes"])
        referenced.update(int(e["cls"]) for e in c["exemplars"])
    referenced.update(class_ids)
    for i in images.values():
        referenced.update(int(x) for x in (i["target"], i["pred"]) if x is not None)

    page_data = {
        "schema": "gig.report/1",
        "run": {"path": str(store.root), "model": config.model, "layers": layers,
                "n_images": len(images_info), "top_k": config.top_k, "edges_per_node": config.edges_per_node,
                "K": K},
        "classNames": {str(c): _class_name(names, c) for c in sorted(referenced)},
        "graphs": graphs,
        "sharedPool": classes[: max(0, opts.shared_classes)],
        "concepts": concepts,
        "images": {k: {kk: vv for kk, vv in v.items() if kk != "layers"} for k, v in images.items()},
        "localised": {k: {c["id"]: {"gig": c["gig"], "coef": c["coef"]} for layer in v["layers"] for c in layer["cells"]}
                      for k, v in images.items()},
    }
    atlas = []
    for layer in reversed(layers):
        atlas.append({"layer": layer, "K": K[layer], "concepts": [concepts[f"{layer}:{q}"] for q in atlas_ids[layer]]})

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["slug"] = _slug
    env.globals["cname"] = lambda c: _class_name(names, c)
    static = {}
    for name in STATIC_FILES:
        if opts.single_file:
            static[name] = Markup(_script_safe((STATIC / name).read_text(encoding="utf-8")))
        else:
            static[name] = assets.add_file(f"static/{name}", STATIC / name)
            if name == "cytoscape.min.js":
                assets.add_file("static/cytoscape.LICENSE", STATIC / "cytoscape.LICENSE")
    html = env.get_template("report.html.j2").render(
        run=page_data["run"], data_json=safe_json(page_data), atlas=atlas, images=list(images.values()),
        figures=figures, metrics=metrics, evaluation=evaluation, graphs=graphs, single_file=opts.single_file,
        nonce=secrets.token_urlsafe(18),
        static=static, atlas_cap=opts.atlas_per_layer,
        atlas_ids={f"{layer}:{q}" for layer in layers for q in atlas_ids[layer]}, generated=time.strftime("%Y-%m-%d %H:%M"),
        build_seconds=round(time.perf_counter() - started, 1))
    index_path = out / "index.html"
    # A file name that is not valid UTF-8 reaches Python as lone surrogates (PEP 383); shown
    # with U+FFFD in its place rather than failing the whole report.
    index_path.write_text(utf8_text(html), encoding="utf-8")
    log(f"wrote {index_path} ({time.perf_counter() - started:.1f}s)")
    return index_path


def read_codes(store: RunStore, layer: str, image_ids: list[int]) -> dict[int, torch.Tensor]:
    """Dense codes ``(H·W, K)`` of a few images (:class:`gig.decompose.CodeReader`, lazy)."""
    reader = CodeReader(store, layer)
    return {int(i): reader.codes(int(i)) for i in image_ids}


def _choose_images(opts: ReportOptions, images_info: list[dict], classes: list[int],
                   row_of: dict[int, int]) -> list[int]:
    """Explicit ids, else up to two images per report class (most confident first), then the
    most confident of the rest, ``n_images`` in all."""
    if opts.image_ids:
        missing = [i for i in opts.image_ids if i not in row_of]
        if missing:
            raise RunMismatchError(f"image id(s) {missing} have no attribution in this run")
        return list(dict.fromkeys(int(i) for i in opts.image_ids))
    ranked = sorted((i for i in images_info if int(i["image_id"]) in row_of),
                    key=lambda i: -(i.get("target_prob") or 0.0))
    chosen: list[int] = []
    for c in classes:
        chosen += [int(i["image_id"]) for i in ranked if int(i["target"]) == c][:2]
    chosen += [int(i["image_id"]) for i in ranked]
    return list(dict.fromkeys(chosen))[: max(0, opts.n_images)]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 10**6):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def _metrics(store: RunStore, layers: list[str], assets: Assets) -> dict:
    from ..summary import summarize
    from .figure import completeness_figure, front_figure, reconstruction_figure

    info = summarize(store.root)
    fidelity_path = store.root / "decompose" / "fidelity.json"
    fidelity = load_json(fidelity_path) if fidelity_path.is_file() else {}
    rows = []
    for entry in info["layers"]:
        extra = fidelity.get(entry["name"], {})
        rows.append({**entry, "n_positions": extra.get("n_positions")})
    plots = []
    if any(r["rel_error"] is not None for r in rows):
        plots.append({"title": "Reconstruction per layer",
                      "url": assets.add_bytes("img/metrics/reconstruction.svg", reconstruction_figure(rows))})
    if any(r["front"] for r in rows):
        config = store.config
        rule = config.target_rel_error is None
        plots.append({"title": "Sparsity–fidelity front per layer",
                      "url": assets.add_bytes("img/metrics/front.svg", front_figure(
                          rows, config.min_r2 if rule else None, config.min_top1_agreement if rule else None))})
    try:
        residuals = completeness_residuals(store).numpy()
    except Exception:  # noqa: BLE001 - a run without attributions still gets its other metrics
        residuals = None
    completeness = dict(store.summary("attribute").get("completeness", {}))
    if residuals is not None and residuals.size:
        plots.append({"title": "GIG completeness residuals",
                      "url": assets.add_bytes("img/metrics/completeness.svg", completeness_figure(residuals))})
    gig = info.get("gig")
    if gig and gig.get("by_source"):
        from ..attribution import load_error_estimates

        estimates = load_error_estimates(store)
        if estimates.numel():
            plots.append({"title": "GIG error estimates",
                          "url": assets.add_bytes("img/metrics/gig_error.svg",
                                                  completeness_figure(estimates.numpy(), "relative error estimate",
                                                                      gig.get("tol")))})
    stages = [{"name": k, **v} for k, v in info["stages"].items()]
    from ..decompose import rule_text

    return {"layers": rows, "completeness": completeness, "gig": gig, "images": info["images"], "stages": stages,
            "plots": plots, "rule": rule_text(store.config), "debias": store.config.debias}


def _evaluation(folder: Path, assets: Assets) -> dict | None:
    """``RUN/evaluate/``: summary.json as tables, markdown files (tables and text), plots."""
    if not folder.is_dir():
        return None
    out: dict[str, Any] = {"summary": None, "markdown": [], "plots": [], "json": [], "other": []}
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            out["summary"] = _json_tables(json.loads(summary.read_text()))
        except (OSError, ValueError) as exc:
            out["summary"] = [{"title": "summary.json", "error": str(exc)}]
    for path in sorted(folder.iterdir()):  # top level only (bases/, parts/ are working files)
        rel = path.name
        if path.is_dir():
            out["other"].append(rel + "/")
            continue
        suffix = path.suffix.lower()
        if suffix == ".md":
            out["markdown"].append({"name": rel, "blocks": markdown_blocks(path.read_text(errors="replace"))})
        elif suffix in (".png", ".svg", ".jpg", ".jpeg"):
            out["plots"].append({"name": rel, "url": assets.add_file(f"eval/{_slug(rel)}", path)})
        elif suffix == ".json" and rel != "summary.json" and path.stat().st_size <= 64 * 1024:
            try:
                out["json"].append({"name": rel, "tables": _json_tables(json.loads(path.read_text()), rel)})
            except (OSError, ValueError):
                out["other"].append(rel)
        elif rel != "summary.json":
            out["other"].append(rel)
    return out


def _json_tables(data: Any, title: str = "summary") -> list[dict]:
    """Nested JSON → tables: a dict of scalars is one key/value table; a dict of dicts of
    scalars (or a list of dicts) is one table with a row per entry; deeper levels recurse."""
    tables: list[dict] = []

    def scalar(v):
        return not isinstance(v, (dict, list)) or (isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v) and len(v) <= 8)

    def show(v):
        if isinstance(v, list):
            return ", ".join(_fmt(x) for x in v)
        return _fmt(v)

    def walk(node, name):
        if isinstance(node, dict):
            scalars = {k: v for k, v in node.items() if scalar(v)}
            nested = {k: v for k, v in node.items() if not scalar(v)}
            if scalars:
                tables.append({"title": name, "columns": ["key", "value"],
                               "rows": [[k, show(v)] for k, v in scalars.items()]})
            records = {k: v for k, v in nested.items() if isinstance(v, dict) and v and all(scalar(x) for x in v.values())}
            if len(records) >= 2:
                cols = list(dict.fromkeys(c for v in records.values() for c in v))
                tables.append({"title": name, "columns": [""] + cols,
                               "rows": [[k] + [show(v.get(c)) for c in cols] for k, v in records.items()]})
                nested = {k: v for k, v in nested.items() if k not in records}
            for k, v in nested.items():
                walk(v, f"{name} › {k}")
        elif isinstance(node, list):
            if node and all(isinstance(x, dict) and all(scalar(y) for y in x.values()) for x in node):
                cols = list(dict.fromkeys(c for x in node for c in x))
                tables.append({"title": name, "columns": cols, "rows": [[show(x.get(c)) for c in cols] for x in node]})
            else:
                for i, x in enumerate(node):
                    walk(x, f"{name} [{i}]")
        else:
            tables.append({"title": name, "columns": ["value"], "rows": [[show(node)]]})

    walk(data, title)
    return tables


def markdown_blocks(text: str) -> list[dict]:
    """A small, safe reading of markdown: pipe tables become tables, ``#`` lines headings, other
    lines paragraphs of plain text (rendered escaped: no HTML from the file reaches the page)."""
    blocks: list[dict] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?\s*:?-{2,}", lines[i + 1]):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            blocks.append({"type": "table", "columns": header, "rows": rows})
            continue
        if line.startswith("#"):
            blocks.append({"type": "heading", "text": line.lstrip("#").strip()})
        elif line.strip():
            if blocks and blocks[-1]["type"] == "text":
                blocks[-1]["text"] += " " + line.strip()
            else:
                blocks.append({"type": "text", "text": line.strip()})
        elif blocks and blocks[-1]["type"] == "text":
            blocks.append({"type": "break"})
        i += 1
    return [b for b in blocks if b["type"] != "break"]


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip().replace("`", "").replace("**", "") for c in line.split("|")]

"""Work with a finished run from Python or a notebook: ``run = gig.open("runs/demo")``.

>>> run = gig.open("runs/demo")                       # doctest: +SKIP
>>> run.concepts("_blocks.15")                        # a table (with crops) in Jupyter
>>> run.graph("class", classes=[281])                 # the graph viewer inline
>>> e = run.explain("my_photo.jpg", target=207)       # a new image: graph, localisation
>>> run.ablate("_blocks.15", [12], image_ids=[0, 1])  # remove a concept, measure the change

Every method calls the module that owns the computation (:mod:`gig.graph`, :mod:`gig.explain`,
:mod:`gig.ablate`, :mod:`gig.decompose`, :mod:`gig.labels`); the objects returned render as
HTML in Jupyter (``_repr_html_``: the report's viewer in an iframe, self-contained) and as
matplotlib figures (``.figure()``).
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .access import RunAccess
from .artefacts import load_concept_cards, load_dictionary, load_labels
from .config import Config
from .decompose import encode_pixels
from .errors import ConfigError
from .explain import Explanation, explain, write_explanations
from .graph import build_graph
from .models import class_name
from .store import RunStore, save_json


def _iframe(index: Path, height: int) -> str:
    """A self-contained page (``single_file``) as an iframe for a notebook cell."""
    page = index.read_text(encoding="utf-8")
    return (
        f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{height}px;border:1px solid #ddd" '
        'sandbox="allow-scripts"></iframe>'
    )


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Run:
    """A finished run (see the module docstring). ``model``: a :class:`gig.models.ModelBundle`
    when the run was made from Python with a user model; ``source``: its images, when they moved."""

    def __init__(self, run_dir: str | Path, model=None, source=None):
        self.store = RunStore.open(run_dir)
        self._access = RunAccess(self.store, model, source)

    # ------------------------------------------------------------------ what the run holds
    @property
    def config(self) -> Config:
        return self.store.config

    @property
    def layers(self) -> list[str]:
        return list(self.config.layers)

    @property
    def class_names(self) -> list[str]:
        return list(self._access.bundle.class_names)

    def _layer(self, layer: str) -> str:
        return self.store.analysed(layer)[0]

    def __repr__(self) -> str:
        done = [s for s in ("collect", "concepts", "decompose", "attribute", "graph") if self.store.is_done(s)]
        return f"gig.Run({str(self.store.root)!r}, model={self.config.model!r}, layers={self.layers}, done={done})"

    def concepts(self, layer: str) -> "ConceptSet":
        """The concepts of ``layer``: vectors, member statistics, labels, exemplar crops."""
        return ConceptSet(self, self._layer(layer))

    # ------------------------------------------------------------------ computations
    def encode(self, images: Sequence[str | Path | Image.Image], layer: str | None = None):
        """Sparse codes of new images with the run's dictionaries and λ: ``(N, H·W, K)`` for
        ``layer``, or ``{layer: (N, H·W, K)}`` for every layer."""
        from .explain import _as_images

        pixels = self._access.bundle.preprocess_batch([im for _, im in _as_images(images)])
        _, codes = encode_pixels(self.store, self._access.handle, pixels, [self._layer(layer)] if layer else None)
        return codes[layer] if layer is not None else codes

    def explain(
        self,
        images: str | Path | Image.Image | Sequence[str | Path | Image.Image],
        target: int | Sequence[int] | None = None,
    ) -> "Explanations":
        """Explain new images (:func:`gig.explain.explain`); one image or a list."""
        single = isinstance(images, (str, Path, Image.Image))
        found = explain(self.store, [images] if single else list(images), target=target, access=self._access)
        return Explanations(self, found)

    def graph(
        self, kind: str = "class", classes: Sequence[int] | None = None, image_id: int | None = None
    ) -> "GraphView":
        """A graph of the run (:func:`gig.graph.build_graph`): ``class``, ``shared``, ``global`` or ``image``."""
        g = build_graph(
            self.store,
            kind,
            classes=list(classes) if classes else None,
            image_id=image_id,
            class_names=self.class_names,
        )
        return GraphView(self, g)

    def ablate(
        self,
        layer: str,
        concepts: Sequence[int],
        image_ids: Sequence[int] | None = None,
        images: Sequence[str | Path] | None = None,
        **kwargs,
    ):
        """Remove concepts from ``layer``'s reconstruction and measure the change (:func:`gig.ablate.ablate`)."""
        from .ablate import ablate

        return ablate(
            self.store,
            self._layer(layer),
            list(concepts),
            image_ids=image_ids,
            images=images,
            model=self._access.bundle,
            **kwargs,
        )

    def label(self, layer: str, concept: int, name: str, note: str | None = None) -> None:
        """Name a concept (written to ``RUN/labels.yaml``; :func:`gig.labels.set_label`)."""
        from .labels import set_label

        set_label(self.store, self._layer(layer), concept, name, note)

    def compare(self, other: "Run", out: str | Path | None = None, **options) -> dict:
        """This run (A) compared with ``other`` (B) on their shared images: concepts matched by
        response, graphs diffed (:func:`gig.compare.compare_runs`; ``options`` are its keywords)."""
        from .compare import compare_runs

        return compare_runs(
            self.store, other.store, out, model_a=self._access.bundle, model_b=other._access.bundle, **options
        )

    def report(self, **options) -> Path:
        """Build the HTML report (:func:`gig.report.build_report`); keyword options as :class:`gig.report.ReportOptions`."""
        from .report import ReportOptions, build_report

        return build_report(self.store.root, options=ReportOptions(**options), model=self._access.bundle)


class ConceptSet:
    """The concepts of one layer of a run."""

    def __init__(self, run: Run, layer: str):
        self.run, self.layer = run, layer
        self.cards = load_concept_cards(run.store, layer)["concepts"]

    @property
    def vectors(self) -> torch.Tensor:
        """Concept vectors ``(K, C)``, the rows of the layer's dictionary."""
        return load_dictionary(self.run.store, self.layer)

    def __len__(self) -> int:
        return len(self.cards)

    def labels(self) -> dict[int, dict]:
        return load_labels(self.run.store).get(self.layer, {})

    def crops(self, concept: int, n: int = 10) -> list[Image.Image]:
        """ERF crops of the concept's ``n`` nearest PFVs (top-1 first), from the run's crop cache."""
        if not 0 <= concept < len(self.cards):
            raise ConfigError(f"concept {concept} does not exist in layer {self.layer!r} (K = {len(self.cards)})")
        return self._images(list(self.cards[concept]["exemplars"][:n]))

    def _images(self, samples: list[int]) -> list[Image.Image]:
        """The ERF crops of sampled PFVs, in one batched pass (:meth:`gig.access.RunAccess.crops`)."""
        out = []
        for path in self.run._access.crops(self.layer, samples):
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        return out

    def _repr_html_(self, n: int = 12) -> str:
        names = self.run.class_names
        labels = self.labels()
        order = sorted(range(len(self.cards)), key=lambda q: -self.cards[q]["count"])[:n]
        with_crop = [q for q in order if self.cards[q]["exemplars"]]
        top1 = dict(zip(with_crop, self._images([self.cards[q]["exemplars"][0] for q in with_crop])))
        rows = []
        for q in order:
            card = self.cards[q]
            classes = ", ".join(f"{class_name(names, c)} ({k})" for c, k in card["top_classes"][:3])
            image = f'<img src="{_data_uri(top1[q])}" width="64">' if q in top1 else ""
            rows.append(
                f"<tr><td>{q}</td><td>{image}</td><td>{html.escape(labels.get(q, {}).get('name', ''))}</td>"
                f"<td>{card['count']}</td><td>{html.escape(classes)}</td></tr>"
            )
        return (
            f"<p><b>{html.escape(self.layer)}</b>: {len(self.cards)} concepts (the {len(order)} largest shown)</p>"
            "<table><tr><th>concept</th><th>top-1</th><th>label</th><th>PFVs</th><th>member classes</th></tr>"
            + "".join(rows)
            + "</table>"
        )


class GraphView:
    """A graph (``gig.graph/1`` in ``.data``) that draws itself: the viewer inline, or a figure."""

    def __init__(self, run: Run, data: dict):
        self.run, self.data = run, data

    def figure(self):
        """The static figure (:func:`gig.visual.graph_figure`) as a matplotlib figure."""
        from .labels import node_labels
        from .visual import graph_figure

        return graph_figure(self.data, labels=node_labels(self.run.store, self.data))

    def save(self, path: str | Path) -> Path:
        save_json(Path(path), self.data)
        return Path(path)

    def page(self, out: str | Path, single_file: bool = False) -> Path:
        """The graph in the report's viewer with its concepts' cards: ``out/index.html``."""
        from .report.sections import graph_entry
        from .report.viewer import write_viewer

        entry = graph_entry(
            f"{self.data['kind']}:view",
            self.data["kind"],
            [c["index"] for c in self.data["classes"]],
            f"{self.data['kind']} graph",
            self.data,
            image_id=(self.data["image_ids"] or [None])[0],
        )
        return write_viewer(
            self.run.store,
            self.run._access,
            [entry],
            Path(out),
            self.run.class_names,
            single_file=single_file,
            heading="graph",
            n_images=self.data["n_images"],
        )

    def _repr_html_(self) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return _iframe(self.page(tmp, single_file=True), 760)


class Explanations(list):
    """The explanations of :meth:`Run.explain` (a list of :class:`gig.explain.Explanation`)."""

    def __init__(self, run: Run, items: list[Explanation]):
        super().__init__(items)
        self.run = run

    def save(self, out: str | Path, single_file: bool = False) -> Path:
        """The explain page and files (:func:`gig.explain.write_explanations`)."""
        return write_explanations(
            self.run.store.root, list(self), out, single_file=single_file, access=self.run._access
        )

    def figure(self, i: int = 0):
        """The single-image graph of the ``i``-th image as a matplotlib figure."""
        from .labels import node_labels
        from .visual import graph_figure

        return graph_figure(self[i].graph, labels=node_labels(self.run.store, self[i].graph))

    def _repr_html_(self) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return _iframe(self.save(tmp, single_file=True), 900)


def open_run(run_dir: str | Path, model=None, source=None) -> Run:
    """Open a finished run for work from Python (exported as ``gig.open``)."""
    return Run(run_dir, model=model, source=source)

"""``evaluate_run``: both faithfulness protocols on a finished run, written to ``RUN/evaluate/``.

Files written::

    RUN/evaluate/
      summary.json         {"extraction": {LAYER: {METHOD: auc_diff}}, "interlayer": {"A->B": {ORDERING: auc_diff}}}
      extraction.json      per layer and method: AUCs with spreads, mean curves, reconstruction
                           figures, per-image values, fitted-basis details
      interlayer.json      per transition and ordering: AUCs with spreads, mean curves, per-image values
      results.md           the tables
      extraction_curves.png, extraction_auc.png, interlayer_curves.png, interlayer_auc.png
      settings.json        the settings, their resolution against the run, timings and image ids
      bases/LAYER/METHOD.safetensors (+ .json)  fitted bases, reused while their fit key holds
      parts/               per-chunk results, reused on resume while the settings key holds

The work is done in chunks of images and each finished chunk is saved, so an interrupted
evaluation resumes where it stopped (with the same settings and the same run).
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..access import RunAccess
from ..artefacts import EVALUATION_SUMMARY, EXTRACTION_RESULTS, evaluate_dir, load_images, load_samples
from ..config import stable_hash
from ..models import output_noun
from ..store import RunStore, as_store, load_json, save_json
from .bases import ConceptBasis, LayerContext, basis_class, method_label
from .curves import markdown_tables, plot_auc_bars, plot_curves
from .extraction import aggregate_extraction, extraction_chunk
from .interlayer import aggregate_transition, interlayer_chunk
from .parts import resumable_parts
from .settings import SETTINGS_VERSION, EvaluationPlan, EvaluationSettings, make_plan
from .view import RunView  # noqa: F401  (re-exported)


def tune_malloc() -> bool:
    """Keep freed memory in the process heap (glibc only): large activation tensors are then
    reused instead of being mapped afresh by the kernel for every forward pass, which on small
    VMs spends more time in page faults than in the network (measured: a wide ``run_from`` on
    EfficientNet-Lite0 took 13.8 s with, 6.0 s without the faults). Process-wide; returns whether
    it applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        return bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok)
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------- bases
def layer_bases(view: RunView, layer: str) -> dict[str, ConceptBasis]:
    """Every chosen method's basis of ``layer`` (label → basis, in the chosen order): the run's
    own, the others fitted on the run's sampled PFVs or reloaded from ``bases/``."""
    plan = view.plan
    run_basis = view.run_bases[layer]
    needs_samples = any(not basis_class(m).from_run for m in plan.methods)
    samples = load_samples(view.store, layer)["pfv"].float() if needs_samples else torch.zeros(0)
    # one context for the layer, so the run's codes of the samples are computed once for all methods
    ctx = LayerContext(layer, samples, run_basis, view.config, plan.settings)
    out = {}
    for spec in plan.methods:
        ctx.spec = spec
        out[method_label(spec)] = fitted_basis(ctx, view.out / "bases" / layer, plan.run_hash)
    return out


def fitted_basis(ctx: LayerContext, folder: Path, run_hash: str) -> ConceptBasis:
    """The basis of ``ctx.spec`` on ``ctx.layer``: saved in ``folder`` with a key of what the fit
    depends on (the run, the settings it :attr:`~ConceptBasis.uses`, user files, and the
    hyper-parameters :meth:`~ConceptBasis.for_layer` derives from them, so that a change in how
    they are derived fits again), and reused while that key holds."""
    klass = basis_class(ctx.spec)
    if klass.from_run:
        return klass.for_layer(ctx)
    basis = klass.for_layer(ctx)  # unfitted: its constructor arguments
    key = stable_hash(
        {
            "version": SETTINGS_VERSION,
            "run_hash": run_hash,
            "method": ctx.spec,
            "class": klass.identity(),
            "uses": {f: getattr(ctx.settings, f) for f in klass.uses},
            "calibration_size": ctx.config.calibration_size,
            "files": klass.fingerprint(ctx.spec),
            "params": basis.get_params(),
        }
    )
    path = folder / (method_label(ctx.spec).replace(":", "-") + ".safetensors")
    meta = path.with_suffix(".json")  # written after the tensors: its presence means a complete save
    if meta.is_file() and path.is_file() and load_json(meta).get("fit_key") == key:
        return klass.load(path)
    basis.fit(ctx.samples)
    basis.info_["n_fit_samples"] = int(ctx.samples.shape[0])
    basis.save(path, extra={"fit_key": key})
    return basis


# ---------------------------------------------------------------------------- protocols
def run_extraction(view: RunView, bar) -> dict:
    """Protocol 1 over the plan's extraction images, chunk by chunk (resumable)."""
    plan = view.plan
    bases = {layer: layer_bases(view, layer) for layer in plan.layers}
    per_image = len(plan.layers) * len(plan.methods)
    parts = resumable_parts(
        view.out / "parts",
        "extraction",
        plan.extraction_images,
        plan.settings.chunk_images,
        lambda chunk: extraction_chunk(view, chunk, bases, bar),
        lambda chunk: bar.update(len(chunk) * per_image),
    )
    return aggregate_extraction(parts, bases, plan)


def run_interlayer(view: RunView, bar) -> dict:
    """Protocol 2 over the plan's inter-layer images, per transition and chunk (resumable)."""
    plan, s = view.plan, view.plan.settings
    infos = plan.interlayer_images
    result: dict = {
        "settings": {
            "n_points": s.n_points,
            "n_steps": plan.n_steps,
            "quadrature": plan.quadrature,
            "gig_tol": plan.gig_tol,
            "seed": s.seed,
            "orderings": s.orderings,
            "n_targets": s.n_targets,
            "n_random": s.n_random,
            "n_images": len(infos),
            "target_rule": f"concept → {output_noun(view.config)} GIG at the upper layer",
        },
        "image_id": [i["image_id"] for i in infos],
        "transitions": {},
    }
    for t_index, (a, b) in enumerate(zip(plan.layers[:-1], plan.layers[1:])):
        parts = resumable_parts(
            view.out / "parts",
            f"interlayer_{t_index:02d}",
            infos,
            s.chunk_images,
            lambda chunk: interlayer_chunk(view, t_index, a, b, chunk, bar),
            lambda chunk: bar.update(len(chunk)),
        )
        K_source = view.run_bases[a].n_components_
        result["transitions"][f"{a}->{b}"] = aggregate_transition(parts, a, b, K_source, s)
    return result


# ---------------------------------------------------------------------------- the folder
def prepare_folder(out: Path, plan: EvaluationPlan) -> None:
    """Empty ``parts/`` when the plan's key changed (or on ``resume=False``, with ``bases/``)."""
    key_path = out / "parts" / "settings_key.json"
    if out.exists():
        old = load_json(key_path) if key_path.is_file() else {}
        if not plan.settings.resume or old.get("key") != plan.key():
            shutil.rmtree(out / "parts", ignore_errors=True)
        if not plan.settings.resume:
            shutil.rmtree(out / "bases", ignore_errors=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    save_json(key_path, {"key": plan.key()})


def summarise(extraction: dict | None, interlayer: dict | None) -> dict:
    """``summary.json``: mean AUC difference per layer and method, per transition and ordering."""
    return {
        "extraction": {
            layer: {m: r["auc_diff"]["mean"] for m, r in ms.items()}
            for layer, ms in (extraction or {}).get("layers", {}).items()
        },
        "interlayer": {
            tr: {o: r["auc_diff"]["mean"] for o, r in v["orderings"].items()}
            for tr, v in (interlayer or {}).get("transitions", {}).items()
        },
    }


def write_outputs(out: Path, plan: EvaluationPlan, results: dict, timings: dict, noun: str = "class") -> list[Path]:
    """Write the JSON results, ``results.md``, the plots and ``settings.json``; returns the files.
    ``noun`` names the run's outputs in the text (``class``, or ``output`` for a probe head)."""
    extraction, interlayer = results["extraction"], results["interlayer"]
    files = []
    for name, data in ((EXTRACTION_RESULTS, extraction), ("interlayer.json", interlayer)):
        if data:
            save_json(out / name, data)
            files.append(out / name)
    (out / "results.md").write_text(markdown_tables(extraction, interlayer, noun))
    files.append(out / "results.md")
    if plan.settings.plots:
        files += _plots(out, extraction, interlayer, noun)
    save_json(out / "settings.json", {**plan.record(), "timings": timings, "torch_threads": torch.get_num_threads()})
    save_json(out / EVALUATION_SUMMARY, results["summary"])
    return files + [out / "settings.json", out / EVALUATION_SUMMARY]


@contextmanager
def _timed(timings: dict, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 1)


def evaluate_run(
    run_dir: str | Path | RunStore,
    settings: EvaluationSettings | None = None,
    *,
    model=None,
    source=None,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the concept-extraction and inter-layer protocols on ``run_dir`` with ``settings``
    (default :class:`EvaluationSettings`); write ``out`` (default ``RUN/evaluate``).

    ``out`` elsewhere serves e.g. an ablation that must not replace the run's evaluation (only
    ``RUN/evaluate/summary.json`` is read by ``gig inspect``). ``model`` / ``source`` override the
    run's model and images (a user ``ModelBundle`` or module and ``ImageSource``, as for
    :class:`~gig.access.RunAccess`; the run itself is only read). Returns ``{"summary", "extraction", "interlayer", "files",
    "seconds"}``; ``summary`` is what ``summary.json`` holds. Raises
    :class:`~gig.errors.RunMismatchError` for a run without a finished decompose stage and
    :class:`~gig.errors.ConfigError` for layers the run does not have.
    """
    start = time.perf_counter()
    settings = settings if settings is not None else EvaluationSettings()
    store = as_store(run_dir)  # a run directory, or a run opened already
    store.require("decompose")
    plan = make_plan(settings, store, store.config, load_images(store)["images"])
    out = Path(out) if out is not None else evaluate_dir(store)
    prepare_folder(out, plan)
    view = RunView(RunAccess(store, model=model, source=source), plan, out)
    total = len(plan.extraction_images) * len(plan.layers) * len(plan.methods) + len(plan.interlayer_images) * (
        len(plan.layers) - 1
    )
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress, smoothing=0.05)
    timings: dict = {}
    with _timed(timings, "extraction_s"):
        extraction = run_extraction(view, bar) if plan.extraction_images else None
    with _timed(timings, "interlayer_s"):
        interlayer = run_interlayer(view, bar) if plan.interlayer_images else None
    bar.close()
    results = {"summary": summarise(extraction, interlayer), "extraction": extraction, "interlayer": interlayer}
    timings["total_s"] = round(time.perf_counter() - start, 1)
    files = write_outputs(out, plan, results, timings, output_noun(store.config))
    return {**results, "files": [str(f) for f in files], "seconds": timings["total_s"]}


def _plots(out: Path, extraction: dict | None, interlayer: dict | None, noun: str = "class") -> list[Path]:
    files = []
    if extraction:
        panels = {layer: {m: r["curves"] for m, r in ms.items()} for layer, ms in extraction["layers"].items()}
        files.append(
            plot_curves(
                panels,
                out / "extraction_curves.png",
                f"target-{noun} probability",
                f"C-Insertion (solid) / C-Deletion (dashed), ranked by concept → {noun} GIG",
            )
        )
        groups = {layer: {m: r["auc_diff"] for m, r in ms.items()} for layer, ms in extraction["layers"].items()}
        files.append(
            plot_auc_bars(
                groups,
                out / "extraction_auc.png",
                "AUC insertion − deletion",
                "Concept extraction (95 % bootstrap interval)",
            )
        )
    if interlayer:
        panels = {
            tr: {o: r["curves"] for o, r in v["orderings"].items()} for tr, v in interlayer["transitions"].items()
        }
        files.append(
            plot_curves(
                panels,
                out / "interlayer_curves.png",
                "target readout / full value",
                "Inter-layer insertion (solid) / deletion (dashed)",
            )
        )
        groups = {
            tr: {o: r["auc_diff"] for o, r in v["orderings"].items()} for tr, v in interlayer["transitions"].items()
        }
        files.append(
            plot_auc_bars(
                groups,
                out / "interlayer_auc.png",
                "AUC insertion − deletion",
                "Inter-layer orderings (95 % bootstrap interval)",
            )
        )
    return files

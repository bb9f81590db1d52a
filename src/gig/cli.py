"""The ``gig`` command line: the whole pipeline, each stage alone, and run inspection."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from .config import STAGE_ORDER, Config
from .errors import ConfigError, GigError

app = typer.Typer(
    add_completion=False,
    help="Dataset-wide mechanistic interpretability with GIG.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"gig {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print gig's version and exit."
    ),
) -> None:
    """Dataset-wide mechanistic interpretability with GIG."""


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see docs/guide.md).")
ModelOpt = typer.Option(None, help="efficientnet-lite0 | torchvision:NAME | timm:NAME")
WeightsOpt = typer.Option(None, help="default | none | path to a state dict")
ImagesOpt = typer.Option(None, help="embedded | image folder | CSV file list")
LayersOpt = typer.Option(None, "--layer", "-l", help="Layer to analyse (repeat, early to late).")
MaxImagesOpt = typer.Option(None, help="Use only the first N images.")
DeviceOpt = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default: the config's, cpu).")
GigTolOpt = typer.Option(None, "--gig-tol", help="Relative error tolerance of every GIG attribution (default 0.01).")


def _config(run_dir: Path, config_file: Optional[Path], overrides: dict) -> Config:
    if config_file is not None:
        config = Config.load(config_file)
    elif (run_dir / "config.yaml").is_file():
        config = Config.load_saved(run_dir / "config.yaml")
    else:
        config = Config()
    given = {key: value for key, value in overrides.items() if value is not None and value != []}
    if given.get("model", config.model) != config.model and "layers" not in given:
        given["layers"] = None  # the saved layers belong to the other model: take the new one's defaults
    return Config.from_dict({**config.to_dict(), **given})  # checked again with the overrides


def _pipeline(run_dir: Path, config_file, model, weights, images, layers, max_images, gig_tol=None, device=None):
    from .pipeline import Pipeline

    config = _config(
        run_dir,
        config_file,
        {
            "model": model,
            "weights": weights,
            "images": images,
            "layers": layers,
            "max_images": max_images,
            "gig_tol": gig_tol,
            "device": device,
        },
    )
    return Pipeline(config, run_dir)


def one_line_errors(command):
    """Every CLI command's error handling, written once: an error the user can cause
    (:class:`GigError`) ends in one line and exit status 2, and so does a disk that is full or a
    place that cannot be written (:func:`_disk_full`); anything else is a bug and keeps its
    traceback."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GigError as exc:
            _fail(exc)
        except OSError as exc:
            _disk_full(exc)

    return guarded


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    raise typer.Exit(2)


def _disk_full(exc: OSError) -> None:
    """A full disk ends in one line: every write is atomic, so the finished shards and
    artefacts are intact and a rerun resumes from them. So does a place that cannot be written
    (a read-only mount, another user's folder)."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        _fail(
            RuntimeError(
                f"cannot write {exc.filename or 'the run'} ({os.strerror(exc.errno)}): a finished run "
                "stays readable (inspect, report --out, explain -o, ablate); computing needs a writable "
                "run directory"
            )
        )
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise exc
    _fail(
        RuntimeError(
            f"disk full while writing {exc.filename or 'the run'}: what was finished is kept; "
            "free space and rerun the same command to resume"
        )
    )


@app.command()
@one_line_errors
def run(
    out: Path = typer.Option(Path("gig-run"), "--out", "-o", help="Run directory (created or resumed)."),
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    weights: Optional[str] = WeightsOpt,
    images: Optional[str] = ImagesOpt,
    layer: Optional[list[str]] = LayersOpt,
    max_images: Optional[int] = MaxImagesOpt,
    gig_tol: Optional[float] = GigTolOpt,
    device: Optional[str] = DeviceOpt,
    verify: bool = typer.Option(
        False,
        "--verify",
        help="First check every artefact of the finished stages against its checksum; damaged ones are computed again.",
    ),
):
    """Run every stage (collect → concepts → decompose → attribute → graph); finished stages are skipped."""
    pipe = _pipeline(out, config, model, weights, images, layer, max_images, gig_tol, device)
    pipe.run(verify=verify)
    _print_done(out)


def _print_done(out: Path) -> None:
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for the launch
        return
    from .summary import summarize

    info = summarize(out)
    console.print(f"[green]done[/green]: results in {out.resolve()}")
    console.print(f"  graph: {info['graph']}")
    console.print(f"  summary: gig inspect {out}")
    _print_missed(console, info["missed"])  # what the run misses, without waiting for inspect


def _print_missed(out: Console, missed: list[str]) -> None:
    """Every missed target and unfinished stage (:func:`gig.summary.missed_targets`), one line each."""
    if missed:
        out.print(f"[yellow]{len(missed)} target(s) missed or stages missing:[/yellow]")
        for line in missed:
            out.print(f"  [yellow]![/yellow] {line}", soft_wrap=True)


def _stage_command(stage: str):
    def command(
        run_dir: Path = typer.Argument(..., help="Run directory."),
        config: Optional[Path] = ConfigOpt,
        model: Optional[str] = ModelOpt,
        weights: Optional[str] = WeightsOpt,
        images: Optional[str] = ImagesOpt,
        layer: Optional[list[str]] = LayersOpt,
        max_images: Optional[int] = MaxImagesOpt,
        gig_tol: Optional[float] = GigTolOpt,
        device: Optional[str] = DeviceOpt,
        force: bool = typer.Option(False, help="Recompute even if done."),
    ):
        pipe = _pipeline(run_dir, config, model, weights, images, layer, max_images, gig_tol, device)
        getattr(pipe, stage)(force=force)
        console.print(f"[green]{stage} done[/green] in {run_dir}")

    command.__doc__ = f"Run the {stage} stage alone on RUN_DIR (its inputs must exist)."
    return command


for _stage in STAGE_ORDER:
    app.command(name=_stage)(one_line_errors(_stage_command(_stage)))


@app.command()
@one_line_errors
def layers(
    model: str = typer.Argument("efficientnet-lite0", help="Model spec."),
    weights: str = typer.Option("none", help="Weights do not change shapes; 'none' avoids loading them."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List the analysable layers of MODEL with their output shapes."""
    from .hooks import LayerUsageError, ModelHandle
    from .models import load_model

    handle = ModelHandle(load_model(model, weights))
    infos = handle.layer_info()
    try:
        defaults = handle.default_layers()
    except LayerUsageError:
        defaults = []
    if json_out:
        typer.echo(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "type": i.type,
                        "shape": list(i.shape),
                        "grid": list(i.grid),
                        "prefix_tokens": i.prefix_tokens,
                        "default": i.name in defaults,
                    }
                    for i in infos
                ],
                indent=1,
            )
        )
        return
    title = f"{model}: {len(infos)} analysable layers; default (*): {', '.join(defaults) or 'none, name them'}"
    table = Table(title=title)
    for col in ("name", "type", "output shape", "grid (C, H, W)"):
        table.add_column(col)
    for i in infos:
        table.add_row(i.name + (" *" if i.name in defaults else ""), i.type, str(tuple(i.shape)), str(tuple(i.grid)))
    Console().print(table)


@app.command()
@one_line_errors
def graph_image(
    run_dir: Path = typer.Argument(...),
    image_id: int = typer.Argument(..., help="Image id (see RUN/collect/images.json)."),
):
    """Write the single-image graph of IMAGE_ID to RUN/graph/image_ID.json (+ SVG/PNG)."""
    from .artefacts import image_graph_path
    from .graph import build_graph
    from .pipeline import Pipeline
    from .store import save_json

    pipe = Pipeline.open(run_dir)
    pipe.store.require("attribute")
    g = build_graph(pipe.store, "image", image_id=image_id, class_names=pipe.bundle.class_names)
    path = image_graph_path(pipe.store, image_id)
    save_json(path, g)
    pipe.draw_graph(pipe.store, g, path.with_suffix(""))
    console.print(f"wrote {path}")


@app.command()
@one_line_errors
def explain(
    run_dir: Path = typer.Argument(..., help="A run whose attribute stage has finished."),
    images: list[Path] = typer.Argument(..., help="Image file(s) to explain (need not be in the run)."),
    target: Optional[int] = typer.Option(
        None,
        "--target",
        "-t",
        help="Class (or probe output) to explain for every image (default: each image's prediction).",
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/explain)."),
    single_file: bool = typer.Option(False, help="Inline every image and script into index.html."),
    as_json: bool = typer.Option(False, "--json", help="Print explanations.json to stdout."),
):
    """Explain new images with the run's concepts: single-image graphs, localisation, one HTML page (DIR/index.html)."""
    import json

    from .access import RunAccess
    from .artefacts import explain_dir
    from .explain import explain as explain_images
    from .explain import write_explanations

    out = out or explain_dir(run_dir)
    access = RunAccess(run_dir)  # one model load for the explanations and their page
    explanations = explain_images(run_dir, images, target=target, access=access)
    index = write_explanations(run_dir, explanations, out, single_file=single_file, access=access)
    if as_json:
        from .store import load_json

        print(json.dumps(load_json(out / "explanations.json"), indent=1))
        return
    term = Console()
    table = Table(title="explained")
    for column in ("image", "predicted", "target", "p(target)", "top concepts (top layer)"):
        table.add_column(column)
    top_layer = explanations[0].graph["layers"][-1]
    for e in explanations:
        tops = ", ".join(f"#{q} {s:.2f}" for q, s in e.top_concepts(top_layer))
        table.add_row(e.name, e.pred_name, e.target_name, f"{float(e.probabilities[e.target]):.3f}", tops)
    term.print(table)
    console.print(f"[green]explain[/green]: {index.resolve()}")


@app.command()
@one_line_errors
def concept(
    run_dir: Path = typer.Argument(...),
    layer: str = typer.Argument(..., help="Layer name."),
    concept_id: int = typer.Argument(..., help="Concept index in that layer."),
):
    """Write a sheet of one concept's top-1 and top-10 exemplar ERF crops (RUN/erf/COLLECT_HASH/LAYER/concept_ID.png)."""
    from .artefacts import erf_dir, load_concept_cards
    from .erf import exemplar_crops
    from .pipeline import Pipeline
    from .visual import concept_sheet

    pipe = Pipeline.open(run_dir)
    pipe.store.require("concepts")
    pipe.store.analysed(layer)
    cards = load_concept_cards(pipe.store, layer)["concepts"]
    if not 0 <= concept_id < len(cards):
        raise ConfigError(f"{layer} has concepts 0..{len(cards) - 1}, not {concept_id}")
    card = cards[concept_id]
    crops = exemplar_crops(pipe.store, pipe.handle, pipe.source, layer, card["exemplars"])
    classes = ", ".join(f"{pipe.bundle.class_name(c)} ({n})" for c, n in card["top_classes"][:3])
    out = erf_dir(pipe.store, layer) / f"concept_{concept_id}.png"
    concept_sheet(crops, out, f"{layer} concept {concept_id}: {card['count']} members; {classes}")
    typer.echo(str(out))


def _outputs_of(run_dir: Path) -> tuple[str, str]:
    """What the run's outputs are called, singular and plural: ``class``/``classes``, or
    ``output``/``outputs`` for a run read through a probe head (:func:`gig.models.output_noun`)."""
    from .models import output_noun
    from .store import RunStore

    noun = output_noun(RunStore.open(run_dir).config)
    return noun, "classes" if noun == "class" else f"{noun}s"


def _narrow_table(title: str, caption: str, columns: tuple[str, ...]) -> Table:
    """A table with a light frame and no edge padding (so that it fits 80 columns), its columns
    never wrapped."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, caption=caption)
    for col in columns:
        table.add_column(col, no_wrap=True)
    return table


@app.command()
@one_line_errors
def inspect(
    run_dir: Path = typer.Argument(...),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON summary."),
):
    """Summarise a run: per-layer reconstruction, completeness residuals, images, graph."""
    from .summary import summarize

    info = summarize(run_dir)
    if json_out:
        typer.echo(json.dumps(info, indent=1))
        return
    table = _narrow_table(
        f"{info['run']} ({info['model']})",
        "over all images; agr.: top-1 agreement; KL: mean KL divergence (nats) of the "
        "model's output with the layer replaced, ± its 95 % interval",
        ("layer", "PFVs", "K", "rel. err.", "R²", "l0", "agr.", "KL"),
    )
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    for l in info["layers"]:
        kl = "-" if l.get("kl") is None else f"{l['kl']:.4f} ± {1.96 * l['kl_se']:.4f}"
        table.add_row(
            l["name"],
            fmt(l["n_pfv"]),
            fmt(l["n_concepts"]),
            fmt(l["rel_error"]),
            fmt(l["r2"]),
            fmt(l["l0_ratio"]),
            fmt(l["top1_agreement"]),
            kl,
        )
    out = Console()
    out.print(table)
    _print_fronts(out, info["layers"])
    c = info["completeness"]
    out.print(f"completeness residual: median {fmt(c['median'])}, p95 {fmt(c['p95'])}")
    _print_gig_accuracy(out, info.get("gig"))
    out.print(f"images: {info['images']['used']} used, {info['images']['skipped']} skipped")
    out.print(f"graph: {info['graph']}")
    if info.get("edge_tests"):
        tests = ", ".join(
            f"{name} {t['beats_random']}/{t['edges']} ({t['n_images']} images)"
            for name, t in info["edge_tests"].items()
        )
        out.print(f"edges stronger than random directions (BH, FDR 5 %): {tests}", soft_wrap=True)
    _print_missed(out, info["missed"])
    for line in info.get("notes", []):
        out.print(f"  note: {line}", soft_wrap=True)


def _print_fronts(out: Console, layers: list[dict]) -> None:
    """Each layer's sparsity–fidelity front (measured on the front images), the chosen λ starred,
    then per layer how stable the choice is and what the check over all images did."""
    if not any(l["front"] for l in layers):
        return
    table = _narrow_table(
        "sparsity–fidelity front (front images; * chosen λ)",
        "agr.: top-1 agreement; KL: mean KL divergence (nats) [95 % bootstrap interval]",
        ("layer", "λ", "l0", "R²", "agr.", "KL", "[95 %]"),  # rel. error: --json
    )
    for l in layers:
        for i, p in enumerate(l["front"]):
            star = (
                "*" if l["front_alpha"] is not None and math.isclose(p["alpha"], l["front_alpha"], rel_tol=1e-9) else ""
            )
            kl = "-" if p.get("kl") is None else f"{p['kl']:.4f}"
            ci = "" if p.get("kl_ci") is None else f"{p['kl_ci'][0]:.4f}–{p['kl_ci'][1]:.4f}"
            table.add_row(
                l["name"] if i == 0 else "",
                f"{p['alpha']:.4g}{star}",
                f"{p['l0_ratio']:.3f}",
                f"{p['r2']:.3f}",
                f"{p['top1_agreement']:.3f}",
                kl,
                ci,
                end_section=i == len(l["front"]) - 1,
            )
    out.print(table)
    for l in layers:
        if l.get("basis"):  # no λ: the basis's own encoder, measured over all images (the table above)
            out.print(f"{l['name']}: {l['basis']} basis with its own encoder: no λ, no front, not stepped")
            continue
        parts = []
        if l.get("stability") is not None:
            parts.append(f"choice repeats in {l['stability']:.0%} of bootstrap resamples of {l['front_images']} images")
        check = l.get("check")
        if check:
            stepped = f"stepped {check['steps']}× to a denser λ, " if check["steps"] else ""
            parts.append(f"check over all images: {stepped}{'missed' if check['miss'] else 'met'}")
        if parts:
            out.print(f"{l['name']}: " + "; ".join(parts), soft_wrap=True)


def _print_gig_accuracy(out: Console, acc: dict | None) -> None:
    """Per path kind: gradient evaluations and the distribution of the error estimates."""
    if not acc or not acc.get("by_source"):
        return
    tol = acc.get("tol")
    title = f"GIG accuracy (tolerance {tol})" if tol else "GIG accuracy (fixed grid)"
    # Short headers and a light frame so that the full path names fit 80 columns.
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption="n: attributions; evals: gradient evaluations per attribution (mean, max); "
        "error estimate: median, p95, max; >tol: share not converged",
    )
    table.add_column("path", no_wrap=True)
    for col in ("n", "evals", "max", "est. med", "p95", "max", ">tol"):
        table.add_column(col, justify="right", no_wrap=True)
    g = lambda d, k, f="{:.4f}": "-" if d.get(k) is None else f.format(d[k])  # noqa: E731
    for name, d in list(acc["by_source"].items()) + [("all", acc)]:
        table.add_row(
            name,
            str(d["n"]),
            g(d, "evaluations_mean", "{:.1f}"),
            g(d, "evaluations_max", "{}"),
            g(d, "error_median"),
            g(d, "error_p95"),
            g(d, "error_max"),
            g(d, "unconverged", "{:.1%}"),
        )
    out.print(table)


@app.command()
@one_line_errors
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (its graph stage must be done)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/report)."),
    atlas_per_layer: int = typer.Option(30, help="Concepts per layer in the atlas, most important first; 0 = all."),
    exemplars: int = typer.Option(10, help="Nearest PFVs shown per concept (top-1 first)."),
    classes: Optional[list[int]] = typer.Option(
        None,
        "--class",
        help="Class (or probe output) with a graph of its own (repeat); default: the run's graph classes, then the "
        "most frequent.",
    ),
    max_classes: int = typer.Option(8, help="Class (or output) graphs when --class is not given."),
    shared_classes: int = typer.Option(
        4, help="The first N classes (or outputs) get a shared graph for every subset of 2+."
    ),
    n_images: int = typer.Option(12, help="Images with a single-image graph and a localisation panel."),
    image_ids: Optional[list[int]] = typer.Option(None, "--image-id", help="Pick these images (repeat)."),
    single_file: bool = typer.Option(False, help="Inline every image and script into index.html."),
    on_demand: bool = typer.Option(
        True, help="Every other class's (or output's) graph in a file of its own, loaded when chosen."
    ),
):
    """Write the offline HTML report of RUN_DIR (graph viewer, concept atlas, localisation, metrics)."""
    from .report import ReportOptions, build_report

    options = ReportOptions(
        atlas_per_layer=atlas_per_layer,
        exemplars=exemplars,
        classes=classes or None,
        max_classes=max_classes,
        shared_classes=shared_classes,
        n_images=n_images,
        image_ids=image_ids or None,
        single_file=single_file,
        on_demand=on_demand,
    )
    path = build_report(run_dir, out, options, progress=True)
    console.print(f"[green]report[/green]: {path.resolve()}")


@app.command()
@one_line_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory whose decompose stage has finished."),
    extraction_images: int = typer.Option(
        100, help="Images for concept extraction (C-Deletion/C-Insertion); 0 skips it."
    ),
    interlayer_images: int = typer.Option(20, help="Images for inter-layer insertion/deletion; 0 skips it."),
    method: Optional[list[str]] = typer.Option(
        None,
        "--method",
        "-m",
        help="ours | dictionary | sae | sae-torch | kmeans | nmf | … (any registered method) | user:PATH (your basis: a .safetensors file or a folder of LAYER.safetensors, see docs/evaluation.md). Repeat; default ours, dictionary, sae (sae-torch without gig[overcomplete]), kmeans.",
    ),
    ordering: Optional[list[str]] = typer.Option(
        None, "--ordering", help="gig | random | grad_x_coef | magnitude (repeat; default all)."
    ),
    layer: Optional[list[str]] = LayersOpt,
    seed: int = typer.Option(0, help="Seed for image choice, baselines and random orders."),
    n_steps: Optional[int] = typer.Option(
        None, help="A fixed number of GIG steps for the rankings (default: the run's setting)."
    ),
    gig_tol: Optional[float] = typer.Option(
        None, "--gig-tol", help="GIG tolerance for the rankings (default: the run's)."
    ),
    n_random: int = typer.Option(5, help="Random orders per image (averaged)."),
    sae_k: Optional[int] = typer.Option(
        None, help="Active latents of the TopK SAEs (default: the run's mean active concepts per PFV)."
    ),
    chunk_images: int = typer.Option(10, help="Images per saved part (an interruption loses at most one)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder (default RUN_DIR/evaluate; only that one is read by inspect)."
    ),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    restart: bool = typer.Option(False, help="Discard saved partial results and fitted baselines."),
    plots: bool = typer.Option(True, help="Write the PNG plots."),
):
    """Faithfulness evaluation of RUN_DIR (concept extraction vs baselines; inter-layer orderings) into RUN_DIR/evaluate/."""
    from .artefacts import evaluate_dir
    from .evaluation import EvaluationSettings, evaluate_run

    _evaluation_threads(threads)
    chosen = {"methods": list(method)} if method else {}  # else the settings' defaults
    chosen |= {"orderings": list(ordering)} if ordering else {}
    settings = EvaluationSettings(
        extraction_images=extraction_images,
        interlayer_images=interlayer_images,
        layers=layer or None,
        seed=seed,
        n_steps=n_steps,
        gig_tol=gig_tol,
        n_random=n_random,
        sae_k=sae_k,
        chunk_images=chunk_images,
        plots=plots,
        resume=not restart,
        **chosen,
    )
    result = evaluate_run(run_dir, settings, out=out, progress=True)
    _print_evaluation(result, out or evaluate_dir(run_dir))


def _evaluation_threads(threads: Optional[int]) -> None:
    """Prepare the evaluation's CPU work: the allocator tuned, and ``threads`` torch threads
    where given (else torch's choice)."""
    import torch

    from .evaluation.runner import tune_malloc

    tune_malloc()
    if threads:
        torch.set_num_threads(threads)


def _print_evaluation(result: dict, folder: Path) -> None:
    """The evaluation's AUC ins − del tables (concept extraction per layer and method, inter-layer
    per transition and ordering; a section without results is left out), then where it went."""
    term = Console()
    for section, title, what in (
        ("extraction", "concept extraction: AUC ins − del", "method"),
        ("interlayer", "inter-layer: AUC ins − del", "ordering"),
    ):
        rows = result["summary"][section]
        if not rows:
            continue
        names = list(dict.fromkeys(n for v in rows.values() for n in v))
        table = Table(title=title)
        table.add_column("layer" if section == "extraction" else "transition")
        for n in names:
            table.add_column(n)
        for key, vals in rows.items():
            table.add_row(key, *[("-" if vals.get(n) is None else f"{vals[n]:.3f}") for n in names])
        term.print(table)
    console.print(
        f"[green]evaluate done[/green] in {result['seconds']:.0f} s: {folder} (results.md, summary.json, plots)"
    )


@app.command()
@one_line_errors
def ablate(
    run_dir: Path = typer.Argument(..., help="Run directory (its decompose stage must be done)."),
    layer: str = typer.Argument(..., help="Layer whose concepts are removed."),
    concepts: list[int] = typer.Argument(..., help="Concept id(s) of LAYER, removed together."),
    images: Optional[list[Path]] = typer.Option(
        None, "--images", "-i", help="A photo outside the run (repeat); default: the run's images."
    ),
    image_ids: Optional[list[int]] = typer.Option(
        None, "--image-id", help="A run image (repeat); default: all of them."
    ),
    target: Optional[int] = typer.Option(
        None,
        "--target",
        "-t",
        help="Class (or probe output) followed for every image (default: the run's target; a photo's prediction).",
    ),
    all_layers: bool = typer.Option(
        False, "--all-layers", help="Read the concepts of every later layer, not only the next one."
    ),
    top: int = typer.Option(5, help="Changed classes (or outputs) and concepts listed."),
    device: Optional[str] = DeviceOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the JSON result."),
):
    """Remove concept(s) from LAYER's reconstruction; report how class (or output) probabilities and later concept readouts change (RUN/graph/ablation/)."""
    from .ablate import ablate as run_ablation
    from .store import RunStore

    result = run_ablation(
        RunStore.open(run_dir),
        layer,
        concepts,
        image_ids=image_ids or None,
        images=images or None,
        targets=target,
        all_layers=all_layers,
        device=device,
        top=top,
    )
    doc = result.to_dict(top)
    if json_out:
        typer.echo(json.dumps(doc, indent=1))
        return
    _print_ablation(Console(), doc, _outputs_of(run_dir)[1])
    console.print(f"[green]ablate[/green]: {result.path}")


@app.command("ablation-correlation")
@one_line_errors
def ablation_correlation_command(
    run_dir: Path = typer.Argument(..., help="Run directory (its attribute stage must be done)."),
    max_images: Optional[int] = typer.Option(None, help="Use the first N images with attributions (default: all)."),
    top_n: int = typer.Option(16, help="Active lower concepts with the largest |GIG| ablated per image and target."),
    others: int = typer.Option(16, help="Other active lower concepts drawn at random per image and target."),
    all_active: bool = typer.Option(False, "--all-active", help="Ablate every active concept instead."),
    n_random: int = typer.Option(20, help="Random orderings for the baseline."),
    device: Optional[str] = DeviceOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the JSON result."),
):
    """Does a strong GIG edge mean a strong ablation effect? Spearman ρ per transition, with a random baseline (RUN/graph/ablation/correlation.json)."""
    from .ablate import ablation_correlation

    result = ablation_correlation(
        run_dir,
        max_images=max_images,
        top_n=None if all_active else top_n,
        n_others=others,
        n_random=n_random,
        device=device,
        progress=True,
    )
    if json_out:
        typer.echo(json.dumps(result, indent=1))
        return
    noun = _outputs_of(run_dir)[0]
    table = Table(title=f"GIG against ablation: {result['n_images']} image(s); ρ per (image, target), mean ± sd")
    for col in ("transition", "ρ", "random ordering", "sign agreement", "top-5 overlap (random)"):
        table.add_column(col)
    for name, t in result["transitions"].items():
        rho, rnd = t["spearman"]["per_target"], t["random"]["per_target"]
        table.add_row(
            name.removesuffix("->class") + f"->{noun}" if name.endswith("->class") else name,
            f"{rho['mean']:+.3f} ± {rho['sd']:.3f}",
            f"{rnd['mean']:+.3f} ± {rnd['sd']:.3f}",
            f"{t['sign_agreement']:.3f}",
            f"{t['top5_overlap']:.2f} ({t['top5_overlap_random']:.2f})",
        )
    Console().print(table)


def _print_ablation(out: Console, doc: dict, nouns: str = "classes") -> None:
    """Per image and on average: the target's probability and logit, with and without the concepts;
    ``nouns``: what the run's outputs are called (``classes``, or ``outputs`` for a probe head)."""
    first = doc["readout_layers"][0] if doc["readout_layers"] else None
    table = Table(
        title=f"{doc['layer']} without concept(s) {', '.join(map(str, doc['concepts']))}: "
        f"{doc['n_images']} image(s); Δ = ablated − reconstruction"
    )
    for col in ("image", "target", "p recon.", "p ablated", "Δp", "Δ logit", "pred recon. → ablated") + (
        (f"largest Δ readout at {first}",) if first else ()
    ):
        table.add_column(col)
    for im in doc["images"]:
        p, z = im["target_prob"], im["target_logit"]
        name = str(im["image_id"]) if im["image_id"] is not None else Path(im["path"]).name
        row = [
            name,
            im["target_name"],
            f"{p['reconstruction']:.3f}",
            f"{p['ablated']:.3f}",
            f"{p['delta']:+.3f}",
            f"{z['delta']:+.3f}",
            f"{im['pred']['reconstruction']} → {im['pred']['ablated']}",
        ]
        if first:
            row.append(", ".join(f"#{r['concept']} {r['delta']:+.2f}" for r in im["readouts"][first]["top"][:3]))
        table.add_row(*row)
    m = doc["mean"]
    table.add_row(
        "mean",
        "",
        f"{m['target_prob']['reconstruction']:.3f}",
        f"{m['target_prob']['ablated']:.3f}",
        f"{m['target_prob']['delta']:+.3f}",
        f"{m['target_logit']['delta']:+.3f}",
        f"{m['prediction_changed']:.0%} changed",
        *([", ".join(f"#{r['concept']} {r['delta']:+.2f}" for r in m["readouts"][first]["top"][:3])] if first else []),
    )
    out.print(table)
    out.print(
        f"most changed {nouns} (mean Δp): " + ", ".join(f"{c['name']} {c['delta_prob']:+.3f}" for c in m["classes"])
    )


@app.command()
@one_line_errors
def stability(
    run_dir: Path = typer.Argument(..., help="A run whose concepts stage has finished."),
    seeds: int = typer.Option(3, help="Refits of every layer's concepts, each with its own seed."),
    fraction: float = typer.Option(0.8, help="Share of the run's images each refit clusters."),
    threshold: float = typer.Option(0.9, help="Mean matched cosine at which a concept counts as found again."),
    layer: Optional[list[str]] = LayersOpt,
    graphs: bool = typer.Option(
        False,
        "--graphs",
        help="Also rerun the stages on the graph classes' (or outputs') images per refit (and once with the run's "
        "own concepts) and measure how many of each class (or output) graph's nodes and edges come back (needs the "
        "graph stage).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON result."),
):
    """Refit each layer's concepts with other seeds on other image subsets and match them to the run's (RUN/stability/)."""
    from .artefacts import stability_path
    from .stability import concept_stability

    result = concept_stability(run_dir, seeds, fraction, threshold, layer or None, graphs=graphs)
    if json_out:
        typer.echo(json.dumps(result, indent=1))
        return
    table = _narrow_table(
        f"concept stability: {seeds} refits on {fraction:.0%} of the images, Hungarian matching",
        f"matched: mean cosine of a concept's match over the refits ≥ {threshold}",
        ("layer", "K", "matched", "median cos.", "per refit", "random PFVs: cos."),
    )
    for name, figures in result["layers"].items():
        per_refit = " ".join(f"{v:.2f}" for v in figures["share_matched_per_refit"])
        table.add_row(
            name,
            str(figures["K"]),
            f"{figures['share_matched']:.2f}",
            f"{figures['median_similarity']:.3f}",
            per_refit,
            f"{figures['baseline_median_similarity']:.3f}",
        )
    Console().print(table)
    if result.get("graphs"):
        _print_graph_recurrence(result["graphs"], seeds, _outputs_of(run_dir)[0])
    console.print(f"[green]stability[/green]: {stability_path(run_dir)}")


def _print_graph_recurrence(g: dict, seeds: int, noun: str = "class") -> None:
    """Per class (``noun``: or output) graph: the shares of its concept nodes (all layers, then per
    layer) and edges that come back, averaged over the refits, beside the control's and chance's."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    table = _narrow_table(
        f"{noun} graphs with refitted concepts: {seeds} refits, {g['n_images']} images",
        "share of the run graph's concept nodes / edges that come back, mean over the refits; "
        "per layer: nodes, early to late; control: the run's own concepts rerun the same way; "
        "chance: top_k/K per layer",
        ("graph", "nodes", "per layer", "edges", "control", "chance"),
    )
    chance = " ".join(fmt(v) for v in g["chance_nodes"].values())
    rows = [(name, g["mean"][name], g["control"]["graphs"][name]) for name in g["control"]["graphs"]]
    rows.append(("all", g["mean_all"], g["control"]["mean"]))
    for i, (name, mean, control) in enumerate(rows):
        mean = mean or {"nodes": None, "nodes_per_layer": {}, "edges": None}
        table.add_row(
            name,
            fmt(mean["nodes"]),
            " ".join(fmt(v) for v in mean["nodes_per_layer"].values()),
            fmt(mean["edges"]),
            f"{fmt(control['nodes'])} / {fmt(control['edges'])}",
            chance,
            end_section=i == len(rows) - 2,
        )
    Console().print(table)


@app.command()
@one_line_errors
def compare(
    run_a: Path = typer.Argument(..., help="The first run (A); its decompose stage must have finished."),
    run_b: Path = typer.Argument(..., help="The second run (B), on the same images."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for compare.json and index.html."),
    pair: Optional[list[str]] = typer.Option(
        None, "--pair", help="LAYER_A=LAYER_B to compare (repeat; default: the runs' layers in order)."
    ),
    max_images: int = typer.Option(200, help="Shared images read per layer pair (a seeded draw when more)."),
    min_similarity: float = typer.Option(0.5, help="Lowest response correlation that counts as a counterpart."),
    seed: int = typer.Option(0, help="Seed of the image draw."),
    page: bool = typer.Option(True, help="Write the offline page index.html."),
    on: str = typer.Option(
        "shared", help="shared: the images both runs analysed | a: A's images, B's concepts coded on them."
    ),
):
    """Compare two runs: concepts matched by response on the same images, graphs diffed (OUT/)."""
    from .compare import compare_runs

    result = compare_runs(run_a, run_b, out, pair or None, max_images, min_similarity, seed, page, on=on)
    table = _narrow_table(
        f"{result['run_a']['model']} (A) against {result['run_b']['model']} (B), {len(result['image_ids'])} images",
        "matched one to one by the correlation of their codes; chance: B's images shifted by one; "
        "> chance: share of A's active concepts above chance p95; counterparts: above it and min_similarity",
        ("A ↔ B", "median r", "chance p95", "> chance", "counterparts"),
    )
    for l in result["layers"]:
        table.add_row(
            f"{l['layer_a']} ↔ {l['layer_b']}",
            "–" if l["median_similarity"] is None else f"{l['median_similarity']:.3f}",
            "–" if l["chance_p95"] is None else f"{l['chance_p95']:.3f}",
            f"{l['share_above_chance']:.0%}",
            f"{l['share_matched']:.0%} of {l['active_a']}",
        )
    Console().print(table)
    for name, diff in result["graphs"].items():
        console.print(
            f"{name}: nodes kept {len(diff['nodes']['kept'])}, lost {len(diff['nodes']['lost'])}, "
            f"gained {len(diff['nodes']['gained'])}; edges kept {len(diff['edges']['kept'])}"
        )
    console.print(f"[green]compare[/green]: {out / 'compare.json'}" + (f", {out / 'index.html'}" if page else ""))


@app.command()
@one_line_errors
def label(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    layer: Optional[str] = typer.Argument(None, help="Layer (with --suggest: only this layer)."),
    concept_id: Optional[int] = typer.Argument(None, help="Concept id in LAYER."),
    name: Optional[str] = typer.Argument(None, help="The concept's name."),
    note: Optional[str] = typer.Option(None, "--note", help="A note kept with the name."),
    suggest: bool = typer.Option(
        False, "--suggest", help="Print suggested names from the members' classes (or probe outputs)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Name a concept (RUN/labels.yaml): `gig label RUN LAYER ID "name" [--note ...]`; `gig label RUN` lists the names, `--suggest [LAYER]` proposes some."""
    from .artefacts import load_labels
    from .labels import set_label
    from .store import RunStore

    store = RunStore.open(run_dir)
    if suggest:
        _print_suggestions(store, layer, json_out)
        return
    if layer is not None and concept_id is not None:
        if name is None:
            raise ConfigError(f'give the name of {layer} concept {concept_id}: gig label RUN LAYER ID "name"')
        path = set_label(store, layer, concept_id, name, note)
        console.print(f"labelled {layer} concept {concept_id} {name!r} in {path}")
        return
    labels = load_labels(store)
    labels = {l: v for l, v in labels.items() if layer is None or l == layer}
    if json_out:
        typer.echo(json.dumps({l: {str(q): e for q, e in v.items()} for l, v in labels.items()}, indent=1))
        return
    table = Table(title=f"concept labels of {run_dir}")
    for col in ("layer", "concept", "name", "note"):
        table.add_column(col)
    for l, entries in labels.items():
        for q, e in sorted(entries.items()):
            table.add_row(l, str(q), str(e.get("name", "")), str(e.get("note") or ""))
    Console().print(table)


def _print_suggestions(store, layer: Optional[str], json_out: bool) -> None:
    from .artefacts import load_labels
    from .labels import concept_label, run_class_names, suggest_labels

    names = run_class_names(store)
    layers = [layer] if layer is not None else list(store.config.layers)
    found = {l: suggest_labels(store, l, class_names=names) for l in layers}
    if json_out:
        typer.echo(json.dumps({l: {str(q): s for q, s in v.items()} for l, v in found.items()}, indent=1))
        return
    labels = load_labels(store)
    nouns = _outputs_of(store.root)[1]
    table = Table(title=f"suggested concept names (members' {nouns}; WordNet ancestor where one is shared)")
    for col in ("layer", "concept", "suggestion", f"top {nouns} (members)", "ancestor (share)", "label"):
        table.add_column(col)
    for l, suggestions in found.items():
        for q, s in suggestions.items():
            a = s["ancestor"]
            table.add_row(
                l,
                str(q),
                s["name"] or "-",
                ", ".join(f"{c} ({n})" for c, n in s["classes"]),
                f"{a['name']} ({a['share']:.0%})" if a else "-",
                concept_label(labels, l, q) or "",
            )
    Console().print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

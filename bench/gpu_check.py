"""GPU check: per-stage throughput of EfficientNet-Lite0 and ResNet-50, and CPU-vs-GPU agreement
of GIG. Run by ``bench/gpu_check.sh``; on a machine without a GPU it runs the same checks on the
CPU at a tiny size and exits 0. Per model it also profiles the GIG walk of four images
(``engine``): images per second, the GPU kernels' share of the wall time, host synchronisations
per refinement round, evaluations per attribution, and the 50 000-image projection from the
run's per-stage rates.

    python bench/gpu_check.py [--images 64] [--out DIR]

Images are made from the photos embedded in scikit-image, scikit-learn and matplotlib (flips and
crops, so that any number can be made offline). ResNet-50 has random weights (timing only).
Prints one table row per (model, stage): seconds and images per second, the device's peak
memory; then the agreement of GIG attributions computed on the CPU and on the GPU from the same
codes: relative L2 difference on a fixed 64-step grid (same nodes on both), with cuDNN's TF32
convolutions on and off, and of the error-controlled default; and the coders' speed on the Lite0
run's sampled PFVs (FISTA and OMP on the device, OMP and LARS on the CPU; ``coder_timing``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch


def make_images(folder: Path, n: int) -> None:
    """``n`` JPEG files from the embedded photos: each photo, flipped and cropped in turn."""
    from PIL import ImageOps

    from gig.images import EmbeddedSource

    source = EmbeddedSource()
    photos = [source.load(r) for r in source.records]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        variant = i // len(photos)
        if variant % 2:
            img = ImageOps.mirror(img)
        if variant >= 2:
            w, h = img.size
            f = 0.9 ** (variant // 2)
            img = img.crop((0, 0, max(32, int(w * f)), max(32, int(h * f))))
        img.convert("RGB").save(folder / f"img_{i:05d}.jpg", quality=90)


def stage_table(
    model: str, weights: str, layers: list[str], images: Path, out: Path, device: str, n_images: int, tiny: bool
) -> list[dict]:
    from gig.config import Config
    from gig.pipeline import Pipeline

    # The tiny CPU size checks that everything runs; the GPU size measures throughput.
    config = Config(
        model=model,
        weights=weights,
        layers=layers,
        images=str(images),
        device=device,
        samples_per_image=16,
        lasso_max_iter=100,
        batch_size=32,
        top_k=2 if tiny else 5,
        internal_batch_size=32 if tiny else 256,
        calibration_size=1000,
        gig_max_steps=32 if tiny else 512,
    )
    pipe = Pipeline(config, out, progress=False)
    rows = []
    for stage in ("collect", "concepts", "decompose", "attribute"):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        getattr(pipe, stage)()
        entry = pipe.store.manifest()["stages"][stage]
        rows.append(
            {
                "model": model,
                "stage": stage,
                "seconds": entry["seconds"],
                "images_per_s": n_images / max(entry["seconds"], 1e-9),
                "cuda_peak_mb": entry.get("cuda_peak_mb"),
                "peak_rss_mb": entry["peak_rss_mb"],
            }
        )
        if stage == "attribute":
            acc = entry["summary"]["accuracy"]
            rows[-1]["gig"] = {k: acc.get(k) for k in ("evaluations_mean", "error_p95", "unconverged")}
            rows[-1]["completeness_p95"] = entry["summary"]["completeness"]["p95"]
    return rows


def agreement(device: str) -> dict:
    """GIG on the CPU and on ``device`` from the same codes (Lite0, channel basis at _blocks.11)."""
    from gig.hooks import ModelHandle
    from gig.images import EmbeddedSource
    from gig.method import GIG
    from gig.models import load_model

    bundle = load_model("efficientnet-lite0")
    source = EmbeddedSource()
    x = torch.stack([bundle.preprocess(source.load(r)) for r in source.records[:2]])
    cpu = ModelHandle(bundle, "cpu").for_gradients(["_blocks.11", "_blocks.15"])
    logits, grids = cpu.capture(x, ["_blocks.11", "_blocks.15"])
    codes = grids["_blocks.11"].flatten(2).transpose(1, 2)
    V = torch.eye(codes.shape[2])
    Vb = torch.randn(20, grids["_blocks.15"].shape[1], generator=torch.Generator().manual_seed(0))
    cases = {
        "class": ({}, logits.argmax(1)),
        "concept": ({"read_layer": "_blocks.15", "read_vectors": Vb}, torch.tensor([[0, 1, 2], [3, 4, 5]])),
    }
    out: dict = {}
    gpu_bundle = load_model("efficientnet-lite0")
    gpu = ModelHandle(gpu_bundle, device).for_gradients(["_blocks.11", "_blocks.15"])
    for name, (read, target) in cases.items():
        ref = GIG(cpu, "_blocks.11", V, n_steps=64).attribute(x, codes, target, **read).attributions
        ref_tol = GIG(cpu, "_blocks.11", V).attribute(x, codes, target, **read)
        for tf32 in (False, True):
            if device.startswith("cuda"):
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
            got = GIG(gpu, "_blocks.11", V, n_steps=64).attribute(x, codes, target, **read).attributions
            out[f"{name}, 64 midpoint steps, tf32={tf32}"] = float((got - ref).norm() / ref.norm())
        if device.startswith("cuda"):
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        got = GIG(gpu, "_blocks.11", V).attribute(x, codes, target, **read)
        out[f"{name}, error control (tol 0.01)"] = float(
            (got.attributions - ref_tol.attributions).norm() / ref_tol.attributions.norm()
        )
        out[f"{name}, evaluations cpu / gpu"] = [int(ref_tol.n_evaluations.sum()), int(got.n_evaluations.sum())]
    return out


def engine_profile(run: Path, device: str, n_images: int = 4) -> dict:
    """The GIG walk of a finished run's first images, profiled: the device kernels' share of the
    wall time (CUDA only), host synchronisations and refinement rounds (their ratio must not grow
    with the images), evaluations per attribution."""
    import warnings

    import gig.attribution as attribution
    import gig.method as method
    from gig.collect import iter_image_batches, load_images
    from gig.decompose import CodeReader
    from gig.pipeline import Pipeline

    pipe = Pipeline.open(run, progress=False)
    store, config = pipe.store, pipe.store.config
    layers = config.layers
    fast = pipe.handle.for_gradients(layers)
    readers = {layer: CodeReader(store, layer) for layer in layers}
    gigs = {layer: attribution.run_gig(store, fast, layer) for layer in layers}
    used = load_images(store)["images"][:n_images]
    by_id = {r.image_id: r for r in pipe.source.records}
    batch = next(iter(iter_image_batches(pipe.source, [by_id[i["image_id"]] for i in used], pipe.handle, len(used))))
    ids = [r.image_id for r in batch.records]
    targets = [i["target"] for i in used]
    attribution.walk(batch.pixels, ids, targets, layers, readers, gigs, config.top_k)  # warm: checks, plans
    rounds = {"n": 0}
    original_round = method.RefinementState.round

    def counted_round(self, *args, **kwargs):
        rounds["n"] += 1
        return original_round(self, *args, **kwargs)

    method.RefinementState.round = counted_round
    cuda = device.startswith("cuda")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else []
            )
            with torch.profiler.profile(activities=activities) as prof:
                t0 = time.perf_counter()
                out = attribution.walk(batch.pixels, ids, targets, layers, readers, gigs, config.top_k)
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        method.RefinementState.round = original_round
    syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
    kernel_s = (sum(e.self_device_time_total for e in prof.key_averages()) / 1e6) if cuda else None
    steps = torch.cat([v.float().flatten() for k, v in out.items() if k.endswith("steps")])
    return {
        "images": len(ids),
        "wall_s": wall,
        "images_per_s": len(ids) / wall,
        "kernel_share": None if kernel_s is None else kernel_s / wall,
        "rounds": rounds["n"],
        "host_syncs": syncs,
        "syncs_per_round": None if syncs is None else syncs / max(rounds["n"], 1),
        "evaluations_per_attribution": float(steps.mean()),
    }


def projection(rows: list[dict], model: str, n_images: int, target: int = 50_000) -> dict:
    """Hours for ``target`` images from this run's per-stage rates (concepts counted once: its
    cost grows with the sampled PFVs, which the run caps); a projection, not a run."""
    per_image = sum(r["seconds"] for r in rows if r["model"] == model and r["stage"] != "concepts") / n_images
    fixed = sum(r["seconds"] for r in rows if r["model"] == model and r["stage"] == "concepts")
    return {"images": target, "hours": (fixed + per_image * target) / 3600, "seconds_per_image": per_image}


def coder_timing(run: Path, device: str) -> dict:
    """Seconds per 1000 rows of each coder on a finished run's sampled PFVs, at the λ of the run's
    decompose stage (Lasso) and at the OMP λ with the same l0: FISTA and OMP on ``device``, OMP
    and LARS (where SPAMS is installed) on the CPU; and OMP's device-vs-CPU code difference."""
    from gig.collect import load_samples
    from gig.concepts import load_dictionary
    from gig.decompose import alpha_for_l0, run_alpha
    from gig.lasso import LassoEncoder, lars_available
    from gig.omp import OMPEncoder
    from gig.store import RunStore

    def timed(encoder, X):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        U = encoder.encode(X)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return U.cpu(), 1000 * (time.perf_counter() - t0) / X.shape[0]

    store = RunStore.open(run)
    out = {}
    for layer in store.config.layers:
        X, V = load_samples(store, layer)["pfv"].float(), load_dictionary(store, layer)
        lam = run_alpha(store, layer)
        U_lasso, fista_s = timed(LassoEncoder(V, lam, device=device, solver="fista"), X.to(device))
        l0 = float((U_lasso != 0).float().mean())
        omp_lam, _ = alpha_for_l0(X, V, l0, OMPEncoder)
        U_dev, omp_dev_s = timed(OMPEncoder(V, omp_lam, device=device), X.to(device))
        U_cpu, omp_cpu_s = timed(OMPEncoder(V, omp_lam), X)
        row = {
            "rows": X.shape[0],
            "K": V.shape[0],
            "C": V.shape[1],
            "l0": l0,
            f"fista_{device}_s_per_1k": fista_s,
            f"omp_{device}_s_per_1k": omp_dev_s,
            "omp_cpu_s_per_1k": omp_cpu_s,
            "omp_device_vs_cpu_rel_diff": float((U_dev - U_cpu).norm() / U_cpu.norm().clamp_min(1e-30)),
        }
        if lars_available():
            row["lars_cpu_s_per_1k"] = timed(LassoEncoder(V, lam, solver="lars"), X)[1]
        out[layer] = row
        print(
            f"  {layer}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="default: 64 on a GPU, 2 on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs and results.json here")
    parser.add_argument("--models", default="lite0,resnet50")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    n_images = args.images or (64 if gpu else 2)
    work = args.out or Path(tempfile.mkdtemp(prefix="gig-gpu-check-"))
    print(
        f"device: {torch.cuda.get_device_name(0) if gpu else 'cpu (no GPU: tiny size)'}; torch {torch.__version__}; "
        f"{n_images} images",
        flush=True,
    )
    if gpu:
        # float32 convolutions and matrix products unless the agreement check below says otherwise
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    make_images(work / "images", n_images)
    specs = {
        "lite0": ("efficientnet-lite0", "default", ["_blocks.4", "_blocks.8", "_blocks.11", "_blocks.15"]),
        "resnet50": ("torchvision:resnet50", "none", ["layer1.2", "layer2.3", "layer3.5", "layer4.2"]),
    }
    rows: list[dict] = []
    coders: dict = {}
    engine: dict = {}
    failures: list[str] = []
    try:  # each part on its own: one failure must not cost the others' (scarce) GPU time
        agree = agreement(device)
        print("CPU vs " + device + " GIG agreement (relative L2 difference of the attribution vectors):")
        for k, v in agree.items():
            print(f"  {k}: {v}", flush=True)
    except Exception:  # noqa: BLE001
        agree = {}
        failures.append("agreement:\n" + traceback.format_exc())
        print(failures[-1], flush=True)
    for key in args.models.split(","):
        model, weights, layers = specs[key]
        t0 = time.perf_counter()
        try:
            rows += stage_table(
                model, weights, layers, work / "images", work / f"run-{key}", device, n_images, tiny=not gpu
            )
        except Exception:  # noqa: BLE001
            failures.append(f"{model}:\n" + traceback.format_exc())
            print(failures[-1], flush=True)
            continue
        print(f"{model}: {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            engine[key] = engine_profile(work / f"run-{key}", device, min(4, n_images))
            engine[key]["projection"] = projection(rows, model, n_images)
            print(f"  GIG engine: {json.dumps(engine[key])}", flush=True)
        except Exception:  # noqa: BLE001
            failures.append(f"engine {model}:\n" + traceback.format_exc())
            print(failures[-1], flush=True)
        if key == "lite0":
            try:
                print("coders (seconds per 1000 sampled PFVs):", flush=True)
                coders = coder_timing(work / f"run-{key}", device)
            except Exception:  # noqa: BLE001
                failures.append("coders:\n" + traceback.format_exc())
                print(failures[-1], flush=True)
        for r in rows:
            if r["model"] == model:
                print(
                    f"  {r['stage']:10s} {r['seconds']:8.2f} s  {r['images_per_s']:8.2f} img/s  "
                    f"cuda peak {r['cuda_peak_mb']} MB  rss {r['peak_rss_mb']} MB  "
                    f"{json.dumps(r.get('gig', ''))} {r.get('completeness_p95', '')}",
                    flush=True,
                )
    results = {
        "device": device,
        "images": n_images,
        "stages": rows,
        "agreement": agree,
        "coders": coders,
        "engine": engine,
        "failures": failures,
        "seconds": time.perf_counter() - start,
    }
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"total {results['seconds']:.1f} s; results in {work / 'results.json'}")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    if failures and gpu:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

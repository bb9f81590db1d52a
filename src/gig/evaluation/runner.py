"""``evaluate_run``: both faithfulness protocols on a finished run, written to ``RUN/evaluate/``.

Files written::

    RUN/evaluate/
      summary.json         {"extraction": {LAYER: {METHOD: auc_diff}}, "interlayer": {"A->B": {ORDERING: auc_diff}}}
      extraction.json      per layer and method: AUCs with spreads, mean curves, reconstruction
                           figures, per-image values, fitted-baseline details
      interlayer.json      per transition and ordering: AUCs with spreads, mean curves, per-image values
      results.md           the tables
      extraction_curves.png, extraction_auc.png, interlayer_curves.png, interlayer_auc.png
      settings.json        the settings, timings and image ids
      bases/               fitted baselines per layer (safetensors + JSON), reused on resume
      parts/               per-chunk results, reused on resume when the settings are unchanged

The work is done in chunks of images and each finished chunk is saved, so an interrupted
evaluation resumes where it stopped (with the same settings and the same run).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attribution import GIG
from ..collect import iter_image_batches, load_images, load_samples
from ..concepts import load_dictionary
from ..decompose import CodeReader, FidelityMeter, encoder_for
from ..errors import ConfigError
from ..store import RunMismatchError, RunStore, load_json, load_tensors, save_json, save_tensors
from .baselines import METHODS, ConceptBasis, dictionary_basis, from_state, kmeans_basis, ours_basis, sae_basis
from .curves import auc, markdown_tables, paired_difference, plot_auc_bars, plot_curves, spread, step_fractions
from .extraction import DELETION, INSERTION, class_probability, deletion_insertion, rank_by_gig
from .interlayer import (ORDERINGS, concept_value_readout, descending, grad_x_coef, magnitude_scores,
                         random_orders)

SETTINGS_VERSION = 3  # 3: error-controlled GIG (gig_tol) for the rankings


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


def _check_names(given: Iterable[str], known: tuple[str, ...], what: str) -> list[str]:
    given = list(dict.fromkeys(given))
    unknown = [g for g in given if g not in known]
    if unknown:
        raise ConfigError(f"unknown {what}(s) {unknown}; choose from {', '.join(known)}")
    return given


def _pick_images(used: list[dict], n: int, seed: int, salt: int) -> list[dict]:
    """``n`` of the run's images, drawn at random (seeded), kept in run order."""
    if n <= 0:
        return []
    rng = np.random.default_rng([seed, salt])
    idx = np.sort(rng.choice(len(used), size=min(n, len(used)), replace=False))
    return [used[i] for i in idx]


def _hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Evaluation:
    def __init__(self, pipe, settings: dict, progress: bool, out: Path):
        self.pipe = pipe
        self.store: RunStore = pipe.store
        self.handle = pipe.handle
        #: batch norms folded, channels-last: for the many gradient evaluations of GIG
        self.fast = pipe.handle.for_gradients(settings["layers"])
        self.config = pipe.config
        self.s = settings
        self.progress = progress
        self.out = out
        self.readers = {layer: CodeReader(self.store, layer) for layer in settings["layers"]}
        self.dicts = {layer: load_dictionary(self.store, layer).float() for layer in settings["layers"]}
        self.by_id = {r.image_id: r for r in pipe.source.records}
        self._grid_shapes: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ helpers
    def pixels(self, infos: list[dict]) -> torch.Tensor:
        records = [self.by_id[i["image_id"]] for i in infos]
        batches = list(iter_image_batches(self.pipe.source, records, self.handle, max(len(records), 1)))
        got = [r.image_id for b in batches for r in b.records]
        if got != [i["image_id"] for i in infos]:
            missing = sorted(set(i["image_id"] for i in infos) - set(got))
            raise RunMismatchError(f"images {missing} of the run could not be loaded again from {self.config.images}")
        return torch.cat([b.pixels for b in batches])

    def codes(self, layer: str, ids: list[int]) -> torch.Tensor:
        return torch.stack([self.readers[layer].codes(i) for i in ids])

    def gig(self, layer: str, V: torch.Tensor) -> GIG:
        return GIG(self.fast, layer, V, self.s["n_steps"], self.s["quadrature"], self.s["internal_batch_size"],
                   tol=self.s["gig_tol"], max_steps=self.s["gig_max_steps"])

    def chunks(self, infos: list[dict]) -> list[list[dict]]:
        c = self.s["chunk_images"]
        return [infos[i : i + c] for i in range(0, len(infos), c)]

    def part_path(self, name: str) -> Path:
        path = self.out / "parts"
        path.mkdir(parents=True, exist_ok=True)
        return path / f"{name}.json"

    # ------------------------------------------------------------------ baselines
    def bases(self, layer: str) -> dict[str, ConceptBasis]:
        """The layer's concept bases: ours from the run, the baselines fitted (or reloaded)."""
        s = self.s
        V = self.dicts[layer]
        alpha = self.store.summary("decompose").get("alpha", {}).get(layer)
        if alpha is None:
            raise RunMismatchError(f"the decompose stage of {self.store.root} records no λ for layer {layer!r}")
        def make_encoder(atoms: torch.Tensor, lam: float):
            return encoder_for(self.config, atoms, lam)

        out = {"ours": ours_basis(make_encoder(V, alpha))}
        wanted = [m for m in s["methods"] if m != "ours"]
        if not wanted:
            return out
        bdir = self.out / "bases"
        bdir.mkdir(parents=True, exist_ok=True)
        info_path, tensor_path = bdir / f"{layer}.json", bdir / f"{layer}.safetensors"
        saved_info = load_json(info_path) if info_path.is_file() else {}
        saved = load_tensors(tensor_path) if tensor_path.is_file() and saved_info else {}
        X = load_samples(self.store, layer)["pfv"].float()
        K = int(V.shape[0])
        changed = False
        for m in wanted:
            if m in saved_info:
                state = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(m + "/")}
                out[m] = from_state(m, state, saved_info[m], make_encoder)
                continue
            if m == "dictionary":
                fit_alpha = float(alpha / V.norm(dim=1).median().clamp_min(1e-12))
                target_l0 = float((out["ours"].encode(X) != 0).float().mean())
                b = dictionary_basis(X, K, target_l0, make_encoder, s["seed"], self.config.nonnegative,
                                     self.config.calibration_size, s["dictionary_iter"], fit_alpha=fit_alpha)
            elif m == "sae":
                k = s["sae_k"]
                if k is None:  # the run's own sparsity: mean active concepts per sampled PFV
                    k = int(round(float((out["ours"].encode(X) != 0).sum(1).float().mean())))
                b = sae_basis(X, K, max(1, k), s["seed"], s["sae_steps"])
            else:
                b = kmeans_basis(X, K, s["seed"])
            b.info["n_fit_samples"] = int(X.shape[0])
            out[m] = b
            saved_info[m] = b.info
            saved.update({f"{m}/{k}": v for k, v in b.state.items()})
            changed = True
        if changed:
            save_tensors(tensor_path, saved)
            save_json(info_path, saved_info)
        return out

    # ------------------------------------------------------------------ extraction
    def extraction_chunk(self, infos: list[dict], bases: dict[str, dict[str, ConceptBasis]], bar) -> dict:
        s = self.s
        ids = [i["image_id"] for i in infos]
        targets = torch.tensor([i["target"] for i in infos])
        preds = torch.tensor([i["pred"] for i in infos])
        pixels = self.pixels(infos)
        with torch.no_grad():
            logits, grids = self.handle.capture(pixels, s["layers"])
        readout = class_probability(targets, preds)
        rec: dict = {"image_id": ids, "target": targets.tolist(),
                     "p_original": readout(logits, torch.arange(len(ids)))[:, 0].tolist(), "layers": {}}
        for layer in s["layers"]:
            grid = grids[layer]
            n, c, h, w = grid.shape
            X = grid.permute(0, 2, 3, 1).reshape(n, h * w, c)
            rec["layers"][layer] = {}
            for m in s["methods"]:
                t0 = time.perf_counter()
                basis = bases[layer][m]
                V = basis.V
                codes = self.codes(layer, ids) if m == "ours" else basis.encode(X.reshape(-1, c)).view(n, h * w, -1)
                meter = FidelityMeter(c)
                meter.add(X.reshape(-1, c), codes.reshape(-1, codes.shape[-1]) @ V, codes.reshape(-1, codes.shape[-1]))
                orders, res = rank_by_gig(self.gig(layer, V), pixels, codes, targets)
                curves = deletion_insertion(self.handle, layer, pixels, codes, V, orders, readout,
                                            n_points=s["n_points"], batch_rows=s["batch_rows"], grid_shape=(h, w))
                prob = curves[:, 0, :, :, 0].double().numpy()  # (n, 2, S)
                agree = curves[:, 0, DELETION, 0, 1]
                meter.agree += int(agree.sum())
                meter.n_images += n
                x = step_fractions(V.shape[0], s["n_points"])
                rec["layers"][layer][m] = {
                    "deletion": prob[:, DELETION].tolist(), "insertion": prob[:, INSERTION].tolist(),
                    "auc_deletion": auc(prob[:, DELETION], x).tolist(), "auc_insertion": auc(prob[:, INSERTION], x).tolist(),
                    "gig_rel_residual": res.relative_residual[:, 0].tolist(), "gig_delta": res.output_diff[:, 0].tolist(),
                    "meter": meter.state(), "seconds": round(time.perf_counter() - t0, 2)}
                bar.update(n)
        return rec

    def extraction(self, infos: list[dict], bar) -> dict:
        s = self.s
        bases = {layer: self.bases(layer) for layer in s["layers"]}
        parts = []
        for index, chunk in enumerate(self.chunks(infos)):
            path = self.part_path(f"extraction_{index:04d}")
            if path.is_file():
                part = load_json(path)
                if part["image_id"] == [i["image_id"] for i in chunk]:
                    parts.append(part)
                    bar.update(len(chunk) * len(s["layers"]) * len(s["methods"]))
                    continue
            part = self.extraction_chunk(chunk, bases, bar)
            save_json(path, part)
            parts.append(part)
        return self._aggregate_extraction(parts, bases)

    def _aggregate_extraction(self, parts: list[dict], bases) -> dict:
        s = self.s
        result: dict = {"settings": {k: s[k] for k in ("n_points", "n_steps", "quadrature", "gig_tol", "seed", "methods")},
                        "layers": {}}
        result["settings"]["n_images"] = sum(len(p["image_id"]) for p in parts)
        result["image_id"] = [i for p in parts for i in p["image_id"]]
        result["p_original"] = spread([v for p in parts for v in p["p_original"]], s["n_boot"], s["seed"])
        for layer in s["layers"]:
            result["layers"][layer] = {}
            diffs = {}
            for m in s["methods"]:
                rows = [p["layers"][layer][m] for p in parts]
                cat = lambda key: np.concatenate([np.asarray(r[key], dtype=np.float64) for r in rows])  # noqa: E731
                a_ins, a_del = cat("auc_insertion"), cat("auc_deletion")
                dele, ins = cat("deletion"), cat("insertion")
                diffs[m] = a_ins - a_del
                meter = FidelityMeter.merge([r["meter"] for r in rows])
                fig = meter.result()
                K = int(bases[layer][m].K)
                fig["active_per_position"] = fig["l0_ratio"] * K
                n = dele.shape[0]
                se = lambda a: (a.std(0, ddof=1) / np.sqrt(n)) if n > 1 else np.zeros(a.shape[1])  # noqa: E731
                entry = {
                    "K": K,
                    "auc_diff": spread(diffs[m], s["n_boot"], s["seed"]),
                    "auc_insertion": spread(a_ins, s["n_boot"], s["seed"]),
                    "auc_deletion": spread(a_del, s["n_boot"], s["seed"]),
                    "prob_full": spread(dele[:, 0], s["n_boot"], s["seed"]),
                    "prob_zero": spread(dele[:, -1], s["n_boot"], s["seed"]),
                    "reconstruction": fig,
                    "gig_rel_residual_median": float(np.nanmedian(cat("gig_rel_residual"))),
                    "curves": {"x": step_fractions(K, s["n_points"]).tolist(),
                               "deletion": dele.mean(0).tolist(), "deletion_se": se(dele).tolist(),
                               "insertion": ins.mean(0).tolist(), "insertion_se": se(ins).tolist()},
                    "per_image": {"auc_insertion": a_ins.tolist(), "auc_deletion": a_del.tolist()},
                    "basis": {k: v for k, v in bases[layer][m].info.items()},
                    "seconds": round(sum(r["seconds"] for r in rows), 1),
                }
                result["layers"][layer][m] = entry
            if "ours" in diffs:
                for m in s["methods"]:
                    if m != "ours":
                        result["layers"][layer][m]["vs_ours"] = paired_difference(
                            diffs["ours"], diffs[m], s["n_boot"], s["seed"])
        return result

    # ------------------------------------------------------------------ inter-layer
    def interlayer_chunk(self, t_index: int, a: str, b: str, infos: list[dict], bar) -> dict:
        s = self.s
        ids = [i["image_id"] for i in infos]
        targets_cls = torch.tensor([i["target"] for i in infos])
        pixels = self.pixels(infos)
        Va, Vb = self.dicts[a], self.dicts[b]
        Ua, Ub = self.codes(a, ids), self.codes(b, ids)
        n, Ka = len(ids), Va.shape[0]
        T = min(s["n_targets"], Vb.shape[0])
        _, res_b = rank_by_gig(self.gig(b, Vb), pixels, Ub, targets_cls)
        top = res_b.attributions[:, 0].topk(T, dim=1).indices  # (n, T)
        grid_a = self.gig(a, Va).grid_shape(pixels)
        blocks: dict[str, tuple[int, int]] = {}
        orders = []
        rec: dict = {"image_id": ids, "targets": top.tolist(),
                     "target_class_gig": res_b.attributions[:, 0].gather(1, top).tolist()}
        if "gig" in s["orderings"]:
            res = self.gig(a, Va).attribute(pixels, Ua, top, read_layer=b, read_vectors=Vb)
            blocks["gig"] = (0, T)
            orders.append(descending(res.attributions))
            rec["gig_rel_residual"] = res.relative_residual.tolist()
        if "grad_x_coef" in s["orderings"]:
            start = sum(o.shape[1] for o in orders)
            gx = grad_x_coef(self.handle, a, b, pixels, Ua, Va, Vb, top, grid_a, s["internal_batch_size"])
            blocks["grad_x_coef"] = (start, T)
            orders.append(descending(gx))
        if "magnitude" in s["orderings"]:
            start = sum(o.shape[1] for o in orders)
            blocks["magnitude"] = (start, 1)
            orders.append(descending(magnitude_scores(Ua))[:, None])
        if "random" in s["orderings"]:
            start = sum(o.shape[1] for o in orders)
            blocks["random"] = (start, s["n_random"])
            orders.append(torch.stack([random_orders(Ka, s["n_random"], s["seed"], i, t_index) for i in ids]))
        orders = torch.cat(orders, 1)
        curves = deletion_insertion(self.handle, a, pixels, Ua, Va, orders, concept_value_readout(top, Vb), read=b,
                                    n_points=s["n_points"], batch_rows=s["batch_rows"], grid_shape=grid_a)
        curves = curves.double()  # (n, O, 2, S, T)
        full = curves[:, :, DELETION, 0, :].mean(1)  # nothing removed: the same for every order
        valid = full > 1e-6
        norm = curves / torch.where(valid, full, torch.ones_like(full))[:, None, None, None, :]
        x = step_fractions(Ka, s["n_points"])
        rec.update({"full_value": full.tolist(), "valid": valid.tolist(), "orderings": {}})
        arange_t = torch.arange(T)
        for name, (start, count) in blocks.items():
            if name in ("gig", "grad_x_coef"):  # order j belongs to target j
                c = norm[:, start + arange_t, :, :, arange_t].permute(1, 0, 2, 3)  # (n, T, 2, S)
                c = c[:, None]
            else:  # every order read for every target
                c = norm[:, start : start + count].permute(0, 1, 4, 2, 3)  # (n, R, T, 2, S)
            a_del = auc(c[:, :, :, DELETION].numpy(), x).mean(1)  # (n, T), mean over random seeds
            a_ins = auc(c[:, :, :, INSERTION].numpy(), x).mean(1)
            mean_c = c.mean(1).numpy()  # (n, T, 2, S)
            rec["orderings"][name] = {"auc_deletion": a_del.tolist(), "auc_insertion": a_ins.tolist(),
                                      "deletion": mean_c[:, :, DELETION].tolist(),
                                      "insertion": mean_c[:, :, INSERTION].tolist()}
        bar.update(n)
        return rec

    def interlayer(self, infos: list[dict], bar) -> dict:
        s = self.s
        layers = s["layers"]
        transitions = list(zip(layers[:-1], layers[1:]))
        result: dict = {"settings": {k: s[k] for k in ("n_points", "n_steps", "quadrature", "gig_tol", "seed", "orderings",
                                                        "n_targets", "n_random")},
                        "transitions": {}}
        result["settings"]["n_images"] = len(infos)
        result["settings"]["target_rule"] = "concept → class GIG at the upper layer"
        result["image_id"] = [i["image_id"] for i in infos]
        for t_index, (a, b) in enumerate(transitions):
            parts = []
            for index, chunk in enumerate(self.chunks(infos)):
                path = self.part_path(f"interlayer_{t_index:02d}_{index:04d}")
                if path.is_file():
                    part = load_json(path)
                    if part["image_id"] == [i["image_id"] for i in chunk]:
                        parts.append(part)
                        bar.update(len(chunk))
                        continue
                part = self.interlayer_chunk(t_index, a, b, chunk, bar)
                save_json(path, part)
                parts.append(part)
            result["transitions"][f"{a}->{b}"] = self._aggregate_transition(parts, a, b)
        return result

    def _aggregate_transition(self, parts: list[dict], a: str, b: str) -> dict:
        s = self.s
        valid = np.concatenate([np.asarray(p["valid"], dtype=bool) for p in parts])  # (n, T)
        out: dict = {"source": a, "target_layer": b, "K_source": int(self.dicts[a].shape[0]),
                     "n_images": int(valid.shape[0]), "n_targets_valid": int(valid.sum()),
                     "n_targets_total": int(valid.size), "orderings": {}}
        if any("gig_rel_residual" in p for p in parts):
            r = np.concatenate([np.asarray(p["gig_rel_residual"], dtype=np.float64) for p in parts])
            out["gig_rel_residual_median"] = float(np.nanmedian(np.where(valid, r, np.nan))) if valid.any() else None
        per_image_diff = {}
        for name in s["orderings"]:
            rows = [p["orderings"][name] for p in parts]
            cat = lambda key: np.concatenate([np.asarray(r[key], dtype=np.float64) for r in rows])  # noqa: E731
            a_ins, a_del = cat("auc_insertion"), cat("auc_deletion")  # (n, T)
            dele, ins = cat("deletion"), cat("insertion")  # (n, T, S)
            mask = np.where(valid, 1.0, np.nan)
            with np.errstate(invalid="ignore"), _quiet():
                img_ins = np.nanmean(a_ins * mask, 1)
                img_del = np.nanmean(a_del * mask, 1)
                img_dele = np.nanmean(dele * mask[..., None], 1)  # (n, S)
                img_insc = np.nanmean(ins * mask[..., None], 1)
            per_image_diff[name] = img_ins - img_del
            ok = ~np.isnan(img_dele[:, 0])
            n_ok = int(ok.sum())
            se = lambda arr: (arr[ok].std(0, ddof=1) / np.sqrt(n_ok)) if n_ok > 1 else np.zeros(arr.shape[1])  # noqa: E731
            out["orderings"][name] = {
                "auc_diff": spread(per_image_diff[name], s["n_boot"], s["seed"]),
                "auc_insertion": spread(img_ins, s["n_boot"], s["seed"]),
                "auc_deletion": spread(img_del, s["n_boot"], s["seed"]),
                "curves": {"x": step_fractions(out["K_source"], s["n_points"]).tolist(),
                           "deletion": img_dele[ok].mean(0).tolist(), "deletion_se": se(img_dele).tolist(),
                           "insertion": img_insc[ok].mean(0).tolist(), "insertion_se": se(img_insc).tolist()},
                "per_image": {"auc_insertion": img_ins.tolist(), "auc_deletion": img_del.tolist()},
            }
        if "gig" in per_image_diff:
            for name in s["orderings"]:
                if name != "gig":
                    out["orderings"][name]["gig_minus"] = paired_difference(
                        per_image_diff["gig"], per_image_diff[name], s["n_boot"], s["seed"])
        return out


class _quiet:
    """Silence numpy's 'mean of empty slice' warnings (images whose targets are all invalid)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def evaluate_run(run_dir, n_images_extraction: int = 100, n_images_interlayer: int = 20,
                 methods: Iterable[str] = METHODS, orderings: Iterable[str] = ORDERINGS, seed: int = 0,
                 progress: bool = True, *, layers: list[str] | None = None, n_points: int = 21,
                 n_steps: int | None = None, gig_tol: float | None = None, n_targets: int = 5, n_random: int = 5, batch_rows: int = 126,
                 chunk_images: int = 10, sae_k: int | None = None, sae_steps: int = 1500,
                 dictionary_iter: int = 5, n_boot: int = 2000, plots: bool = True, resume: bool = True,
                 out_dir=None, model=None, source=None) -> dict:
    """Run the concept-extraction and inter-layer protocols on ``run_dir``; write ``RUN/evaluate/``.

    ``out_dir`` (default ``RUN/evaluate``) puts the files elsewhere, e.g. for an ablation that
    must not replace the run's evaluation (only ``RUN/evaluate/summary.json`` is read by
    ``gig inspect``). ``model`` / ``source`` override the run's model and images (a user ``ModelBundle`` and
    ``ImageSource``, as for :class:`~gig.pipeline.Pipeline`). Returns ``{"summary": …,
    "extraction": …, "interlayer": …, "files": […], "seconds": …}``; ``summary`` is what
    ``summary.json`` holds. Raises :class:`~gig.store.RunMismatchError` for a run without a
    finished decompose stage, ``ValueError`` for unknown methods, orderings or layers.
    """
    from ..pipeline import Pipeline

    start = time.perf_counter()
    run_dir = Path(run_dir)
    store = RunStore.open(run_dir)
    store.require("decompose")
    methods = _check_names(methods, METHODS, "method")
    orderings = _check_names(orderings, ORDERINGS, "ordering")
    if n_points < 2 or n_targets < 1 or n_random < 1 or batch_rows < 2 * n_points:
        raise ConfigError("need n_points ≥ 2, n_targets ≥ 1, n_random ≥ 1 and batch_rows ≥ 2·n_points")
    run_layers = list(store.config.layers)
    if layers:
        bad = [l for l in layers if l not in run_layers]
        if bad:
            raise ConfigError(f"layer(s) {bad} are not layers of the run ({', '.join(run_layers)})")
        layers = [l for l in run_layers if l in layers]
    else:
        layers = run_layers
    if n_images_interlayer > 0 and len(layers) < 2 and orderings:
        raise ConfigError("the inter-layer protocol needs at least two layers")

    pipe = Pipeline.open(run_dir, model=model, source=source, progress=False)
    config = pipe.config
    used = load_images(store)["images"]
    ext_images = _pick_images(used, n_images_extraction, seed, 1) if methods else []
    int_images = _pick_images(used, n_images_interlayer, seed, 2) if orderings and len(layers) > 1 else []
    settings = {
        "version": SETTINGS_VERSION, "run_hash": store.expected_hash("decompose"), "layers": layers,
        "methods": methods, "orderings": orderings, "seed": seed, "n_points": n_points,
        "n_steps": n_steps or config.n_steps, "quadrature": config.quadrature,
        "gig_tol": float(gig_tol or config.gig_tol), "gig_max_steps": config.gig_max_steps,
        "internal_batch_size": config.internal_batch_size, "n_targets": n_targets, "n_random": n_random,
        "batch_rows": batch_rows, "chunk_images": chunk_images, "sae_k": sae_k, "sae_steps": sae_steps,
        "dictionary_iter": dictionary_iter, "n_boot": n_boot,
        "extraction_images": [i["image_id"] for i in ext_images],
        "interlayer_images": [i["image_id"] for i in int_images],
    }
    out = Path(out_dir) if out_dir is not None else run_dir / "evaluate"
    key_path = out / "parts" / "settings_key.json"
    # Results depend on everything but the batch sizes and the bootstrap.
    key = _hash({k: v for k, v in settings.items() if k not in ("batch_rows", "n_boot")})
    bases_key = _hash({k: settings[k] for k in ("version", "run_hash", "seed", "sae_k", "sae_steps", "dictionary_iter")})
    if out.exists():
        old = load_json(key_path) if key_path.is_file() else {}
        if not resume or old.get("key") != key:
            shutil.rmtree(out / "parts", ignore_errors=True)
        if not resume or old.get("bases_key") != bases_key:
            shutil.rmtree(out / "bases", ignore_errors=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    save_json(key_path, {"key": key, "bases_key": bases_key})

    ev = _Evaluation(pipe, settings, progress, out)
    transitions = len(layers) - 1
    total = len(ext_images) * len(layers) * len(methods) + len(int_images) * transitions
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress, smoothing=0.05)
    timings = {}
    t0 = time.perf_counter()
    extraction = ev.extraction(ext_images, bar) if ext_images else None
    timings["extraction_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    interlayer = ev.interlayer(int_images, bar) if int_images else None
    timings["interlayer_s"] = round(time.perf_counter() - t0, 1)
    bar.close()

    summary = {
        "extraction": {layer: {m: r["auc_diff"]["mean"] for m, r in ms.items()}
                       for layer, ms in (extraction or {}).get("layers", {}).items()},
        "interlayer": {tr: {o: r["auc_diff"]["mean"] for o, r in v["orderings"].items()}
                       for tr, v in (interlayer or {}).get("transitions", {}).items()},
    }
    files = []

    def write(name: str, data) -> None:
        save_json(out / name, data)
        files.append(out / name)

    if extraction:
        write("extraction.json", extraction)
    if interlayer:
        write("interlayer.json", interlayer)
    (out / "results.md").write_text(markdown_tables(extraction, interlayer))
    files.append(out / "results.md")
    if plots:
        files += _plots(out, extraction, interlayer)
    timings["total_s"] = round(time.perf_counter() - start, 1)
    write("settings.json", {**settings, "timings": timings, "torch_threads": torch.get_num_threads()})
    write("summary.json", summary)
    return {"summary": summary, "extraction": extraction, "interlayer": interlayer,
            "files": [str(f) for f in files], "seconds": timings["total_s"]}


def _plots(out: Path, extraction: dict | None, interlayer: dict | None) -> list[Path]:
    files = []
    if extraction:
        panels = {layer: {m: r["curves"] for m, r in ms.items()} for layer, ms in extraction["layers"].items()}
        files.append(plot_curves(panels, out / "extraction_curves.png", "target-class probability",
                                 "C-Insertion (solid) / C-Deletion (dashed), ranked by concept → class GIG"))
        groups = {layer: {m: r["auc_diff"] for m, r in ms.items()} for layer, ms in extraction["layers"].items()}
        files.append(plot_auc_bars(groups, out / "extraction_auc.png", "AUC insertion − deletion",
                                   "Concept extraction (95 % bootstrap interval)"))
    if interlayer:
        panels = {tr: {o: r["curves"] for o, r in v["orderings"].items()} for tr, v in interlayer["transitions"].items()}
        files.append(plot_curves(panels, out / "interlayer_curves.png", "target readout / full value",
                                 "Inter-layer insertion (solid) / deletion (dashed)"))
        groups = {tr: {o: r["auc_diff"] for o, r in v["orderings"].items()} for tr, v in interlayer["transitions"].items()}
        files.append(plot_auc_bars(groups, out / "interlayer_auc.png", "AUC insertion − deletion",
                                   "Inter-layer orderings (95 % bootstrap interval)"))
    return files

"""The first `gig report` of a run, against another gig side by side: seconds, attribute-shard
openings, and which ERF crops differ (in their pixels).

    OMP_NUM_THREADS=1 python bench/report_time.py RUN OUT [--reference-src REF/src] [--src SRC]
        [--repeat N] [--stage-crops]

The run is copied twice into ``OUT`` without its ERF crop cache and report, so each build is a
first build; ``--stage-crops`` keeps the crops its graph stage made, as ``gig run`` leaves them
(a user's first report). Each copy's report is built in a fresh process, one thread, by this gig
and by the one in ``--reference-src`` (e.g. ``git archive COMMIT src | tar -x -C REF``). Each process counts
how often it opens an attribute shard (``gig.artefacts.open_tensors``; ``gig.attribution``'s in a
gig from before ``gig.artefacts``). Prints both builds'
seconds and openings per shard, their ratio, and the crops whose pixels differ; with
``--repeat N`` the two are built N times each, alternating, and the fastest of each counts. Results:
``OUT/report_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import collections, json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
try:
    import gig.artefacts as reader  # the attribute shards' reader
except ImportError:  # a gig from before gig.artefacts: its reader was gig.attribution
    import gig.attribution as reader
from gig.report import build_report
opens = collections.Counter()
real = reader.open_tensors
def counted(path, *args, **kwargs):
    if Path(path).parent.name == "shards" and Path(path).parent.parent.name == "attribute":
        opens[Path(path).name] += 1
    return real(path, *args, **kwargs)
reader.open_tensors = counted
build_report(sys.argv[1], progress=False)
print(json.dumps(dict(opens)))
"""


def fresh_copy(run: Path, out: Path, stage_crops: bool = False) -> Path:
    """``run`` copied to ``out`` without its ERF crop cache, report and evaluation; with
    ``stage_crops``, the crops ``gig run``'s graph stage made for its figures are kept (the top-1
    exemplar of every concept node of each class graph it drew): the cache a user's first report
    starts from."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("erf", "report", "evaluate"))
    if stage_crops:
        for crop in graph_stage_crops(run):
            (out / crop.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(crop, out / crop.relative_to(run))
    return out


def graph_stage_crops(run: Path) -> list[Path]:
    """The ERF crops in ``run``'s cache that its graph stage's class figures show."""
    crops = set()
    for graph in (run / "graph").glob("class_*.json"):
        if not graph.with_suffix(".png").is_file():
            continue
        for node in json.loads(graph.read_text())["nodes"]:
            if node.get("exemplars"):
                crops.update((run / "erf").glob(f"*/{node['layer']}/s{node['exemplars'][0]}.png"))
    return sorted(crops)


def build(run: Path, src: Path | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(run)], env=env, capture_output=True, text=True, check=True)
    opens = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": round(time.perf_counter() - start, 1), "max_opens_per_shard": max(opens.values(), default=0)}


def crops(run: Path) -> dict[str, bytes]:
    """Each ERF crop's decoded pixels (not its file bytes: the PNG compression level may differ)."""
    from PIL import Image

    return {
        str(p.relative_to(run / "erf")): Image.open(p).convert("RGB").tobytes()
        for p in sorted((run / "erf").rglob("*.png"))
    }


def _keep_fastest(result: dict, key: str, build_result: dict) -> None:
    """Record a build's result under ``key``, keeping the fastest and every build's seconds."""
    seconds = result.get(key, {}).get("all_seconds", []) + [build_result["seconds"]]
    if key not in result or build_result["seconds"] < result[key]["seconds"]:
        result[key] = build_result
    result[key]["all_seconds"] = seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--reference-src", type=Path, default=None)
    parser.add_argument("--src", type=Path, default=None, help="this gig's src (default: the installed one)")
    parser.add_argument("--repeat", type=int, default=1, help="builds of each, alternating; the fastest counts")
    parser.add_argument(
        "--stage-crops", action="store_true", help="keep the crops the graph stage made (a user's first report)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    for _ in range(max(1, args.repeat)):  # alternating, so that a busy spell of the machine hits both
        today = fresh_copy(args.run, args.out / "today", args.stage_crops)
        _keep_fastest(result, "today", build(today, args.src))
        if args.reference_src is not None:
            reference = fresh_copy(args.run, args.out / "reference", args.stage_crops)
            _keep_fastest(result, "reference", build(reference, args.reference_src))
    if args.reference_src is not None:
        result["speed_up"] = round(result["reference"]["seconds"] / result["today"]["seconds"], 2)
        a, b = crops(args.out / "today"), crops(args.out / "reference")
        result["crops"] = len(a)
        result["crops_differing"] = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(json.dumps(result, indent=1))
    (args.out / "report_time.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

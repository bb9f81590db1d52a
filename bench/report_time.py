"""The first `gig report` of a run, against another gig side by side: seconds, attribute-shard
openings, and which ERF crops differ (in their pixels).

    OMP_NUM_THREADS=1 python bench/report_time.py RUN OUT [--reference-src REF/src] [--src SRC] [--repeat N]

The run is copied twice into ``OUT`` without its ERF crop cache and report (so each build is a
first build); each copy's report is built in a fresh process, one thread, by this gig and by the
one in ``--reference-src`` (e.g. ``git archive COMMIT src | tar -x -C REF``). Each process counts
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


def fresh_copy(run: Path, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("erf", "report", "evaluate"))
    return out


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
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    for _ in range(max(1, args.repeat)):  # alternating, so that a busy spell of the machine hits both
        _keep_fastest(result, "today", build(fresh_copy(args.run, args.out / "today"), args.src))
        if args.reference_src is not None:
            _keep_fastest(result, "reference", build(fresh_copy(args.run, args.out / "reference"), args.reference_src))
    if args.reference_src is not None:
        result["speed_up"] = round(result["reference"]["seconds"] / result["today"]["seconds"], 2)
        a, b = crops(args.out / "today"), crops(args.out / "reference")
        result["crops"] = len(a)
        result["crops_differing"] = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(json.dumps(result, indent=1))
    (args.out / "report_time.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The first `gig report` of a run, against another gig side by side: seconds, attribute-shard
openings, and which ERF crops differ (in their pixels).

    OMP_NUM_THREADS=1 python bench/report_time.py RUN OUT [--reference-src REF/src]

The run is copied twice into ``OUT`` without its ERF crop cache and report (so each build is a
first build); each copy's report is built in a fresh process, one thread, by this gig and by the
one in ``--reference-src`` (e.g. ``git archive COMMIT src | tar -x -C REF``). Each process counts
how often it opens an attribute shard (``gig.attribution.open_tensors``). Prints both builds'
seconds and openings per shard, their ratio, and the crops whose pixels differ. Results:
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
import gig.attribution as attribution
from gig.report import build_report
opens = collections.Counter()
real = attribution.open_tensors
def counted(path, *args, **kwargs):
    if Path(path).parent.name == "shards" and Path(path).parent.parent.name == "attribute":
        opens[Path(path).name] += 1
    return real(path, *args, **kwargs)
attribution.open_tensors = counted
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--reference-src", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"today": build(fresh_copy(args.run, args.out / "today"), None)}
    if args.reference_src is not None:
        result["reference"] = build(fresh_copy(args.run, args.out / "reference"), args.reference_src)
        result["speed_up"] = round(result["reference"]["seconds"] / result["today"]["seconds"], 2)
        a, b = crops(args.out / "today"), crops(args.out / "reference")
        result["crops"] = len(a)
        result["crops_differing"] = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(json.dumps(result, indent=1))
    (args.out / "report_time.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

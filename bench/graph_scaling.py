"""The graph stage at 800 and 5 000 images: peak memory and time, against an earlier gig.

    OMP_NUM_THREADS=1 python bench/graph_scaling.py RUN OUT [--images 800,5000]
                                                    [--reference-src DIR] [--repeats 3]

A finished run's attribute shards are tiled into runs of each image count (copy ``c`` of image
``i`` gets id ``i + c·n``, the same target class; ``OUT/N``), so any count can be made without
attributing it. For each count, the graphs the graph stage builds (one per default class, the
shared and the global graph: :func:`gig.graph.build_graph_set`) are built in a fresh process, one
thread, best of ``--repeats``; the process's peak RSS is its ``ru_maxrss``. With
``--reference-src`` (the ``src`` folder of another gig, e.g. a ``git worktree`` of the commit
before intervals) the same is measured with that code side by side, each count alternating
between the two, and the time ratio printed. Results: ``OUT/graph_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])  # bench/, for the stage's graph specs
from graph_time import stage_specs
from gig.graph import build_graph_set
from gig.store import RunStore
store = RunStore.open(sys.argv[1])
specs = stage_specs(store)
best = float("inf")
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    graphs = build_graph_set(store, specs)
    best = min(best, time.perf_counter() - start)
tested = sum(1 for g in graphs.values() for e in g["edges"] if e.get("p_value") is not None)
print(json.dumps({"seconds": best, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "graphs": len(graphs), "n_images_global": graphs["global"]["n_images"], "tested_edges": tested}))
"""


def tile_run(run: Path, out: Path, n: int) -> Path:
    """``out``: a run of ``n`` images made of copies of ``run``'s attributions (see the docstring)."""
    import torch

    from gig.store import load_json, open_tensors, save_json, save_tensors

    if (out / "attribute" / "shards").is_dir() and (out / "collect" / "images.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "collect").mkdir(parents=True)
    (out / "attribute" / "shards").mkdir(parents=True)
    shutil.copy(run / "manifest.json", out / "manifest.json")
    # Without the fields an earlier gig does not know (those it made runs without): the reference
    # can then open the run. The graphs' sums read the shards' fields whatever the config says.
    import yaml

    from gig.config import SAVED_BEFORE

    config = yaml.safe_load((run / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if k not in SAVED_BEFORE}))
    shutil.copytree(run / "concepts", out / "concepts", ignore=shutil.ignore_patterns("*.safetensors"))
    images = load_json(run / "collect" / "images.json")
    base = images["images"]
    width = max(int(i["image_id"]) for i in base) + 1
    copies = -(-n // len(base))
    tiled = [{**i, "image_id": int(i["image_id"]) + c * width} for c in range(copies) for i in base][:n]
    save_json(out / "collect" / "images.json", {**images, "images": tiled})
    keep = {int(i["image_id"]) for i in tiled}
    shards = sorted((run / "attribute" / "shards").glob("*.safetensors"))
    for c in range(copies):
        for path in shards:
            with open_tensors(path) as shard:
                part = {key: shard.get_tensor(key) for key in shard.keys()}
            ids = part["image_id"] + c * width
            rows = torch.tensor([int(i) in keep for i in ids])
            if not bool(rows.any()):
                continue
            part = {key: value[rows] for key, value in part.items()}
            part["image_id"] = ids[rows]
            save_tensors(out / "attribute" / "shards" / f"c{c:04d}_{path.name}", part)
    return out


def measure(run: Path, src: Path | None, repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(run), str(repeats), str(Path(__file__).resolve().parent)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", default="800,5000")
    parser.add_argument("--reference-src", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(v) for v in args.images.split(",")]:
        tiled = tile_run(args.run, args.out / str(n), n)
        row = {"images": n, "today": measure(tiled, None, args.repeats)}
        if args.reference_src is not None:
            row["reference"] = measure(tiled, args.reference_src, args.repeats)
            row["time_ratio"] = row["today"]["seconds"] / row["reference"]["seconds"]
        results.append(row)
        print(json.dumps(row), flush=True)
    low, high = results[0]["today"]["peak_rss_mb"], results[-1]["today"]["peak_rss_mb"]
    summary = {"rows": results, "peak_rss_growth": high / low - 1}
    print(
        f"peak RSS {low:.0f} MB at {results[0]['images']} images, {high:.0f} MB at {results[-1]['images']}: "
        f"{100 * summary['peak_rss_growth']:+.1f} %"
    )
    (args.out / "graph_scaling.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""The graph stage's graphs of a finished run, built in memory: best of five, one thread.

    OMP_NUM_THREADS=1 python bench/graph_time.py RUN

Builds what the graph stage builds (a graph per default class, the shared and the global graph;
two passes over the attribute shards) without writing or drawing, and prints the best time of
five. Run it with two versions of gig (PYTHONPATH=OTHER/src) on the same run to compare them.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from gig.graph import build_graph_set, default_classes
from gig.store import RunStore


def stage_specs(store: RunStore) -> dict:
    """The graphs the graph stage builds: one per default class, the shared and the global graph."""
    classes = default_classes(store)
    specs = {f"class_{c}": ("class", [c]) for c in classes}
    specs["shared"] = ("shared", classes)
    specs["global"] = ("global", None)
    return specs


def main() -> None:
    torch.set_num_threads(1)
    store = RunStore.open(sys.argv[1])
    specs = stage_specs(store)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        build_graph_set(store, specs)
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"graphs": len(specs), "seconds_best_of_5": round(best, 4)}))


if __name__ == "__main__":
    main()

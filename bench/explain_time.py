"""Time ``gig explain`` by phase on one photo: model load, coding (decompose.encode_pixels), the
GIG walk (attribution.walk) and the page, and print the walk's gradient evaluations per path.

    OMP_NUM_THREADS=2 python bench/explain_time.py RUN PHOTO OUT

Wall times depend on the machine's load: compare phases within one run, and report the load
(``uptime``) beside them.
"""

from __future__ import annotations

import sys
import time

import gig.explain as explain_module
from gig.access import RunAccess
from gig.explain import explain, write_explanations


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        return out

    return wrapper


def main(run: str, photo: str, out: str) -> None:
    start = time.perf_counter()
    access = RunAccess(run)
    handle = access.handle
    print(f"model: {time.perf_counter() - start:.1f} s", flush=True)
    explain_module.encode_pixels = timed("coding", explain_module.encode_pixels)
    explain_module.walk = timed("walk", explain_module.walk)
    (e,) = explain(access.store, [photo], model=access.bundle, handle=handle)
    for layer in access.store.config.layers:
        steps = e.walk.get(f"{layer}/steps", e.walk.get(f"{layer}/class_steps"))
        print(f"{layer}: gradient evaluations per path {steps.tolist()}")
    page = time.perf_counter()
    write_explanations(access.store.root, [e], out, model=access.bundle)
    print(f"page: {time.perf_counter() - page:.1f} s; total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(*sys.argv[1:4])

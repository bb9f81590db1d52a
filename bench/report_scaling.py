"""The report against the run's size: build time, peak memory, page size and the time the page
takes to open, for runs of different numbers of images.

    python bench/report_scaling.py RUN [RUN ...] [--no-browser] [--threads 1]

Each report is built by ``python -m gig report RUN --out RUN/report-bench`` in its own process,
whose resident memory (with its children) is sampled every 0.1 s. The page is then opened in
headless Chromium (Debian's, through Playwright, as in the browser tests) and timed from
navigation to the viewer's first drawn graph (``data-graph-ready``). Prints one row per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def build(run: Path, out: Path, threads: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gig", "report", str(run), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.1)
    output = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"gig report {run} failed:\n{output}")
    files = [f for f in out.rglob("*") if f.is_file()]
    return {
        "build_s": time.perf_counter() - start,
        "peak_rss_mb": peak / 2**20,
        "index_mb": (out / "index.html").stat().st_size / 2**20,
        "total_mb": sum(f.stat().st_size for f in files) / 2**20,
        "files": len(files),
    }


def open_time(index: Path) -> float | None:
    """Seconds from navigation to the first drawn graph in headless Chromium; None without one."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from browser_page import CHROMIUM_ARGS, _chromium
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    executable = _chromium()
    if executable is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        start = time.perf_counter()
        page.goto(index.resolve().as_uri(), wait_until="load")
        page.wait_for_function("document.body.getAttribute('data-graph-ready')", timeout=120000)
        seconds = time.perf_counter() - start
        browser.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        images = len(json.loads((run / "collect" / "images.json").read_text())["images"])
        shards = len(list((run / "attribute" / "shards").glob("*.safetensors")))
        row = {
            "run": str(run),
            "images": images,
            "attribute_shards": shards,
            **build(run, run / "report-bench", args.threads),
        }
        row["open_s"] = None if args.no_browser else open_time(run / "report-bench" / "index.html")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| images | build s | peak RSS MB | index.html MB | report MB (files) | opens in s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        opened = "-" if r["open_s"] is None else f"{r['open_s']:.2f}"
        print(
            f"| {r['images']} | {r['build_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['index_mb']:.2f} | "
            f"{r['total_mb']:.1f} ({r['files']}) | {opened} |"
        )


if __name__ == "__main__":
    main()

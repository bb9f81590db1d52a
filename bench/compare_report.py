"""Compare two builds of a run's report: the page's data block, and every file byte for byte.

    python bench/compare_report.py REPORT_A REPORT_B [--ignore-positions]

Prints the top-level keys of the page data that differ (with the first differing entry), the
files present in one build only, and how many common files are byte-identical (SVGs are
deterministic since gig 0.2: no date, fixed id salt). ``--ignore-positions`` drops the graph
nodes' ``position`` field first (for a build made before positions existed). Exit status 1 when
anything differs, so it can gate a refactor.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def page_data(folder: Path) -> dict:
    text = (folder / "index.html").read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="gig-data">(.*?)</script>', text, re.S)
    if not match:
        sys.exit(f"{folder}/index.html has no gig-data block")
    return json.loads(match.group(1))


def drop_positions(data: dict) -> dict:
    for entry in data.get("graphs", []):
        for node in entry["graph"]["nodes"]:
            node.pop("position", None)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--ignore-positions", action="store_true")
    args = parser.parse_args()
    a, b = page_data(args.a), page_data(args.b)
    if args.ignore_positions:
        a, b = drop_positions(a), drop_positions(b)
    differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    for key in differing:
        first = a.get(key), b.get(key)
        if isinstance(first[0], dict) and isinstance(first[1], dict):
            inner = sorted(k for k in set(first[0]) | set(first[1]) if first[0].get(k) != first[1].get(k))
            print(f"page data {key!r} differs at {inner[:5]}")
        else:
            print(f"page data {key!r} differs")
    files = {p: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()) for p in (args.a, args.b)}
    only_a, only_b = sorted(set(files[args.a]) - set(files[args.b])), sorted(set(files[args.b]) - set(files[args.a]))
    common = sorted(set(files[args.a]) & set(files[args.b]) - {"index.html"})  # index.html holds the build time
    changed = [f for f in common if (args.a / f).read_bytes() != (args.b / f).read_bytes()]
    print(f"page data: {'identical' if not differing else f'{len(differing)} key(s) differ'}")
    print(f"files only in {args.a}: {only_a[:10]}; only in {args.b}: {only_b[:10]}")
    print(f"{len(common) - len(changed)} of {len(common)} common files byte-identical; differing: {changed[:10]}")
    return int(bool(differing or only_a or only_b or changed))


if __name__ == "__main__":
    sys.exit(main())

"""Compare two evaluation folders (``gig evaluate`` outputs) number by number.

    python bench/compare_evaluation.py BEFORE_DIR AFTER_DIR [--tol 1e-9] [--rename NEW=OLD ...]

For each of summary.json, extraction.json and interlayer.json: every numeric leaf of BEFORE is
paired with the leaf at the same path in AFTER; prints the number of leaves compared, the largest
absolute difference (and where), and every path present in one file only or whose non-numeric
value differs. Timings (``seconds``, ``fit_seconds``) are skipped: they are not results.
``--rename sae-torch=sae`` reads AFTER's method ``sae-torch`` as ``sae`` (the hand-written SAE was
renamed when Overcomplete's became ``sae``). Exit status 1 when a difference exceeds ``--tol`` or
the structures differ.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FILES = ("summary.json", "extraction.json", "interlayer.json")
SKIP = {"seconds", "fit_seconds"}


def renamed(data, names: dict[str, str]):
    """``data`` with every dict key and string equal to a key of ``names`` replaced by its value."""
    if isinstance(data, dict):
        return {names.get(k, k): renamed(v, names) for k, v in data.items()}
    if isinstance(data, list):
        return [renamed(v, names) for v in data]
    return names.get(data, data) if isinstance(data, str) else data


def leaves(data, path: str = ""):
    """``(path, value)`` for every leaf of a JSON value (lists indexed, timing keys skipped)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key not in SKIP:
                yield from leaves(value, f"{path}/{key}")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, data


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare(a, b) -> dict:
    """Largest absolute difference over the numeric leaves, and the mismatched paths."""
    la, lb = dict(leaves(a)), dict(leaves(b))
    worst, where, n = 0.0, None, 0
    mismatched = sorted(set(la) ^ set(lb))
    for path in la.keys() & lb.keys():
        x, y = la[path], lb[path]
        if _number(x) and _number(y):
            n += 1
            if math.isnan(x) and math.isnan(y):
                continue
            d = abs(x - y) if not (math.isnan(x) or math.isnan(y)) else math.inf
            if d > worst:
                worst, where = d, path
        elif x != y:
            mismatched.append(path)
    return {"numbers": n, "max_abs_diff": worst, "at": where, "mismatched": sorted(mismatched)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tol", type=float, default=1e-9, help="largest absolute difference accepted")
    parser.add_argument(
        "--rename", action="append", default=[], metavar="NEW=OLD", help="read AFTER's name NEW as OLD (method labels)"
    )
    args = parser.parse_args()
    names = dict(r.split("=", 1) for r in args.rename)
    ok = True
    for name in FILES:
        pa, pb = args.before / name, args.after / name
        if not pa.is_file() and not pb.is_file():
            continue
        if not (pa.is_file() and pb.is_file()):
            print(f"{name}: only in {'before' if pa.is_file() else 'after'}")
            ok = False
            continue
        r = compare(json.loads(pa.read_text()), renamed(json.loads(pb.read_text()), names))
        print(
            f"{name}: {r['numbers']} numbers, max |Δ| = {r['max_abs_diff']:.3g}"
            + (f" at {r['at']}" if r["at"] else "")
            + f", {len(r['mismatched'])} structural/text differences"
        )
        for path in r["mismatched"][:20]:
            print(f"    differs: {path}")
        ok &= r["max_abs_diff"] <= args.tol and not r["mismatched"]
    print("identical within tolerance" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

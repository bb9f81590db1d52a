"""The longest pause between a command's progress updates (on its stderr, where tqdm writes).

    OMP_NUM_THREADS=1 python bench/progress_pauses.py gig run --out OUT

Runs the command and prints the longest time between two line or carriage-return updates of its
stderr and the update that ended it: a run whose bars stand still for minutes looks hung.
"""

from __future__ import annotations

import subprocess
import sys
import time


def main() -> None:
    proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    last, worst, where, line = time.time(), 0.0, "", b""
    while ch := proc.stderr.read(1):
        line += ch
        if ch in (b"\r", b"\n"):
            now = time.time()
            if now - last > worst:
                worst, where = now - last, line.decode(errors="replace").strip()[:120]
            last, line = now, b""
    proc.wait()
    print(f"longest pause {worst:.1f} s, ended by: {where!r}; exit status {proc.returncode}")


if __name__ == "__main__":
    main()

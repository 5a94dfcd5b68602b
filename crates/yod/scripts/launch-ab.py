#!/usr/bin/env python3
"""Launch time of two yod builds and MPICH hydra, interleaved in one run.

    python3 crates/yod/scripts/launch-ab.py OLD_YOD NEW_YOD [SIZES] [REPEATS]

e.g. OLD_YOD = a copy of target/release/yod built from the previous commit.
Each repeat runs `sh -c 'echo hello from $RANK'` with N ranks under the three
launchers in turn (order alternating between repeats, so neither build always
follows the other), checks every job printed N lines, and prints seconds
min/median/max per launcher with the ratios of the medians.
"""
import statistics
import subprocess
import sys
import time


def command(kind, yods, n):
    if kind == "hydra":
        return ["mpiexec.hydra", "-n", str(n), "sh", "-c", "echo hello from $PMI_RANK"]
    return [yods[kind], "-n", str(n), "sh", "-c", "echo hello from $PUMA_RANK"]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    yods = {"old": sys.argv[1], "new": sys.argv[2]}
    sizes = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1,8,64,256").split(",")]
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 9
    fmt = lambda v: "%.3f/%.3f/%.3f" % (min(v), statistics.median(v), max(v))
    for n in sizes:
        times = {"old": [], "new": [], "hydra": []}
        for r in range(repeats):
            order = ["old", "new", "hydra"] if r % 2 == 0 else ["hydra", "new", "old"]
            for kind in order:
                start = time.perf_counter()
                out = subprocess.run(command(kind, yods, n), capture_output=True,
                                     stdin=subprocess.DEVNULL)
                took = time.perf_counter() - start
                lines = out.stdout.count(b"\n")
                if out.returncode != 0 or lines != n:
                    sys.exit(f"{kind} -n {n}: status {out.returncode}, {lines} of {n} lines: "
                             f"{out.stderr[-400:].decode(errors='replace')}")
                times[kind].append(took)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{n:>4}  old {fmt(times['old'])}  new {fmt(times['new'])}  "
              f"hydra {fmt(times['hydra'])}  hydra/old {med['hydra'] / med['old']:.2f}  "
              f"hydra/new {med['hydra'] / med['new']:.2f}  new/old {med['new'] / med['old']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()

"""Run every benchmark script (benchmarks/bench_*.py) in its own process, one after another.

Each script prints its figures and writes JSON under benchmarks/results/; this runner only sequences them
(separate processes, so one benchmark's memory peak or thread settings cannot skew the next).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names, e.g. bench_model")
    args = parser.parse_args()
    scripts = sorted(Path(__file__).parent.glob("bench_*.py"))
    failed = []
    for script in scripts:
        if args.only and script.stem not in args.only:
            continue
        print(f"== {script.stem}", flush=True)
        if subprocess.call([sys.executable, "-m", f"benchmarks.{script.stem}"]) != 0:
            failed.append(script.stem)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

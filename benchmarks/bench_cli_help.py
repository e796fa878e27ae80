"""How long each command takes to answer --help, and what it imports to do so.

Every command of mmdiff/cli.py's COMMANDS, as `python -m <module> --help` and, for console scripts, as the
installed wrapper runs it (`from <module> import <function>; sys.exit(<function>())`), each in a fresh
interpreter, ``--repeats`` times (the median is reported, with the peak RSS). Side by side in the same run:
the bare interpreter (`python -c pass`, the floor) and importing each command's module (what --help
cost while the parser lived there: torch, Ray, MLflow and the rest). Whether torch was imported comes from
``-X importtime``. Absolute times depend on the machine and its load; the ratios are the figure.

    python -m benchmarks.bench_cli_help [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from benchmarks.report import write_result
from mmdiff.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str]) -> tuple[float, int, bool]:
    """Wall seconds, peak RSS (MiB) and whether torch was imported, for one run of ``argv`` (exit 0 expected)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-X", "importtime", *argv], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited {process.returncode}: {stderr[-2000:]}")
    imports_torch = any(line.rsplit("|", 1)[-1].strip() == "torch" for line in stderr.splitlines())
    return seconds, usage.ru_maxrss // 1024, imports_torch


def measure(argv: list[str], repeats: int) -> dict:
    runs = [timed(argv) for _ in range(repeats)]
    return {"seconds": round(statistics.median(r[0] for r in runs), 3), "max_rss_mib": max(r[1] for r in runs),
            "imports_torch": any(r[2] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    floor = measure(["-c", "pass"], args.repeats)
    print(f"python -c pass: {floor['seconds']:.2f} s, {floor['max_rss_mib']} MiB", flush=True)
    commands = {}
    for module, script in COMMANDS.items():
        row = {"python -m": measure(["-m", module, "--help"], args.repeats)}
        if script:
            target, function = scripts[script].split(":")
            row[script] = measure(["-c", f"import sys; from {target} import {function}; sys.exit({function}())",
                                   "--help"], args.repeats)
        row["import of the module"] = measure(["-c", f"import {module}"], args.repeats)
        commands[module] = row
        help_s, heavy_s = row["python -m"]["seconds"], row["import of the module"]["seconds"]
        print(f"{module:26s} --help {help_s:5.2f} s {row['python -m']['max_rss_mib']:4d} MiB "
              f"(torch: {row['python -m']['imports_torch']}); import {module}: {heavy_s:5.2f} s "
              f"{row['import of the module']['max_rss_mib']:4d} MiB; ratio {heavy_s / help_s:4.1f}x", flush=True)
    slowest = max(r[k]["seconds"] for r in commands.values() for k in r if k != "import of the module")
    print(f"slowest --help: {slowest:.2f} s; any imports torch: "
          f"{any(r[k]['imports_torch'] for r in commands.values() for k in r if k != 'import of the module')}")
    write_result("bench_cli_help", {
        "command": "python -m benchmarks.bench_cli_help " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()},
        "repeats": args.repeats, "python -c pass": floor, "slowest_help_seconds": slowest, "commands": commands})


if __name__ == "__main__":
    main()

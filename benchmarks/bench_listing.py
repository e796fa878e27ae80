"""Listing at scale: how fast the job lists a list file of a million lines, and what that costs the driver.

    python -m benchmarks.bench_listing [--lines 1000000]

The inputs are ``--lines`` paths to 64 px PNGs, 1,000 per folder, hard links to one PNG per folder
(distinct paths the listing must stat, few inodes on disk), and ``list.txt`` with one relative path per
line; building them is not measured. A fresh Python process plays the driver: it imports the job, then runs the driver's own listing
step (``pipeline.preprocess._list`` on ``input.kind: list``: the streamed listing cut into partitions, each
partition's fixed batches written for Ray Data to read). Reported: entries per second, and the process's
peak RSS (Linux's VmHWM) above its RSS before listing, in total and per line.

Writes benchmarks/results/bench_listing.json (``--label X``: bench_listing_X.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.bench_pipeline_scale import MIB, ROOT, high_water_mark, revision
from benchmarks.report import write_result


def current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_list(folder: Path, lines: int) -> Path:
    """``lines`` paths under ``folder``, 1,000 per subfolder: the first of each is a PNG, the others hard links
    to it (a file system caps the links to one file, ext4 at 65,000), and the list naming them."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    names = []
    for index in range(lines):
        name = f"{index // 1000:04d}/{index:07d}.png"
        if index % 1000 == 0:
            first = folder / name
            first.parent.mkdir()
            image.save(first)
        else:
            os.link(first, folder / name)
        names.append(name)
    listing = folder / "list.txt"
    listing.write_text("\n".join(names) + "\n", encoding="utf-8")
    return listing


def list_as_the_driver(list_file: str, out: str) -> dict:
    """Runs in the measured process: the driver's own listing step (``pipeline.preprocess._list``: stream the
    listing, cut it into partitions, write each partition's fixed batches under ``out``) over ``list_file``."""
    from pipeline.config import PreprocessConfig
    from pipeline.preprocess import _list
    from pipeline.shards import JsonlStream, ShardLayout

    config = PreprocessConfig(input={"kind": "list", "path": list_file}, output={"path": out, "shard_size": 256})
    layout = ShardLayout(out)
    skipped = JsonlStream(layout.skipped)
    before = current_rss()
    started = time.perf_counter()
    listed = _list(config, layout, skipped)
    seconds = time.perf_counter() - started
    skipped.commit()
    return {"entries": listed.seen, "inputs": listed.inputs, "seconds": seconds, "rss_before": before,
            "rss_after": current_rss(), "peak_rss": high_water_mark(os.getpid())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--label", default="", help="write bench_listing_<label>.json (e.g. baseline)")
    parser.add_argument("--driver", nargs=2, metavar=("LIST_FILE", "OUT"), help=argparse.SUPPRESS)  # the measured process
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(list_as_the_driver(*args.driver)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        list_file = write_list(Path(tmp), args.lines)
        child = subprocess.run([sys.executable, "-m", "benchmarks.bench_listing", "--driver", str(list_file), f"{tmp}/out"],
                               capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if child.returncode != 0:
        raise RuntimeError(f"the listing process exited {child.returncode}:\n{child.stderr[-4000:]}")
    run = json.loads(child.stdout.strip().splitlines()[-1])
    if run["inputs"] != args.lines:
        raise RuntimeError(f"listed {run['inputs']} inputs from {args.lines} lines")
    seconds = run["seconds"]
    growth = run["peak_rss"] - run["rss_before"]
    result = {
        "lines": args.lines, "kind": "list",
        "entries_per_second": round(run["entries"] / seconds),
        "seconds": round(seconds, 2),
        "driver_rss_before_mib": round(run["rss_before"] / MIB, 1),
        "driver_peak_rss_mib": round(run["peak_rss"] / MIB, 1),
        "driver_rss_growth_mib": round(growth / MIB, 1),
        "driver_rss_growth_bytes_per_line": round(growth / args.lines),
        "code_path": "pipeline.preprocess._list: the driver's listing step (streamed listing, partitions, "
                     "each partition's fixed batches written to <out>/listing)",
        "commit": revision(), "command": " ".join(["python -m benchmarks.bench_listing", *sys.argv[1:]]),
    }
    print(f"bench_listing: {args.lines} list lines in {seconds:.1f} s = {result['entries_per_second']} entries/s; "
          f"driver RSS +{result['driver_rss_growth_mib']:.0f} MiB ({result['driver_rss_growth_bytes_per_line']} "
          "bytes per line)")
    write_result("bench_listing" + (f"_{args.label}" if args.label else ""), result)


if __name__ == "__main__":
    main()

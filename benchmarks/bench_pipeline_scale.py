"""The preprocessing driver's memory and time as the input count grows: does the driver stay bounded?

The real job (``python -m pipeline.preprocess`` on an embedded Ray, in a subprocess) runs on a folder of
small generated PNGs, ``--small`` and ``--large`` images, ``--repeats`` times each (alternating; figures
are the medians), with the cheapest operator the job accepts (:class:`BareSampler`: each image becomes a
sample without subjects), so what grows with the input count is the job's own bookkeeping, not model
work. Generating the images is not measured.

The driver is that subprocess alone: its peak RSS is the kernel's high-water mark (``VmHWM`` in
``/proc/<pid>/status``), read every 50 ms until it exits. Ray's own processes (GCS, raylet, workers; the
driver's descendants) are reported apart, as the peak of their summed RSS (shared object-store pages count
once per process that maps them).

    python -m benchmarks.bench_pipeline_scale [--small 1000] [--large 10000] [--repeats 3] [--trace] [--label baseline]

``--trace`` adds one run per size with the driver under tracemalloc (started after the job's modules are
imported): the driver's Python heap peak, and the job's own source lines that hold most of it at the
largest heap seen, which is where to look when the driver grows with the input count.

Writes benchmarks/results/bench_pipeline_scale.json (``--label X``: bench_pipeline_scale_X.json) with
``small_inputs``, ``large_inputs`` and ``driver_peak_rss_ratio`` (large / small; the goal is <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

from benchmarks.report import write_result
from pipeline.config import PreprocessConfig
from preprocess.sample import Sample

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


class BareSampler:
    """Operator (``stages.annotate.operator``): each image becomes a sample with its caption and no
    subjects, so a job runs the whole pipeline at almost no cost per input."""

    def __init__(self, config: PreprocessConfig) -> None:
        del config  # nothing to build

    def __call__(self, keys: list[str], images: list[Image.Image], captions: list[str]) -> list[Sample]:
        return [Sample(key, image, caption, [], np.zeros((0, image.height, image.width), bool),
                       np.zeros((0, 1, 1, 3), np.uint8)) for key, image, caption in zip(keys, images, captions)]


def write_images(folder: Path, count: int, size: int = 64) -> None:
    """``count`` distinct ``size`` px PNGs, 1,000 per subfolder (as a large image folder is laid out)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), np.uint8)
    for index in range(count):
        sub = folder / f"{index // 1000:04d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        pixels = base.copy()
        pixels[0, :4] = np.frombuffer(index.to_bytes(12, "little"), np.uint8).reshape(4, 3)  # distinct bytes
        Image.fromarray(pixels).save(sub / f"{index:07d}.png")


def high_water_mark(pid: int) -> int | None:
    """The peak RSS of process ``pid`` so far, in bytes (Linux's VmHWM); None once it has exited."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return None  # gone, or a zombie (no memory left to report)


def run_measured(command: list[str], env: dict[str, str], time_limit: float) -> dict:
    """Run ``command``; return its wall seconds, its own peak RSS and the peak summed RSS of its descendants."""
    started = time.perf_counter()
    # its own session, so a job past the limit goes down with the Ray processes it started
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    driver = psutil.Process(process.pid)
    peak, others = 0, 0
    output: list[str] = []
    # drained on threads, so a chatty job cannot block on a full pipe
    readers = [threading.Thread(target=lambda s=stream: output.append(s.read()), daemon=True)
               for stream in (process.stdout, process.stderr)]
    for reader in readers:
        reader.start()
    while process.poll() is None:
        if time.perf_counter() - started > time_limit:
            os.killpg(process.pid, signal.SIGKILL)
            raise TimeoutError(f"{' '.join(command)} ran past {time_limit:.0f} s")
        mark = high_water_mark(process.pid)
        if mark is None:
            break
        peak = max(peak, mark)
        try:
            total = 0
            for child in driver.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            others = max(others, total)
        except psutil.NoSuchProcess:
            break  # the driver exited between the two reads
        time.sleep(0.05)
    process.wait()
    seconds = time.perf_counter() - started
    for reader in readers:
        reader.join(timeout=30)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{''.join(output)[-4000:]}")
    return {"wall_seconds": round(seconds, 2), "driver_peak_rss_mib": round(peak / MIB, 1),
            "ray_processes_peak_rss_mib": round(others / MIB, 1), "output": "".join(output)}


def job_config(images: Path, out: Path) -> dict:
    return {
        "input": {"kind": "folder", "path": str(images), "extensions": [".png"]},
        "output": {"path": str(out), "shard_size": 256},
        "image": {"max_side": 64, "min_side": 16},
        "stages": {"load": {"batch_size": 64, "concurrency": 1, "num_cpus": 0.5},
                   "annotate": {"batch_size": 64, "concurrency": 1, "num_cpus": 0.5,
                                "operator": "benchmarks.bench_pipeline_scale:BareSampler"}},
        "ray": {"num_cpus": 2},
        "progress": False,
        "qa_samples": 0,
    }


def _own_code_sites(snapshot, count: int) -> list[dict]:
    """The ``count`` largest allocation sites, each trace charged to its innermost frame in this repository's
    code (outside .venv and the standard library), so the job's own lines show, not the library internals
    they call; traces with no such frame (imports, Ray's threads) are left out."""
    own, venv = str(ROOT) + "/", str(ROOT / ".venv") + "/"
    sites: dict[str, list[int]] = {}
    for trace in snapshot.traces:
        frame = next((f for f in reversed(trace.traceback) if f.filename.startswith(own)
                      and not f.filename.startswith(venv)), None)
        if frame is not None:
            site = sites.setdefault(f"{frame.filename.removeprefix(own)}:{frame.lineno}", [0, 0])
            site[0] += trace.size
            site[1] += 1
    largest = sorted(sites.items(), key=lambda item: -item[1][0])[:count]
    return [{"site": site, "bytes": size, "blocks": blocks} for site, (size, blocks) in largest]


def traced_driver(config: str) -> dict:
    """Runs as the driver: the job's own ``main`` with tracemalloc on. Returns the Python heap's peak and,
    for the largest heap seen (snapshotted whenever it grew 5 % past the last snapshot, so the peak is
    caught and snapshots stay few), its size and the job's own lines that allocated most of it."""
    import tracemalloc

    import ray.data  # noqa: F401 - imported before tracing: the heap then holds the job's data, not modules
    import tqdm  # noqa: F401

    from pipeline.preprocess import main as job_main

    tracemalloc.start(32)
    largest: dict = {"bytes": 0, "sites": []}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.25):
            current, _ = tracemalloc.get_traced_memory()
            if current > 1.05 * largest["bytes"]:
                largest.update(bytes=current, sites=_own_code_sites(tracemalloc.take_snapshot(), 12))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = job_main(["--config", config])
    done.set()
    watcher.join()
    return {"exit": code, "python_heap_peak": tracemalloc.get_traced_memory()[1], "largest_heap": largest}


def run_job(images: Path, count: int, out: Path, time_limit: float, traced: bool = False) -> dict:
    """One measured run of the job over ``images`` (``count`` of them) into ``out``; ``traced``: through
    :func:`traced_driver` (its RSS is inflated by tracemalloc, its Python heap figures are what counts)."""
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(job_config(images, out)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    driver = ["benchmarks.bench_pipeline_scale", "--traced-driver"] if traced else ["pipeline.preprocess", "--config"]
    run = run_measured([sys.executable, "-m", *driver, str(config)], env, time_limit)
    shutil.rmtree(out)  # the shards of a 100k run are a gigabyte
    lines = run.pop("output").splitlines()
    line = next((x for x in lines if x.startswith("preprocess: ")), "")
    if f"{count} inputs -> {count} written" not in line:
        raise RuntimeError(f"the job did not write all {count} inputs: {line!r}")
    if traced:
        heap = json.loads(next(x for x in lines if x.startswith("HEAP "))[5:])
        print(f"  {count} inputs, traced: driver Python heap peak {heap['python_heap_peak'] / MIB:.1f} MiB", flush=True)
        return {"python_heap_peak_mib": round(heap["python_heap_peak"] / MIB, 2), "largest_heap": heap["largest_heap"]}
    print(f"  {count} inputs: {run['wall_seconds']:.1f} s, driver peak RSS {run['driver_peak_rss_mib']:.0f} MiB, "
          f"Ray processes {run['ray_processes_peak_rss_mib']:.0f} MiB", flush=True)
    return {**run, "job_line": line}


def median_run(count: int, runs: list[dict]) -> dict:
    """The median of each figure over ``runs``, with the runs themselves."""
    figures = ("wall_seconds", "driver_peak_rss_mib", "ray_processes_peak_rss_mib")
    return {"inputs": count, **{k: statistics.median(r[k] for r in runs) for k in figures}, "runs": runs}


def revision() -> str:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return commit.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000, help="images in the small run")
    parser.add_argument("--large", type=int, default=10000, help="images in the large run")
    parser.add_argument("--label", default="", help="write bench_pipeline_scale_<label>.json (e.g. baseline)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; figures are their medians")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds one job may run")
    parser.add_argument("--trace", action="store_true",
                        help="one more run per size with tracemalloc in the driver: its Python heap and the lines that fill it")
    parser.add_argument("--traced-driver", metavar="CONFIG", help=argparse.SUPPRESS)  # the measured process
    args = parser.parse_args()
    if args.traced_driver:
        print("HEAP " + json.dumps(traced_driver(args.traced_driver)), flush=True)
        return
    if not 0 < args.small < args.large:
        raise SystemExit(f"need 0 < --small < --large, got {args.small} and {args.large}")
    runs: dict[int, list[dict]] = {args.small: [], args.large: []}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        for count in runs:
            write_images(tmp / f"images-{count}", count)
        for round_index in range(args.repeats):  # alternating, so a change in the machine's load hits both sizes
            for count in runs:
                runs[count].append(run_job(tmp / f"images-{count}", count, tmp / f"out-{count}-{round_index}",
                                           args.time_limit))
        traced = {count: run_job(tmp / f"images-{count}", count, tmp / f"out-{count}-traced", args.time_limit, True)
                  for count in runs if args.trace}
    small, large = (median_run(n, runs[n]) for n in (args.small, args.large))
    ratio = large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"]
    growth = (large["driver_peak_rss_mib"] - small["driver_peak_rss_mib"]) * MIB / (args.large - args.small)
    result = {
        "small_inputs": small, "large_inputs": large, "driver_peak_rss_ratio": round(ratio, 3),
        "driver_peak_rss_growth_bytes_per_input": round(growth),
        "goal": "driver_peak_rss_ratio <= 1.2",
        "commit": revision(), "command": " ".join(["python -m benchmarks.bench_pipeline_scale", *sys.argv[1:]]),
        "inputs": "64 px PNGs in folders of 1000; operator benchmarks.bench_pipeline_scale:BareSampler "
                  "(no model), shard_size 256, batch_size 64, embedded Ray with 2 CPUs",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
    }
    print(f"bench_pipeline_scale: {args.small} -> {args.large} inputs: driver peak RSS "
          f"{small['driver_peak_rss_mib']:.0f} -> {large['driver_peak_rss_mib']:.0f} MiB (ratio {ratio:.2f}, "
          f"{growth:.0f} bytes per extra input), wall {small['wall_seconds']:.0f} -> {large['wall_seconds']:.0f} s")
    if traced:
        heap = {n: traced[n]["python_heap_peak_mib"] for n in traced}
        heap_growth = (heap[args.large] - heap[args.small]) * MIB / (args.large - args.small)
        result["traced"] = {"driver_python_heap_peak_mib": {str(n): v for n, v in heap.items()},
                            "driver_python_heap_growth_bytes_per_input": round(heap_growth),
                            "largest_driver_heap_of_large_run": traced[args.large]["largest_heap"]}
        print(f"bench_pipeline_scale: driver Python heap {heap[args.small]:.1f} -> {heap[args.large]:.1f} MiB "
              f"({heap_growth:.0f} bytes per extra input)")
    write_result("bench_pipeline_scale" + (f"_{args.label}" if args.label else ""), result)


if __name__ == "__main__":
    main()

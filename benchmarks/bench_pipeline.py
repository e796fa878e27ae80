"""Preprocessing job throughput: Ray Data (1 and 2 model actors) vs the same operators in a plain loop.

Same images (scikit-image photos in an img2dataset shard with captions), same tiny models
(configs/preprocess/test_tiny.yaml), same batch size, measured one after another in one run. Ray times
are the whole job (listing, actor start-up and model build, processing, shard finalisation), after
Ray itself has started; the loop time covers model build + processing + encoding.

    python -m benchmarks.bench_pipeline [--repeats 20]
    python -m benchmarks.bench_pipeline --against <git revision> [--rounds 2]

``--against`` measures the cost of a code change on clean data: the job of this tree and the job of
``<revision>`` (exported with ``git archive``) run alternately, each in a fresh process with its own
embedded Ray, on the same inputs with each tree's own test_tiny config, ``--rounds`` times (who goes first
alternates); it reports the throughput ratio of the medians (results/bench_pipeline_against.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import write_result
from mmdiff.configuration import load_config
from pipeline.config import PreprocessConfig
from pipeline.example_inputs import PHOTOS, write_caption_shard
from pipeline.inputs import assign_partitions, list_inputs, read_bytes
from pipeline.preprocess import run_job
from preprocess.annotate import Annotator
from preprocess.image_io import ImageRejected, load_image

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(config: PreprocessConfig) -> tuple[float, int]:
    start = time.perf_counter()
    annotator = Annotator(config.annotate)
    records = [r for r in assign_partitions(list_inputs(config.input).inputs, config.output.shard_size) if not r.reason]
    batch = config.stages.annotate.batch_size
    written = 0
    for i in range(0, len(records), batch):
        chunk, images = [], []
        for record in records[i : i + batch]:
            try:
                images.append(load_image(read_bytes(record), record.source, config.image).image)
                chunk.append(record)
            except ImageRejected:
                continue
        results = annotator([r.key for r in chunk], images, [r.caption for r in chunk])
        written += sum(1 for r in results if hasattr(r, "to_wds") and r.to_wds())
    return time.perf_counter() - start, written


# Runs in a fresh process inside either tree (only APIs both trees have): one job, prints images/s as JSON.
_CHILD = """
import json, sys
import ray
from mmdiff.configuration import load_config
from pipeline.config import PreprocessConfig
from pipeline.preprocess import run_job
inputs, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = load_config("configs/preprocess/test_tiny.yaml", PreprocessConfig, {
    "input.path": inputs, "output.path": out, "output.shard_size": 32,
    "stages.annotate.concurrency": workers, "qa_samples": 0})
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
summary = run_job(config)
print("RESULT " + json.dumps({"seconds": summary.seconds, "written": summary.written, "inputs": summary.inputs}))
"""


def against(revision: str, repeats: int, rounds: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = tmp / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        write_caption_shard(tmp / "in" / "shard.tar", PHOTOS * repeats)
        n = len(PHOTOS) * repeats
        seconds: dict[str, list[float]] = {"baseline": [], "current": []}
        written = {}
        for round_index in range(rounds):
            trees = [("baseline", baseline), ("current", ROOT)]
            for name, tree in trees if round_index % 2 == 0 else trees[::-1]:  # alternate who runs first
                out = tmp / f"{name}{round_index}"
                env = {**os.environ, "PYTHONPATH": str(tree)}
                run = subprocess.run([sys.executable, "-c", _CHILD, str(tmp / "in"), str(out), str(workers)], cwd=tree,
                                     env=env, capture_output=True, text=True, timeout=3600)
                line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{name} run failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
                result = json.loads(line[7:])
                seconds[name].append(result["seconds"])
                written[name] = result["written"]
                print(f"  {name} round {round_index}: {n / result['seconds']:.2f} img/s", flush=True)
    if written["baseline"] != written["current"]:
        raise RuntimeError(f"the two trees wrote different sample counts: {written}")
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "images": n, "written": written["current"], "workers": workers, "rounds": rounds, "baseline_revision": revision,
        "device": "cpu", "cores": 2, "seconds": seconds,
        "baseline_images_per_s": n / medians["baseline"], "current_images_per_s": n / medians["current"],
        "current_vs_baseline": medians["baseline"] / medians["current"],
    }
    print(f"bench_pipeline --against {revision}: {n} images, {workers} actor(s), median of {rounds}: baseline "
          f"{result['baseline_images_per_s']:.2f} img/s, current {result['current_images_per_s']:.2f} img/s "
          f"(current/baseline throughput {result['current_vs_baseline']:.3f})")
    write_result("bench_pipeline_against", result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20, help="copies of the 7 photos")
    parser.add_argument("--against", default=None, metavar="REVISION", help="compare this tree's job with REVISION's")
    parser.add_argument("--rounds", type=int, default=2, help="--against: alternating runs per tree")
    parser.add_argument("--workers", type=int, default=1, help="--against: model actors")
    args = parser.parse_args()
    if args.against:
        against(args.against, args.repeats, args.rounds, args.workers)
        return
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_caption_shard(tmp / "in" / "shard.tar", PHOTOS * args.repeats)
        n = len(PHOTOS) * args.repeats

        def cfg(out: str, workers: int) -> PreprocessConfig:
            return load_config(ROOT / "configs/preprocess/test_tiny.yaml", PreprocessConfig, {
                "input.path": str(tmp / "in"), "output.path": str(tmp / out), "output.shard_size": 32,
                "stages.annotate.concurrency": workers, "qa_samples": 0})

        loop_seconds, loop_written = plain_loop(cfg("loop", 1))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs = {}
        for workers in (1, 2):
            summary = run_job(cfg(f"ray{workers}", workers))
            assert summary.written == loop_written, (summary.written, loop_written)
            runs[workers] = summary.seconds
        ray.shutdown()
    result = {
        "images": n, "written": loop_written, "device": "cpu", "cores": 2, "machine": platform.processor() or platform.machine(),
        "loop_images_per_s": n / loop_seconds,
        "ray_1_worker_images_per_s": n / runs[1], "ray_2_workers_images_per_s": n / runs[2],
        "ray_1_vs_loop": loop_seconds / runs[1], "ray_2_vs_loop": loop_seconds / runs[2],
    }
    print(f"bench_pipeline: {n} images, loop {result['loop_images_per_s']:.2f} img/s, ray 1 worker "
          f"{result['ray_1_worker_images_per_s']:.2f} img/s ({result['ray_1_vs_loop']:.2f}x), ray 2 workers "
          f"{result['ray_2_workers_images_per_s']:.2f} img/s ({result['ray_2_vs_loop']:.2f}x)")
    write_result("bench_pipeline", result)


if __name__ == "__main__":
    main()

"""Preprocessing job throughput: Ray Data (1 and 2 model actors) vs the same operators in a plain loop.

Same images (scikit-image photos in an img2dataset shard with captions), same tiny models
(configs/preprocess/test_tiny.yaml), same batch size, measured one after another in one run. Ray times
are the whole job (listing, actor start-up and model build, processing, shard finalisation), after
Ray itself has started; the loop time covers model build + processing + encoding.

    python -m benchmarks.bench_pipeline [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

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
    records = [r for r in assign_partitions(list_inputs(config.input), config.output.shard_size) if not r.duplicate]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20, help="copies of the 7 photos")
    args = parser.parse_args()
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
    out = ROOT / "benchmarks/results/bench_pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench_pipeline: {n} images, loop {result['loop_images_per_s']:.2f} img/s, ray 1 worker "
          f"{result['ray_1_worker_images_per_s']:.2f} img/s ({result['ray_1_vs_loop']:.2f}x), ray 2 workers "
          f"{result['ray_2_workers_images_per_s']:.2f} img/s ({result['ray_2_vs_loop']:.2f}x) -> {out}")


if __name__ == "__main__":
    main()

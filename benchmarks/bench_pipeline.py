"""Preprocessing job throughput: Ray Data (1 and 2 model actors) vs the same operators in a plain loop.

Same images (scikit-image photos in an img2dataset shard with captions), same tiny models
(configs/preprocess/test_tiny.yaml), same batch size, measured one after another in one run. Ray times
are the whole job (listing, actor start-up and model build, processing, shard finalisation), after
Ray itself has started; the loop time covers model build + processing + encoding.

    python -m benchmarks.bench_pipeline [--repeats 20]
    python -m benchmarks.bench_pipeline --against <git revision> [--rounds 2]
    python -m benchmarks.bench_pipeline --stages --repeats 2 --rounds 3

``--against`` measures the cost of a code change on clean data: the job of this tree and the job of
``<revision>`` (exported with ``git archive``) run alternately, each in a fresh process with its own
embedded Ray, on the same inputs with each tree's own test_tiny config, ``--rounds`` times (who goes first
alternates); it reports the throughput ratio of the medians (results/bench_pipeline_against.json).

``--stages`` measures one actor pool per model (``stages.mode: per_model``, one actor each) against the
fused single actor (``fused``, 1 and 2 actors) on the same photos with all four tiny models
(configs/preprocess/demo.yaml), in one Ray session, ``--rounds`` alternating rounds (the order rotates),
each variant on ``--repeats`` and 10x ``--repeats`` copies of the photos: the whole job's images/s on the
large input, and the images/s once running (the extra images over the extra time, so actor start-up and
model builds drop out). It checks that every variant wrote the same shards, and records what a group
costs between stages: its JPEGs against raw RGB, and the JPEG encode (once, at load) and decode (in
each stage) times (results/bench_pipeline_stages.json).
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

from benchmarks.report import export_tree, write_result
from mmdiff.configuration import load_config
from pipeline.config import PreprocessConfig
from pipeline.example_inputs import PHOTOS, photo, write_caption_shard, write_photos
from pipeline.inputs import assign_partitions, list_inputs, read_bytes
from pipeline.preprocess import run_job
from preprocess.annotate import Annotator
from preprocess.image_io import ImageRejected, load_image
from preprocess.sample import encode_jpeg

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
        baseline = export_tree(ROOT, revision, tmp / "baseline")
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


STAGE_VARIANTS = {"per_model": {"stages.mode": "per_model"},
                  "fused_1_actor": {"stages.mode": "fused", "stages.annotate.concurrency": 1},
                  "fused_2_actors": {"stages.mode": "fused", "stages.annotate.concurrency": 2}}


def jpeg_costs(config: PreprocessConfig, paths: list[Path]) -> dict[str, float]:
    """Per image as loaded by ``config``: JPEG bytes against raw RGB bytes, encode and decode ms."""
    import io

    from PIL import Image

    jpeg_bytes, raw_bytes, encode_s, decode_s = [], [], [], []
    for path in paths:
        image = load_image(path.read_bytes(), path.name, config.image).image
        start = time.perf_counter()
        jpeg = encode_jpeg(image)
        encode_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        Image.open(io.BytesIO(jpeg)).convert("RGB")
        decode_s.append(time.perf_counter() - start)
        jpeg_bytes.append(len(jpeg))
        raw_bytes.append(3 * image.width * image.height)
    return {"jpeg_bytes": statistics.mean(jpeg_bytes), "raw_rgb_bytes": statistics.mean(raw_bytes),
            "raw_over_jpeg": sum(raw_bytes) / sum(jpeg_bytes), "encode_ms": 1e3 * statistics.median(encode_s),
            "decode_ms": 1e3 * statistics.median(decode_s)}


def shard_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("shards/*"))}


def stages(repeats: int, rounds: int) -> None:
    import ray

    sizes = {"small": repeats, "large": 10 * repeats}  # copies of the 7 photos; the difference is start-up free
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size, copies in sizes.items():
            for index in range(copies):
                write_photos(tmp / size, prefix=f"{index}_")
        full_size = []
        for name in PHOTOS:  # the photos at their own size (up to 741 x 500), lossless
            full_size.append(tmp / "full" / f"{name}.png")
            full_size[-1].parent.mkdir(exist_ok=True)
            photo(name).save(full_size[-1])
        base = {"output.shard_size": 16, "qa_samples": 0, "progress": False}
        config = load_config(ROOT / "configs/preprocess/demo.yaml", PreprocessConfig, {**base, "input.path": str(tmp)})
        costs = {"demo_size": jpeg_costs(config, sorted((tmp / "small").glob("0_*.jpg"))),
                 "full_size": jpeg_costs(config.model_copy(update={"image": config.image.model_copy(
                     update={"max_side": 4096})}), full_size)}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        seconds = {name: {size: [] for size in sizes} for name in STAGE_VARIANTS}
        shards: dict[str, dict[str, bytes]] = {}
        # untimed: the first job of a Ray session also starts its worker processes
        run_job(load_config(ROOT / "configs/preprocess/demo.yaml", PreprocessConfig, {
            **base, "input.path": str(tmp / "small"), "output.path": str(tmp / "warm_up")}))
        for round_index in range(rounds):
            names = list(STAGE_VARIANTS)
            shift = round_index % len(names)  # rotate who goes first
            for name in names[shift:] + names[:shift]:
                for size, copies in sizes.items():
                    out = tmp / f"{name}_{size}{round_index}"
                    summary = run_job(load_config(ROOT / "configs/preprocess/demo.yaml", PreprocessConfig, {
                        **base, "input.path": str(tmp / size), "output.path": str(out), **STAGE_VARIANTS[name]}))
                    seconds[name][size].append(summary.seconds)
                    shards[f"{name}_{size}"] = shard_files(out)
                    print(f"  {name} {size} round {round_index}: {7 * copies / summary.seconds:.2f} img/s", flush=True)
        ray.shutdown()
    for size in sizes:
        if any(shards[f"{name}_{size}"] != shards[f"per_model_{size}"] for name in STAGE_VARIANTS):
            raise RuntimeError(f"the modes wrote different shards for the {size} input")
    images = {size: 7 * copies for size, copies in sizes.items()}
    whole = {name: images["large"] / statistics.median(s["large"]) for name, s in seconds.items()}
    # images/s once running: the extra images of the large input over its extra time, per round
    marginal = {name: statistics.median((images["large"] - images["small"]) / (large - small)
                                        for small, large in zip(s["small"], s["large"]))
                for name, s in seconds.items()}
    result = {
        "images": images, "rounds": rounds, "device": "cpu", "cores": 2,
        "models": "tiny BLIP-2, Grounding DINO, SAM, insightface (configs/preprocess/demo.yaml)",
        "seconds": seconds, "whole_job_images_per_s": whole, "marginal_images_per_s": marginal,
        "per_model_vs_fused_1_actor": {"whole_job": whole["per_model"] / whole["fused_1_actor"],
                                       "marginal": marginal["per_model"] / marginal["fused_1_actor"]},
        "per_model_vs_fused_2_actors": {"whole_job": whole["per_model"] / whole["fused_2_actors"],
                                        "marginal": marginal["per_model"] / marginal["fused_2_actors"]},
        "same_shards": True, "between_stages_per_image": costs,
    }
    full = costs["full_size"]
    print(f"bench_pipeline --stages: {images['large']} images, median of {rounds}: whole job per-model "
          f"{whole['per_model']:.2f} img/s, fused 1 actor {whole['fused_1_actor']:.2f}, fused 2 actors "
          f"{whole['fused_2_actors']:.2f} (per-model/fused {result['per_model_vs_fused_1_actor']['whole_job']:.2f}, "
          f"{result['per_model_vs_fused_2_actors']['whole_job']:.2f}); once running (marginal) per-model "
          f"{marginal['per_model']:.2f}, fused {marginal['fused_1_actor']:.2f} and {marginal['fused_2_actors']:.2f} "
          f"({result['per_model_vs_fused_1_actor']['marginal']:.2f}, {result['per_model_vs_fused_2_actors']['marginal']:.2f}); "
          f"same shards; JPEGs between stages {full['raw_over_jpeg']:.1f}x smaller than raw RGB "
          f"(full-size photos: encode {full['encode_ms']:.1f} ms, decode {full['decode_ms']:.1f} ms)")
    write_result("bench_pipeline_stages", result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20, help="copies of the 7 photos")
    parser.add_argument("--against", default=None, metavar="REVISION", help="compare this tree's job with REVISION's")
    parser.add_argument("--rounds", type=int, default=2, help="--against, --stages: alternating rounds")
    parser.add_argument("--workers", type=int, default=1, help="--against: model actors")
    parser.add_argument("--stages", action="store_true", help="per-model stages against the fused actor")
    args = parser.parse_args()
    if args.stages:
        stages(args.repeats, args.rounds)
        return
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

"""Evaluation throughput: the Ray Data job (generation and scoring actor pools) against the same two
stages in a plain loop, in one run, on CPU; and the share of stage time spent generating vs scoring.

Same registered model, same benchmark (the demo set from scikit-image photos, ``--seeds`` seeds per
prompt), same stage settings (batch sizes, one intra-op thread per 0.5-CPU stage); the Ray job runs one
generation actor and ``--score-actors`` scoring actors (0.5 CPU each), where the loop runs one of each in
turn. Both times are the whole job (model and metric-model loading, generation, scoring, the result
table), Ray's own start-up excluded. Metric models: CLIP ViT-B/32 and DINO ViT-S/16 architectures with random weights (the real
scoring cost); the generator is the tiny SD1.5 twin (``--base random`` uses the real SD1.5 architecture,
far too slow for this 2-core machine at any useful size).

    python -m benchmarks.bench_eval [--seeds 8] [--score-actors 2] [--base tiny|random]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.report import write_result

ROOT = Path(__file__).resolve().parents[1]


def register(root: Path, base: str) -> str:
    import mlflow

    from mmdiff import MMDiffConfig, MMDiffModel
    from mmdiff.configuration import load_config
    from train.config import TrainConfig
    from train.export import register_model

    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = load_config(ROOT / "configs/train/tiny_test.yaml", TrainConfig, {
        "output_dir": str(root), "mlflow.tracking_uri": uri, "mlflow.registered_model": "bench-eval",
        "model.base.source": base})
    settings = load_config(ROOT / config.model.mmdiff, MMDiffConfig)
    model = MMDiffModel.from_specs(config.model.base, config.model.image_encoder, settings)
    model.save_pretrained(root / "adapter")
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("bench-eval", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    register_model(config, root / "adapter", run_id, "bench")
    return uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (10 generated images each)")
    parser.add_argument("--score-actors", type=int, default=2, help="scoring actors (scoring is the heavier stage)")
    parser.add_argument("--base", choices=("tiny", "random"), default="tiny")
    args = parser.parse_args()
    import ray

    from evaluation.benchmark import write_demo
    from evaluation.evaluate import load_evaluation_config, run_evaluation

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri = register(tmp, args.base)
        write_demo(tmp / "bench")

        def config(name: str):
            return load_evaluation_config(ROOT / "configs/eval/demo.yaml", {
                "benchmark.dreambench": str(tmp / "bench/dataset"), "benchmark.portraits.folder": str(tmp / "bench/portraits"),
                "benchmark.seeds": list(range(args.seeds)), "generation.steps": 10, "output_dir": str(tmp / name),
                "metrics.clip.source": "random", "metrics.dino.source": "random", "progress": False,
                "score.concurrency": args.score_actors})

        timings = {}
        loop_start = time.perf_counter()
        loop = run_evaluation(config("loop"), "models:/bench-eval/1", uri, "loop")
        timings["loop"] = time.perf_counter() - loop_start
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter()
        job = run_evaluation(config("ray"), "models:/bench-eval/1", uri, "ray")
        timings["ray"] = time.perf_counter() - ray_start
        ray.shutdown()
    rows = len(loop.table)  # every case is scored (ceiling rows score reference photos, without generation)
    for _name, result in (("loop", loop), ("ray", job)):
        ok = result.table["status"] == "ok"
        assert ok.all(), result.table.loc[~ok, ["case_id", "detail"]].to_dict("records")
    stage = loop.summary["generate_seconds"] + loop.summary["score_seconds"]
    result = {
        "images_scored": rows, "images_generated": int(loop.summary["images_scored"]), "device": "cpu", "cores": 2,
        "machine": platform.processor() or platform.machine(), "base_model": args.base,
        "metric_models": "clip ViT-B/32 + dino ViT-S/16 (random weights), tiny insightface + grounding_dino",
        "generation_steps": 10, "score_actors": args.score_actors, "loop_seconds": timings["loop"], "ray_seconds": timings["ray"],
        "loop_images_per_s": rows / timings["loop"], "ray_images_per_s": rows / timings["ray"],
        "ray_vs_loop": timings["loop"] / timings["ray"],
        "generate_share": loop.summary["generate_seconds"] / stage, "score_share": loop.summary["score_seconds"] / stage,
        "same_figures": {k: [loop.summary[k], job.summary[k]] for k in ("clip_t", "dino")},
    }
    print(f"bench_eval: {rows} images scored ({result['images_generated']} generated), loop "
          f"{result['loop_images_per_s']:.2f} img/s, ray {result['ray_images_per_s']:.2f} img/s "
          f"({result['ray_vs_loop']:.2f}x); stage time {100 * result['generate_share']:.0f}% generating, "
          f"{100 * result['score_share']:.0f}% scoring")
    write_result("bench_eval", result)


if __name__ == "__main__":
    main()

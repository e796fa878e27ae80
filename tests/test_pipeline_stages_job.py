"""Per-model stages as a Ray job on an embedded Ray: each stage's resources come from its config, and the
per-model job writes the same shards as the fused single actor, with more actors and with a model actor
killed mid-job (in process: tests/test_pipeline_stages.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdiff.configuration import load_config
from pipeline.config import PreprocessConfig
from pipeline.example_inputs import write_photos
from pipeline.preprocess import run_job
from pipeline.stages import sample_stages
from tests.faults import run_killing_a_worker
from tests.test_pipeline_job import CONFIGS, assert_ray_released, output_files

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def demo_config(inputs: Path, out: Path, **overrides) -> PreprocessConfig:
    """All four tiny models, micro-batches smaller than the groups; CPU shares that fit 2 CPUs with a
    second detect actor."""
    return load_config(CONFIGS / "demo.yaml", PreprocessConfig, {
        "input.path": str(inputs), "output.path": str(out), "qa_samples": 0, "progress": False,
        "stages.caption.batch_size": 2, "stages.detect.batch_size": 3, "stages.segment.batch_size": 2,
        **{f"stages.{name}.num_cpus": 0.2 for name in ("load", "annotate", "caption", "detect", "segment", "faces")},
        **overrides})


def map_operators(ds) -> list:
    """The dataset's map operators, first to last."""
    chain, op = [], ds._logical_plan.dag
    while op.input_dependencies:
        chain.append(op)
        (op,) = op.input_dependencies
    return chain[::-1]


def test_each_stage_takes_its_resources_from_config(tmp_path):
    import ray

    sizes = {"caption": (3, 1, 0.5, 0.5, 1), "detect": (5, 2, 1.0, 0.25, 2), "segment": (6, 3, 0.5, 0.25, 3),
             "faces": (7, 1, 0.25, 0.0, 4)}  # batch_size, concurrency, num_cpus, num_gpus, crash_retries
    overrides = {f"stages.{name}.{key}": value for name, values in sizes.items()
                 for key, value in zip(("batch_size", "concurrency", "num_cpus", "num_gpus", "crash_retries"), values)}
    config = demo_config(tmp_path, tmp_path / "out", **overrides, **{"stages.annotate.concurrency": 2})
    ds = ray.data.from_items([{"batch": "0:a", "partition": 0, "inputs": "[]"}])
    load, *models, write = map_operators(sample_stages(ds, config, "hash"))
    assert "load_batch" in load.name and "write_batch" in write.name
    assert [op.fn_constructor_kwargs["name"] for op in models] == ["caption", "detect", "segment", "faces"]
    for op, (batch_size, concurrency, num_cpus, num_gpus, retries) in zip(models, sizes.values()):
        name = op.fn_constructor_kwargs["name"]
        assert "ModelStage" in op.name and op.batch_size == 1  # one whole group per call; micro-batches inside
        assert op.compute.min_size == op.compute.max_size == concurrency, name
        assert op.ray_remote_args["num_cpus"] == num_cpus and op.ray_remote_args.get("num_gpus", 0) == num_gpus, name
        assert op.ray_remote_args["max_task_retries"] == retries and op.ray_remote_args["max_restarts"] == -1, name
        assert getattr(config.stages, name).batch_size == batch_size
    assert write.compute.size == 2 and write.ray_remote_args["num_cpus"] == 0.2
    # alone (the driver's narrowing after a worker died): every actor stage holds one group at a time
    alone = map_operators(sample_stages(ds, config, "hash", alone=True))
    assert all(op.compute.max_tasks_in_flight_per_actor == 1 for op in alone[1:-1])
    assert all(op.batch_size == 1 for op in alone)
    # fused: one actor pool with every model, sized by stages.annotate
    (_, fused) = map_operators(sample_stages(ds, demo_config(tmp_path, tmp_path / "f", **{"stages.mode": "fused"}),
                                             "hash"))
    assert "SampleStage" in fused.name and fused.compute.min_size == 1


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder)
    write_photos(folder, prefix="again_")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def fused_run(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "out"
    run_job(demo_config(inputs, out, **{"stages.mode": "fused"}))
    return out


def test_per_model_job_writes_the_same_shards_as_the_fused_actor(inputs, fused_run, tmp_path):
    summary = run_job(demo_config(inputs, tmp_path / "out"))
    assert summary.inputs == 15 and summary.written >= 1 and summary.rejected.get("not_an_image") == 1
    assert output_files(tmp_path / "out") == output_files(fused_run)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config_hash"] == json.loads((fused_run / "manifest.json").read_text())["config_hash"]


def test_killed_model_actor_with_more_actors_writes_the_same_shards(ray_session, inputs, fused_run, tmp_path):
    """Two detect actors, and a model actor SIGKILLed once the first group is staged: the driver's retry
    (rerun of the missing inputs one per group) gives the same shards as the clean fused run, and every
    actor of the job has ended when it returns."""
    cfg = demo_config(inputs, tmp_path, **{"stages.detect.concurrency": 2})
    # the job takes about a minute on a loaded 2-core machine; 300 s leaves room for a slower one
    summary, killed = run_killing_a_worker(lambda: run_job(cfg), tmp_path, "ModelStage", 300)
    assert killed, "the job finished before a model actor could be killed"
    assert_ray_released(ray_session)
    assert summary.inputs == 15
    assert output_files(tmp_path) == output_files(fused_run)

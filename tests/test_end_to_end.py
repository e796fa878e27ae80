"""The README's end-to-end path on object storage, each step through its own command line, as a user runs
it: raw photos on an S3 server (moto, loopback) -> ``python -m pipeline.preprocess`` with tiny models to
``s3://`` -> ``python -m train.latents`` writes the VAE latents beside the shards on ``s3://`` -> 2 CPU ranks
train from ``s3://`` and register the adapter on a real ``mlflow server``. The same training from a local
copy of what preprocessing wrote ends with the same losses. Minutes: `make test-extended` only."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import mlflow
import pytest

from test_train_launch import CONFIG, REPO, launch, losses, mlflow_server  # noqa: F401 - registers the fixture
from tests.object_store import object_store_fixture  # noqa: F401 - registers the fixture

pytestmark = [pytest.mark.slow, pytest.mark.extended]
MODEL_NAME = "mmdiff-end-to-end"


def command(*args: str, env: dict[str, str], timeout: float = 600) -> str:
    """``python -m ARGS`` from the repository root; its output, or a failure showing the end of it."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{output[-6000:]}"
    return output


def test_preprocess_to_the_object_store_cache_latents_train_2_ranks_and_register(
        object_store, mlflow_server, tmp_path):  # noqa: F811 - mlflow_server is the fixture imported above
    import s3fs

    from pipeline.example_inputs import write_caption_shard
    from test_train_data import builder
    from train.config import load_train_config
    from train.data import ShardStream, data_sources
    from train.latents import vae_tag

    # the endpoint on the command line, the keys in the usual AWS variables (README)
    env = {"AWS_ACCESS_KEY_ID": object_store.options["key"], "AWS_SECRET_ACCESS_KEY": object_store.options["secret"],
           "OMP_NUM_THREADS": "1"}
    endpoint = object_store.options["endpoint_url"]
    fs = s3fs.S3FileSystem(**object_store.options, skip_instance_cache=True)
    raw, shards = object_store.url("raw/captioned"), object_store.url("train/shards/v1")
    fs.put(str(write_caption_shard(tmp_path / "captioned" / "part-0.tar")), f"{raw}/part-0.tar")

    # 1. preprocess: object store to object store, tiny Grounding DINO + SAM (configs/preprocess/test_tiny.yaml)
    command("pipeline.preprocess", "--config", "configs/preprocess/test_tiny.yaml", "--set", f"input.path={raw}",
            f"input.storage_options.endpoint_url={endpoint}", f"output.path={shards}",
            f"output.storage_options.endpoint_url={endpoint}", env=env)
    manifest = json.loads(fs.cat(f"{shards}/manifest.json"))
    assert manifest["inputs"] == 7 and manifest["written"] + sum(manifest["rejected"].values()) == 7
    assert manifest["written"] >= 3 and not fs.exists(f"{shards}/lock.json")

    # 2. cache the VAE latents beside the shards, on the object store
    storage = [f"data.storage_options.endpoint_url={endpoint}"]
    command("train.latents", "--config", CONFIG, "--set", f"data.shards={shards}", *storage, env=env)
    config = load_train_config(CONFIG, {"data.shards": shards, "data.storage_options": object_store.options})
    [source] = data_sources(config.data)
    latents = source.dataset.latents(vae_tag(config.model.base))
    summary = json.loads((latents / "latents.json").read_bytes())
    assert (summary["samples"], summary["latents"], summary["unreadable"]) == (manifest["written"],) * 2 + (0,)
    # the reader takes them from the object store: the batches carry latents, the VAE is not needed
    stream = ShardStream([source], config.data, builder(config.data), seed=0, base=config.model.base)
    assert all("latent_parameters" in batch for batch in itertools.islice(iter(stream), 3))

    # 3. train 2 ranks from s3:// and register the adapter; 4. the same run from a local copy of the folder
    from_store = tmp_path / "from_store"
    run = ["mlflow.sample_prompt=null", f"mlflow.registered_model={MODEL_NAME}"]
    launch(f"output_dir={from_store}", f"data.shards={shards}", *storage, *run,
           env={**env, "MLFLOW_TRACKING_URI": mlflow_server})
    local = tmp_path / "local_copy"
    fs.get(f"{shards}/", str(local), recursive=True)
    assert (local / "manifest.json").is_file() and list((local / "latents").glob("*/latents.json"))
    from_local = tmp_path / "from_local"
    launch(f"output_dir={from_local}", f"data.shards={local}", "mlflow.sample_prompt=null",
           "mlflow.registered_model=null")
    store_losses, local_losses = losses(from_store), losses(from_local)
    assert [r["step"] for r in store_losses] == [r["step"] for r in local_losses] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(store_losses, local_losses):
        for name in ("loss", "denoise_loss", "attention_loss", "lr"):
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-8), (a["step"], name)

    # the registered version comes from the object-store run, whose dataset input is the s3:// folder
    client = mlflow.MlflowClient(mlflow_server)
    run_id = json.loads((from_store / "mlflow_run.json").read_text())["run_id"]
    [version] = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert version.run_id == run_id and version.tags["data.manifest_hash"] == manifest["manifest_hash"]
    [dataset_input] = client.get_run(run_id).inputs.dataset_inputs
    assert dataset_input.dataset.digest == manifest["manifest_hash"] and dataset_input.dataset.source_type == "s3"
    assert json.loads(dataset_input.dataset.source)["uri"] == shards
    assert "testing" not in json.dumps(client.get_run(run_id).data.params)  # no keys in the tracked settings

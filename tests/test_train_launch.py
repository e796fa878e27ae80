"""Training through the real launcher on 2 CPU ranks (tiny models): ZeRO-2 and ZeRO-3, resume
equivalence with a warmup + cosine schedule and checkpoint retention, 2 nodes x 1 rank without ssh,
MLflow tracking against a real `mlflow server` on loopback (found through MLFLOW_TRACKING_URI), the
registered pyfunc model."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image
from test_train_data import write_shards
from tests.helpers import free_port, serves

from train.tracking import logged_images

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/train/tiny_test.yaml"
pytestmark = pytest.mark.slow


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m train.launch --config CONFIG ARGS``; output goes to a temporary file (no pipe to fill).
    The job (launcher and ranks) is a process group of its own, so a test can kill all of it at once."""
    full = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # a developer's own server stays out
    full.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by finish() once the process has ended
    process = subprocess.Popen([sys.executable, "-m", "train.launch", "--config", CONFIG, *args], cwd=REPO, env=full,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log
    return process


def finish(process: subprocess.Popen, timeout: int = 400, expect: int | None = 0) -> str:
    """Wait for the job; its output (the end of it). ``expect``: the exit status it must have (None: any)."""
    try:
        process.wait(timeout=timeout)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    process.log.seek(0)
    output = process.log.read().decode(errors="replace")
    process.log.close()
    assert expect is None or process.returncode == expect, output[-6000:]
    return output


def launch(*overrides: str, env: dict[str, str] | None = None, timeout: int = 400) -> str:
    return finish(start("--num-gpus", "2", "--master-port", str(free_port()), "--set", *overrides, env=env), timeout)


def kill_when(predicate, *overrides: str, timeout: float = 400) -> str:
    """Start a 2-rank run and SIGKILL the whole job (launcher and ranks) as soon as ``predicate()`` holds,
    polled every few milliseconds: the job is first frozen with SIGSTOP, so it is killed in the state the
    predicate saw. Returns the run's output; fails if the run ended before the predicate held."""
    process = start("--num-gpus", "2", "--master-port", str(free_port()), "--set", *overrides)
    deadline, held = time.monotonic() + timeout, False
    while not held and process.poll() is None and time.monotonic() < deadline:
        if predicate():
            os.killpg(process.pid, signal.SIGSTOP)
            held = predicate()  # still true while frozen: kill it here; else it moved on, watch again
            os.killpg(process.pid, signal.SIGKILL if held else signal.SIGCONT)
        time.sleep(0.002)
    output = finish(process, expect=None)
    assert held, f"the run ended before the kill point:\n{output[-4000:]}"
    return output


def losses(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    store, port = tmp_path_factory.mktemp("mlflow"), free_port()
    server = subprocess.Popen([str(REPO / "infra/mlflow/start_server.sh"), str(store), str(port)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        if not serves(f"{uri}/health", 120):
            raise RuntimeError("mlflow server did not start")
        yield uri
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), num_samples=8, per_shard=2)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, mlflow_server, shards):
    out = tmp_path_factory.mktemp("zero2")
    held_out = write_shards(tmp_path_factory.mktemp("held_out"), num_samples=2, per_shard=2)
    # the server is named only by the environment, as infra/deepspeed/README.md tells users to do
    launch(f"output_dir={out}", f"data.shards={shards}", f"validation.shards={held_out}", "validation.every=3",
           "validation.num_samples=2", "validation.seeds=[0,1]", "validation.steps=2",
           env={"MLFLOW_TRACKING_URI": mlflow_server})
    return out


def test_zero2_run_is_tracked_in_mlflow(zero2_run, mlflow_server):
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(json.loads((zero2_run / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["deepspeed.zero_stage"] == "2" and params["data.resolution"] == "64"
    assert params["model.base.source"] == "tiny" and params["optim.lr_schedule"] == "cosine"
    assert params["deepspeed.config.zero_optimization.reduce_bucket_size"] == "20000000"
    # the model settings themselves, not only the path of their file (configs/mmdiff/tiny_sd15.yaml)
    assert params["mmdiff.lora_rank"] == "4" and params["mmdiff.attention_loss_kind"] == "mask_nll"
    assert json.loads(params["mmdiff.supervised_layers"])[0] == "down_blocks.0"
    assert run.data.tags["data.manifest_hash"] == "test-manifest"
    assert len(run.data.tags["git_commit"]) >= 40 and run.data.tags["world_size"] == "2"
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == "test-manifest" and dataset_input.dataset.source_type == "local"
    assert json.loads(dataset_input.dataset.profile) == {"shard_files": 4, "written": 8}
    assert {(t.key, t.value) for t in dataset_input.tags} == {("mlflow.data.context", "training")}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    for name in ("denoise_loss", "attention_loss", "rejected_samples", "nonfinite_steps"):
        assert client.get_metric_history(run.info.run_id, name), name
    for part in ("down", "mid", "up"):  # the attention constraint's figure, per UNet part
        shares = [m.value for m in client.get_metric_history(run.info.run_id, f"inside_share/{part}")]
        assert shares and all(0.0 <= v <= 1.0 for v in shares), part
    # 2 warmup steps (diffusers' schedule starts at 0), then cosine over the remaining 4
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert rates == pytest.approx([0.0, 0.005] + [0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    ds_json = json.loads(Path(client.download_artifacts(run.info.run_id, "config/deepspeed.json", str(zero2_run / "dl"))).read_text())
    assert ds_json["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 20000000}
    # images through log_image(key=, step=): the UI's image panel steps through each key
    attention = logged_images(client, run.info.run_id, "attention")
    assert [step for step, _ in attention] == [3, 6]
    assert [step for step, _ in logged_images(client, run.info.run_id, "sample")] == [6]
    assert "mlflow.loggedImages" in client.get_run(run.info.run_id).data.tags
    overlay = Image.open(client.download_artifacts(run.info.run_id, attention[-1][1], str(zero2_run / "dl")))
    assert overlay.height == 64 * 2 and overlay.width >= 64 * 2  # 2 examples: image + a subject panel
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/step-2", "checkpoints/step-4", "checkpoints/step-6"}
    # validation grids: 2 held-out samples (rows) x (their subject crop + one image per seed 0 and 1)
    validation = logged_images(client, run.info.run_id, "validation")
    assert [step for step, _ in validation] == [3, 6]
    grid = Image.open(client.download_artifacts(run.info.run_id, validation[-1][1], str(zero2_run / "dl")))
    assert grid.size == (3 * 64, 2 * 64) and len(set(grid.getdata())) > 1
    assert {"config/resolved.yaml", "config/mmdiff.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    version = client.get_model_version("mmdiff-tiny", "1")
    assert version.run_id == run.info.run_id
    assert version.tags["run_id"] == run.info.run_id and version.tags["data.manifest_hash"] == "test-manifest"
    assert version.tags["base_model"] == "tiny"


def test_the_serving_gate_waits_for_a_registered_model(zero2_run, mlflow_server, capsys):
    """infra/k8s/wait.py, the serving pods' init container, against the registry the run above wrote:
    a registered version, `latest` and an alias that is not set yet."""
    from infra.k8s import wait

    quick = ["--tracking-uri", mlflow_server, "--timeout-s", "0.2", "--poll-s", "0.05"]
    assert wait.main(["model", "models:/mmdiff-tiny/1", *quick]) == 0
    assert wait.main(["model", "models:/mmdiff-tiny/latest", *quick]) == 0
    assert wait.main(["model", "models:/mmdiff-tiny@champion", *quick]) == 1
    assert "gave up on model models:/mmdiff-tiny@champion" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        wait.main(["model", "runs:/abc/adapter", *quick])  # not a registry URI: refused at once


def test_retention_keeps_the_newest_two_and_the_best_by_loss(zero2_run):
    rows = losses(zero2_run)
    interval_loss = {step: (rows[step - 2]["loss"] + rows[step - 1]["loss"]) / 2 for step in (2, 4, 6)}
    best = min(interval_loss, key=interval_loss.get)
    kept = {f"step-{s}" for s in {4, 6, best}}
    assert {p.name for p in (zero2_run / "checkpoints").iterdir() if p.is_dir()} == kept
    assert {p.name for p in (zero2_run / "adapters").iterdir()} == kept
    assert (zero2_run / "checkpoints" / "latest").read_text() == "step-6"
    state = json.loads((zero2_run / "checkpoints" / "step-6" / "trainer_state_rank0.json").read_text())
    assert {int(k): v for k, v in state["checkpoint_scores"].items()} == pytest.approx(
        {s: interval_loss[s] for s in {4, 6, best}}, rel=1e-6)


def test_loss_falls_on_the_overfit_set(zero2_run, shards):
    from mmdiff import MMDiffModel
    from mmdiff.configuration import load_config
    from train.config import TrainConfig
    from train.data import BatchBuilder, ShardStream
    from train.run import build_model

    config = load_config(CONFIG, TrainConfig, {"data.shards": str(shards), "data.text_dropout": 0.0,
                                               "data.subject_dropout": 0.0, "data.micro_batch_size": 4})
    initial = build_model(config)
    trained = MMDiffModel.from_pretrained(config.model.base, zero2_run / "adapter")
    batch = next(iter(ShardStream(shards, config.data, BatchBuilder(config.data, initial.tokenizers,
                                                                     initial.image_processor), seed=1)))
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def loss(model) -> float:
        torch.manual_seed(0)  # same noise and timesteps for both models
        with torch.no_grad():
            return sum(float(model.training_loss(batch)["loss"]) for _ in range(3)) / 3

    before, after = loss(initial), loss(trained)
    assert after < before - 0.01, (before, after)


def test_registered_model_generates_an_image(zero2_run, mlflow_server, tmp_path):
    from train.generate import main as generate

    out = tmp_path / "generated.png"
    generate(["--model-uri", "models:/mmdiff-tiny/1", "--tracking-uri", mlflow_server, "--prompt", "a [cat] on a beach",
              "--subject", "skimage:chelsea", "--steps", "2", "--out", str(out)])
    image = Image.open(out)
    assert image.size == (64, 64) and len(set(image.getdata())) > 1


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a file (inside a tensor's data for the .pt files here)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + count] = bytes(b ^ 0xFF for b in data[middle: middle + count])
    path.write_bytes(bytes(data))


class CreatesAFile:
    """Unpickling this runs ``open(marker, "w")``: what a tampered checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant_pickle(checkpoint: Path, name: str, marker: Path) -> None:
    """Replace ``name`` with a pickle that would create ``marker``, and update the manifest to match, as
    someone who can write to the checkpoint folder could."""
    from train.checkpoint import sha256_file

    torch.save({"module": CreatesAFile(marker), "optimizer_state_dict": {}}, checkpoint / name)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"size": (checkpoint / name).stat().st_size, "sha256": sha256_file(checkpoint / name)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def problems(checkpoints: Path, tag: str) -> str:
    """Both ranks' findings on ``tag``, checked offline as a resume does (each rank hashes its share)."""
    from train.checkpoint import Checkpoints

    return "\n".join(p for rank in (0, 1) for p in Checkpoints(checkpoints, rank=rank, world=2).check(tag)[0])


def test_damaged_checkpoint_files_are_detected_and_named(zero2_run, tmp_path):
    """Every kind of checkpoint file: flipped bytes are named by the sha256 check; a truncated or missing
    trainer state and an unreadable manifest are named too; the untouched checkpoint passes."""
    from train.checkpoint import Checkpoints

    source = zero2_run / "checkpoints" / "step-6"
    assert problems(zero2_run / "checkpoints", "step-6") == ""
    states = [Checkpoints(zero2_run / "checkpoints", rank=r, world=2).check("step-6")[1] for r in (0, 1)]
    assert [s.step for s in states] == [6, 6]
    names = sorted(json.loads((source / "manifest.json").read_text())["files"])
    assert {n for n in names if n.endswith(".pt")} == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    for name in names:
        shutil.copytree(source, tmp_path / name / "step-6")
        flip_bytes(tmp_path / name / "step-6" / name)
        found = problems(tmp_path / name, "step-6")
        assert f"{name}: sha256 differs" in found, (name, found)
    damaged = tmp_path / "state" / "step-6"
    shutil.copytree(source, damaged)
    (damaged / "trainer_state_rank1.json").write_text('{"step": 6, ')
    assert "trainer_state_rank1.json: " in problems(tmp_path / "state", "step-6")
    (damaged / "trainer_state_rank1.json").unlink()
    assert "trainer_state_rank1.json: missing" in problems(tmp_path / "state", "step-6")
    (damaged / "manifest.json").write_text('{"files": ')
    assert "manifest.json: unreadable manifest" in problems(tmp_path / "state", "step-6")
    (damaged / "manifest.json").unlink()
    assert "is incomplete" in problems(tmp_path / "state", "step-6")


def test_a_planted_pickle_is_refused_and_never_run(zero2_run, tmp_path):
    from train.checkpoint import weights_only_load

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoints" / "step-6"
    shutil.copytree(zero2_run / "checkpoints" / "step-6", checkpoint)
    plant_pickle(checkpoint, "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    found = problems(tmp_path / "checkpoints", "step-6")
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: pickles globals no checkpoint holds: ['io.open']" in found
    with pytest.raises(Exception, match="weights_only"):
        weights_only_load(checkpoint / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert not marker.exists()
    # the untouched files of DeepSpeed's checkpoint load as weights only
    assert weights_only_load(checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]


@pytest.mark.extended
def test_killed_runs_resume_to_the_same_losses(zero2_run, shards, tmp_path):
    """SIGKILL the whole job at points chosen by watching its folder: during step 1 (no checkpoint yet),
    in the middle of a checkpoint's save, and right after ``latest`` moved to step-4. Then step-4 is
    damaged (flipped bytes in rank 0's optimizer state, a planted pickle as the model states, the
    manifest made to match the pickle): the last run skips it, naming both files, resumes from step-2,
    and ends with the uninterrupted run's losses, each step once, and its retention scores."""
    out = tmp_path / "run"
    checkpoints, marker = out / "checkpoints", tmp_path / "pwned"
    overrides = (f"output_dir={out}", f"data.shards={shards}", "mlflow.registered_model=null", "mlflow.sample_prompt=null")

    def partial_step() -> list[str]:
        return [p.name for p in checkpoints.glob("step-*") if not (p / "manifest.json").exists()]

    kill_when(lambda: (out / "losses.jsonl").is_file() and not any(checkpoints.glob("step-*")), *overrides)
    kill_when(lambda: bool({"step-2", "step-4"} & set(partial_step())), *overrides)  # step-6 would leave no step to redo
    [partial] = partial_step()
    latest = checkpoints / "latest"
    before = latest.stat().st_mtime_ns if latest.is_file() else None
    output = kill_when(lambda: latest.is_file() and latest.read_text() == "step-4" and latest.stat().st_mtime_ns != before,
                       *overrides)
    assert f"skipping checkpoint {partial}" in output and "is incomplete" in output
    assert {p.name for p in checkpoints.glob("step-*/manifest.json")} and (checkpoints / "step-2" / "manifest.json").is_file()

    flip_bytes(checkpoints / "step-4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    plant_pickle(checkpoints / "step-4", "mp_rank_00_model_states.pt", marker)
    output = launch(*overrides)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256 differs" in output
    assert "mp_rank_00_model_states.pt: pickles globals no checkpoint holds" in output
    assert "resumed at step 2" in output and not marker.exists()
    full, again = losses(zero2_run), losses(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, again):
        for name in ("loss", "denoise_loss", "attention_loss", "lr"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), (a["step"], name)

    def state(run: Path) -> dict:
        return json.loads((run / "checkpoints" / "step-6" / "trainer_state_rank1.json").read_text())

    assert state(out)["checkpoint_scores"] == pytest.approx(state(zero2_run)["checkpoint_scores"], rel=1e-5)


def test_multi_node_without_ssh_matches_one_node(zero2_run, shards, tmp_path):
    """2 nodes x 1 rank (two launchers, --no_ssh, node ranks 0 and 1 on loopback), as on Slurm or
    Kubernetes, against the 1 node x 2 ranks run. Losses of steps 1-3 depend on the rates of steps 1-2
    only, which are warmup rates and do not depend on max_steps, so a 3-step run must match."""
    port = str(free_port())
    nodes = [start("--num-gpus", "1", "--num-nodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                   "--master-port", port, "--set", f"output_dir={tmp_path}", f"data.shards={shards}", "schedule.max_steps=3",
                   "mlflow.registered_model=null", "mlflow.sample_prompt=null") for rank in (0, 1)]
    for node in nodes:
        finish(node)
    single, multi = losses(zero2_run), losses(tmp_path)
    assert [r["step"] for r in multi] == [1, 2, 3]
    for a, b in zip(single[:3], multi):
        for name in ("loss", "denoise_loss", "attention_loss"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), (a["step"], name)
    tags = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]).data.tags
    assert tags["world_size"] == "2"


def test_zero3_builds_the_base_partitioned_from_checkpoint_folders(zero2_run, shards, tmp_path):
    """ZeRO-3 builds the base inside deepspeed.zero.Init and streams the checkpoint's safetensors into the
    partitions: from diffusers/transformers folders of the tiny twins (seed 0, as the config's "tiny"),
    the first steps' losses equal the ZeRO-2 run's, so every frozen weight arrived."""
    from mmdiff import MMDiffModel, zoo
    from mmdiff.zoo.spec import ModelSpec

    base, encoder = zoo.save_tiny("sd15", tmp_path / "base"), zoo.save_tiny("clip_vision", tmp_path / "encoder")
    out = tmp_path / "run"
    launch(f"output_dir={out}", f"data.shards={shards}", "deepspeed.zero_stage=3", f"model.base.source={base}",
           f"model.image_encoder.source={encoder}", "schedule.max_steps=3", "schedule.checkpoint_every=0",
           "mlflow.registered_model=null", "mlflow.sample_prompt=null")
    rows = losses(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(losses(zero2_run)[:3], rows):  # steps 1-3 use warmup rates only (see the multi-node test)
        for name in ("loss", "denoise_loss", "attention_loss"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), (a["step"], name)
    # the adapter records the base folder's content hash: it loads on that folder, not on the generated twin
    model = MMDiffModel.from_pretrained(ModelSpec(family="sd15", source=str(base)), out / "adapter")
    # training moved the LoRA "up" weights away from their zero initialisation
    assert any(float(p.abs().max()) > 0 for n, p in model.trainable_state_dict().items() if "up" in n)


def test_config_errors_stop_before_any_process_starts(tmp_path, capsys):
    from train.launch import main

    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / CONFIG).read_text().replace("  resolution: 64", "  resolutoin: 64"))
    assert main(["--config", str(bad), "--num-gpus", "2"]) == 2
    assert "data.resolutoin" in capsys.readouterr().err
    assert main(["--config", CONFIG, "--num-gpus", "2", "--set", f"data.shards={tmp_path}"]) == 2
    assert "no shards/*.tar" in capsys.readouterr().err
    shards = write_shards(tmp_path / "data", num_samples=2, per_shard=2)
    assert main(["--config", CONFIG, "--num-gpus", "2", "--set", f"data.shards={shards}",
                 "model.mmdiff=configs/mmdiff/tiny_sdxl.yaml"]) == 2
    assert "does not match base_family sdxl" in capsys.readouterr().err


def test_a_tracking_server_that_never_answers_stops_the_launch_or_is_spooled(shards, tmp_path, capsys):
    from mmdiff.configuration import load_config
    from train.config import TrainConfig
    from train.launch import main, tracking_preflight

    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["--config", CONFIG, "--num-gpus", "2", "--set", f"data.shards={shards}", f"output_dir={tmp_path}",
                 f"mlflow.tracking_uri={closed}", "mlflow.preflight_wait_s=1"]) == 3
    assert time.monotonic() - started < 60  # not the MLflow client's minutes of retries
    err = capsys.readouterr().err
    assert f"tracking server {closed} does not answer" in err and "mlflow.on_unreachable=spool" in err
    spool = load_config(CONFIG, TrainConfig, {"data.shards": str(shards), "output_dir": str(tmp_path),
                                              "mlflow.tracking_uri": closed, "mlflow.preflight_wait_s": 0,
                                              "mlflow.on_unreachable": "spool"})
    assert tracking_preflight(spool) is None
    assert "training anyway" in capsys.readouterr().err


def test_tracking_spooled_from_the_start_reaches_the_server_when_it_answers(mlflow_server, tmp_path):
    """The spool mode in process: the run is created, its params, metrics and an artifact logged while the
    server is down, and all of it sent, in order and once, when it answers."""
    from faults import SwitchableProxy

    from mmdiff.configuration import load_config
    from train.config import TrainConfig
    from train.tracking import RunTracker

    proxy = SwitchableProxy(int(mlflow_server.rsplit(":", 1)[1]))
    proxy.down()
    try:
        config = load_config(CONFIG, TrainConfig, {"data.shards": str(tmp_path), "output_dir": str(tmp_path),
                                                   "mlflow.tracking_uri": f"http://127.0.0.1:{proxy.port}",
                                                   "mlflow.experiment": "spooled", "run_name": "spooled"})
        tracker = RunTracker(config, offline=True).start("spooled-manifest", {"world_size": "2"})
        for step in (1, 2, 3):
            tracker.metrics({"loss": 1.0 / step}, step)
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "weights.txt").write_text("w")
        tracker.directory(tmp_path / "adapter", "adapter")
        shutil.rmtree(tmp_path / "adapter")  # the spool kept its own copy
        tracker.image(Image.new("RGB", (8, 4), (200, 30, 10)), "attention", 3)
        assert tracker.run_id is None and tracker.finish(wait_s=0) is False
        again = RunTracker(config, offline=True)  # a resumed run sees what is spooled: no step twice
        again.metrics({"loss": 0.5}, 2)
        proxy.restore()
        assert again.finish(wait_s=60) is True and not (tmp_path / "mlflow_spool").exists()
    finally:
        proxy.close()
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["data.manifest_hash"] == "spooled-manifest"
    assert run.data.params["data.resolution"] == "64"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "adapter")] == ["adapter/weights.txt"]
    ((step, path),) = logged_images(client, run.info.run_id, "attention")  # the spooled image, as log_image
    image = Image.open(client.download_artifacts(run.info.run_id, path, str(tmp_path / "dl")))
    assert step == 3 and image.size == (8, 4) and image.getpixel((0, 0)) == (200, 30, 10)


@pytest.mark.extended
def test_a_tracking_outage_mid_run_does_not_stop_training(mlflow_server, shards, tmp_path):
    """The server goes away after step 1 (connections refused; the MLflow client's retry budget shrunk to
    nothing) and comes back only once training has ended: the run finishes, and afterwards the server has
    every step's metrics once, the checkpoints' adapters, the registered model and status FINISHED."""
    from faults import SwitchableProxy

    proxy = SwitchableProxy(int(mlflow_server.rsplit(":", 1)[1]))
    out = tmp_path / "run"
    try:
        job = start("--num-gpus", "2", "--master-port", str(free_port()), "--set", f"output_dir={out}", f"data.shards={shards}",
                    "mlflow.registered_model=mmdiff-tiny-outage", "mlflow.sample_prompt=null", "mlflow.end_wait_s=300",
                    env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
        deadline, outage = time.monotonic() + 400, "before"
        while job.poll() is None and time.monotonic() < deadline:
            if outage == "before" and (out / "losses.jsonl").is_file():
                proxy.down()
                outage = "during"
            if outage == "during" and (out / "adapter").is_dir():
                proxy.restore()
                outage = "after"
            time.sleep(0.05)
        output = finish(job)
    finally:
        proxy.close()
    assert "unreachable" in output and "spooled operations sent" in output
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(json.loads((out / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == pytest.approx(
        [r["loss"] for r in losses(out)], rel=1e-6)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/step-2", "checkpoints/step-4", "checkpoints/step-6"}
    assert client.get_model_version("mmdiff-tiny-outage", "1").run_id == run.info.run_id


@pytest.mark.extended
def test_a_full_output_disk_stops_the_job_and_a_rerun_resumes(zero2_run, shards, tmp_path):
    """The output folder is a 2.6 MB tmpfs: the run fills it (checkpoints, tracking store) and must stop
    non-zero, every rank saying that the filesystem of the output folder is full, leaving no partial
    checkpoint; after the space is grown the rerun resumes and ends with the uninterrupted run's losses."""
    out = tmp_path / "out"
    out.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(out)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root or CAP_SYS_ADMIN): {mount.stderr.strip()}")
    overrides = (f"output_dir={out}", f"data.shards={shards}", "mlflow.registered_model=null", "mlflow.sample_prompt=null")
    try:
        job = start("--num-gpus", "2", "--master-port", str(free_port()), "--set", *overrides)
        output = finish(job, expect=None)
        assert job.returncode != 0, output[-4000:]
        for rank in (0, 1):
            assert f"rank {rank}: the output filesystem is full ({out}: " in output, (rank, output[-6000:])
        assert not [p for p in (out / "checkpoints").glob("step-*") if not (p / "manifest.json").is_file()]
        assert not list(out.rglob(".*.tmp-*"))  # failed temporary writes were removed
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        launch(*overrides)
        for a, b in zip(losses(zero2_run), losses(out), strict=True):
            for name in ("loss", "denoise_loss", "attention_loss", "lr"):
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), (a["step"], name)
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


from tests.object_store import object_store_fixture  # noqa: E402,F401 - registers the fixture


@pytest.mark.extended
def test_training_from_the_object_store_killed_mid_epoch_resumes_to_the_local_runs_losses(
        zero2_run, shards, object_store, tmp_path):
    """The shards on an S3 server (moto, loopback), 2 ranks from s3://: the same losses as the zero2 run
    from the local copy. One rank is SIGKILLed mid-epoch; the rerun resumes from the step-3 checkpoint
    (rank x worker positions mid-epoch, samples waiting in the shuffle buffer, fetched back by byte range)
    and ends with the uninterrupted run's losses."""
    import psutil
    import s3fs

    url = object_store.url("launch/shards")
    s3fs.S3FileSystem(**object_store.options, skip_instance_cache=True).put(f"{shards}/", url, recursive=True)
    out = tmp_path / "run"
    args = [f"output_dir={out}", f"data.shards={url}", f"data.storage_options={json.dumps(object_store.options)}",
            "schedule.checkpoint_every=3", "mlflow.registered_model=null", "mlflow.sample_prompt=null"]
    launcher = start("--num-gpus", "2", "--master-port", str(free_port()), "--set", *args)
    deadline = time.monotonic() + 400
    try:
        while not ((out / "losses.jsonl").is_file() and len(losses(out)) >= 4):  # past the step-3 checkpoint
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        rank1 = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "train.main" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].kill()
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        launcher.log.close()
    assert launcher.returncode != 0
    assert (out / "checkpoints" / "latest").read_text() == "step-3"  # mid-epoch: 2 steps per epoch per rank
    launch(*args)
    full, again = losses(zero2_run), losses(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, again):
        for name in ("loss", "denoise_loss", "attention_loss", "lr"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), (a["step"], name)


@pytest.mark.extended
def test_a_3_to_1_mixture_follows_its_weights_and_logs_both_dataset_inputs(mlflow_server, tmp_path):
    import itertools

    from mmdiff.configuration import load_config
    from test_train_data import builder
    from train.config import TrainConfig
    from train.data import ReaderPosition, ShardStream, data_sources
    from train.run import log_datasets
    from train.tracking import RunTracker

    general = write_shards(tmp_path / "general", num_samples=8)
    portraits = write_shards(tmp_path / "portraits", num_samples=4, per_shard=2)
    (portraits / "manifest.json").write_text(json.dumps({"written": 4, "manifest_hash": "portrait-manifest"}))
    config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
        "output_dir": str(tmp_path / "run"), "data.shards": None, "data.resolution": 32,
        "data.sources": [{"shards": str(general), "weight": 3}, {"shards": str(portraits), "weight": 1}],
        "data.micro_batch_size": 4, "data.text_dropout": 0.0, "data.subject_dropout": 0.0,
        "mlflow.tracking_uri": mlflow_server})
    sources = data_sources(config.data)
    mixed = ShardStream(sources, config.data, builder(config.data), seed=7)
    batches = list(itertools.islice(iter(mixed), 100))  # 400 samples
    positions = [ReaderPosition.of_batch(b).sources for b in batches]
    assert [s.drawn for s in positions[-1]] == [300, 100]  # 3:1 over 400 samples ...
    assert all([s.drawn for s in p] == [3 * (n + 1), n + 1] for n, p in enumerate(positions))  # ... at every step
    assert [s.epoch for s in positions[-1]] == [37, 24]  # each source cycles its own epochs (8 and 4 samples)
    Path(config.output_dir).mkdir(parents=True)
    tracker = RunTracker(config).start("mixture")
    log_datasets(tracker, sources)
    inputs = mlflow.MlflowClient(config.tracking_uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert {(i.dataset.name, i.dataset.digest, json.loads(i.dataset.profile)["weight"]) for i in inputs} == {
        ("general", "test-manifest", 3.0), ("portraits", "portrait-manifest", 1.0)}

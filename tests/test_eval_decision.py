"""The decision against a real `mlflow server` on loopback: two tracked runs with registered models are
evaluated (the Ray Data job and the in-process loop), compared in an HTML + PNG report, and promoted
behind gates (a worse model refused, a better one accepted, tags saying why)."""

from __future__ import annotations

import json
import re
import time

import mlflow
import pytest
import torch

from evaluation.benchmark import write_demo
from evaluation.compare import compare
from evaluation.evaluate import load_evaluation_config, log_evaluation, run_evaluation
from evaluation.promote import GatesConfig, LeaseError, promote
from mmdiff import MMDiffConfig, MMDiffModel
from mmdiff.configuration import load_config
from test_train_launch import mlflow_server  # noqa: F401 - the module's server fixture
from tests.helpers import screenshot_hsv
from train.config import TrainConfig
from train.export import register_model
from train.samples import attention_overlay
from train.tracking import RunTracker

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
MODEL = "mmdiff-eval-test"


def tracked_run(root, uri: str, name: str, weight: float, seed: int) -> str:
    """A run as training records it (params, loss curves, an attention overlay), its adapter registered."""
    config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
        "output_dir": str(root / name), "run_name": name, "mlflow.tracking_uri": uri, "mlflow.registered_model": MODEL,
        "mlflow.experiment": "eval-test"})
    (root / name).mkdir()
    settings = load_config(config.model.mmdiff, MMDiffConfig)
    model = MMDiffModel.from_specs(config.model.base, config.model.image_encoder, settings)
    generator = torch.Generator().manual_seed(seed)  # the zoo reseeds the global RNG when it builds models
    with torch.no_grad():  # stands in for training: moves every trainable weight away from its start
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    tracker = RunTracker(config).start(
        "eval-test-data", model_settings={**settings.model_dump(mode="json"), "attention_loss_weight": weight})
    for step in range(1, 5):
        tracker.metrics({"loss": 1.0 / step + weight, "attention_loss": weight * step}, step)
    batch = {"pixel_values": torch.rand(1, 3, 32, 32) * 2 - 1, "subject_valid": torch.ones(1, 1, dtype=torch.bool),
             "subject_masks": torch.ones(1, 1, 32, 32)}
    tracker.image(attention_overlay(batch, torch.rand(1, 1, 8, 8)), "attention", 4)
    model.save_pretrained(root / name / "adapter")
    tracker.directory(root / name / "adapter", "adapter")
    register_model(config, root / name / "adapter", tracker.run_id, "eval-test-data")
    tracker.finish()
    return tracker.run_id


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, mlflow_server):  # noqa: F811
    root = tmp_path_factory.mktemp("decision")
    runs = [tracked_run(root, mlflow_server, "run-a", 0.01, seed=1),
            tracked_run(root, mlflow_server, "run-b", 0.02, seed=2)]
    write_demo(root / "bench")
    results = []
    # a registered version through the Ray Data job, a run's adapter through the in-process loop
    for name, source, runner in (("1", f"models:/{MODEL}/1", "ray"), ("2", f"runs:/{runs[1]}/adapter", "loop")):
        config = load_evaluation_config("configs/eval/demo.yaml", {
            "benchmark.dreambench": str(root / "bench/dataset"), "benchmark.portraits.folder": str(root / "bench/portraits"),
            "benchmark.subjects": ["cat", "cup"], "benchmark.prompts_per_subject": 1,
            "benchmark.pairs.prompts": ["a {0} and a {1} on the beach"], "benchmark.portraits.prompts": ["a {0}"],
            "generation.steps": 2, "output_dir": str(root / f"eval-{name}"), "progress": False})
        result = run_evaluation(config, source, mlflow_server, runner)
        log_evaluation(result, mlflow_server)
        results.append(result)
    return runs, results, root


def test_evaluation_scores_every_case_and_logs_to_the_training_run(evaluated, mlflow_server):  # noqa: F811
    runs, results, _ = evaluated
    client = mlflow.MlflowClient(mlflow_server)
    for run_id, result in zip(runs, results):
        table = result.table
        assert set(table["kind"]) == {"single", "ceiling", "multi", "portrait"}
        assert (table["status"] == "ok").all(), table.loc[table["status"] != "ok", ["case_id", "detail"]]
        assert result.summary["images_scored"] == 4  # 2 single + 1 pair + 1 portrait
        assert 0.9 < result.summary["ceiling.dino"] <= 1.0  # a view of the same photo is close to it
        run = client.get_run(run_id)
        for name in ("clip_t", "clip_i", "dino", "face_id", "multi.located_rate", "ceiling.clip_i"):
            assert run.data.metrics[f"eval.{name}"] == pytest.approx(result.summary[name])
        assert run.data.tags["eval.benchmark_hash"] == result.benchmark_hash
        files = {a.path for a in client.list_artifacts(run_id, "eval/demo/images")}
        assert "eval/demo/images/single__cat__p00__s0.png" in files and len(files) == 4
    assert results[0].benchmark_hash == results[1].benchmark_hash
    assert results[0].summary["dino"] != results[1].summary["dino"]  # two different models


@pytest.fixture(scope="module")
def report(evaluated, mlflow_server):  # noqa: F811
    runs, _, root = evaluated
    return compare(runs, root / "compare", mlflow_server)


def test_compare_report_holds_both_runs_config_diff_and_same_seed_grids(evaluated, report, mlflow_server):  # noqa: F811
    runs, results, _ = evaluated
    page, picture, logged = report
    text = page.read_text()
    assert page.name == "comparison.html" and picture.name == "comparison.png"
    for run_id, result in zip(runs, results):
        assert run_id in text
        assert f"{result.summary['dino']:.4f}" in text and f"{result.summary['clip_t']:.4f}" in text
    diff = text[text.index("id='config-diff'"):text.index("<h2>Curves")]
    assert "mmdiff.attention_loss_weight" in diff and "0.01" in diff and "0.02" in diff and "run_name" in diff
    assert "model.base.source" not in diff  # identical params are left out of the diff
    grid = text[text.index("id='samples'"):text.index("<h2>Attention")]
    for case in ("single/cat/p00/s0", "multi/cat+cup/p00/s0", "portrait/astronaut/p00/s0"):
        assert len(re.findall(f"<img alt='{re.escape(case)}' src='data:image/png;base64,", grid)) == 2
    assert "ceiling/" not in grid and grid.count("<img class='ref'") == 5  # cat, cup, cat + cup, astronaut
    attention = text[text.index("<h2>Attention"):]  # each run's overlay, found by its log_image key
    assert attention.count("src='data:image/png;base64,") == 2 and "none logged" not in attention
    assert text.count("class='best'") >= 3 and "src='http" not in text  # self-contained
    from PIL import Image

    assert Image.open(picture).size[1] > 3 * 128  # curves + 3 grid rows
    client = mlflow.MlflowClient(mlflow_server)
    assert {a.path for a in client.list_artifacts(logged, "comparison")} == {"comparison/comparison.html",
                                                                             "comparison/comparison.png"}
    assert client.get_run(logged).data.tags["mmdiff.compared_runs"] == ",".join(runs)


def test_compare_report_renders_in_chromium(report, tmp_path):
    """The page as a browser shows it: headless Chromium (Debian's package, .ci/setup-system) screenshots it;
    the inlined sample images must be decoded and drawn (the tiny models' images are strongly coloured, the
    page's own colours are greys and pale table fills)."""
    hsv = screenshot_hsv(report[0], tmp_path, 1200)
    dark_text = (hsv[:300, :, 2] < 80).sum()
    vivid = ((hsv[..., 1] > 128) & (hsv[..., 2] > 80)).sum()
    assert dark_text > 500 and vivid > 8 * 64 * 64, (dark_text, vivid)


def test_promote_refuses_a_worse_model_and_accepts_a_better_one(evaluated, mlflow_server):  # noqa: F811
    _, results, _ = evaluated
    gates = GatesConfig(alias="champion", rank_by="dino", gates=[{"metric": "dino", "limit": 0.0, "margin": 0.0}])
    dino = {"1": results[0].summary["dino"], "2": results[1].summary["dino"]}
    worse, better = sorted(dino, key=dino.get)
    client = mlflow.MlflowClient(mlflow_server)

    first = promote(gates, MODEL, [worse], mlflow_server)  # no champion yet: the limit alone decides
    assert first.promoted == worse and client.get_model_version_by_alias(MODEL, "champion").version == worse

    accepted = promote(gates, MODEL, [better], mlflow_server)
    assert accepted.promoted == better and accepted.champion_before == worse
    assert client.get_model_version_by_alias(MODEL, "champion").version == better
    tags = client.get_model_version(MODEL, better).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.against"] == f"v{worse}"
    assert any(r.startswith(f"ok dino {dino[better]:.4f} vs champion v{worse}") for r in json.loads(tags["promotion.reasons"]))

    refused = promote(gates, MODEL, [worse], mlflow_server)
    assert refused.promoted is None and client.get_model_version_by_alias(MODEL, "champion").version == better
    tags = client.get_model_version(MODEL, worse).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.against"] == f"v{better}"
    reasons = json.loads(tags["promotion.reasons"])
    assert any(r.startswith(f"FAIL dino {dino[worse]:.4f} vs champion v{better}") for r in reasons), reasons

    missing = GatesConfig(rank_by="dino", gates=[{"metric": "no_such_figure"}])
    assert promote(missing, MODEL, [worse], mlflow_server).decisions[0].reasons == [
        "FAIL no_such_figure: missing from the evaluation"]


def test_promote_cli_exit_codes(evaluated, mlflow_server, capsys, tmp_path):  # noqa: F811
    from evaluation.promote import main

    strict = tmp_path / "gates.yaml"
    strict.write_text("rank_by: dino\ngates:\n  - {metric: dino, limit: 2.0}\n")
    assert main(["--model-name", MODEL, "--versions", "1", "2", "--gates", str(strict), "--alias", "strict",
                 "--tracking-uri", mlflow_server]) == 1
    err = capsys.readouterr().err
    assert "refused: no candidate passed the gates; @strict is not set" in err
    assert main(["--model-name", MODEL, "--versions", "1", "2", "--gates", "configs/eval/gates_demo.yaml",
                 "--alias", "demo", "--tracking-uri", mlflow_server]) == 0
    assert re.search(rf"promote: {MODEL}@demo -> v[12]", capsys.readouterr().out)


@pytest.fixture(scope="module")
def race_registry(mlflow_server, tmp_path_factory):  # noqa: F811
    """tests/test_promote.py's versions (champion v1, dino 0.5/0.6/0.7) on the real server."""
    from test_promote import NAME, register_evaluated_versions

    register_evaluated_versions(mlflow_server, NAME, tmp_path_factory.mktemp("race"))
    return mlflow_server


def test_concurrent_promotions_against_a_tracking_server_end_as_a_serial_order(race_registry):
    """The race of tests/test_promote.py once against the real server: its lease lives in the registry."""
    from test_promote import NAME, assert_serial, race

    assert_serial(race(race_registry, NAME, rounds=1, processes=False))


def test_a_dead_holders_lease_is_outlasted_and_a_live_one_waited_for(race_registry, tmp_path, capsys):
    from evaluation.promote import main
    from test_promote import GATES, NAME, reset

    uri = race_registry
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    reset(client, NAME)
    config = GatesConfig.model_validate(GATES)
    live = json.dumps({"owner": "another", "host": "elsewhere", "pid": 1, "ttl_s": 600})
    client.set_registered_model_tag(NAME, "promotion.lease.champion", live)
    with pytest.raises(LeaseError, match="another promotion holds the lease.*elsewhere"):
        promote(config, NAME, ["3"], uri, lease_wait_s=1)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    gates = tmp_path / "gates.yaml"
    gates.write_text(json.dumps(GATES))
    assert main(["--model-name", NAME, "--versions", "3", "--gates", str(gates), "--tracking-uri", uri,
                 "--lease-wait-s", "1"]) == 2
    assert "another promotion holds the lease" in capsys.readouterr().err

    dead = json.dumps({"owner": "crashed", "host": "elsewhere", "pid": 1, "ttl_s": 1})
    client.set_registered_model_tag(NAME, "promotion.lease.champion", dead)
    started = time.monotonic()
    assert promote(config, NAME, ["3"], uri, lease_wait_s=30).promoted == "3"
    assert time.monotonic() - started >= 1  # it watched the record unchanged for the dead holder's ttl
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert "promotion.lease.champion" not in client.get_registered_model(NAME).tags


def test_models_are_registered_and_read_in_the_configured_registry_whatever_the_process_set(
        evaluated, mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    """The process's registry points at the server (as an evaluation in the same process, a library, or
    $MLFLOW_REGISTRY_URI leaves it): a job tracked in a SQLite store registers there (the registry defaults to
    the tracking store), a job tracked on the server whose config names the SQLite registry registers there;
    the server's registry gets neither, and evaluation, the serving gate and generation read them back."""
    from evaluation.evaluate import resolve_source
    from infra.k8s.wait import model_ready
    from train.registry import download_model, registry_client

    _, _, root = evaluated
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "mmdiff-elsewhere"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    before = mlflow.get_tracking_uri()
    mlflow.set_registry_uri(mlflow_server)
    try:
        registered = {}
        for tracking, registry in ((local, None), (mlflow_server, local)):
            config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
                "output_dir": str(tmp_path), "mlflow.tracking_uri": tracking, "mlflow.registry_uri": registry,
                "mlflow.registered_model": name})
            runs = mlflow.MlflowClient(tracking)
            experiment = runs.get_experiment_by_name(name)
            run_id = runs.create_run(experiment.experiment_id if experiment else runs.create_experiment(
                name, artifact_location=str(tmp_path / "artifacts") if tracking == local else None)).info.run_id
            version = register_model(config, root / "run-a" / "adapter", run_id, "elsewhere-data")
            registered[str(version.version)] = (tracking, run_id)
            assert version.tags["run_id"] == run_id and version.tags["data.manifest_hash"] == "elsewhere-data"
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(before)
    assert sorted(registered) == ["1", "2"]
    assert not mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server).search_registered_models(f"name='{name}'")
    for number, (tracking, run_id) in registered.items():
        # still with $MLFLOW_REGISTRY_URI pointing at the server
        registry = None if tracking == local else local
        assert resolve_source(f"models:/{name}/{number}", tracking, registry).run_id == run_id
        assert model_ready(f"models:/{name}/{number}", tracking, registry) is None
        files = download_model(registry_client(tracking, registry), f"models:/{name}/{number}", tmp_path / number)
        assert (files / "MLmodel").is_file() and (files / "artifacts" / "adapter").is_dir()
    assert "not in the registry" in model_ready(f"models:/{name}/1", mlflow_server)

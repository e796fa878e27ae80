"""Concurrent promotions of one alias end as some serial order of them would, and none crashes: two processes
promote at once, ten times, against a SQLite registry (each process its own engine, as two CLI runs). The
same race once against a real `mlflow server`, and the lease's dead and live holders, are in
test_eval_decision.py (its server is already running there)."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import traceback

import mlflow
import pytest

from evaluation.promote import GatesConfig, promote

NAME = "mmdiff-promote-race"
pytestmark = pytest.mark.slow  # spawns two promoting processes
GATES = {"alias": "champion", "rank_by": "dino", "gates": [{"metric": "dino", "limit": 0.0, "margin": 0.0}]}
DINO = {"1": 0.5, "2": 0.6, "3": 0.7}  # champion v1; the races promote v2 and v3: every serial order ends on v3


def register_evaluated_versions(uri: str, name: str, root) -> None:
    """One registered version per DINO entry, each on a run carrying the figures evaluation.evaluate logs."""
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment(name, artifact_location=f"{root}/artifacts")
    client.create_registered_model(name)
    for version, dino in DINO.items():
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "eval.dino", dino)
        client.set_tag(run.info.run_id, "eval.benchmark_hash", "bench")
        client.set_terminated(run.info.run_id)
        assert str(client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version) == version


def reset(client, name: str) -> None:
    """Champion back to v1; every promotion.* tag of v2 and v3 is written again by each round."""
    client.set_registered_model_alias(name, "champion", "1")


def promoter(uri: str, name: str, version: str, rounds: int, start, answers) -> None:
    """A separate process promoting ``version`` once per round, all rounds started together by ``start``."""
    config = GatesConfig.model_validate(GATES)
    for _ in range(rounds):
        start.wait(timeout=120)
        try:
            outcome = promote(config, name, [version], uri)
            answers.put((version, outcome.promoted, outcome.champion_before))
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            answers.put((version, "crashed", traceback.format_exc()))


def race(uri: str, name: str, rounds: int, processes: bool = True) -> list[dict]:
    """``rounds`` times: champion back to v1, then one promoter promotes v2 and another v3 at the same moment:
    two processes (each its own SQL engine, as two CLI runs), or two threads when the store is a tracking
    server (every call a request of its own, as from two machines). Returns, per round, what each reported
    and the tags each version was left with."""
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    spawn = multiprocessing.get_context("spawn")
    start, answers = (spawn.Barrier(3), spawn.Queue()) if processes else (threading.Barrier(3), queue.Queue())
    worker_class = spawn.Process if processes else threading.Thread
    workers = [worker_class(target=promoter, args=(uri, name, v, rounds, start, answers)) for v in ("2", "3")]
    for worker in workers:
        worker.start()
    seen = []
    try:
        for _ in range(rounds):
            reset(client, name)
            start.wait(timeout=120)
            reported = dict((v, (promoted, before)) for v, promoted, before in (answers.get(timeout=120) for _ in range(2)))
            seen.append({"reported": reported, "alias": str(client.get_model_version_by_alias(name, "champion").version),
                         "tags": {v: client.get_model_version(name, v).tags for v in ("2", "3")},
                         "lease": client.get_registered_model(name).tags.get("promotion.lease.champion")})
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if processes and worker.is_alive():
                worker.kill()
    return seen


def assert_serial(rounds: list[dict]) -> None:
    """Each round ended as "v2 then v3" or "v3 then v2" would: v3 holds the alias, both decisions are tagged,
    each against the champion its process saw, and the two processes saw one another's result."""
    for index, seen in enumerate(rounds):
        assert not [r for r in seen["reported"].values() if r[0] == "crashed"], (index, seen["reported"])
        assert seen["alias"] == "3" and seen["lease"] is None, (index, seen)
        tags = seen["tags"]
        decisions = {v: (tags[v]["promotion.decision"], tags[v]["promotion.against"]) for v in ("2", "3")}
        # what each process reported: (version it promoted or None, champion it judged against)
        v2_first = {"2": ("promoted", "v1"), "3": ("promoted", "v2")}, {"2": ("2", "1"), "3": ("3", "2")}
        v3_first = {"2": ("refused", "v3"), "3": ("promoted", "v1")}, {"2": (None, "3"), "3": ("3", "1")}
        assert (decisions, seen["reported"]) in (v2_first, v3_first), (index, decisions, seen["reported"])
        assert tags["2"]["promotion.id"] != tags["3"]["promotion.id"]
        assert index == 0 or tags["2"]["promotion.id"] != rounds[index - 1]["tags"]["2"]["promotion.id"]


@pytest.fixture(scope="module")
def sqlite_registry(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    register_evaluated_versions(uri, NAME, root)
    return uri


@pytest.mark.extended
def test_concurrent_promotions_end_as_a_serial_order(sqlite_registry):
    assert_serial(race(sqlite_registry, NAME, rounds=10))

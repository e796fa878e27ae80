"""MLflow tracking on rank 0: params, tags, metrics, images and checkpoint artifacts of one run.

A resumed run continues the same MLflow run: its id is kept in ``<output_dir>/mlflow_run.json``, with the
last step whose metrics were logged, so steps redone after a kill are not logged twice.

The tracking server is not a single point of failure. A call that fails for want of the server (after
the MLflow client's own retries) moves the tracker offline: that call and every later one are appended
to a spool under ``<output_dir>/mlflow_spool/`` (operations as JSON lines, artifacts and images copied
beside them) and training goes on. While offline, the server's ``/health`` is probed every
``mlflow.retry_every_s`` seconds; when it answers, the spool is replayed in order (same steps, values
and timestamps) and the tracker is online again. Registration at the end is part of the spool, so a
run that ends offline registers when the spool is flushed, at the end of a later resume or by hand:

    python -m train.tracking --config configs/train/<name>.yaml [--set KEY=VALUE ...] [--wait-s S]

Images (sample generations, attention overlays, validation grids) go through ``log_image(key=, step=)``,
so the run page's image panel steps through each key's images; :func:`logged_images` lists them back.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m train.tracking`: parse (and answer --help) before the heavy imports below
    import sys

    import train.cli

    sys.exit(train.cli.tracking())

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import yaml
from PIL import Image

from train import cli
from train.checkpoint import write_atomic
from train.config import TrainConfig

__all__ = ["RunTracker", "TrackingUnavailable", "flatten", "git_commit", "logged_images", "server_reachable"]

log = logging.getLogger("train")


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer."""


def git_commit(repo: str | Path = ".") -> str:
    """HEAD of the source tree, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--", "."], check=False, capture_output=True).returncode
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"data.resolution": "512", ...} (MLflow params are flat strings)."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, (list, tuple)):
        return {prefix.rstrip("."): json.dumps(data)}
    return {prefix.rstrip("."): str(data)} if prefix else {}


def server_reachable(uri: str, timeout_s: float = 5.0) -> bool:
    """Whether a tracking server answers ``/health`` (a URI that is not http(s), a local store, always
    counts as reachable)."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def _unreachable(exc: BaseException) -> bool:
    """A failure for want of the server (connection refused or reset, timeouts, 5xx after the client's
    retries), as opposed to a request the server refused."""
    import requests

    from mlflow.exceptions import MlflowException

    text = str(exc)
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        return ("failed with exception" in text or "failed with timeout exception" in text
                or exc.error_code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") or "error code 5" in text)
    return False


class RunTracker:
    """The MLflow run of ``config.output_dir``. ``offline=True`` starts in spool mode without calling the
    server (the launcher found it down and ``mlflow.on_unreachable`` is ``spool``)."""

    def __init__(self, config: TrainConfig, offline: bool = False):
        self.config, self.uri = config, config.tracking_uri
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri)
        output = Path(config.output_dir)
        self.run_file, self.spool = output / "mlflow_run.json", output / "mlflow_spool"
        self.ops_file, self.sent_file = self.spool / "ops.jsonl", self.spool / "sent"
        self.offline, self._probed = offline or self.ops_file.is_file(), time.monotonic()
        if self.ops_file.is_file():  # a line a kill cut short was never acknowledged: drop it before appending
            data = self.ops_file.read_bytes()
            if data and not data.endswith(b"\n"):
                write_atomic(self.ops_file, data[: data.rfind(b"\n") + 1])
        record = json.loads(self.run_file.read_text()) if self.run_file.is_file() else {}
        self.run_id: str | None = record.get("run_id")
        spooled = [op["step"] for op in self._ops() if op["op"] == "metrics"]
        self.metrics_through = max([record.get("metrics_through", 0), *spooled])

    def start(self, data_manifest_hash: str, extra_tags: dict[str, str] | None = None,
              model_settings: dict[str, Any] | None = None, deepspeed: dict[str, Any] | None = None) -> RunTracker:
        """Create the run (tags, params, configs), or mark a resumed one RUNNING again. ``model_settings``
        is the resolved MM-Diff config, logged as ``mmdiff.*`` params beside the training config's own;
        ``deepspeed`` is the effective DeepSpeed JSON config."""
        if self.offline and not (server_reachable(self.uri) and self.flush()):
            log.warning("tracking server %s unreachable: tracking into %s until it answers", self.uri, self.spool)
        if self.run_id is not None or any(op["op"] == "create_run" for op in self._ops()):
            if self.run_id is not None and not self.offline:
                self.metrics_through = max(self.metrics_through, self._logged_through())
            self._do({"op": "status", "status": "RUNNING"})
            return self
        config = self.config
        tags = {
            "git_commit": git_commit(Path(__file__).resolve().parent.parent),
            "data.manifest_hash": data_manifest_hash,
            "base_model": config.model.base.source,
            "base_model.family": config.model.base.family,
            **(extra_tags or {}),
        }
        self._do({"op": "create_run", "experiment": config.mlflow.experiment, "run_name": config.run_name, "tags": tags})
        resolved = config.model_dump(mode="json")
        flat = {**flatten(resolved), **flatten(model_settings or {}, "mmdiff.")}
        self._do({"op": "params", "params": {k: v[:6000] for k, v in flat.items()}})
        self._do({"op": "text", "text": yaml.safe_dump(resolved, sort_keys=False), "artifact_file": "config/resolved.yaml"})
        if model_settings:
            self._do({"op": "text", "text": yaml.safe_dump(model_settings, sort_keys=False), "artifact_file": "config/mmdiff.yaml"})
        if deepspeed:
            self._do({"op": "dict", "data": deepspeed, "artifact_file": "config/deepspeed.json"})
        return self

    # -- the operations, each replayable from the spool -------------------------------------------------
    def _send(self, op: dict[str, Any]) -> None:
        kind, client = op["op"], self.client
        if kind == "create_run":
            if self.run_id is not None:  # created before a kill cut the spool's bookkeeping short
                return
            experiment = client.get_experiment_by_name(op["experiment"])
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(op["experiment"])
            self.run_id = client.create_run(experiment_id, run_name=op["run_name"], tags=op["tags"]).info.run_id
            self._record_run()
        elif kind == "params":
            params = [mlflow.entities.Param(k, v) for k, v in op["params"].items()]
            for i in range(0, len(params), 100):
                client.log_batch(self.run_id, params=params[i: i + 100])
        elif kind == "text":
            client.log_text(self.run_id, op["text"], op["artifact_file"])
        elif kind == "dict":
            client.log_dict(self.run_id, op["data"], op["artifact_file"])
        elif kind == "inputs":
            dataset = mlflow.entities.Dataset(name=op["name"], digest=op["digest"], source_type=op.get("source_type", "local"),
                                              source=op["source"], profile=op["profile"])
            context = mlflow.entities.InputTag(key=mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT, value="training")
            client.log_inputs(self.run_id, [mlflow.entities.DatasetInput(dataset, tags=[context])])
        elif kind == "metrics":
            client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, float(v), op["timestamp"], op["step"])
                                                   for k, v in op["values"].items()])
        elif kind == "artifacts":
            client.log_artifacts(self.run_id, op["local_dir"], op["artifact_path"])
        elif kind == "artifact":
            client.log_artifact(self.run_id, op["local_file"], op["artifact_path"] or None)
        elif kind == "image":
            with Image.open(op["local_file"]) as image:
                image.load()
                client.log_image(self.run_id, image, key=op["key"], step=op["step"], timestamp=op["timestamp"],
                                 synchronous=True)
        elif kind == "status":
            if op["status"] == "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            else:
                client.set_terminated(self.run_id, status=op["status"])
        elif kind == "register":
            from train.export import register_model

            version = register_model(self.config, op["adapter"], self.run_id, op["data_hash"])
            log.info("registered %s version %s", version.name, version.version)
        else:
            raise ValueError(f"{self.ops_file}: unknown operation {kind!r}")

    def _do(self, op: dict[str, Any]) -> None:
        """Send ``op``, or spool it (offline, or the server stopped answering during this call)."""
        if self.offline:
            self._append(op)
            self._retry()
            return
        try:
            self._send(op)
        except Exception as exc:
            if not _unreachable(exc):
                raise
            log.warning("tracking server %s unreachable (%s); training goes on, tracking into %s until it answers",
                        self.uri, exc, self.spool)
            self.offline = True
            self._probed = time.monotonic()
            self._append(op)

    def _append(self, op: dict[str, Any]) -> None:
        """Spool ``op``; the files it names are copied into the spool (a temporary image, or a checkpoint's
        adapter that retention may delete, would be gone by the time the server answers)."""
        self.spool.mkdir(parents=True, exist_ok=True)
        for key in ("local_file", "local_dir"):
            if key in op:
                source = Path(op[key])
                target = self.spool / "files" / str(time.time_ns()) / source.name
                target.parent.mkdir(parents=True)
                (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
                op = {**op, key: str(target)}
        line = json.dumps(op) + "\n"
        with self.ops_file.open("a") as ops:
            end = ops.tell()
            try:
                ops.write(line)
                ops.flush()
            except OSError:  # a full disk: no half line is left for the next operation to run into
                ops.truncate(end)
                raise

    def _ops(self) -> list[dict[str, Any]]:
        if not self.ops_file.is_file():
            return []
        ops = []
        for line in self.ops_file.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{self.ops_file}: not a spooled operation: {line[:80]!r}") from exc
        return ops

    def _retry(self) -> None:
        if time.monotonic() - self._probed >= self.config.mlflow.retry_every_s:
            self._probed = time.monotonic()
            if server_reachable(self.uri):
                self.flush()

    def flush(self) -> bool:
        """Replay the spool in order; True when it is empty (the tracker is then online again)."""
        ops = self._ops()
        sent = int(self.sent_file.read_text()) if self.sent_file.is_file() else 0
        for i in range(sent, len(ops)):
            try:
                self._send(ops[i])
            except Exception as exc:
                if not _unreachable(exc):
                    raise
                log.warning("tracking server %s still unreachable (%s): %d operations wait in %s",
                            self.uri, exc, len(ops) - i, self.spool)
                self.offline = True
                return False
            write_atomic(self.sent_file, str(i + 1).encode())
        if ops:
            log.info("tracking: %d spooled operations sent to %s", len(ops) - sent, self.uri)
        shutil.rmtree(self.spool, ignore_errors=True)
        self.offline = False
        return True

    def _record_run(self) -> None:
        write_atomic(self.run_file, json.dumps({"run_id": self.run_id, "tracking_uri": self.uri,
                                                "metrics_through": self.metrics_through}).encode())

    def _logged_through(self) -> int:
        """The last step with metrics on the server (0 when unreachable: the local record then decides)."""
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, "loss")), default=0)
        except Exception as exc:
            if not _unreachable(exc):
                raise
            return 0

    # -- what training logs ----------------------------------------------------------------------------
    def dataset(self, folder: str | Path, digest: str, profile: dict[str, Any]) -> None:
        """The shards as the run's training input (MLflow dataset tracking): digest = manifest hash."""
        url = str(folder)
        if "://" in url and not url.startswith("file://"):  # object storage: the URL as given
            name, source_type = url.rstrip("/").rpartition("/")[2], url.partition("://")[0]
        else:
            path = Path(url.removeprefix("file://")).resolve()
            name, source_type, url = path.name, "local", path.as_uri()
        self._do({"op": "inputs", "name": name, "digest": digest, "source": json.dumps({"uri": url}),
                  "source_type": source_type, "profile": json.dumps(profile, sort_keys=True)})

    def metrics(self, values: dict[str, float], step: int) -> None:
        """One step's metrics, once: a step already logged (before a kill, then redone) is not logged again."""
        if step <= self.metrics_through:
            return
        self._do({"op": "metrics", "step": step, "timestamp": mlflow.utils.time.get_current_time_millis(),
                  "values": {k: float(v) for k, v in values.items()}})
        self.metrics_through = step
        if self.run_id is not None:
            self._record_run()

    def image(self, image: Image.Image, key: str, step: int) -> None:
        """``image`` as step ``step`` of the image series ``key`` (MLflow's ``log_image(key=, step=)``); the
        timestamp is taken now, so a spooled image keeps it when it is sent later."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "image.png"
            image.save(path)
            self._do({"op": "image", "local_file": str(path), "key": key, "step": int(step),
                      "timestamp": mlflow.utils.time.get_current_time_millis()})

    def directory(self, local_dir: str | Path, artifact_path: str) -> None:
        self._do({"op": "artifacts", "local_dir": str(local_dir), "artifact_path": artifact_path})

    def register(self, adapter: str | Path, data_manifest_hash: str) -> None:
        """Register the exported adapter (train/export.py): now, or when the spool is flushed."""
        self._do({"op": "register", "adapter": str(adapter), "data_hash": data_manifest_hash})

    def finish(self, status: str = "FINISHED", wait_s: float = 0.0) -> bool:
        """End the run with ``status``; offline, wait up to ``wait_s`` for the server to flush the spool.
        True when everything reached the server; False leaves the spool and says how to send it later."""
        self._do({"op": "status", "status": status})
        deadline = time.monotonic() + wait_s
        while self.offline:
            if server_reachable(self.uri) and self.flush():
                break
            if time.monotonic() >= deadline:
                log.error("tracking server %s unreachable: the run's tracking (and registration) waits in %s; "
                          "send it with: python -m train.tracking --config <this run's config> --set output_dir=%s",
                          self.uri, self.spool, self.config.output_dir)
                return False
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        return True


# MLflow's file name for an image logged with a key: images/<key, "/" as "~">+step+<step>+timestamp+<ms>+<uuid>.png
# (older clients wrote "%" for "+"), beside a "+compressed.webp" thumbnail.
_IMAGE_FILE = re.compile(r"(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%](?P<timestamp>\d+)[+%][0-9a-f-]+\.png")


def logged_images(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, str]]:
    """(step, artifact path) of every full-size image logged under ``key`` in ``run_id``, by step (and time)."""
    found = []
    for artifact in client.list_artifacts(run_id, "images"):
        match = _IMAGE_FILE.fullmatch(Path(artifact.path).name)
        if match and match["key"].replace("~", "/") == key:
            found.append((int(match["step"]), int(match["timestamp"]), artifact.path))
    return [(step, path) for step, _, path in sorted(found)]


def run(args: argparse.Namespace) -> int:
    """Send a run's spooled tracking (and its pending registration) to the tracking server."""
    from mmdiff.configuration import parse_overrides
    from train.config import load_train_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_train_config(args.config, parse_overrides(args.set), check_data=False)
    tracker = RunTracker(config, offline=True)
    if not tracker.ops_file.is_file():
        print(f"{tracker.spool}: nothing to send")
        return 0
    deadline = time.monotonic() + args.wait_s
    while not (server_reachable(tracker.uri) and tracker.flush()):
        if time.monotonic() >= deadline:
            print(f"tracking server {tracker.uri} unreachable; {tracker.spool} kept", file=sys.stderr)
            return 1
        time.sleep(5)
    print(f"sent {tracker.spool} to {tracker.uri} (run {tracker.run_id})")
    return 0


main = cli.tracking  # the command itself (parsed in train/cli.py)

"""MLflow tracking on rank 0: params, tags, metrics, images and checkpoint artifacts of one run.

A resumed run continues the same MLflow run: its id is kept in ``<output_dir>/mlflow_run.json``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import yaml
from PIL import Image

from train.config import TrainConfig

__all__ = ["RunTracker", "flatten", "git_commit"]


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


class RunTracker:
    """``model_settings`` is the resolved MM-Diff config (configs/mmdiff/*.yaml), logged as ``mmdiff.*``
    params beside the training config's own; ``deepspeed`` is the effective DeepSpeed JSON config."""

    def __init__(self, config: TrainConfig, data_manifest_hash: str, extra_tags: dict[str, str] | None = None,
                 model_settings: dict[str, Any] | None = None, deepspeed: dict[str, Any] | None = None):
        self.config = config
        mlflow.set_tracking_uri(config.tracking_uri)
        self.client = mlflow.MlflowClient(config.tracking_uri)
        experiment = self.client.get_experiment_by_name(config.mlflow.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.mlflow.experiment)
        self.run_file = Path(config.output_dir) / "mlflow_run.json"
        if self.run_file.is_file():
            self.run_id = json.loads(self.run_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {
            "git_commit": git_commit(Path(__file__).resolve().parent.parent),
            "data.manifest_hash": data_manifest_hash,
            "base_model": config.model.base.source,
            "base_model.family": config.model.base.family,
            **(extra_tags or {}),
        }
        run = self.client.create_run(experiment_id, run_name=config.run_name, tags=tags)
        self.run_id = run.info.run_id
        self.run_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": config.tracking_uri}))
        resolved = config.model_dump(mode="json")
        flat = {**flatten(resolved), **flatten(model_settings or {}, "mmdiff.")}
        params = [mlflow.entities.Param(k, v[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i: i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(resolved, sort_keys=False), "config/resolved.yaml")
        if model_settings:
            self.client.log_text(self.run_id, yaml.safe_dump(model_settings, sort_keys=False), "config/mmdiff.yaml")
        if deepspeed:
            self.client.log_dict(self.run_id, deepspeed, "config/deepspeed.json")

    def dataset(self, folder: str | Path, digest: str, profile: dict[str, Any]) -> None:
        """The shards as the run's training input (MLflow dataset tracking): digest = manifest hash."""
        url = str(folder)
        if "://" in url and not url.startswith("file://"):  # object storage: the URL as given
            name, source_type = url.rstrip("/").rpartition("/")[2], url.partition("://")[0]
        else:
            path = Path(url.removeprefix("file://")).resolve()
            name, source_type, url = path.name, "local", path.as_uri()
        dataset = mlflow.entities.Dataset(name=name, digest=digest, source_type=source_type,
                                          source=json.dumps({"uri": url}),
                                          profile=json.dumps(profile, sort_keys=True))
        context = mlflow.entities.InputTag(key=mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT, value="training")
        self.client.log_inputs(self.run_id, [mlflow.entities.DatasetInput(dataset, tags=[context])])

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = mlflow.utils.time.get_current_time_millis()
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, image: Image.Image, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file)

    def directory(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

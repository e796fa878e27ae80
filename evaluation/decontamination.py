"""Was the model's training set decontaminated against the benchmark it is scored on?

The preprocessing job records its decontamination check in ``manifest.json`` (``decontamination``: each
benchmark folder with the sha256 of every reference image it held). The training run logs the shards
folder as its MLflow dataset input. Evaluation follows model -> training run -> dataset input ->
manifest, and compares the benchmark's reference photos (by sha256 of their bytes, so a copy of the
benchmark elsewhere counts) with the ones the check covered. A model whose training data was not checked
against every reference it is scored on gets a loud warning, or, with ``require_decontaminated``, is
refused.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DecontaminationStatus", "NotDecontaminated", "benchmark_files", "check_manifest", "training_manifest",
           "check_training_data"]


class NotDecontaminated(RuntimeError):
    """The model's training data was not checked against this benchmark (``require_decontaminated``)."""


@dataclass(frozen=True)
class DecontaminationStatus:
    status: str  # "checked" | "not_checked" | "unknown"
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "checked"


def benchmark_files(cases: list[Any]) -> list[str]:
    """Every photo an evaluation shows the model or scores against (conditions, references, ceiling images)."""
    return sorted({f for c in cases for refs in c.references for f in refs} | {f for c in cases for f in c.condition}
                  | {c.image for c in cases if c.image})


def check_manifest(manifest: dict[str, Any] | None, references: list[str], where: str) -> DecontaminationStatus:
    """Whether ``manifest`` (a preprocessing manifest, or None when none was found) records a
    decontamination check covering every file of ``references`` (by content)."""
    if manifest is None:
        return DecontaminationStatus("unknown", f"no training manifest found ({where}): cannot tell whether the "
                                                "training data overlaps the benchmark")
    record = manifest.get("decontamination")
    if not record:
        return DecontaminationStatus("not_checked", f"the training data ({where}) was not decontaminated: its "
                                                    "manifest records no decontamination check")
    covered = {r["sha256"] for bench in record.get("benchmarks", []) for r in bench.get("references", [])}
    missing = [path for path in references if hashlib.sha256(Path(path).read_bytes()).hexdigest() not in covered]
    if missing:
        return DecontaminationStatus("not_checked", f"the training data ({where}) was decontaminated against other "
                                                    f"benchmarks: {len(missing)} of {len(references)} reference photos "
                                                    f"scored here were not checked (e.g. {missing[0]})")
    return DecontaminationStatus("checked", f"the training data ({where}) was decontaminated against all "
                                            f"{len(references)} reference photos ({record.get('overlaps', 0)} "
                                            "overlapping inputs rejected)")


def training_manifest(run_id: str | None, tracking_uri: str | None) -> tuple[dict[str, Any] | None, str]:
    """The manifest of the training run's dataset input (MLflow, context ``training``), and where it was."""
    if run_id is None:
        return None, "the model is a folder, not a training run"
    import mlflow

    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        tags = {t.key: t.value for t in dataset_input.tags}
        if tags.get(mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT) != "training":
            continue
        try:  # RunTracker.dataset logs {"uri": "file:///..."}; another logger may log the URI itself
            uri = json.loads(dataset_input.dataset.source).get("uri", "")
        except (ValueError, AttributeError):
            uri = dataset_input.dataset.source
        folder = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
        manifest = folder / "manifest.json"
        if manifest.is_file():
            return json.loads(manifest.read_text()), str(manifest)
        return None, f"run {run_id}'s dataset {uri} has no manifest.json here"
    return None, f"run {run_id} logged no training dataset"


def check_training_data(run_id: str | None, tracking_uri: str | None, references: list[str],
                        required: bool) -> DecontaminationStatus:
    """The check for one evaluation: a warning on stderr when not ``checked``; raises
    :class:`NotDecontaminated` instead when ``required``."""
    manifest, where = training_manifest(run_id, tracking_uri)
    status = check_manifest(manifest, references, where)
    if not status.ok:
        if required:
            raise NotDecontaminated(f"evaluation refused: {status.message} (evaluation.require_decontaminated)")
        banner = "!" * 100
        print(f"{banner}\nWARNING: {status.message}.\nScores on this benchmark may be inflated by training on its "
              f"subjects; decontaminate with the preprocessing job's decontamination.benchmarks.\n{banner}",
              file=sys.stderr, flush=True)
    return status

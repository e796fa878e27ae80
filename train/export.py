"""Export: the trainable weights as the safetensors adapter, logged and registered as a pyfunc model.

The registered model is self-contained: it ships the code it imports (``mmdiff`` and preprocessing's image
check) as ``code_paths``, pins its pip requirements from ``requirements/runtime.lock``, declares an input/output
signature, and stores the base model spec as an artifact. It loads in any process with those packages.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch.distributed as dist

from mmdiff.integrity import write_manifest
from mmdiff.provenance import source_commit
from train.config import TrainConfig
from train.registry import registry_client

__all__ = ["save_adapter", "register_model", "inference_requirements", "locked_versions", "model_signature"]

PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")
REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "runtime.lock"
# what train/pyfunc_model.py and the code it ships import at inference time (distribution names)
INFERENCE_PACKAGES = ("mlflow", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors",
                      "numpy", "pillow", "pandas", "pydantic", "PyYAML")
# shipped code: whole packages, or single modules of a package (kept at their import path)
CODE = ("mmdiff", "preprocess/image_io.py")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a lock file (requirements/*.lock: ``name==version`` entries, each
    followed by its ``--hash`` lines and ``# via`` comments)."""
    pins = {}
    for number, line in enumerate(Path(lock).read_text().splitlines(), 1):
        if not line.strip() or line[0].isspace() or line.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if match is None:
            raise ValueError(f"{lock}:{number}: not a pinned `name==version` entry: {line.strip()[:80]!r}")
        pins[_canonical(match[1])] = match[3]
    return pins


def inference_requirements(lock: Path = LOCK) -> list[str]:
    """``name==version`` for each inference package, from the lock (or, without one, as installed)."""
    if lock.is_file():
        pins = locked_versions(lock)
    else:  # an installed wheel: the environment was built from the lock
        pins = {_canonical(n): importlib.metadata.version(n) for n in INFERENCE_PACKAGES}
    missing = [n for n in INFERENCE_PACKAGES if _canonical(n) not in pins]
    if missing:
        raise ValueError(f"{lock}: no pin for inference package(s) {missing}")
    return [f"{name}=={pins[_canonical(name)]}" for name in INFERENCE_PACKAGES]


def model_signature() -> Any:
    """The pyfunc signature: one column per GenerateRequest field (optional where it has a default)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    from train.pyfunc_model import GenerateRequest

    kinds = {str: "string", int: "long", float: "double", list[str]: Array("string")}
    columns = []
    for name, field in GenerateRequest.model_fields.items():
        kind = next(v for k, v in kinds.items() if field.annotation == k or field.annotation == k | None)
        columns.append(ColSpec(kind, name, required=field.is_required()))
    return ModelSignature(inputs=Schema(columns), outputs=Schema([ColSpec("string", "image")]))


def _stage_code(root: Path) -> list[str]:
    """Copy CODE under ``root`` keeping import paths (no caches); returns the top-level folders."""
    for entry in CODE:
        source, target = REPO / entry, root / entry
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return sorted({str(root / Path(entry).parts[0]) for entry in CODE})


def save_adapter(engine: Any, out_dir: str | Path) -> Path | None:
    """Write the adapter from a DeepSpeed engine (all ranks call this; rank 0 writes). ZeRO-3 gathers first."""
    import deepspeed

    model = engine.module.model
    gather = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        gather = deepspeed.zero.GatheredParameters(list(model.trainable_parameters()), modifier_rank=None)
    out_dir = Path(out_dir)
    with gather:
        if not dist.is_initialized() or dist.get_rank() == 0:
            model.save_pretrained(out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if (not dist.is_initialized() or dist.get_rank() == 0) else None


def register_model(config: TrainConfig, adapter_dir: str | Path, run_id: str, data_manifest_hash: str) -> Any:
    """Log the adapter as a pyfunc model in ``run_id`` (``config.tracking_uri``) and register it in
    ``config.registry_uri`` (the tracking store's registry unless the config names another; never the
    process's or the environment's registry: train/registry.py); returns the ModelVersion."""
    from mlflow.exceptions import MlflowException

    name = config.mlflow.registered_model
    if not name:
        raise ValueError("mlflow.registered_model is not set")
    mlflow.set_tracking_uri(config.tracking_uri)  # the fluent start_run / log_model log through it
    with tempfile.TemporaryDirectory() as tmp:
        base_spec = Path(tmp) / "base_model.json"
        # which base; the device and dtype training loaded it in are not the inference rule (model_config)
        base_spec.write_text(config.model.base.model_dump_json(exclude={"device", "dtype"}))
        checksums = write_manifest(tmp, [base_spec.name])  # the adapter carries its own; both checked at load
        with mlflow.start_run(run_id=run_id):
            # registered below through an explicit client: log_model's registered_model_name would register
            # wherever the process's registry URI points
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_MODEL),
                artifacts={"adapter": str(adapter_dir), "base_model": str(base_spec), "checksums": str(checksums)},
                code_paths=_stage_code(Path(tmp) / "code"), signature=model_signature(),
                # the inference placement rule (mmdiff.placement) and the keys load_model(model_config=...)
                # may override (pyfunc_model.py)
                model_config={"device": "auto", "dtype": "auto", "reserved_gpus": 0, "limits": {}},
                pip_requirements=inference_requirements(),
            )
    client = registry_client(config.tracking_uri, config.registry_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {"run_id": run_id, "data.manifest_hash": data_manifest_hash, "mmdiff_commit": source_commit(),
            "base_model": config.model.base.source, "base_model.spec": json.dumps(config.model.base.model_dump(mode="json", exclude={"device", "dtype"}))}
    # the files' own location, not models:/<model_id>: a registry store resolves that through the process's
    # tracking URI, and a registry apart from the tracking store does not hold the logged model at all
    source = client.get_logged_model(info.model_id).artifact_location
    same_store = config.registry_uri == config.tracking_uri
    version = client.create_model_version(name, source, run_id=run_id, tags=tags,
                                          model_id=info.model_id if same_store else None)
    return client.get_model_version(name, version.version)

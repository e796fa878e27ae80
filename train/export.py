"""Export: the trainable weights as the safetensors adapter, logged and registered as a pyfunc model."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch.distributed as dist

from train.config import TrainConfig

__all__ = ["save_adapter", "register_model"]

PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")


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
    """Log the adapter as a pyfunc model in ``run_id`` and register it; returns the ModelVersion."""
    name = config.mlflow.registered_model
    if not name:
        raise ValueError("mlflow.registered_model is not set")
    mlflow.set_tracking_uri(config.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        base_spec = Path(tmp) / "base_model.json"
        base_spec.write_text(config.model.base.model_dump_json())
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_MODEL),
                artifacts={"adapter": str(adapter_dir), "base_model": str(base_spec)},
                # the serving environment is this repository's; no requirement inference (slow, offline)
                pip_requirements=[], registered_model_name=name,
            )
    client = mlflow.MlflowClient(config.tracking_uri)
    version = client.get_model_version(name, info.registered_model_version)
    tags = {"run_id": run_id, "data.manifest_hash": data_manifest_hash,
            "base_model": config.model.base.source, "base_model.spec": json.dumps(config.model.base.model_dump(mode="json"))}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return client.get_model_version(name, version.version)

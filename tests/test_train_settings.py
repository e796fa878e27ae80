"""Training settings without launching: DeepSpeed passthrough, LR schedules, checkpoint retention,
the MLflow tracking URI's precedence."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

from mmdiff.configuration import ConfigError, load_config
from train.config import TrainConfig
from train.deepspeed_config import deepspeed_config
from train.checkpoint import kept_checkpoints
from train.engine import lr_scheduler

CONFIG = "configs/train/tiny_test.yaml"


def tiny(**overrides) -> TrainConfig:
    return load_config(CONFIG, TrainConfig, overrides)


def test_deepspeed_passthrough_is_merged_over_the_generated_config():
    config = tiny(**{"deepspeed.config": {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 1000},
                                          "wall_clock_breakdown": True}})
    ds = deepspeed_config(config, "cpu")
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert ds["wall_clock_breakdown"] is True and ds["train_micro_batch_size_per_gpu"] == 2
    assert config.deepspeed.config["zero_optimization"] == {"overlap_comm": True, "reduce_bucket_size": 1000}


@pytest.mark.parametrize(("raw", "message"), [
    ({"zero_optimization": {"stage": 3}}, "deepspeed.config.zero_optimization.stage: set deepspeed.zero_stage"),
    ({"train_micro_batch_size_per_gpu": 4}, "set data.micro_batch_size"),
    ({"bf16": {"enabled": True}}, "set deepspeed.precision"),
    ({"optimizer": {"type": "Adam"}}, "deepspeed.config.optimizer"),
    ({"zero_optimization": {"overlap_comms": True}}, "overlap_comms"),  # DeepSpeed's own schema
    ({"zero_optimisation": {"overlap_comm": True}}, "does not read the top-level key(s) ['zero_optimisation']"),
    ({"zero_optimization": {"reduce_bucket_size": "big"}}, "reduce_bucket_size"),
], ids=["stage", "micro_batch", "precision", "optimizer", "nested_typo", "top_level_typo", "wrong_type"])
def test_deepspeed_passthrough_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as error:
        tiny(**{"deepspeed.config": raw})
    assert message in str(error.value) and CONFIG in str(error.value)


def test_warmup_then_cosine_and_constant_schedules():
    def rates(schedule: str, steps: int = 10, warmup: int = 4) -> list[float]:
        config = tiny(**{"optim.lr": 0.1, "optim.lr_warmup_steps": warmup, "optim.lr_schedule": schedule,
                         "schedule.max_steps": steps})
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
        scheduler = lr_scheduler(optimizer, config)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])  # the rate of this step
            optimizer.step()
            scheduler.step()
        return out

    assert rates("constant") == pytest.approx([0.0, 0.025, 0.05, 0.075] + [0.1] * 6)
    cosine = rates("cosine")
    assert cosine[:4] == pytest.approx([0.0, 0.025, 0.05, 0.075])
    assert cosine[4:] == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
    assert rates("constant", warmup=0) == pytest.approx([0.1] * 10)
    with pytest.raises(ConfigError, match="lr_warmup_steps=20 exceeds schedule.max_steps=6"):
        tiny(**{"optim.lr_warmup_steps": 20})


def test_retention_keeps_the_newest_and_the_best():
    scores = {2: 0.9, 4: 0.3, 6: 0.5, 8: 0.7, 10: 0.6}
    assert kept_checkpoints(scores, 2, "min") == {8, 10, 4}
    assert kept_checkpoints(scores, 2, "max") == {8, 10, 2}
    assert kept_checkpoints(scores, 3, None) == {6, 8, 10}
    assert kept_checkpoints({2: 0.5, 4: 0.5, 6: 0.9}, 1, "min") == {2, 6}  # a tie keeps the earlier one
    with pytest.raises(ConfigError, match="keep_best_by needs schedule.keep_last"):
        tiny(**{"schedule.keep_last": 0})


def test_tracking_uri_from_config_else_environment_else_local(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tiny(**{"mlflow.tracking_uri": "http://127.0.0.1:5000"}).tracking_uri == "http://127.0.0.1:5000"
    assert tiny().tracking_uri == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tiny(output_dir=str(tmp_path)).tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"

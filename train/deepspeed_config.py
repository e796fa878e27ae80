"""The DeepSpeed JSON config: generated from the training config, plus a raw passthrough dict.

``deepspeed.config`` in a training config holds any DeepSpeed keys we do not generate (communication
overlap, bucket sizes, ZeRO-3 prefetch, monitors ...). It is merged over the generated config, key by
key, and the result is validated by DeepSpeed's own parser before any process starts. Keys the training
config already owns are refused, so there is one place for each setting, and so is any top-level key
DeepSpeed's parser never reads (a typo there would otherwise be ignored silently).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from train.config import TrainConfig

__all__ = ["OWNED_KEYS", "check_passthrough", "deepspeed_config", "merge"]

# dotted DeepSpeed key -> the training-config key that sets it
OWNED_KEYS = {
    "train_batch_size": "data.micro_batch_size x ranks x optim.gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "optim.gradient_accumulation_steps",
    "gradient_clipping": "optim.max_grad_norm",
    "optimizer": "optim (a torch AdamW on the trainable parameters is passed)",
    "scheduler": "optim.lr_warmup_steps / optim.lr_schedule",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, recursing into mappings present in both; neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dotted(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted(value, f"{prefix}{key}.")
    return keys


class _ReadKeys(dict):
    """A dict that records which keys were looked up (DeepSpeedConfig reads its top level with get/in/[])."""

    def __init__(self, data: dict[str, Any]):
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def __copy__(self):  # DeepSpeedConfig parses a shallow copy; keep recording on this one
        return self


def _validate(full: dict[str, Any]) -> None:
    """DeepSpeed's own parser on the merged config (nested sections reject unknown keys there)."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    seen = _ReadKeys(full)
    try:
        DeepSpeedConfig(seen)
    except (ValueError, TypeError, AssertionError, DeepSpeedConfigError) as exc:  # pydantic errors are ValueErrors
        raise ValueError(f"deepspeed.config: DeepSpeed rejects the merged config: {exc}") from None
    unread = sorted(set(full) - seen.read)
    if unread:
        raise ValueError(f"deepspeed.config: DeepSpeed does not read the top-level key(s) {unread}")


def check_passthrough(raw: dict[str, Any]) -> None:
    """Refuse owned keys, then validate ``raw`` merged over a minimal generated config."""
    if not raw:
        return
    for key in _dotted(raw):
        if key in OWNED_KEYS:
            raise ValueError(f"deepspeed.config.{key}: set {OWNED_KEYS[key]} instead")
    _validate(merge(_generated(micro_batch=1, accumulation=1, clipping=1.0, zero_stage=2, offload=False,
                               precision="fp32"), raw))


def _generated(micro_batch: int, accumulation: int, clipping: float, zero_stage: int, offload: bool,
               precision: str) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clipping,
        "zero_optimization": zero,
        # we pass a torch AdamW; DeepSpeed's own would JIT-build fused_adam (see STACK.md)
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,
    }


def deepspeed_config(config: TrainConfig, accelerator: str) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run: fp32 on CPU, bf16/fp16 on GPUs, then ``deepspeed.config``."""
    import torch

    precision = config.deepspeed.precision
    if accelerator == "cpu":
        if precision not in ("auto", "fp32"):
            raise ValueError(f"deepspeed.precision={precision} needs a GPU; use fp32 or auto on CPU")
        precision = "fp32"
    elif precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    generated = _generated(config.data.micro_batch_size, config.optim.gradient_accumulation_steps,
                           config.optim.max_grad_norm, config.deepspeed.zero_stage,
                           config.deepspeed.offload_optimizer, precision)
    return merge(generated, config.deepspeed.config)

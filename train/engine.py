"""The DeepSpeed training loop: ZeRO 0-3, accumulation, non-finite steps, checkpoints and resume.

A "step" is one optimizer step. Every micro-batch seeds torch's RNG from (run seed, micro-batch number,
rank) before the loss, so noise and timesteps do not depend on where a run was interrupted; together with
the resumable data stream (train/data.py) a resumed run reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from train.config import TrainConfig
from train.data import ReaderPosition

__all__ = [
    "NonFiniteLossError", "TrainingObjective", "TrainerState", "deepspeed_config", "step_seed",
    "Trainer", "latest_checkpoint",
]

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging."""


class TrainingObjective(nn.Module):
    """What DeepSpeed wraps: forward(batch) is the model's training loss, so ZeRO-3 hooks see the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.training_loss(batch)


def deepspeed_config(config: TrainConfig, accelerator: str) -> dict[str, Any]:
    """The DeepSpeed JSON config from the training config; fp32 on CPU, bf16/fp16 on GPUs."""
    precision = config.deepspeed.precision
    if accelerator == "cpu":
        if precision not in ("auto", "fp32"):
            raise ValueError(f"deepspeed.precision={precision} needs a GPU; use fp32 or auto on CPU")
        precision = "fp32"
    elif precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    zero: dict[str, Any] = {"stage": config.deepspeed.zero_stage}
    if config.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": config.data.micro_batch_size,
        "gradient_accumulation_steps": config.optim.gradient_accumulation_steps,
        "gradient_clipping": config.optim.max_grad_norm,
        "zero_optimization": zero,
        # we pass a torch AdamW; DeepSpeed's own would JIT-build fused_adam (see STACK.md)
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 2**31 - 1,
    }


def step_seed(seed: int, micro_batch: int, rank: int) -> int:
    return (seed * 1_000_003 + micro_batch * 9_176 + rank) % (2**63 - 1)


@dataclass
class TrainerState:
    """What a rank needs, beyond DeepSpeed's checkpoint, to continue exactly; saved as JSON per rank."""

    step: int = 0
    micro_batches: int = 0  # consumed, including skipped non-finite ones
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    rejected_total: int = 0
    positions: dict[int, ReaderPosition] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {**self.__dict__, "positions": {str(k): v.__dict__ for k, v in self.positions.items()}}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        data["positions"] = {int(k): ReaderPosition(**v) for k, v in data["positions"].items()}
        return cls(**data)


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file names, or None for a fresh run."""
    latest = checkpoint_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


class Trainer:
    """Runs the loop on one rank. ``tracker`` is rank 0's MLflow run (None elsewhere)."""

    def __init__(self, config: TrainConfig, engine: Any, state: TrainerState, tracker: Any = None,
                 on_checkpoint: Callable[[int], None] | None = None, on_sample: Callable[[int, dict, torch.Tensor | None], None] | None = None):
        self.config, self.engine, self.state, self.tracker = config, engine, state, tracker
        self.on_checkpoint, self.on_sample = on_checkpoint, on_sample
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.checkpoint_dir = Path(config.output_dir) / "checkpoints"
        self.history_path = Path(config.output_dir) / "losses.jsonl"
        self._window: list[dict[str, float]] = []
        self.boundary = False
        self.last_attention_maps: torch.Tensor | None = None

    # -- one micro-batch -----------------------------------------------------------------------
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dtype = next(p.dtype for p in self.engine.module.parameters() if p.is_floating_point())
        out = {}
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):  # captions, keys and reader bookkeeping stay here
                value = value.to(self.engine.device)
                out[name] = value.to(dtype) if value.is_floating_point() else value
        return out

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())])
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips together
        return bool(finite.item())

    def micro_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """Forward, and backward + step unless the loss is non-finite on any rank (then None)."""
        self._observe(batch)
        torch.manual_seed(step_seed(self.config.seed, self.state.micro_batches, self.rank))
        self.state.micro_batches += 1
        losses = self.engine(self._to_device(batch))
        if not self._all_finite(losses["loss"]):
            self.state.nonfinite_total += 1
            self.state.nonfinite_in_row += 1
            log.warning("rank %d: non-finite loss at micro-batch %d (%d in a row), step skipped",
                        self.rank, self.state.micro_batches, self.state.nonfinite_in_row)
            if self.state.nonfinite_in_row >= self.config.schedule.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"{self.state.nonfinite_in_row} non-finite losses in a row at step {self.state.step} "
                    f"(schedule.max_nonfinite_in_row={self.config.schedule.max_nonfinite_in_row})")
            return None
        self.state.nonfinite_in_row = 0
        self.last_attention_maps = losses.get("attention_maps")
        self.engine.backward(losses["loss"])
        self.boundary = self.engine.is_gradient_accumulation_boundary()  # asked before step() advances it
        self.engine.step()
        return {k: float(v.detach().float().mean()) for k, v in losses.items()
                if isinstance(v, torch.Tensor) and v.numel() == 1}

    def _observe(self, batch: dict[str, Any]) -> None:
        reader = batch["reader"]
        self.state.positions[reader["worker"]] = ReaderPosition(reader["epoch"], reader["offset"])
        for rejected in batch["rejected"]:
            self.state.rejected_total += 1
            log.warning("rank %d: skipped %s %s: %s", self.rank, rejected["source"], rejected["key"], rejected["reason"])

    # -- the loop ------------------------------------------------------------------------------
    def run(self, batches: Iterator[dict[str, Any]]) -> TrainerState:
        schedule = self.config.schedule
        started = time.perf_counter()
        while self.state.step < schedule.max_steps:
            batch = next(batches)
            metrics = self.micro_step(batch)
            if metrics is not None:
                self._window.append(metrics)
            if metrics is None or not self.boundary:
                continue
            self.state.step += 1
            step = self.state.step
            self._record(step, started)
            started = time.perf_counter()
            if self.on_sample and (step == schedule.max_steps or (schedule.sample_every and step % schedule.sample_every == 0)):
                self.on_sample(step, batch, self.last_attention_maps)
            if step == schedule.max_steps or (schedule.checkpoint_every and step % schedule.checkpoint_every == 0):
                self.save_checkpoint()
        return self.state

    def _record(self, step: int, started: float) -> None:
        names = sorted(self._window[0])
        # per-rank means over the step's micro-batches, then averaged over ranks; counters summed
        values = torch.tensor([sum(m[k] for m in self._window) / len(self._window) for k in names]
                              + [float(self.state.rejected_total), float(self.state.nonfinite_total)], dtype=torch.float64)
        self._window = []
        if dist.is_initialized():
            dist.all_reduce(values)
            values[: len(names)] /= dist.get_world_size()
        if self.rank != 0:
            return
        mean = dict(zip(names, values[: len(names)].tolist()))
        row = {"step": step, **mean, "rejected_samples": values[-2].item(), "nonfinite_steps": values[-1].item(),
               "lr": self.engine.get_lr()[0], "step_time_s": time.perf_counter() - started}
        with self.history_path.open("a") as history:
            history.write(json.dumps(row) + "\n")
        every = self.config.schedule.log_every
        if step % every == 0 or step == self.config.schedule.max_steps:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
            if self.tracker is not None:
                self.tracker.metrics({k: v for k, v in row.items() if k != "step"}, step)

    def save_checkpoint(self) -> None:
        tag = f"step-{self.state.step}"
        # the frozen base (UNet, VAE, text encoders) is rebuilt from its spec, not stored per checkpoint
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, exclude_frozen_parameters=True)
        (self.checkpoint_dir / tag / f"trainer_state_rank{self.rank}.json").write_text(self.state.to_json())
        if dist.is_initialized():
            dist.barrier()
        if self.on_checkpoint:
            self.on_checkpoint(self.state.step)

    def load_checkpoint(self) -> bool:
        """Restore the latest checkpoint (weights, optimizer, this rank's data position); False if none."""
        tag = latest_checkpoint(self.checkpoint_dir)
        if tag is None:
            return False
        state_file = self.checkpoint_dir / tag / f"trainer_state_rank{self.rank}.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file}: missing; was the checkpoint written with another number of ranks?")
        path, _ = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"{self.checkpoint_dir / tag}: DeepSpeed could not load the checkpoint")
        self.state = TrainerState.from_json(state_file.read_text())
        self.state.nonfinite_in_row = 0
        # steps after the checkpoint are redone; drop their rows from the loss history
        if self.rank == 0 and self.history_path.is_file():
            rows = [r for r in self.history_path.read_text().splitlines() if json.loads(r)["step"] <= self.state.step]
            self.history_path.write_text("".join(r + "\n" for r in rows))
        return True

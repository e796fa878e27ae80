"""The DeepSpeed training loop: ZeRO 0-3, accumulation, non-finite steps, checkpoints and resume.

A "step" is one optimizer step. Every micro-batch seeds torch's RNG from (run seed, micro-batch number,
rank) before the loss, so noise and timesteps do not depend on where a run was interrupted; together with
the resumable data stream (train/data.py) a resumed run reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.checkpoint import Checkpoints, kept_checkpoints, write_atomic
from train.config import TrainConfig
from train.data import ReaderPosition

__all__ = [
    "NonFiniteLossError",
    "Trainer",
    "TrainerState",
    "TrainingObjective",
    "lr_scheduler",
    "step_seed",
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


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup to ``optim.lr`` over ``optim.lr_warmup_steps``, then constant or cosine to 0 at max_steps.

    DeepSpeed steps it once per optimizer step (not for skipped steps) and keeps it in its checkpoints.
    """
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine"}[config.optim.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.optim.lr_warmup_steps,
                         num_training_steps=config.schedule.max_steps)


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
    # retained checkpoints (step -> mean of schedule.keep_best_by over the steps it closed), when retention is on
    checkpoint_scores: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {**self.__dict__, "positions": {str(k): v.__dict__ for k, v in self.positions.items()},
                "checkpoint_scores": {str(k): v for k, v in self.checkpoint_scores.items()}}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        data["positions"] = {int(k): ReaderPosition(**v) for k, v in data["positions"].items()}
        data["checkpoint_scores"] = {int(k): v for k, v in data.get("checkpoint_scores", {}).items()}
        return cls(**data)


def _history_step(row: str) -> float:
    """The step of a losses.jsonl row; infinite for a row a kill cut short (it is dropped)."""
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Trainer:
    """Runs the loop on one rank. ``tracker`` is rank 0's MLflow run (None elsewhere)."""

    def __init__(self, config: TrainConfig, engine: Any, state: TrainerState, tracker: Any = None,
                 on_checkpoint: Callable[[int], None] | None = None, on_sample: Callable[[int, dict, torch.Tensor | None], None] | None = None,
                 on_validate: Callable[[int], None] | None = None):
        self.config, self.engine, self.state, self.tracker = config, engine, state, tracker
        self.on_checkpoint, self.on_sample, self.on_validate = on_checkpoint, on_sample, on_validate
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.checkpoint_dir = Path(config.output_dir) / "checkpoints"
        self.history_path = Path(config.output_dir) / "losses.jsonl"
        self._window: list[dict[str, float]] = []
        self._since_checkpoint: list[dict[str, float]] = []  # rank-averaged metrics of each step since the last one
        self.step_lr = 0.0
        self.metric_names: set[str] = set()
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
        self.step_lr = self.engine.get_lr()[0]  # the rate this step applies; step() moves the scheduler on
        self.engine.step()
        return {k: float(v.detach().float().mean()) for k, v in losses.items()
                if isinstance(v, torch.Tensor) and v.numel() == 1}

    def _observe(self, batch: dict[str, Any]) -> None:
        reader = batch["reader"]
        self.state.positions[reader["worker"]] = ReaderPosition.of_batch(batch)
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
            every = self.config.validation.every
            if self.on_validate and (step == schedule.max_steps or (every and step % every == 0)):
                self.on_validate(step)
            if step == schedule.max_steps or (schedule.checkpoint_every and step % schedule.checkpoint_every == 0):
                self.save_checkpoint()
        return self.state

    def _record(self, step: int, started: float) -> None:
        names = sorted(self._window[0])
        self.metric_names = set(names)
        # means over the step's micro-batches on all ranks, leaving out NaN (a metric with nothing to
        # measure, e.g. the inside-mask share of a batch without subjects); counters summed
        window = torch.tensor([[m[k] for k in names] for m in self._window], dtype=torch.float64)
        finite = torch.isfinite(window)
        values = torch.cat([torch.where(finite, window, 0.0).sum(0), finite.sum(0).double(),
                            torch.tensor([float(self.state.rejected_total), float(self.state.nonfinite_total)],
                                         dtype=torch.float64)])
        self._window = []
        if dist.is_initialized():
            dist.all_reduce(values)
        n = len(names)
        mean = {k: s / c for k, s, c in zip(names, values[:n].tolist(), values[n: 2 * n].tolist()) if c}
        self._since_checkpoint.append(mean)  # the same on every rank: retention decides alike everywhere
        if self.rank != 0:
            return
        row = {"step": step, **mean, "rejected_samples": values[-2].item(), "nonfinite_steps": values[-1].item(),
               "lr": self.step_lr, "step_time_s": time.perf_counter() - started}
        with self.history_path.open("a") as history:
            history.write(json.dumps(row) + "\n")
        every = self.config.schedule.log_every
        if step % every == 0 or step == self.config.schedule.max_steps:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
            if self.tracker is not None:
                self.tracker.metrics({k: v for k, v in row.items() if k != "step"}, step)

    def save_checkpoint(self) -> None:
        step, schedule = self.state.step, self.config.schedule
        dropped: set[int] = set()
        if schedule.keep_last:
            metric = schedule.keep_best_by
            measured = [m[metric] for m in self._since_checkpoint if metric in m]
            if metric and not measured and metric not in self.metric_names:
                raise ValueError(f"schedule.keep_best_by={metric!r} is not a logged metric; "
                                 f"choose one of {sorted(self.metric_names)}")
            # a checkpoint whose interval never measured the metric cannot be the best one
            worst = float("inf") if schedule.keep_best_mode == "min" else float("-inf")
            score = sum(measured) / len(measured) if measured else worst
            scores = {**self.state.checkpoint_scores, step: score}
            kept = kept_checkpoints(scores, schedule.keep_last, schedule.keep_best_mode if metric else None)
            dropped = set(scores) - kept
            self.state.checkpoint_scores = {s: scores[s] for s in sorted(kept)}  # saved with this checkpoint
        self._since_checkpoint = []
        Checkpoints(self.checkpoint_dir, self.engine.device).save(
            self.engine, step, self.state.to_json(), self.on_checkpoint, dropped,
            (Path(self.config.output_dir) / "adapters",))

    def load_checkpoint(self) -> bool:
        """Restore the newest complete, verified checkpoint (weights, optimizer, this rank's data position);
        False if there is none (train/checkpoint.py)."""
        state = Checkpoints(self.checkpoint_dir, self.engine.device).resume(self.engine)
        if state is not None:
            self.state = state
            self.state.nonfinite_in_row = 0
        # steps after the checkpoint (all of them, without one) are redone; drop their rows from the history
        if self.rank == 0 and self.history_path.is_file():
            rows = [r for r in self.history_path.read_text().splitlines() if _history_step(r) <= self.state.step]
            write_atomic(self.history_path, "".join(r + "\n" for r in rows).encode())
        return state is not None

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.checkpoint import CheckpointFormatError, Checkpoints, kept_checkpoints, write_atomic
from train.config import TrainConfig
from train.data import ReaderPosition

__all__ = [
    "NonFiniteLossError",
    "SkippableAdamW",
    "Trainer",
    "TrainerState",
    "TrainingObjective",
    "lr_scheduler",
    "host_values",
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

    def forward(self, batch: dict[str, Any], return_attention_maps: bool = False) -> dict[str, torch.Tensor]:
        return self.model.training_loss(batch, return_attention_maps=return_attention_maps)


class SkippableAdamW(torch.optim.AdamW):
    """AdamW (the fused kernel) whose step is skipped on the device when ``skip`` holds 1.0.

    The fused kernel takes a ``found_inf`` tensor (as ``torch.amp.GradScaler`` uses it): with 1.0 it leaves
    weights, moments and step counts as they were, so whether a step applies is decided on the device
    and the host never waits for the loss to know it.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)

    def skip_step_if(self, skip: torch.Tensor) -> None:
        """The next :meth:`step` applies only where ``skip`` (a float32 scalar tensor) is 0.0."""
        self.found_inf = skip


def host_values(values: torch.Tensor) -> list[float]:
    """The training loop's one device-to-host read per optimizer step (everything it logs or decides on)."""
    return values.tolist()


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
        data = {**self.__dict__, "positions": {str(k): asdict(v) for k, v in self.positions.items()},
                "checkpoint_scores": {str(k): v for k, v in self.checkpoint_scores.items()}}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        if any("sources" not in v for v in data["positions"].values()):
            raise CheckpointFormatError(
                "its data positions are in the layout written before each reader slot recorded its shard and byte "
                f"(per worker: {sorted(next(v for v in data['positions'].values() if 'sources' not in v))})")
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
        self.optimizer = engine.client_optimizer
        if not isinstance(self.optimizer, SkippableAdamW):
            raise TypeError(f"the engine's optimizer is {type(self.optimizer).__name__}; the trainer needs a "
                            "SkippableAdamW (train/run.py make_engine) to skip non-finite steps on the device")
        self._window: list[dict[str, torch.Tensor]] = []  # this step's scalar losses per micro-batch, on the device
        self._nonfinite: list[torch.Tensor] = []  # ... and whether each loss was non-finite
        self._metric_names: list[str] = []
        self._step_values: torch.Tensor | None = None
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
                value = value.to(self.engine.device, non_blocking=True)
                out[name] = value.to(dtype) if value.is_floating_point() else value
        return out

    def _samples_at(self, step: int) -> bool:
        every = self.config.schedule.sample_every
        return self.on_sample is not None and (step == self.config.schedule.max_steps or bool(every and step % every == 0))

    def micro_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward, backward and DeepSpeed's step on one micro-batch; returns its scalar losses, on the device.

        Nothing here waits for the device. Whether the loss was finite is known on the device only: at the
        accumulation boundary :meth:`_close_step` reduces the step's flags over all ranks, and the optimizer
        skips the step on the device if any micro-batch of it, on any rank, had a non-finite loss
        (:class:`SkippableAdamW`); the host learns it from the step's one read.
        """
        self._observe(batch)
        torch.manual_seed(step_seed(self.config.seed, self.state.micro_batches, self.rank))
        self.state.micro_batches += 1
        self.boundary = self.engine.is_gradient_accumulation_boundary()  # asked before step() advances it
        maps = self.boundary and self._samples_at(self.state.step + 1)
        losses = self.engine(self._to_device(batch), return_attention_maps=maps)
        metrics = {k: v.detach().float().mean() for k, v in losses.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        self._window.append(metrics)
        self._nonfinite.append(~torch.isfinite(losses["loss"].detach()))
        self.last_attention_maps = losses.get("attention_maps") if maps else None
        self.engine.backward(losses["loss"])
        if self.boundary:
            self.step_lr = self.engine.get_lr()[0]  # the rate this step applies; step() moves the scheduler on
            self._step_values = self._reduce_step()
        self.engine.step()
        return metrics

    def _observe(self, batch: dict[str, Any]) -> None:
        reader = batch["reader"]
        self.state.positions[reader["worker"]] = ReaderPosition.of_batch(batch)
        for rejected in batch["rejected"]:
            self.state.rejected_total += 1
            log.warning("rank %d: skipped %s %s: %s", self.rank, rejected["source"], rejected["key"], rejected["reason"])

    def _reduce_step(self) -> torch.Tensor:
        """The step's figures summed over its micro-batches and all ranks, on the device, in one collective:
        per metric the sum and count of its finite values (a NaN metric has nothing to measure, e.g. the
        inside-mask share of a batch without subjects), the rejected samples, then per micro-batch the
        number of ranks whose loss was non-finite. Tells the optimizer to skip the step if that is not 0."""
        device = self.engine.device
        names = sorted(self._window[0])
        window = torch.stack([torch.stack([m[k] for k in names]) for m in self._window]).to(torch.float32)
        finite = torch.isfinite(window)
        rejected = torch.full((1,), float(self.state.rejected_total), dtype=torch.float32, device=device)  # no copy
        values = torch.cat([torch.where(finite, window, 0.0).sum(0), finite.sum(0).to(torch.float32), rejected,
                            torch.stack(self._nonfinite).to(torch.float32)])
        micro_batches = len(self._nonfinite)
        self._metric_names, self._window, self._nonfinite = names, [], []
        if dist.is_initialized():
            dist.all_reduce(values)
        self.optimizer.skip_step_if((values[-micro_batches:].sum() > 0).to(torch.float32))
        return values

    # -- the loop ------------------------------------------------------------------------------
    def run(self, batches: Iterator[dict[str, Any]]) -> TrainerState:
        schedule = self.config.schedule
        started = time.perf_counter()
        while self.state.step < schedule.max_steps:
            batch = next(batches)
            if not self.advance(batch, started):
                continue
            started = time.perf_counter()
            step = self.state.step
            if self._samples_at(step) and self.last_attention_maps is not None:
                self.on_sample(step, batch, self.last_attention_maps)
            every = self.config.validation.every
            if self.on_validate and (step == schedule.max_steps or (every and step % every == 0)):
                self.on_validate(step)
            if step == schedule.max_steps or (schedule.checkpoint_every and step % schedule.checkpoint_every == 0):
                self.save_checkpoint()
        return self.state

    def advance(self, batch: dict[str, Any], started: float) -> bool:
        """One micro-batch; True when it closed a step that applied (``state.step`` advanced and was
        logged, ``started`` being when the step began)."""
        self.micro_step(batch)
        return self.boundary and self._close_step(started)

    def _close_step(self, started: float) -> bool:
        """After the boundary micro-batch: read the step's figures (the one device-to-host read), count
        non-finite micro-batches, and, if the step applied, advance ``state.step`` and log it. False for a
        skipped step (its micro-batches are consumed, the step is redone with the next ones)."""
        names = self._metric_names
        n = len(names)
        values = host_values(self._step_values)
        nonfinite = sum(1 for ranks in values[2 * n + 1:] if ranks)
        if nonfinite:
            self.state.nonfinite_total += nonfinite
            self.state.nonfinite_in_row += nonfinite
            log.warning("rank %d: non-finite loss in %d micro-batch(es) of step %d (%d in a row), step skipped",
                        self.rank, nonfinite, self.state.step + 1, self.state.nonfinite_in_row)
            if self.state.nonfinite_in_row >= self.config.schedule.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"{self.state.nonfinite_in_row} non-finite losses in a row at step {self.state.step} "
                    f"(schedule.max_nonfinite_in_row={self.config.schedule.max_nonfinite_in_row})")
            return False
        self.state.nonfinite_in_row = 0
        self.state.step += 1
        step = self.state.step
        self.metric_names = set(names)
        # means over the step's micro-batches on all ranks, leaving out NaN; counters summed over ranks
        mean = {k: s / c for k, s, c in zip(names, values[:n], values[n: 2 * n]) if c}
        self._since_checkpoint.append(mean)  # the same on every rank: retention decides alike everywhere
        if self.rank != 0:
            return True
        row = {"step": step, **mean, "rejected_samples": values[2 * n], "nonfinite_steps": self.state.nonfinite_total,
               "lr": self.step_lr, "step_time_s": time.perf_counter() - started}
        with self.history_path.open("a") as history:
            history.write(json.dumps(row) + "\n")
        every = self.config.schedule.log_every
        if step % every == 0 or step == self.config.schedule.max_steps:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
            if self.tracker is not None:
                self.tracker.metrics({k: v for k, v in row.items() if k != "step"}, step)
        return True

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

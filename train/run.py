"""One training run on one rank: model, DeepSpeed engine, data stream, MLflow, checkpoints, export."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mmdiff.configuration import load_config
from mmdiff.speed import apply_speed_options
from train.config import TrainConfig
from train.data import (
    BatchBuilder,
    ShardStream,
    dataset_profile,
    make_loader,
    manifest_hash,
)
from train.deepspeed_config import deepspeed_config
from train.engine import SkippableAdamW, Trainer, TrainerState, TrainingObjective, lr_scheduler
from train.export import save_adapter
from train.samples import attention_overlay
from train.validation import ValidationSet

__all__ = ["build_model", "generate_sample", "make_engine", "train"]

log = logging.getLogger("train")


def model_settings(config: TrainConfig):
    """The MM-Diff config the run trains with: its file, with the training config's overrides."""
    from mmdiff import MMDiffConfig

    settings = load_config(config.model.mmdiff, MMDiffConfig)
    if config.model.gradient_checkpointing is not None:
        settings = settings.model_copy(update={"gradient_checkpointing": config.model.gradient_checkpointing})
    return settings


def build_model(config: TrainConfig, accelerator: str = "cpu"):
    """The model; under ZeRO-3 (in a distributed run) its frozen base is partitioned across the ranks
    while it is built (train/partitioned.py)."""
    from mmdiff import MMDiffModel, zoo

    base, encoder = config.model.base, config.model.image_encoder
    if config.deepspeed.zero_stage == 3 and dist.is_initialized():
        from train.partitioned import partitioned_base

        pipe, vision = partitioned_base(base, encoder, deepspeed_config(config, accelerator))
    else:
        pipe, vision = zoo.build(base), zoo.build(encoder)
    torch.manual_seed(config.seed)  # the trainable initialisation: the same on every rank and for every ZeRO stage
    model = MMDiffModel(pipe, vision, model_settings(config), base, encoder)
    apply_speed_options(model.unet, config.model.channels_last, config.model.compile)
    return model


def make_engine(config: TrainConfig, model):
    """The DeepSpeed engine around the model's training loss, with a fused torch AdamW on the trainable
    weights that skips non-finite steps on the device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    optimizer = SkippableAdamW(list(model.trainable_parameters()), lr=config.optim.lr,
                               betas=config.optim.betas, weight_decay=config.optim.weight_decay)
    engine, *_ = deepspeed.initialize(model=TrainingObjective(model), optimizer=optimizer,
                                      lr_scheduler=lr_scheduler(optimizer, config),
                                      config=deepspeed_config(config, get_accelerator().device_name()))
    return engine


def generate_sample(config: TrainConfig, adapter_dir: Path):
    """An image from the exported adapter, loaded the way users load it (MMDiffPipeline.from_pretrained)."""
    from mmdiff import MMDiffPipeline
    from train.generate import load_subject

    # the inference placement rule (the GPU in bf16 when there is one), not the training spec's CPU/fp32 load
    pipe = MMDiffPipeline.from_pretrained(config.model.base, adapter_dir, device="auto", torch_dtype="auto")
    subjects = [load_subject(ref) for ref in config.mlflow.sample_subjects]
    return pipe(config.mlflow.sample_prompt, subjects, num_inference_steps=config.mlflow.sample_steps,
                height=config.data.resolution, width=config.data.resolution, seed=config.seed).images[0]


def failure_report(exc: BaseException, config: TrainConfig) -> str:
    """What stopped this rank, in one line that names the path at fault when the environment failed: a
    full or read-only output filesystem shows on the rank that wrote, and as a lost peer on the others."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    output = Path(config.output_dir)
    try:
        usage = shutil.disk_usage(output)
        space = f"{output}: {usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
        writable = os.access(output, os.W_OK)
    except OSError as err:
        return f"{text}; the output folder {output} cannot be reached ({err})"
    full = usage.free < 16 * 2**20 or any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in _chain(exc)) \
        or "disk is full" in str(exc) or "No space left" in str(exc)
    if full:
        return f"the output filesystem is full ({space}); free space and rerun to resume. Cause: {text}"
    if not writable:
        return f"the output folder {output} is not writable; cause: {text}"
    if "Connection closed by peer" in str(exc) or "Connection reset by peer" in str(exc):
        return f"another rank stopped (its error names the cause; {space}). Here: {text}"
    return text


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def train(config: TrainConfig) -> TrainerState:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # a SIGTERM (preemption, Kubernetes) unwinds like an error, so the MLflow run is ended, not left RUNNING
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world = dist.get_rank(), dist.get_world_size()
    tracker = None
    try:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        model = build_model(config, accelerator.device_name())
        engine = make_engine(config, model)
        data_hash = manifest_hash(config.data.shards)
        if rank == 0:
            from train.tracking import RunTracker, TrackingUnavailable, server_reachable

            offline = not server_reachable(config.tracking_uri)
            if offline and config.mlflow.on_unreachable == "fail":  # started without train.launch's preflight
                raise TrackingUnavailable(f"tracking server {config.tracking_uri} does not answer; start it, or set "
                                          "mlflow.on_unreachable=spool")
            tracker = RunTracker(config, offline).start(
                data_hash, {"world_size": str(world), "zero_stage": str(config.deepspeed.zero_stage)},
                model_settings(config).model_dump(mode="json"), deepspeed_config(config, accelerator.device_name()))
            tracker.dataset(config.data.shards, data_hash, dataset_profile(config.data.shards))
            if (report := Path(config.data.shards) / "report").is_dir():  # pipeline.report, beside the dataset input
                tracker.directory(report, "data_report")
        state = _train(config, model, engine, tracker, rank, world)
        if tracker is not None:
            adapter = Path(config.output_dir) / "adapter"
            tracker.directory(adapter, "adapter")
            if config.mlflow.sample_prompt:
                tracker.image(generate_sample(config, adapter), f"samples/generated-step-{state.step:06d}.png")
            if config.mlflow.registered_model:
                tracker.register(adapter, data_hash)
            tracker.finish(wait_s=config.mlflow.end_wait_s)
        return state
    except BaseException as exc:
        log.error("rank %d: %s", rank, failure_report(exc, config))
        if tracker is not None:
            try:
                tracker.finish("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED")
            except Exception as tracking:  # noqa: BLE001 -- the run's own error is the one to raise
                log.error("rank 0: could not record the run's end in MLflow: %s", tracking)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, model, engine, tracker, rank: int, world: int) -> TrainerState:
    """The loop with its hooks (checkpoints' adapters, samples, validation), then the final adapter."""
    def on_checkpoint(step: int) -> None:
        adapter = save_adapter(engine, Path(config.output_dir) / "adapters" / f"step-{step}")
        if tracker is not None:
            tracker.directory(adapter, f"checkpoints/step-{step}")

    def on_sample(step: int, batch: dict, attention_maps: torch.Tensor | None) -> None:
        if tracker is not None and attention_maps is not None:
            tracker.image(attention_overlay(batch, attention_maps), f"samples/attention-step-{step:06d}.png")

    # under ZeRO-3 every rank takes part in each forward (the weights are gathered), so every rank generates
    generates = bool(config.validation.shards) and (rank == 0 or config.deepspeed.zero_stage == 3)
    validation = ValidationSet(config.validation.shards, config.validation.num_samples,
                               config.data.max_subjects) if generates else None

    def on_validate(step: int) -> None:
        if validation is not None:
            from mmdiff import MMDiffPipeline

            training = model.training
            model.eval()
            v = config.validation
            with torch.no_grad():
                grid = validation.grid(MMDiffPipeline(model), v.seeds, v.steps, (config.data.resolution,) * 2,
                                       v.guidance_scale)
            model.train(training)
            if tracker is not None:
                tracker.image(grid, f"validation/step-{step:06d}.png")
        dist.barrier()

    trainer = Trainer(config, engine, TrainerState(), tracker, on_checkpoint, on_sample,
                      on_validate if config.validation.shards else None)
    if trainer.load_checkpoint():
        log.info("rank %d: resumed at step %d", rank, trainer.state.step)
    workers = config.data.num_workers
    stream = ShardStream(config.data.shards, config.data, BatchBuilder(config.data, model.tokenizers, model.image_processor),
                         config.seed, rank, world, trainer.state.positions,
                         first_worker=trainer.state.micro_batches % max(1, workers), base=config.model.base)
    trainer.run(iter(make_loader(stream, workers)))
    save_adapter(engine, Path(config.output_dir) / "adapter")
    return trainer.state

"""One training run on one rank: model, DeepSpeed engine, data stream, MLflow, checkpoints, export."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from mmdiff.configuration import load_config
from train.config import TrainConfig
from train.data import (
    BatchBuilder,
    ShardStream,
    dataset_profile,
    make_loader,
    manifest_hash,
)
from train.deepspeed_config import deepspeed_config
from train.engine import Trainer, TrainerState, TrainingObjective, lr_scheduler
from train.export import register_model, save_adapter
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
    return MMDiffModel(pipe, vision, model_settings(config), base, encoder)


def make_engine(config: TrainConfig, model):
    """The DeepSpeed engine around the model's training loss, with a torch AdamW on the trainable weights."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    optimizer = torch.optim.AdamW(list(model.trainable_parameters()), lr=config.optim.lr,
                                  betas=config.optim.betas, weight_decay=config.optim.weight_decay)
    engine, *_ = deepspeed.initialize(model=TrainingObjective(model), optimizer=optimizer,
                                      lr_scheduler=lr_scheduler(optimizer, config),
                                      config=deepspeed_config(config, get_accelerator().device_name()))
    return engine


def generate_sample(config: TrainConfig, adapter_dir: Path):
    """An image from the exported adapter, loaded the way users load it (MMDiffPipeline.from_pretrained)."""
    from mmdiff import MMDiffPipeline
    from train.generate import load_subject

    pipe = MMDiffPipeline.from_pretrained(config.model.base, adapter_dir)
    subjects = [load_subject(ref) for ref in config.mlflow.sample_subjects]
    return pipe(config.mlflow.sample_prompt, subjects, num_inference_steps=config.mlflow.sample_steps,
                height=config.data.resolution, width=config.data.resolution, seed=config.seed).images[0]


def train(config: TrainConfig) -> TrainerState:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world = dist.get_rank(), dist.get_world_size()
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)

    model = build_model(config, accelerator.device_name())
    engine = make_engine(config, model)
    data_hash = manifest_hash(config.data.shards)
    tracker = None
    if rank == 0:
        from train.tracking import RunTracker

        tracker = RunTracker(config, data_hash, {"world_size": str(world), "zero_stage": str(config.deepspeed.zero_stage)},
                             model_settings(config).model_dump(mode="json"),
                             deepspeed_config(config, accelerator.device_name()))
        tracker.dataset(config.data.shards, data_hash, dataset_profile(config.data.shards))
        if (report := Path(config.data.shards) / "report").is_dir():  # pipeline.report, beside the dataset input
            tracker.directory(report, "data_report")

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
    try:
        trainer.run(iter(make_loader(stream, workers)))
        adapter = save_adapter(engine, Path(config.output_dir) / "adapter")
        if tracker is not None:
            tracker.directory(adapter, "adapter")
            if config.mlflow.sample_prompt:
                tracker.image(generate_sample(config, adapter), f"samples/generated-step-{trainer.state.step:06d}.png")
            if config.mlflow.registered_model:
                version = register_model(config, adapter, tracker.run_id, data_hash)
                log.info("registered %s version %s", version.name, version.version)
            tracker.finish()
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return trainer.state

"""One training run on one rank: model, DeepSpeed engine, data stream, MLflow, checkpoints, export."""

from __future__ import annotations

import errno
import hashlib
import json
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
from train.data import BatchBuilder, ShardStream, data_sources, default_num_workers, make_loader
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


def mixture_hash(sources: list) -> str:
    """The run's data identity: the manifest hash of its one source, else a hash of every source's hash
    and weight."""
    if len(sources) == 1:
        return sources[0].dataset.manifest_hash()
    lines = "".join(f"{s.dataset.manifest_hash()}\t{s.weight}\n" for s in sources)
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def log_datasets(tracker, sources: list) -> None:
    """One MLflow dataset input per source, its digest the source's manifest hash (its weight in a mixture)."""
    for source in sources:
        profile = {**source.dataset.profile(), **({"weight": source.weight} if len(sources) > 1 else {})}
        tracker.dataset(source.dataset.url, source.dataset.manifest_hash(), profile)


def drawn_per_source(state: TrainerState, sources: list, device: torch.device | str) -> dict[str, int]:
    """The samples drawn from each source by every reader slot of every rank (a sum over the ranks)."""
    counts = torch.zeros(len(sources), dtype=torch.float64, device=device)
    for position in state.positions.values():
        for i, source in enumerate(position.sources):
            counts[i] += source.drawn
    if dist.is_initialized():
        dist.all_reduce(counts)
    names = [s.dataset.url.rstrip("/").rpartition("/")[2] or s.dataset.url for s in sources]
    return {f"{i}-{name}": int(n) for i, (name, n) in enumerate(zip(names, counts.tolist()))}


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
        sources = data_sources(config.data)
        data_hash = mixture_hash(sources)
        if rank == 0:
            from train.tracking import RunTracker, TrackingUnavailable, server_reachable

            offline = not server_reachable(config.tracking_uri)
            if offline and config.mlflow.on_unreachable == "fail":  # started without train.launch's preflight
                raise TrackingUnavailable(f"tracking server {config.tracking_uri} does not answer; start it, or set "
                                          "mlflow.on_unreachable=spool")
            tracker = RunTracker(config, offline).start(
                data_hash, {"world_size": str(world), "zero_stage": str(config.deepspeed.zero_stage)},
                model_settings(config).model_dump(mode="json"), deepspeed_config(config, accelerator.device_name()))
            log_datasets(tracker, sources)
            for i, source in enumerate(sources):  # pipeline.report, beside the dataset input (local datasets)
                report = source.dataset.root / "report"
                if report.is_local and Path(report.path).is_dir():
                    tracker.directory(Path(report.path), "data_report" if len(sources) == 1 else f"data_report/{i}")
        state = _train(config, model, engine, tracker, rank, world, sources)
        if tracker is not None:
            adapter = Path(config.output_dir) / "adapter"
            tracker.directory(adapter, "adapter")
            if config.mlflow.sample_prompt:
                tracker.image(generate_sample(config, adapter), "sample", state.step)
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


def _train(config: TrainConfig, model, engine, tracker, rank: int, world: int, sources: list) -> TrainerState:
    """The loop with its hooks (checkpoints' adapters, samples, validation), then the final adapter."""
    def on_checkpoint(step: int) -> None:
        adapter = save_adapter(engine, Path(config.output_dir) / "adapters" / f"step-{step}")
        if tracker is not None:
            tracker.directory(adapter, f"checkpoints/step-{step}")

    def on_sample(step: int, batch: dict, attention_maps: torch.Tensor | None) -> None:
        if tracker is not None and attention_maps is not None:
            tracker.image(attention_overlay(batch, attention_maps), "attention", step)

    # under ZeRO-3 every rank takes part in each forward (the weights are gathered), so every rank generates
    generates = bool(config.validation.shards) and (rank == 0 or config.deepspeed.zero_stage == 3)
    validation = ValidationSet(config.validation.shards, config.validation.num_samples,
                               config.data.max_subjects, config.data.storage_options) if generates else None

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
                tracker.image(grid, "validation", step)
        dist.barrier()

    trainer = Trainer(config, engine, TrainerState(), tracker, on_checkpoint, on_sample,
                      on_validate if config.validation.shards else None)
    if trainer.load_checkpoint():
        log.info("rank %d: resumed at step %d", rank, trainer.state.step)
    workers = config.data.num_workers
    if workers is None:
        workers = default_num_workers(config.data, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        log.info("rank %d: data.num_workers %d (derived from the measured CPU cost per image)", rank, workers)
    latent_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)  # the VAE's downsampling
    builder = BatchBuilder(config.data, model.tokenizers, model.image_processor, latent_factor)
    stream = ShardStream(sources, config.data, builder, config.seed, rank, world, trainer.state.positions,
                         first_worker=trainer.state.micro_batches % max(1, workers), base=config.model.base)
    # pinned batches: their copies to the GPU overlap compute (the engine copies with non_blocking)
    trainer.run(iter(make_loader(stream, workers, pin_memory=torch.device(engine.device).type == "cuda")))
    drawn = drawn_per_source(trainer.state, sources, engine.device)
    log.info("rank %d: samples drawn per source, all ranks: %s", rank, drawn)
    if tracker is not None:  # an artifact: the step's metrics are logged already, and only once
        (Path(config.output_dir) / "data").mkdir(exist_ok=True)
        (Path(config.output_dir) / "data" / "drawn.json").write_text(json.dumps(drawn, indent=1, sort_keys=True))
        tracker.directory(Path(config.output_dir) / "data", "data")
    save_adapter(engine, Path(config.output_dir) / "adapter")
    return trainer.state

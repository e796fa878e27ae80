"""The training config (configs/train/*.yaml), validated before any process starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mmdiff.configuration import ConfigModel, load_config
from mmdiff.zoo.spec import ModelSpec

__all__ = [
    "DataSection",
    "SourceSection",
    "DeepSpeedSection",
    "MLflowSection",
    "ModelSection",
    "OptimSection",
    "ScheduleSection",
    "TrainConfig",
    "ValidationSection",
    "load_train_config",
]


class ModelSection(ConfigModel):
    base: ModelSpec  # sd15 / sdxl family
    image_encoder: ModelSpec  # clip_vision family
    mmdiff: str  # path of the MMDiffConfig YAML (configs/mmdiff/*.yaml)
    # UNet activation checkpointing (recompute in backward): None keeps the MM-Diff config's
    # gradient_checkpointing, true/false overrides it for this run
    gradient_checkpointing: bool | None = None
    # UNet speed options (mmdiff/speed.py): NHWC weights and activations for the GPU's convolution kernels,
    # and torch.compile of the UNet (compiled in place on the first steps of each input shape)
    channels_last: bool = False
    compile: bool = False


class SourceSection(ConfigModel):
    """One dataset of a mixture (data.sources)."""

    shards: str  # a preprocessing output folder or URL, as data.shards
    weight: float = Field(1.0, gt=0)  # relative share of the samples drawn
    # empty: data.storage_options; kept out of dumps (MLflow params, resolved.yaml): they may hold keys
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)


class DataSection(ConfigModel):
    # the preprocessing output (shards/*.index.json + *.tar, manifest.json): a local folder or any fsspec URL
    # (s3://bucket/prefix, gs://...); None when data.sources is given
    shards: str | None = None
    # a mixture instead: [{shards: URL, weight: w}, ...]; every sample drawn picks a source by weight
    sources: list[SourceSection] = Field(default_factory=list)
    # options of the shards' filesystem (s3: endpoint_url, key, secret, client_kwargs, ...), as the
    # preprocessing job's output.storage_options; empty: its defaults (AWS_* variables, ~/.aws). Kept out of
    # dumps (MLflow params, resolved.yaml): they may hold keys
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    # what training checks before reading a shard: "size" (the size its index recorded; the sha256 is
    # computed as it streams and a mismatch reported at its end) or "sha256" (read whole and checked first)
    verify: Literal["size", "sha256"] = "size"
    read_retries: int = Field(3, ge=0)  # a failed read is retried from where it stopped, with backoff
    resolution: int = 512  # the square side; with aspect_buckets, every bucket has about this many pixels
    # SDXL-style aspect-ratio buckets: each image goes to the bucket nearest its aspect ratio, is resized to
    # cover it and centre-cropped; a batch holds one bucket. Sides are multiples of bucket_step (64 for SD:
    # 8 latent pixels x 3 UNet downsamplings), aspect ratios up to bucket_max_aspect.
    aspect_buckets: bool = False
    bucket_step: int = Field(64, ge=8)
    bucket_max_aspect: float = Field(4.0, ge=1.0)
    # use the VAE latents `python -m train.latents` cached for the base model, where there are some
    cached_latents: bool = True
    max_subjects: int = 2
    micro_batch_size: int = 1  # per rank
    # DataLoader workers per rank; None: enough for the planned images/s per GPU at the measured CPU cost per
    # training image, within the node's cores (train.data.default_num_workers, docs/SIZING.md)
    num_workers: int | None = Field(None, ge=0)
    shuffle_buffer: int = 64
    text_dropout: float = 0.05  # caption and subjects dropped: unconditional for guidance
    subject_dropout: float = 0.05  # subjects dropped, caption kept


class OptimSection(ConfigModel):
    lr: float = 1e-5  # the peak rate, reached at the end of the warmup
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = 1.0
    lr_warmup_steps: int = Field(0, ge=0)  # linear from 0 to lr over this many optimizer steps
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after the warmup; cosine decays to 0 at max_steps


class DeepSpeedSection(ConfigModel):
    zero_stage: Literal[0, 1, 2, 3] = 2  # 0 = plain data parallel (DDP-like)
    # auto: bf16 on GPUs that support it, else fp16 on GPUs; fp32 on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    offload_optimizer: bool = False
    # raw DeepSpeed JSON keys merged over the generated config (e.g. {"zero_optimization":
    # {"overlap_comm": true}}); keys this config already owns are refused, see train/deepspeed_config.py
    config: dict[str, Any] = Field(default_factory=dict)


class ScheduleSection(ConfigModel):
    max_steps: int  # optimizer steps
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = Field(0, ge=0)  # keep the newest N checkpoints (0: keep all) ...
    # ... plus the one with the best mean of this metric over the steps since the checkpoint before it
    keep_best_by: str | None = None  # a logged metric: loss, denoise_loss, attention_loss, ...
    keep_best_mode: Literal["min", "max"] = "min"
    max_nonfinite_in_row: int = 5  # the run stops after this many non-finite losses in a row


class MLflowSection(ConfigModel):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a local sqlite store under output_dir
    # the model registry the adapter is registered in; None: the tracking store's (never $MLFLOW_REGISTRY_URI
    # nor what the process set earlier: train/registry.py)
    registry_uri: str | None = None
    experiment: str = "mmdiff"
    registered_model: str | None = None  # register the exported adapter under this name
    # an image generated from the exported adapter is logged at the end: the prompt marks subject words
    # as [word], one subject image (path or skimage:<name>) per marked word; None: no generated sample
    sample_prompt: str | None = None
    sample_subjects: list[str] = Field(default_factory=list)
    sample_steps: int = 20
    # the tracking server down when the job starts (train/launch.py checks it for preflight_wait_s seconds):
    # "fail" stops before any rank starts, "spool" trains and tracks into <output_dir>/mlflow_spool until it
    # answers. Down during the run (past the MLflow client's own retries), training always goes on spooling.
    on_unreachable: Literal["fail", "spool"] = "fail"
    preflight_wait_s: float = Field(20.0, ge=0)
    retry_every_s: float = Field(30.0, gt=0)  # while spooling, how often the server is asked again
    end_wait_s: float = Field(60.0, ge=0)  # at the end, how long to wait for the server to take the spool


class ValidationSection(ConfigModel):
    """Images generated during training from held-out samples (train/validation.py), logged to MLflow."""

    shards: str | None = None  # a held-out preprocessing output folder (shards/*.tar); None: no validation
    every: int = Field(0, ge=0)  # steps between validations; 0: only at the end
    num_samples: int = Field(4, ge=1)  # the first N held-out samples with a subject, in key order
    seeds: list[int] = Field(default_factory=lambda: [0])  # one image per seed and sample
    steps: int = Field(20, ge=1)  # denoising steps
    guidance_scale: float = 7.5


class TrainConfig(ConfigModel):
    run_name: str
    output_dir: str
    seed: int = 0
    model: ModelSection
    data: DataSection
    optim: OptimSection = OptimSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    schedule: ScheduleSection
    mlflow: MLflowSection = MLflowSection()
    validation: ValidationSection = ValidationSection()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model.base.family not in ("sd15", "sdxl"):
            raise ValueError(f"model.base.family must be sd15 or sdxl, got {self.model.base.family}")
        if self.model.image_encoder.family != "clip_vision":
            raise ValueError(f"model.image_encoder.family must be clip_vision, got {self.model.image_encoder.family}")
        if (self.data.shards is None) == (not self.data.sources):
            raise ValueError("give data.shards (one dataset) or data.sources (a mixture), not both or neither")
        for name in ("text_dropout", "subject_dropout"):
            if not 0.0 <= getattr(self.data, name) < 1.0:
                raise ValueError(f"data.{name} must be in [0, 1)")
        if self.model.channels_last and self.deepspeed.zero_stage == 3:
            raise ValueError("model.channels_last needs deepspeed.zero_stage < 3: ZeRO-3 partitions the UNet's "
                             "weights as flat tensors and gathers them in the default layout")
        if self.schedule.keep_best_by and not self.schedule.keep_last:
            raise ValueError("schedule.keep_best_by needs schedule.keep_last >= 1 (with keep_last 0 every checkpoint is kept)")
        if self.optim.lr_warmup_steps > self.schedule.max_steps:
            raise ValueError(f"optim.lr_warmup_steps={self.optim.lr_warmup_steps} exceeds schedule.max_steps={self.schedule.max_steps}")
        from train.deepspeed_config import check_passthrough

        check_passthrough(self.deepspeed.config)
        return self

    @property
    def tracking_uri(self) -> str:
        """The config's URI, else ``MLFLOW_TRACKING_URI`` (as MLflow itself reads it), else a local store."""
        return (self.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{Path(self.output_dir).resolve() / 'mlflow.db'}")

    @property
    def registry_uri(self) -> str:
        """The config's registry URI, else the tracking URI (train/registry.py)."""
        return self.mlflow.registry_uri or self.tracking_uri


def load_train_config(path: str | Path, overrides: dict | None = None, check_data: bool = True) -> TrainConfig:
    """Load and check a training config, including the files it points at, so errors come first.

    ``check_data=False`` skips the shards check (for validating a cluster config away from the cluster).
    """
    from mmdiff.configuration import ConfigError

    config = load_config(path, TrainConfig, overrides)
    if check_data:
        from train.shards import Dataset

        data = config.data
        folders = [("data.shards", data.shards, data.storage_options)] + [
            (f"data.sources[{i}].shards", s.shards, s.storage_options or data.storage_options)
            for i, s in enumerate(data.sources)] + [("validation.shards", config.validation.shards, data.storage_options)]
        for key, folder, options in folders:
            if folder:
                try:
                    Dataset.open(folder, options)
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"{path}: {key}: {exc}") from None
    from mmdiff.model_config import MMDiffConfig

    mmdiff = load_config(config.model.mmdiff, MMDiffConfig)  # its own errors name its file
    if mmdiff.base_family != config.model.base.family:
        raise ConfigError(f"{path}: model.base.family {config.model.base.family} does not match "
                          f"base_family {mmdiff.base_family} of {config.model.mmdiff}")
    return config

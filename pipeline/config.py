"""The preprocessing job's config (configs/preprocess/*.yaml)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mmdiff.configuration import ConfigModel
from pipeline.curation_config import DecontaminationConfig, DedupConfig
from preprocess.annotate import AnnotateConfig
from preprocess.image_io import ImageConfig
from preprocess.quality import QualityConfig

__all__ = ["InputConfig", "OutputConfig", "StageConfig", "AnnotateStageConfig", "StagesConfig", "RayConfig",
           "PreprocessConfig"]


class InputConfig(ConfigModel):
    """Where inputs come from.

    ``folder``: every image file under ``path`` (recursive). ``list``: a text file, one image path per
    line (relative paths resolve against the list's folder). ``shards``: WebDataset / img2dataset tars
    (a folder of ``*.tar`` or one tar); a ``txt`` member is used as the caption. ``annotated``: the
    images are FastComposer / MM-Diff annotations (``name.json`` segments + ``name.npy``/``.png`` integer
    map beside each image); they are imported and no model runs (folder or list only).
    """

    kind: Literal["folder", "list", "shards"]
    path: str  # a local path or a URL of any fsspec filesystem installed (s3://bucket/prefix, gs://...)
    # options of that filesystem (s3: endpoint_url, key, secret, client_kwargs, ...); empty: its defaults
    # (for S3 the AWS_* environment variables and ~/.aws). Never written to the manifest.
    storage_options: dict[str, Any] = {}
    annotated: bool = False
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

    @model_validator(mode="after")
    def _annotated_files_only(self) -> "InputConfig":
        if self.annotated and self.kind == "shards":
            raise ValueError("input.annotated needs kind folder or list (annotations are files beside images)")
        return self


class OutputConfig(ConfigModel):
    path: str  # a local path or s3://bucket/prefix (pipeline.storage: what an output needs)
    storage_options: dict[str, Any] = {}  # as input.storage_options
    shard_size: int = 256  # inputs per partition; shard k holds the accepted samples of partition k
    # the job holds <out>/lock.json while it runs, refreshed every lease_seconds / 4; another job takes
    # the folder over only when the lease is older than this (or its driver is gone from this host)
    lease_seconds: float = 120.0
    # what a rerun checks before trusting a finished shard: "size" (shard and rejects have the sizes their
    # index recorded when they were written; nothing is read) or "sha256" (their bytes too: reads them all)
    verify: Literal["size", "sha256"] = "size"
    # shards are packed by Ray tasks of finalize_cpus CPUs each, at most finalize_in_flight at once; a task
    # lost with its node is rerun up to finalize_retries times (it writes atomically, its index last)
    finalize_cpus: float = Field(default=0.25, gt=0)
    finalize_in_flight: int = Field(default=4, ge=1)
    finalize_retries: int = Field(default=3, ge=0)


class StageConfig(ConfigModel):
    """Resources of one Ray Data stage; fractional CPUs/GPUs let the same job fit a laptop or a cluster."""

    batch_size: int = 8
    concurrency: int = 1  # actors (model stages) or parallel tasks (load stage)
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # a batch whose worker process died (segfault, out of memory, killed) is retried this many times
    # (Ray's max_retries / max_task_retries); then its inputs are retried one by one and the one whose
    # worker still dies is rejected as worker_crash
    crash_retries: int = Field(default=2, ge=0)


class AnnotateStageConfig(StageConfig):
    """The stage that turns a fixed group of ``batch_size`` inputs into staged samples.

    ``batch_size`` is the group size: the driver cuts each partition into groups of it, and every stage
    sees whole groups, so what each model sees depends on the listing only. With ``stages.mode:
    per_model`` this stage is CPU tasks after the model stages (crops, encoding, staging); with ``fused``
    it is one actor pool that also runs every model; a custom ``operator`` or the importer (annotated
    inputs) runs here too, as one actor pool, whatever the mode."""

    # "module:Class" replacing the built-in operator (Annotator, or AnnotationImporter for annotated
    # inputs); built once per actor as Class(config: PreprocessConfig), called like the one it replaces
    operator: str | None = None


class StagesConfig(ConfigModel):
    """Ray Data stages: ``load`` (read, validate, JPEG-encode; tasks), one actor pool per model step
    (``caption``, ``detect``, ``segment``, ``faces``; a step runs when ``annotate.<step>`` is set), then
    ``annotate`` (see :class:`AnnotateStageConfig`). A model stage's ``batch_size`` is its micro-batch:
    it runs its model on the group's inputs still in play in batches of at most that many (so at most
    the group size). ``mode: fused`` runs all model steps in the ``annotate`` actors instead (their
    micro-batch sizes still apply, so both modes write the same bytes); the ``caption``/``detect``/
    ``segment``/``faces`` resources then go unused. Fused starts fewer processes: on 2 CPU cores with
    the tiny models a 140-image job runs at 0.37x the fused throughput per-model, nearly all of it
    start-up (``python -m benchmarks.bench_pipeline --stages``); per-model is what lets each model get
    its own GPU share on a cluster."""

    mode: Literal["per_model", "fused"] = "per_model"
    load: StageConfig = StageConfig(batch_size=16, num_cpus=0.25)
    annotate: AnnotateStageConfig = AnnotateStageConfig()
    caption: StageConfig = StageConfig()
    detect: StageConfig = StageConfig()
    segment: StageConfig = StageConfig()
    faces: StageConfig = StageConfig()
    embed: StageConfig = StageConfig()  # the curation pass's embedding model (dedup.embedding), one actor pool


class RayConfig(ConfigModel):
    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else an embedded local Ray
    num_cpus: int | None = None  # embedded Ray only


class PreprocessConfig(ConfigModel):
    input: InputConfig
    output: OutputConfig
    image: ImageConfig = ImageConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    stages: StagesConfig = StagesConfig()
    ray: RayConfig = RayConfig()
    dedup: DedupConfig = DedupConfig()  # pipeline.curation_config
    decontamination: DecontaminationConfig = DecontaminationConfig()
    quality: QualityConfig = QualityConfig()  # preprocess.quality: optional filters, each with its reason
    progress: bool = True
    qa_samples: int = 16  # samples drawn into <out>/contact_sheet.png at the end (0: none)
    # <out>/report/report.html at the end (pipeline.report): histograms over the first report_samples samples
    # (0: no report; `python -m pipeline.report <out>` writes one for any finished folder)
    report_samples: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _heads_need_embeddings(self) -> "PreprocessConfig":
        if self.quality.heads and self.dedup.embedding is None:
            raise ValueError(f"quality {sorted(self.quality.heads)} score embeddings: set dedup.embedding "
                             "(a clip_vision model whose projection the heads take)")
        return self

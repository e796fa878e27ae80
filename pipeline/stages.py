"""The Ray Data stages of the preprocessing job, from fixed-group rows to one result row per input.

A row is one *fixed group*: the inputs the driver grouped together (``batch``, ``partition`` and
``inputs``, a JSON list of input records). Groups are fixed by the listing and ``stages.annotate.batch_size``,
never by timing, and every stage takes one whole group at a time, cutting it into its own micro-batches
(``stages.<step>.batch_size``) in input order; so each model always sees the same batches and the shards
get the same bytes whatever the concurrency.

    load (tasks) -> caption -> detect -> segment -> faces (one actor pool each) -> annotate (tasks)

``load`` reads, validates and JPEG-encodes each input (the JPEG the shard will store) and decodes that
JPEG once; between stages a group travels as its inputs' state in JSON (status, caption, kept entities)
plus per-input binary columns: ``images`` (that JPEG), ``pixels`` (its decoded RGB, ``height x width x 3``
bytes: what every later stage works on, so no stage decodes again; about 8x the JPEG's bytes in the
object store), ``masks`` (bit-packed) and ``faces`` (float32). Each model stage runs its step
(:mod:`preprocess.annotate`) with its model built once per actor and passes the group on; ``annotate``
builds crops and samples, stages them on shared storage and returns one small row per input (``key``, ``partition``, ``status`` = ``ok`` or ``rejected``, or ``unwritten``
when the output refused the group's samples, and ``outcome``:
JSON of ``source``, ``reason`` and ``detail``; text from file names travels as JSON, which holds any
name, even one that is not UTF-8). ``stages.mode: fused`` runs every model step in one ``annotate``
actor pool instead (:class:`SampleStage`); a custom operator or the importer runs there too.

One input never takes its group down: an exception on an input becomes that input's reject naming the
stage (a micro-batch that raises is rerun one input at a time to find it), and a worker process that
dies is handled by the driver.
"""

from __future__ import annotations

import importlib
import io
import json
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import PreprocessConfig, StageConfig
from pipeline.importer import AnnotationImporter
from pipeline.inputs import InputRecord, NotAFileError, read_bytes
from pipeline.roster import enroll
from pipeline.shards import ShardLayout, stage_samples
from preprocess.annotate import STEPS, Annotation, Annotator, Rejection, SampleBuilder, build_steps, run_step
from preprocess.faces import EMBEDDING_DIM
from preprocess.filters import Kept
from preprocess.image_io import ImageConfig, ImageRejected, as_rgb, load_image
from preprocess.phrases import Phrase
from preprocess.quality import subject_rejection
from preprocess.sample import Sample, encode_jpeg

__all__ = ["load_batch", "ModelStage", "SampleStage", "write_batch", "sample_stages",
           "model_steps", "content_batching", "RESULT_COLUMNS", "UNWRITTEN", "RECORD_FIELDS", "GROUP_COLUMNS", "error_detail"]

RESULT_COLUMNS = ["key", "partition", "status", "outcome"]
# The status of a result row whose group could not be written to the output: the job stops on it.
UNWRITTEN = "unwritten"
RECORD_FIELDS = ("key", "source", "path", "offset", "size", "caption", "annotation", "partition")
# A group between stages: its inputs' state (JSON list) and, per input, the JPEG, its decoded RGB pixels,
# masks and faces (b"": none).
GROUP_COLUMNS = ["batch", "partition", "inputs", "images", "pixels", "masks", "faces"]


def error_detail(source: str, stage: str, exc: BaseException) -> str:
    return f"{source}: stage {stage}: {type(exc).__name__}: {exc}"


def model_steps(config: PreprocessConfig) -> list[str]:
    """The model steps this job runs, in order (caption and faces only when configured)."""
    return [name for name in STEPS if getattr(config.annotate, name) is not None]


def content_batching(config: PreprocessConfig) -> dict[str, int] | None:
    """The batch sizes that decide the shards' bytes (batched inference is not bit-exact): the group
    size and each model step's micro-batch (capped at the group, as run); None for the importer, which
    treats every input on its own."""
    group = config.stages.annotate.batch_size
    if config.stages.annotate.operator or config.input.annotated:
        return None if not config.stages.annotate.operator else {"annotate": group}
    return {"annotate": group, **{name: min(getattr(config.stages, name).batch_size, group) for name in model_steps(config)}}


# -- load -----------------------------------------------------------------------------------------
def _load_one(fields: dict[str, Any], image: ImageConfig,
              storage_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], bytes, bytes]:
    record = InputRecord(**fields)
    result = {**fields, "status": "ok", "reason": "", "detail": "", "width": 0, "height": 0,
              "original_width": 0, "original_height": 0, "kept": []}
    try:
        loaded = load_image(read_bytes(record, storage_options), record.source, image)
        jpeg = encode_jpeg(loaded.image)
        # The stages see the pixels the shard stores (the JPEG decoded), decoded here once for all of them.
        pixels = _decode_image(jpeg).tobytes()
    except ImageRejected as rejected:
        result.update(status="rejected", reason=rejected.reason, detail=rejected.detail)
    except FileNotFoundError as exc:
        result.update(status="rejected", reason="missing_file", detail=str(exc))
    except NotAFileError as exc:
        result.update(status="rejected", reason="not_a_file", detail=str(exc))
    except OSError as exc:
        result.update(status="rejected", reason="unreadable", detail=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a failure on one input is that input's reject
        result.update(status="rejected", reason="load_error", detail=error_detail(record.source, "load", exc))
    else:
        result.update(width=loaded.image.width, height=loaded.image.height,
                      original_width=loaded.original_size[0], original_height=loaded.original_size[1])
        return result, jpeg, pixels
    return result, b"", b""


def load_batch(batch: pd.DataFrame, image: ImageConfig, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Read, validate, JPEG-encode and decode every input of each group; ``inputs`` gains status and sizes."""
    out = []
    for row in batch.to_dict("records"):
        results, images, pixels = zip(*(_load_one(fields, image, storage_options)
                                        for fields in json.loads(row["inputs"])))
        out.append({"batch": row["batch"], "partition": row["partition"], "inputs": json.dumps(results),
                    "images": list(images), "pixels": list(pixels), "masks": [b""] * len(images),
                    "faces": [b""] * len(images)})
    return pd.DataFrame(out, columns=GROUP_COLUMNS)


# -- a group between stages -----------------------------------------------------------------------
def _decode_image(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    image.load()
    return as_rgb(image)


def _kept(data: dict[str, Any]) -> Kept:
    return Kept(Phrase(**data["phrase"]), tuple(data["box"]), data["score"])


def _kept_data(kept: Kept) -> dict[str, Any]:
    return {"phrase": vars(kept.phrase), "box": list(kept.box), "score": kept.score}


class Group:
    """One fixed group decoded: ``inputs`` (each input's JSON state) and ``items`` (an
    :class:`Annotation` per input still in play, by position)."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.batch, self.partition = row["batch"], int(row["partition"])
        self.inputs: list[dict[str, Any]] = json.loads(row["inputs"])
        self.images = [bytes(b) for b in row["images"]]
        self.pixels = [bytes(b) for b in row["pixels"]]
        masks, faces = [bytes(b) for b in row["masks"]], [bytes(b) for b in row["faces"]]
        self.items: dict[int, Annotation] = {}
        for i, fields in enumerate(self.inputs):
            if fields["status"] != "ok":
                continue
            kept = [_kept(k) for k in fields["kept"]]
            shape = (len(kept), int(fields["height"]), int(fields["width"]))
            self.items[i] = Annotation(
                fields["key"], Image.frombytes("RGB", (int(fields["width"]), int(fields["height"])), self.pixels[i]),
                fields["caption"], kept,
                np.unpackbits(np.frombuffer(masks[i], np.uint8), count=int(np.prod(shape))).reshape(shape).astype(bool)
                if masks[i] else None,
                np.frombuffer(faces[i], np.float32).reshape(len(kept), EMBEDDING_DIM) if faces[i] else None)

    def sources(self) -> dict[str, str]:
        return {fields["key"]: fields["source"] for fields in self.inputs}

    def reject(self, index: int, rejection: Rejection) -> None:
        self.inputs[index].update(status="rejected", reason=rejection.reason, detail=rejection.detail)

    def row(self) -> dict[str, Any]:
        """The group as a row for the next stage (rejections recorded in the inputs' state)."""
        masks, faces = [b""] * len(self.inputs), [b""] * len(self.inputs)
        for i, item in self.items.items():
            if item.rejection is not None:
                self.reject(i, item.rejection)
                continue
            self.inputs[i].update(caption=item.caption, kept=[_kept_data(k) for k in item.kept])
            if item.masks is not None:
                masks[i] = np.packbits(item.masks).tobytes()
            if item.faces is not None:
                faces[i] = np.asarray(item.faces, np.float32).tobytes()
        return {"batch": self.batch, "partition": self.partition, "inputs": json.dumps(self.inputs),
                "images": self.images, "pixels": self.pixels, "masks": masks, "faces": faces}


def _annotate_error(sources: dict[str, str]) -> Callable[[Annotation, str, Exception], Rejection]:
    return lambda item, stage, exc: Rejection("annotate_error", error_detail(sources[item.key], stage, exc))


# -- model stages ---------------------------------------------------------------------------------
class ModelStage:
    """Actor: builds one model step once, runs it over each group in its micro-batches."""

    def __init__(self, config: PreprocessConfig, name: str, roster: Any = None) -> None:
        enroll(roster)
        (self.step,) = build_steps(config.annotate, [name]).values()
        self.batch_size = getattr(config.stages, name).batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for row in batch.to_dict("records"):
            group = Group(row)
            run_step(self.step, list(group.items.values()), self.batch_size, _annotate_error(group.sources()))
            out.append(group.row())
        return pd.DataFrame(out, columns=GROUP_COLUMNS)


class _Writer:
    """Turns a group's results into staged samples and one result row per input."""

    def __init__(self, config: PreprocessConfig, content_hash: str) -> None:
        self.layout = ShardLayout(config.output.path, config.output.storage_options)
        self.content_hash = content_hash
        self.quality = config.quality

    def __call__(self, group: Group, results: dict[int, Sample | Rejection]) -> list[dict[str, Any]]:
        staged: list[dict[str, Any]] = []
        for i, result in results.items():
            fields = group.inputs[i]
            if isinstance(result, Sample) and (small := subject_rejection(
                    result.masks, self.quality, fields["source"], [e.word for e in result.entities])):
                result = Rejection(*small)  # preprocess.quality: min_subject_area
            if isinstance(result, Rejection):
                group.reject(i, result)
                continue
            try:
                result.meta.update(source=fields["source"], config_hash=self.content_hash,
                                   original_size=[int(fields["original_width"]), int(fields["original_height"])])
                staged.append(result.to_wds(jpeg=group.images[i]))
            except Exception as exc:  # noqa: BLE001 - a failure on one input is that input's reject
                group.reject(i, Rejection("encode_failed", error_detail(fields["source"], "encode", exc)))
        if staged:
            try:
                stage_samples(self.layout, group.partition, staged)
            except Exception as exc:  # noqa: BLE001 - the samples are made: only the output can fail here
                # The job's failure, not the inputs': the driver stops on this row, and nothing of the group
                # is recorded, so a rerun redoes it.
                return [{"key": r["key"], "partition": r["partition"], "status": UNWRITTEN,
                         "outcome": json.dumps({"source": r["source"], "reason": "", "detail": f"{type(exc).__name__}: {exc}"})}
                        for r in group.inputs]
        return [{"key": r["key"], "partition": r["partition"], "status": r["status"],
                 "outcome": json.dumps({k: r[k] for k in ("source", "reason", "detail")})} for r in group.inputs]


def _build_results(builder: SampleBuilder, group: Group) -> dict[int, Sample | Rejection]:
    results: dict[int, Sample | Rejection] = {}
    for i, item in group.items.items():
        try:
            results[i] = builder(item)
        except Exception as exc:  # noqa: BLE001 - a failure on one input is that input's reject
            results[i] = Rejection("annotate_error", error_detail(group.inputs[i]["source"], "crops", exc))
    return results


def write_batch(batch: pd.DataFrame, config: PreprocessConfig, content_hash: str) -> pd.DataFrame:
    """After the model stages: crops and samples of each group, staged; one result row per input."""
    builder, writer = SampleBuilder(config.annotate), _Writer(config, content_hash)
    out: list[dict[str, Any]] = []
    for row in batch.to_dict("records"):
        group = Group(row)
        out += writer(group, _build_results(builder, group))
    return pd.DataFrame(out, columns=RESULT_COLUMNS)


# -- everything in one actor: fused model steps, a custom operator or the importer ---------------------
def _build_operator(config: PreprocessConfig) -> tuple[Callable[..., list], str]:
    """A custom per-group operator (or the importer) and the reject reason for an exception it raises."""
    reason = "import_error" if config.input.annotated else "annotate_error"
    if config.stages.annotate.operator:
        module, _, name = config.stages.annotate.operator.partition(":")
        return getattr(importlib.import_module(module), name)(config), reason
    return AnnotationImporter(config.annotate.crops), reason


class SampleStage:
    """Actor: turns each group into staged samples in one stage. It holds either every model step
    (:class:`Annotator`, ``stages.mode: fused``; same steps, micro-batches and failure handling as the
    per-model stages) or a custom operator / the importer, built once and run over the whole group."""

    def __init__(self, config: PreprocessConfig, content_hash: str, roster: Any = None) -> None:
        enroll(roster)
        self.annotated = config.input.annotated
        self.writer = _Writer(config, content_hash)
        if config.stages.annotate.operator or config.input.annotated:
            self.annotator = None
            self.operator, self.error_reason = _build_operator(config)
        else:
            self.annotator = Annotator(config.annotate)
            self.batch_sizes = {name: getattr(config.stages, name).batch_size for name in STEPS}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out: list[dict[str, Any]] = []
        for row in batch.to_dict("records"):
            group = Group(row)
            if self.annotator is not None:
                self.annotator.annotate(list(group.items.values()), self.batch_sizes, _annotate_error(group.sources()))
                results = _build_results(self.annotator.builder, group)
            else:
                indexes = list(group.items)
                results = dict(zip(indexes, self._results([group.inputs[i] for i in indexes],
                                                          [group.items[i].image for i in indexes])))
            out += self.writer(group, results)
        return pd.DataFrame(out, columns=RESULT_COLUMNS)

    def _apply(self, rows: list[dict[str, Any]], images: list[Image.Image]) -> list:
        keys = [r["key"] for r in rows]
        if self.annotated:
            sizes = [(int(r["original_width"]), int(r["original_height"])) for r in rows]
            return self.operator(keys, images, [r["annotation"] for r in rows], sizes)
        return self.operator(keys, images, [r["caption"] for r in rows])

    def _results(self, rows: list[dict[str, Any]], images: list[Image.Image]) -> list:
        """The operator over the whole group; if it raises, over one input at a time, so only the input
        that raises is rejected (with the stage and the exception)."""
        if not rows:
            return []
        try:
            results = self._apply(rows, images)
            if len(results) != len(rows):
                raise RuntimeError(f"operator returned {len(results)} results for {len(rows)} inputs")
            return results
        except Exception:  # noqa: BLE001 - narrowed below to the input that raises
            pass
        return [self._alone(row, image) for row, image in zip(rows, images)]

    def _alone(self, row: dict[str, Any], image: Image.Image) -> Sample | Rejection:
        try:
            (result,) = self._apply([row], [image])
            return result
        except Exception as exc:  # noqa: BLE001
            return Rejection(self.error_reason, error_detail(row["source"], "annotate", exc))


# -- the chain ------------------------------------------------------------------------------------
def sample_stages(ds: Any, config: PreprocessConfig, content_hash: str, alone: bool = False,
                  roster: Any = None) -> Any:
    """The Ray Data stages from fixed-group rows (``batch``, ``partition``, ``inputs``) to one
    :data:`RESULT_COLUMNS` row per input. ``alone``: every stage holds one group at a time, so a worker
    that dies takes no other input's group with it (Ray Data otherwise queues several per actor). The
    stage actors enroll in ``roster`` (:func:`actor_roster`)."""
    import ray

    stages = config.stages
    ds = ds.map_batches(load_batch, fn_kwargs={"image": config.image, "storage_options": config.input.storage_options}, batch_format="pandas",
                        batch_size=1 if alone else max(1, stages.load.batch_size // stages.annotate.batch_size),
                        compute=ray.data.TaskPoolStrategy(size=stages.load.concurrency), num_cpus=stages.load.num_cpus,
                        max_retries=stages.load.crash_retries)

    def actors(ds: Any, stage_class: type, stage: StageConfig, **kwargs: Any) -> Any:
        # A dead actor is always replaced (it holds only a model); the group it held is retried crash_retries times.
        return ds.map_batches(
            stage_class, fn_constructor_kwargs=kwargs, batch_format="pandas", batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=stage.concurrency,
                                               max_tasks_in_flight_per_actor=1 if alone else None),
            num_cpus=stage.num_cpus, num_gpus=stage.num_gpus, max_restarts=-1, max_task_retries=stage.crash_retries)

    if stages.mode == "fused" or stages.annotate.operator or config.input.annotated:
        return actors(ds, SampleStage, stages.annotate, config=config, content_hash=content_hash, roster=roster)
    for name in model_steps(config):
        ds = actors(ds, ModelStage, getattr(stages, name), config=config, name=name, roster=roster)
    return ds.map_batches(write_batch, fn_kwargs={"config": config, "content_hash": content_hash},
                          batch_format="pandas", batch_size=1,
                          compute=ray.data.TaskPoolStrategy(size=stages.annotate.concurrency),
                          num_cpus=stages.annotate.num_cpus, max_retries=stages.annotate.crash_retries)

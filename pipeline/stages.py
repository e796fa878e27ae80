"""The Ray Data stages of the preprocessing job: small callables over pandas batches.

A row is one *fixed batch*: the inputs the driver grouped together (``batch``, ``partition`` and
``inputs``, a JSON list of input records). Batches are fixed by the listing and the annotate batch size,
never by timing, so the models always see the same groups and the shards get the same bytes whatever
the concurrency. The load stage adds each input's pixels and status; the sample stage runs the operator
once per fixed batch, stages finished samples on shared storage and returns one small row per input
(``key``, ``partition``, ``status`` = ``ok`` or ``rejected``, and ``outcome``: JSON of ``source``,
``reason`` and ``detail``; text from file names travels as JSON, which holds any name, even one that is
not UTF-8).

One input never takes its batch down: an exception on an input becomes that input's reject (the batch
is retried one input at a time to find it), and a worker process that dies is handled by the driver.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable

import pandas as pd
from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.importer import AnnotationImporter
from pipeline.inputs import InputRecord, NotAFileError, read_bytes
from pipeline.shards import ShardLayout, stage_samples
from preprocess.annotate import Annotator, Rejection
from preprocess.image_io import ImageConfig, ImageRejected, load_image

__all__ = ["load_batch", "SampleStage", "sample_stages", "RESULT_COLUMNS", "RECORD_FIELDS", "error_detail"]

RESULT_COLUMNS = ["key", "partition", "status", "outcome"]
RECORD_FIELDS = ("key", "source", "path", "offset", "size", "caption", "annotation", "partition")


def error_detail(source: str, stage: str, exc: BaseException) -> str:
    return f"{source}: stage {stage}: {type(exc).__name__}: {exc}"


def _load_one(fields: dict[str, Any], image: ImageConfig) -> tuple[dict[str, Any], bytes]:
    record = InputRecord(**fields)
    result = {**fields, "status": "ok", "reason": "", "detail": "", "width": 0, "height": 0,
              "original_width": 0, "original_height": 0}
    try:
        loaded = load_image(read_bytes(record), record.source, image)
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
        return result, loaded.image.tobytes()
    return result, b""


def load_batch(batch: pd.DataFrame, image: ImageConfig) -> pd.DataFrame:
    """Read + validate every input of each fixed batch; ``inputs`` gains status and sizes, ``pixels``
    holds the inputs' raw RGB bytes back to back."""
    out = []
    for row in batch.to_dict("records"):
        results, pixels = [], []
        for fields in json.loads(row["inputs"]):
            result, rgb = _load_one(fields, image)
            results.append(result)
            pixels.append(rgb)
        out.append({"batch": row["batch"], "partition": row["partition"], "inputs": json.dumps(results),
                    "pixels": b"".join(pixels)})
    return pd.DataFrame(out, columns=["batch", "partition", "inputs", "pixels"])


def _build_operator(config: PreprocessConfig) -> tuple[Callable[..., list], str]:
    """The per-batch operator and the reject reason for an exception it raises on an input."""
    reason = "import_error" if config.input.annotated else "annotate_error"
    if config.stages.annotate.operator:
        module, _, name = config.stages.annotate.operator.partition(":")
        return getattr(importlib.import_module(module), name)(config), reason
    if config.input.annotated:
        return AnnotationImporter(config.annotate.crops), reason
    return Annotator(config.annotate), reason


class SampleStage:
    """Actor: builds the operator once, turns each fixed batch into samples, stages them, returns small rows."""

    def __init__(self, config: PreprocessConfig, content_hash: str) -> None:
        self.layout = ShardLayout(config.output.path)
        self.content_hash = content_hash
        self.annotated = config.input.annotated
        self.operator, self.error_reason = _build_operator(config)

    def _apply(self, rows: list[dict[str, Any]], images: list[Image.Image]) -> list:
        keys = [r["key"] for r in rows]
        if self.annotated:
            sizes = [(int(r["original_width"]), int(r["original_height"])) for r in rows]
            return self.operator(keys, images, [r["annotation"] for r in rows], sizes)
        return self.operator(keys, images, [r["caption"] for r in rows])

    def _samples(self, rows: list[dict[str, Any]], images: list[Image.Image]) -> list:
        """The operator over the whole batch; if it raises, over one input at a time, so only the input
        that raises is rejected (with the stage and the exception)."""
        if not rows:
            return []
        try:
            results = self._apply(rows, images)
            if len(results) != len(rows):
                raise RuntimeError(f"operator returned {len(results)} results for {len(rows)} inputs")
            return results
        except Exception:  # noqa: BLE001 - narrowed below to the input that raises
            if len(rows) == 1:
                raise
        results = []
        for row, image in zip(rows, images):
            try:
                results.extend(self._apply([row], [image]))
            except Exception as exc:  # noqa: BLE001
                results.append(Rejection(self.error_reason, error_detail(row["source"], "annotate", exc)))
        return results

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out: list[dict[str, Any]] = []
        for fixed in batch.to_dict("records"):
            rows = json.loads(fixed["inputs"])
            pixels, offset = bytes(fixed["pixels"]), 0
            images = []
            for row in rows:
                size = 3 * int(row["width"]) * int(row["height"])
                if row["status"] == "ok":
                    images.append(Image.frombytes("RGB", (int(row["width"]), int(row["height"])),
                                                  pixels[offset : offset + size]))
                offset += size
            ok = [r for r in rows if r["status"] == "ok"]
            try:
                results = self._samples(ok, images)
            except Exception as exc:  # noqa: BLE001 - a single input that raises
                results = [Rejection(self.error_reason, error_detail(ok[0]["source"], "annotate", exc))]
            staged: list[dict[str, Any]] = []
            for row, result in zip(ok, results):
                if isinstance(result, Rejection):
                    row.update(status="rejected", reason=result.reason, detail=result.detail)
                    continue
                try:
                    result.meta.update(source=row["source"], config_hash=self.content_hash,
                                       original_size=[int(row["original_width"]), int(row["original_height"])])
                    staged.append(result.to_wds())
                except Exception as exc:  # noqa: BLE001
                    row.update(status="rejected", reason="encode_failed", detail=error_detail(row["source"], "encode", exc))
            if staged:
                stage_samples(self.layout, int(fixed["partition"]), staged)
            out += [{"key": r["key"], "partition": r["partition"], "status": r["status"],
                     "outcome": json.dumps({k: r[k] for k in ("source", "reason", "detail")})} for r in rows]
        return pd.DataFrame(out, columns=RESULT_COLUMNS)


def sample_stages(ds: Any, config: PreprocessConfig, content_hash: str, alone: bool = False) -> Any:
    """The Ray Data stages from fixed-batch rows (``batch``, ``partition``, ``inputs``) to one
    :data:`RESULT_COLUMNS` row per input. ``alone``: each actor holds one batch at a time, so a worker that
    dies takes no other input's batch with it (Ray Data otherwise queues several per actor)."""
    import ray

    load, annotate = config.stages.load, config.stages.annotate
    ds = ds.map_batches(load_batch, fn_kwargs={"image": config.image}, batch_format="pandas",
                        batch_size=max(1, load.batch_size // annotate.batch_size),
                        compute=ray.data.TaskPoolStrategy(size=load.concurrency), num_cpus=load.num_cpus,
                        max_retries=load.crash_retries)
    # A dead actor is always replaced (it holds only models); the batch it held is retried crash_retries times.
    return ds.map_batches(
        SampleStage, fn_constructor_kwargs={"config": config, "content_hash": content_hash}, batch_format="pandas",
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=annotate.concurrency, max_tasks_in_flight_per_actor=1 if alone else None),
        num_cpus=annotate.num_cpus, num_gpus=annotate.num_gpus,
        max_restarts=-1, max_task_retries=annotate.crash_retries,
    )

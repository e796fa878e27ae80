"""The Ray Data stages of the preprocessing job: small callables over pandas batches.

Rows carry ``key``, ``partition`` and ``source`` through every stage plus a ``status`` (``ok`` or
``rejected`` with ``reason``/``detail``); a rejected row passes through later stages untouched. The last
stage stages finished samples on shared storage and returns only small rows to the driver.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.importer import AnnotationImporter
from pipeline.inputs import InputRecord, read_bytes
from pipeline.shards import ShardLayout, stage_samples
from preprocess.annotate import Annotator, Rejection
from preprocess.image_io import ImageConfig, ImageRejected, load_image

__all__ = ["load_batch", "SampleStage", "RESULT_COLUMNS"]

RESULT_COLUMNS = ["key", "partition", "source", "status", "reason", "detail"]


def load_batch(batch: pd.DataFrame, image: ImageConfig) -> pd.DataFrame:
    """Read + validate each input; adds ``rgb`` (raw RGB bytes), sizes and the status columns."""
    out = []
    for row in batch.to_dict("records"):
        record = InputRecord(**{k: row[k] for k in ("key", "source", "path", "offset", "size", "caption",
                                                     "annotation", "partition")})
        result = {**row, "status": "ok", "reason": "", "detail": "", "rgb": b"", "width": 0, "height": 0,
                  "original_width": 0, "original_height": 0}
        try:
            loaded = load_image(read_bytes(record), record.source, image)
        except ImageRejected as rejected:
            result.update(status="rejected", reason=rejected.reason, detail=rejected.detail)
        except FileNotFoundError as exc:
            result.update(status="rejected", reason="missing_file", detail=str(exc))
        except OSError as exc:
            result.update(status="rejected", reason="unreadable", detail=f"{type(exc).__name__}: {exc}")
        else:
            result.update(rgb=loaded.image.tobytes(), width=loaded.image.width, height=loaded.image.height,
                          original_width=loaded.original_size[0], original_height=loaded.original_size[1])
        out.append(result)
    return pd.DataFrame(out)


class SampleStage:
    """Actor: builds the models once, turns loaded images into samples, stages them, returns small rows."""

    def __init__(self, config: PreprocessConfig, content_hash: str) -> None:
        self.layout = ShardLayout(config.output.path)
        self.content_hash = content_hash
        if config.input.annotated:
            self.importer: AnnotationImporter | None = AnnotationImporter(config.annotate.crops)
            self.annotator: Annotator | None = None
        else:
            self.importer = None
            self.annotator = Annotator(config.annotate)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        ok = [r for r in rows if r["status"] == "ok"]
        images = [Image.frombytes("RGB", (int(r["width"]), int(r["height"])), r["rgb"]) for r in ok]
        keys = [r["key"] for r in ok]
        if self.importer is not None:
            sizes = [(int(r["original_width"]), int(r["original_height"])) for r in ok]
            results = self.importer(keys, images, [r["annotation"] for r in ok], sizes)
        else:
            results = self.annotator(keys, images, [r["caption"] for r in ok]) if ok else []
        staged: dict[int, list[dict[str, Any]]] = {}
        for row, result in zip(ok, results):
            if isinstance(result, Rejection):
                row.update(status="rejected", reason=result.reason, detail=result.detail)
                continue
            result.meta.update(source=row["source"], config_hash=self.content_hash,
                               original_size=[int(row["original_width"]), int(row["original_height"])])
            try:
                staged.setdefault(int(row["partition"]), []).append(result.to_wds())
            except (ValueError, OSError) as exc:
                row.update(status="rejected", reason="encode_failed", detail=f"{type(exc).__name__}: {exc}")
        for partition, samples in staged.items():
            stage_samples(self.layout, partition, samples)
        return pd.DataFrame([{c: r[c] for c in RESULT_COLUMNS} for r in rows], columns=RESULT_COLUMNS)

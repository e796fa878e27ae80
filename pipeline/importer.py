"""Import FastComposer / MM-Diff annotation folders into the same shards as the model path.

The two published layouts, as their own code writes and reads them:

- MM-Diff (alibaba/mm-diff ``data_annotation/imagenet_annotation_demo.py``, the writer): per image
  ``<id>.jpg``, ``<id>.npy`` = ``float32 [H, W]`` map where the pixels of segment ``k`` hold ``k`` (1, 2, ...;
  0 = background) and ``<id>.json`` = ``{"image_id", "caption", "segments": [{"id", "word", "start", "end",
  "box"}]}``; ``word`` is the spaCy noun chunk (``"a cat"``) at ``caption[start:end]``, ``box`` is
  ``[ceil x0, ceil y0, floor x1, floor y1]`` in pixels of the image.
- FastComposer (mit-han-lab/fastcomposer ``fastcomposer/data.py``, the reader): the same files with the box
  under ``"bbox"``. Its code comments the box as ``[h1, w1, h2, w2]`` but crops with
  ``image[:, w1:w2, h1:h2]`` on a ``[C, H, W]`` tensor (``transforms.SegmentProcessor``): ``bbox[0]`` and
  ``bbox[2]`` index columns, so the box is column-first, ``[x0, y0, x1, y1]``, like MM-Diff's. The subject
  token is the last token of ``caption[:end]``.

Each segment becomes an entity: ``phrase`` = ``caption[start:end]``, ``word`` = its last word (the token
FastComposer binds the subject to). Every field is validated; a malformed annotation is rejected with
``missing_annotation``, ``bad_annotation`` (the detail names the file, segment and field),
``mask_outside_box``, ``empty_mask``, ``ambiguous_words`` or ``no_entities``. Maps are read with pickles
refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from preprocess.annotate import Rejection, box_masks, round_box
from preprocess.crops import CropConfig, SubjectCropper
from preprocess.sample import Entity, Sample

__all__ = ["AnnotationImporter", "AnnotationError", "read_segmentation_map", "MAX_OUTSIDE_SHARE"]

MAX_OUTSIDE_SHARE = 0.05  # share of a segment's pixels allowed outside its box (SAM spills past box prompts)
_BOX_SLACK = 2.0  # pixels the box is grown by before that share is measured (the writer rounds boxes inward)


class AnnotationError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def read_segmentation_map(image_path: Path) -> np.ndarray:
    """The map beside ``image_path`` (``.npy`` read without pickles, or an 8/16-bit ``.png``)."""
    npy, png = image_path.with_suffix(".npy"), image_path.with_suffix(".png")
    if npy.is_file():
        return np.load(npy, allow_pickle=False)
    if png.is_file() and png != image_path:
        with Image.open(png) as image:
            return np.asarray(image)
    raise FileNotFoundError(f"{image_path.name}: no segmentation map ({npy.name} or {png.name})")


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnnotationError("bad_annotation", f"{what} must be an integer, got {value!r}")
    return value


def _box(value: Any, what: str, size: tuple[int, int]) -> tuple[float, float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise AnnotationError("bad_annotation", f"{what} must be 4 finite numbers [x0, y0, x1, y1], got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if x1 <= x0 or y1 <= y0:
        raise AnnotationError("bad_annotation", f"{what} {list(value)} is empty or inverted (needs x0 < x1, y0 < y1)")
    width, height = size
    if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
        raise AnnotationError("bad_annotation", f"{what} {list(value)} lies outside the {width}x{height} image")
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))


def _check_map(segmap: Any, name: str, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    if not isinstance(segmap, np.ndarray) or segmap.ndim != 2 or segmap.shape != (height, width):
        shape = getattr(segmap, "shape", None)
        raise AnnotationError("bad_annotation", f"{name}: segmentation map shape {shape} != image {height}x{width} (H x W)")
    if segmap.dtype.kind not in "iuf":
        raise AnnotationError("bad_annotation", f"{name}: segmentation map dtype {segmap.dtype} is not numeric")
    if segmap.dtype.kind == "f" and not (np.isfinite(segmap).all() and (segmap == np.round(segmap)).all()):
        raise AnnotationError("bad_annotation", f"{name}: float segmentation map holds non-integer ids")
    return segmap


def _head(caption: str, start: int, end: int) -> tuple[str, int, int]:
    """The last word of ``caption[start:end]`` and its span: the token the subject binds to."""
    match = re.search(r"(\S+)\s*$", caption[start:end])
    if match is None:
        raise AnnotationError("bad_annotation", f"caption[{start}:{end}] holds no word")
    return match.group(1), start + match.start(1), start + match.end(1)


def _segments(data: Any, name: str, size: tuple[int, int]) -> tuple[str, list[dict[str, Any]]]:
    """Validated caption and segments (id, phrase span, head word span, box or None, name for errors)."""
    if not isinstance(data, dict):
        raise AnnotationError("bad_annotation", f"{name}: top level must be an object, got {type(data).__name__}")
    caption, segments = data.get("caption"), data.get("segments")
    if not isinstance(caption, str) or not caption.strip():
        raise AnnotationError("bad_annotation", f"{name}: caption must be a non-empty string, got {caption!r}")
    if not isinstance(segments, list):
        raise AnnotationError("bad_annotation", f"{name}: segments must be a list, got {segments!r}")
    if not segments:
        raise AnnotationError("no_entities", f"{name}: no segments")
    out = []
    for index, segment in enumerate(segments):
        what = f"{name}: segment {index}"
        if not isinstance(segment, dict):
            raise AnnotationError("bad_annotation", f"{what} must be an object, got {segment!r}")
        segment_id = _integer(segment.get("id"), f"{what} id")
        start, end = _integer(segment.get("start"), f"{what} start"), _integer(segment.get("end"), f"{what} end")
        word = segment.get("word")
        if not isinstance(word, str) or not word:
            raise AnnotationError("bad_annotation", f"{what} word must be a non-empty string, got {word!r}")
        if not 0 <= start < end <= len(caption):
            raise AnnotationError("bad_annotation", f"{what} span [{start}:{end}] is not inside the caption "
                                  f"({len(caption)} characters)")
        if caption[start:end] != word:
            raise AnnotationError("bad_annotation", f"{what} caption[{start}:{end}] = {caption[start:end]!r} != "
                                  f"word {word!r}")
        boxes = [segment[k] for k in ("bbox", "box") if k in segment]
        if len(boxes) == 2 and boxes[0] != boxes[1]:
            raise AnnotationError("bad_annotation", f"{what} has both bbox {boxes[0]} and box {boxes[1]}")
        head, head_start, head_end = _head(caption, start, end)
        out.append({"id": segment_id, "phrase": word, "start": start, "end": end, "word": head,
                    "word_start": head_start, "word_end": head_end, "what": what,
                    "box": _box(boxes[0], f"{what} box", size) if boxes else None})
    ids = [s["id"] for s in out]
    if len(set(ids)) != len(ids):
        raise AnnotationError("bad_annotation", f"{name}: segment ids repeat: {ids}")
    words = [s["word"].lower() for s in out]
    if len(set(words)) != len(words):
        raise AnnotationError("ambiguous_words", f"{name}: two segments share a subject word: {words}")
    return caption, out


class AnnotationImporter:
    """``importer(keys, images, annotation_paths, original_sizes) -> [Sample | Rejection]``; each input is
    imported on its own, so the result never depends on the batch."""

    def __init__(self, crops: CropConfig) -> None:
        self.cropper = SubjectCropper(crops)

    def __call__(self, keys: list[str], images: list[Image.Image], annotations: list[str],
                 original_sizes: list[tuple[int, int]]) -> list[Sample | Rejection]:
        out: list[Sample | Rejection] = []
        for args in zip(keys, images, annotations, original_sizes):
            try:
                out.append(self.import_one(*args))
            except AnnotationError as error:
                out.append(Rejection(error.reason, error.detail))
        return out

    def import_one(self, key: str, image: Image.Image, annotation: str, original_size: tuple[int, int]) -> Sample:
        path = Path(annotation)
        try:
            text = path.read_text(encoding="utf-8")
            segmap = read_segmentation_map(path)
        except FileNotFoundError as exc:
            raise AnnotationError("missing_annotation", str(exc)) from None
        except (OSError, ValueError) as exc:  # a pickled or damaged map, unreadable files
            raise AnnotationError("bad_annotation", f"{path.name}: {type(exc).__name__}: {exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise AnnotationError("bad_annotation", f"{path.name}: not JSON: {exc}") from None
        caption, segments = _segments(data, path.name, original_size)
        segmap = _check_map(segmap, path.with_suffix(".npy").name, original_size)
        width, height = image.size
        if image.size != tuple(original_size):
            segmap = np.asarray(Image.fromarray(segmap.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST))
        sx, sy = width / original_size[0], height / original_size[1]
        entities, masks = [], []
        for segment in segments:
            mask = segmap == segment["id"]
            if not mask.any():
                raise AnnotationError("empty_mask", f"{segment['what']} (id {segment['id']}): no pixel of the map "
                                      "holds this id")
            if segment["box"] is None:  # no box given: the mask's extent
                ys, xs = np.nonzero(mask)
                box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            else:
                x0, y0, x1, y1 = segment["box"]
                box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            box = round_box(box)
            grown = box_masks(np.array([[box[0] - _BOX_SLACK, box[1] - _BOX_SLACK, box[2] + _BOX_SLACK,
                                         box[3] + _BOX_SLACK]], np.float32), image.size)[0]
            outside = float((mask & ~grown).sum()) / float(mask.sum())
            if outside > MAX_OUTSIDE_SHARE:
                raise AnnotationError("mask_outside_box", _outside_detail(segment, mask, outside, (sx, sy)))
            mask &= box_masks(np.array([box], np.float32), image.size)[0]
            if not mask.any():
                raise AnnotationError("empty_mask", f"{segment['what']}: no pixel of the segment inside its box")
            entities.append(Entity(phrase=segment["phrase"], word=segment["word"], start=segment["word_start"],
                                   end=segment["word_end"], phrase_start=segment["start"], phrase_end=segment["end"],
                                   box=box, score=1.0))
            masks.append(mask)
        masks_array = np.stack(masks)
        crops = self.cropper(image, np.array([e.box for e in entities], np.float32), masks_array)
        return Sample(key, image, caption, entities, masks_array, crops, meta={"models": {"annotation": "import"}})


def _outside_detail(segment: dict[str, Any], mask: np.ndarray, outside: float, scale: tuple[float, float]) -> str:
    ys, xs = np.nonzero(mask)
    extent = [round(v, 1) for v in (xs.min() / scale[0], ys.min() / scale[1], (xs.max() + 1) / scale[0],
                                    (ys.max() + 1) / scale[1])]
    box = [round(v, 1) for v in segment["box"]]
    return (f"{segment['what']}: {outside:.0%} of segment {segment['id']} lies outside its box {box} (read as "
            f"[x0, y0, x1, y1], column first, as MM-Diff writes it and FastComposer crops with it); the segment spans "
            f"{extent}. A box written row first ([y0, x0, y1, x1]) looks like this.")

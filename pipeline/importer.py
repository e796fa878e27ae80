"""Import FastComposer / MM-Diff annotation folders into the same shards as the model path.

Per image ``name.jpg`` the folder holds ``name.json`` = ``{"caption", "segments": [{"id", "word",
"start", "end", "bbox" | "box"}]}`` (``caption[start:end] == word``, boxes xyxy in pixels of the
original image) and an integer segmentation map ``name.npy`` (or ``name.png``) where pixels of segment
``id`` hold ``id``. Each segment becomes an entity whose phrase is its word.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from preprocess.annotate import Rejection, round_box
from preprocess.crops import CropConfig, SubjectCropper
from preprocess.sample import Entity, Sample

__all__ = ["AnnotationImporter", "read_segmentation_map"]


def read_segmentation_map(image_path: Path) -> np.ndarray:
    """The integer map beside ``image_path`` (``.npy`` read without pickles, or a 8/16-bit ``.png``)."""
    npy, png = image_path.with_suffix(".npy"), image_path.with_suffix(".png")
    if npy.is_file():
        return np.load(npy, allow_pickle=False)
    if png.is_file() and png != image_path:
        return np.asarray(Image.open(png))
    raise FileNotFoundError(f"{image_path}: no segmentation map ({npy.name} or {png.name})")


class AnnotationImporter:
    """``importer(keys, images, annotation_paths, original_sizes) -> [Sample | Rejection]``."""

    def __init__(self, crops: CropConfig) -> None:
        self.cropper = SubjectCropper(crops)

    def __call__(self, keys: list[str], images: list[Image.Image], annotations: list[str],
                 original_sizes: list[tuple[int, int]]) -> list[Sample | Rejection]:
        return [self._one(*args) for args in zip(keys, images, annotations, original_sizes)]

    def _one(self, key: str, image: Image.Image, annotation: str, original_size: tuple[int, int]):
        path = Path(annotation)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            caption, segments = data["caption"], data["segments"]
            segmap = read_segmentation_map(path)
        except FileNotFoundError as exc:
            return Rejection("missing_annotation", str(exc))
        except (ValueError, KeyError, TypeError) as exc:
            return Rejection("bad_annotation", f"{path.name}: {type(exc).__name__}: {exc}")
        if segmap.ndim != 2 or segmap.shape[::-1] != tuple(original_size):
            return Rejection("bad_annotation", f"{path.name}: segmentation map {segmap.shape} does not match "
                             f"image {original_size[0]}x{original_size[1]}")
        width, height = image.size
        if image.size != tuple(original_size):
            segmap = np.asarray(Image.fromarray(segmap.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST))
        scale = width / original_size[0]
        entities, masks = [], []
        for index, segment in enumerate(segments):
            try:
                word, start, end = segment["word"], int(segment["start"]), int(segment["end"])
                segment_id = int(segment["id"])
                box = segment.get("bbox", segment.get("box"))
            except (KeyError, TypeError, ValueError) as exc:
                return Rejection("bad_annotation", f"{path.name}: segment {index}: {type(exc).__name__}: {exc}")
            if caption[start:end] != word:
                return Rejection("bad_annotation", f"{path.name}: segment {index}: caption[{start}:{end}] "
                                 f"= {caption[start:end]!r} != word {word!r}")
            mask = segmap == segment_id
            if not mask.any():
                return Rejection("empty_mask", f"{path.name}: segment {index} (id {segment_id}) has no pixels")
            if box is None:
                ys, xs = np.nonzero(mask)
                box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            else:
                box = [float(v) * scale for v in box]
            entities.append(Entity(phrase=word, word=word, start=start, end=end, phrase_start=start,
                                   phrase_end=end, box=round_box(box), score=1.0))
            masks.append(mask)
        if not entities:
            return Rejection("no_entities", f"{path.name}: no segments")
        masks_array = np.stack(masks)
        crops = self.cropper(image, np.array([e.box for e in entities], np.float32), masks_array)
        return Sample(key, image, caption, entities, masks_array, crops, meta={"models": {"annotation": "import"}})

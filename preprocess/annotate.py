"""One image in, one training sample (or a rejection with its reason) out.

Composes the operators in the order of METHOD.md: caption (unless the input brings one) -> entity
phrases -> open-set detection on the phrases -> filter -> SAM masks from the kept boxes -> subject crops
-> (portraits) ArcFace embeddings. Every step works on the whole batch at once, so the models see
batches. The model operators live in preprocess.caption/detect/segment/faces; their configs are given
here as plain mappings and validated by each operator's own config class.
"""

from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mmdiff.configuration import ConfigModel, parse_config
from preprocess.crops import CropConfig, SubjectCropper
from preprocess.filters import EntityFilter, FilterConfig
from preprocess.phrases import PhraseConfig, PhraseExtractor
from preprocess.sample import Entity, Sample

__all__ = ["AnnotateConfig", "Rejection", "Annotator", "build_operator", "round_box", "box_masks"]


class AnnotateConfig(ConfigModel):
    """``caption``/``detect``/``segment``/``faces``: the model operators' configs (each holds a
    ``model: ModelSpec`` plus settings). ``caption`` may be omitted when every input brings a caption;
    ``faces`` is the portrait option."""

    caption: dict[str, Any] | None = None
    detect: dict[str, Any] | None = None
    segment: dict[str, Any] | None = None
    faces: dict[str, Any] | None = None
    phrases: PhraseConfig = PhraseConfig()
    filter: FilterConfig = FilterConfig()
    crops: CropConfig = CropConfig()


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str = ""


OPERATORS = {
    "caption": ("preprocess.caption", "Captioner"),
    "detect": ("preprocess.detect", "Detector"),
    "segment": ("preprocess.segment", "Segmenter"),
    "faces": ("preprocess.faces", "FaceEmbedder"),
}


def build_operator(name: str, data: dict[str, Any]) -> tuple[Any, str]:
    """Build model operator ``name`` from its config mapping; returns (operator, model id)."""
    module_name, class_name = OPERATORS[name]
    operator_class = getattr(importlib.import_module(module_name), class_name)
    schema = typing.get_type_hints(operator_class.__init__)["config"]
    config = parse_config(data, schema, f"annotate.{name}")
    spec = config.model
    return operator_class(config), f"{spec.family}:{spec.backend}:{spec.source}"


def round_box(box: Any) -> tuple[float, float, float, float]:
    # Two decimals: boxes stay identical across batch compositions (float noise in batched inference).
    return tuple(round(float(v), 2) for v in box)  # type: ignore[return-value]


def box_masks(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [k, H, W]: True inside each (pixel-rounded outward) box."""
    width, height = size
    out = np.zeros((len(boxes), height, width), bool)
    for j, (x0, y0, x1, y1) in enumerate(boxes):
        top, left = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))  # clamped: a negative start would wrap
        out[j, top : max(top, int(np.ceil(y1))), left : max(left, int(np.ceil(x1)))] = True
    return out


class Annotator:
    """``annotator(keys, images, captions) -> [Sample | Rejection]``; ``captions[i]`` may be ``""``."""

    def __init__(self, config: AnnotateConfig) -> None:
        self.config = config
        missing = [n for n in ("detect", "segment") if getattr(config, n) is None]
        if missing:
            raise ValueError(f"annotate: missing operator config(s) {missing}")
        self.model_ids: dict[str, str] = {}
        self.captioner = self._build("caption")
        self.detector = self._build("detect")
        self.segmenter = self._build("segment")
        self.face_embedder = self._build("faces")
        self.phrase_extractor = PhraseExtractor(config.phrases)
        self.entity_filter = EntityFilter(config.filter)
        self.cropper = SubjectCropper(config.crops)

    def _build(self, name: str) -> Any:
        data = getattr(self.config, name)
        if data is None:
            return None
        operator, model_id = build_operator(name, data)
        self.model_ids[name] = model_id
        return operator

    def __call__(self, keys: list[str], images: list[Image.Image], captions: list[str]) -> list[Sample | Rejection]:
        results: list[Sample | Rejection | None] = [None] * len(images)
        captions = list(captions)
        need = [i for i, c in enumerate(captions) if not c.strip()]
        if need:
            if self.captioner is None:
                for i in need:
                    results[i] = Rejection("no_caption", "input has no caption and annotate.caption is not set")
            else:
                for i, caption in zip(need, self.captioner([images[i] for i in need])):
                    captions[i] = caption.strip()
        todo = [i for i in range(len(images)) if results[i] is None]
        all_phrases = self.phrase_extractor([captions[i] for i in todo])
        phrases_of = dict(zip(todo, all_phrases))
        for i in todo:
            if not any(p.is_single_entity for p in phrases_of[i]):
                results[i] = Rejection("no_phrases", f"no single-entity noun phrase in {captions[i]!r}")
        todo = [i for i in todo if results[i] is None]
        if not todo:
            return results  # type: ignore[return-value]
        detections = self.detector([images[i] for i in todo], [[p.text for p in phrases_of[i]] for i in todo])
        kept_of = {}
        for i, found in zip(todo, detections):
            result = self.entity_filter(phrases_of[i], found, images[i].size)
            if result.accepted:
                kept_of[i] = result.entities
            else:
                results[i] = Rejection(result.reason, result.detail)
        todo = [i for i in todo if results[i] is None]
        if not todo:
            return results  # type: ignore[return-value]
        boxes_of = {i: np.array([round_box(k.box) for k in kept_of[i]], np.float32) for i in todo}
        masks = self.segmenter([images[i] for i in todo], [boxes_of[i] for i in todo])
        masks_of = {}
        for i, mask in zip(todo, masks):
            # SAM can spill past its box prompt; the entity is what lies inside its box.
            mask = np.asarray(mask, bool) & box_masks(boxes_of[i], images[i].size)
            empty = [kept_of[i][j].phrase.text for j in range(len(mask)) if not mask[j].any()]
            if empty:
                results[i] = Rejection("empty_mask", f"segmentation is empty for {empty}")
            else:
                masks_of[i] = mask
        todo = [i for i in todo if results[i] is None]
        faces_of: dict[int, np.ndarray] = {}
        if self.face_embedder is not None and todo:
            for i, faces in zip(todo, self.face_embedder([images[i] for i in todo], [boxes_of[i] for i in todo])):
                faces_of[i] = np.asarray(faces, np.float32)
        for i in todo:
            entities = [
                Entity(phrase=k.phrase.text, word=k.phrase.head, start=k.phrase.head_start, end=k.phrase.head_end,
                       phrase_start=k.phrase.start, phrase_end=k.phrase.end, box=round_box(k.box),
                       score=round(k.score, 4))
                for k in kept_of[i]
            ]
            crops = self.cropper(images[i], boxes_of[i], masks_of[i])
            results[i] = Sample(keys[i], images[i], captions[i], entities, masks_of[i], crops, faces_of.get(i),
                                meta={"models": dict(self.model_ids)})
        return results  # type: ignore[return-value]

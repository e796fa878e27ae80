"""One image in, one training sample (or a rejection with its reason) out.

The annotation of METHOD.md as four model steps over :class:`Annotation` records: caption (BLIP-2, for
inputs without a caption) -> detect (entity phrases of the caption, Grounding DINO on the phrases, the
entity filter) -> segment (SAM masks from the kept boxes) -> faces (portraits: ArcFace embeddings), then
:class:`SampleBuilder` (subject crops, the sample). Each step holds one model and works on a whole batch,
so the models see batches; the job runs each step in its own Ray actor pool (``stages.mode: per_model``)
or all of them in one actor (``fused``), and :class:`Annotator` runs them in process. The model
operators live in preprocess.caption/detect/segment/faces; their configs are given here as plain
mappings and validated by each operator's own config class.
"""

from __future__ import annotations

import copy
import importlib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from mmdiff.configuration import ConfigModel, parse_config
from mmdiff.zoo.spec import ModelSpec
from preprocess.crops import CropConfig, SubjectCropper
from preprocess.filters import EntityFilter, FilterConfig, Kept
from preprocess.phrases import PhraseConfig, PhraseExtractor
from preprocess.sample import Entity, Sample

__all__ = ["AnnotateConfig", "Rejection", "Annotation", "ModelStep", "CaptionStep", "DetectStep", "SegmentStep",
           "FaceStep", "SampleBuilder", "Annotator", "STEPS", "build_steps", "run_step", "model_ids",
           "build_operator", "round_box", "box_masks"]


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


@dataclass
class Annotation:
    """One input on its way through the steps: what the steps so far found, or why it was rejected."""

    key: str
    image: Image.Image
    caption: str  # "" until captioned, when the input brings none
    kept: list[Kept] = field(default_factory=list)  # detect: the entities, in caption order
    masks: np.ndarray | None = None  # segment: bool [k, H, W], inside each entity's box
    faces: np.ndarray | None = None  # faces: float32 [k, 512]
    rejection: Rejection | None = None

    @property
    def boxes(self) -> np.ndarray:
        """float32 [k, 4]: the kept entities' boxes as stored (rounded)."""
        return np.array([round_box(k.box) for k in self.kept], np.float32).reshape(-1, 4)


OPERATORS = {
    "caption": ("preprocess.caption", "Captioner"),
    "detect": ("preprocess.detect", "Detector"),
    "segment": ("preprocess.segment", "Segmenter"),
    "faces": ("preprocess.faces", "FaceEmbedder"),
}


def build_operator(name: str, data: dict[str, Any]) -> Any:
    """Build model operator ``name`` from its config mapping (validated against the operator's config class)."""
    module_name, class_name = OPERATORS[name]
    operator_class = getattr(importlib.import_module(module_name), class_name)
    schema = typing.get_type_hints(operator_class.__init__)["config"]
    return operator_class(parse_config(data, schema, f"annotate.{name}"))


def model_ids(config: AnnotateConfig) -> dict[str, str]:
    """``{step: "family:backend:source"}`` for every configured model (stored in each sample's metadata)."""
    ids = {}
    for name in OPERATORS:
        data = getattr(config, name)
        if data is not None:
            spec = parse_config(data.get("model"), ModelSpec, f"annotate.{name}.model")
            ids[name] = f"{spec.family}:{spec.backend}:{spec.source}"
    return ids


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


class ModelStep:
    """A step around model operator ``name`` (built once, from ``annotate.<name>``): ``step(items)``
    annotates the items in place; the caller passes only items not rejected yet."""

    name: str

    def __init__(self, config: AnnotateConfig) -> None:
        self.operator = build_operator(self.name, getattr(config, self.name))


class CaptionStep(ModelStep):
    """BLIP-2 captions for the inputs that bring none."""

    name = "caption"

    def __call__(self, items: list[Annotation]) -> None:
        need = [a for a in items if not a.caption.strip()]
        for item, caption in zip(need, self.operator([a.image for a in need])):
            item.caption = caption.strip()


class DetectStep(ModelStep):
    """Entity phrases of each caption, Grounding DINO on them (one prompt per image), the entity filter."""

    name = "detect"

    def __init__(self, config: AnnotateConfig) -> None:
        super().__init__(config)
        self.has_captioner = config.caption is not None
        self.phrase_extractor = PhraseExtractor(config.phrases)
        self.entity_filter = EntityFilter(config.filter)

    def __call__(self, items: list[Annotation]) -> None:
        if not self.has_captioner:
            for item in items:
                if not item.caption.strip():
                    item.rejection = Rejection("no_caption", "input has no caption and annotate.caption is not set")
        items = [a for a in items if a.rejection is None]
        todo = []
        for item, phrases in zip(items, self.phrase_extractor([a.caption for a in items])):
            if any(p.is_single_entity for p in phrases):
                todo.append((item, phrases))
            else:
                item.rejection = Rejection("no_phrases", f"no single-entity noun phrase in {item.caption!r}")
        if not todo:
            return
        detections = self.operator([a.image for a, _ in todo], [[p.text for p in ps] for _, ps in todo])
        for (item, phrases), found in zip(todo, detections):
            result = self.entity_filter(phrases, found, item.image.size)
            if result.accepted:
                item.kept = result.entities
            else:
                item.rejection = Rejection(result.reason, result.detail)


class SegmentStep(ModelStep):
    """SAM masks prompted with the kept boxes (image embeddings once per image, batched), clipped to them."""

    name = "segment"

    def __call__(self, items: list[Annotation]) -> None:
        for item, mask in zip(items, self.operator([a.image for a in items], [a.boxes for a in items])):
            # SAM can spill past its box prompt; the entity is what lies inside its box.
            mask = np.asarray(mask, bool) & box_masks(item.boxes, item.image.size)
            empty = [item.kept[j].phrase.text for j in range(len(mask)) if not mask[j].any()]
            if empty:
                item.rejection = Rejection("empty_mask", f"segmentation is empty for {empty}")
            else:
                item.masks = mask


class FaceStep(ModelStep):
    """ArcFace embeddings of the faces inside each entity box (portraits)."""

    name = "faces"

    def __call__(self, items: list[Annotation]) -> None:
        for item, faces in zip(items, self.operator([a.image for a in items], [a.boxes for a in items])):
            item.faces = np.asarray(faces, np.float32)


STEPS = {"caption": CaptionStep, "detect": DetectStep, "segment": SegmentStep, "faces": FaceStep}


def build_steps(config: AnnotateConfig, names: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """The configured steps in order (``names``: only these); detect and segment are required."""
    missing = [n for n in ("detect", "segment") if getattr(config, n) is None]
    if missing:
        raise ValueError(f"annotate: missing operator config(s) {missing}")
    wanted = set(STEPS if names is None else names)
    return {name: step(config) for name, step in STEPS.items() if name in wanted and getattr(config, name) is not None}


class SampleBuilder:
    """The last, CPU-only step: subject crops and the :class:`Sample` of an annotated input."""

    def __init__(self, config: AnnotateConfig) -> None:
        self.cropper = SubjectCropper(config.crops)
        self.model_ids = model_ids(config)

    def __call__(self, item: Annotation) -> Sample | Rejection:
        if item.rejection is not None:
            return item.rejection
        entities = [
            Entity(phrase=k.phrase.text, word=k.phrase.head, start=k.phrase.head_start, end=k.phrase.head_end,
                   phrase_start=k.phrase.start, phrase_end=k.phrase.end, box=round_box(k.box), score=round(k.score, 4))
            for k in item.kept
        ]
        crops = self.cropper(item.image, item.boxes, item.masks)
        return Sample(item.key, item.image, item.caption, entities, item.masks, crops, item.faces,
                      meta={"models": dict(self.model_ids)})


class Annotator:
    """``annotator(keys, images, captions) -> [Sample | Rejection]``; ``captions[i]`` may be ``""``.

    Every step in process (the fused form of the job's per-model stages), each over the whole batch or
    over micro-batches of ``batch_sizes[step]``."""

    def __init__(self, config: AnnotateConfig) -> None:
        self.config = config
        self.steps = build_steps(config)
        self.builder = SampleBuilder(config)
        self.model_ids = self.builder.model_ids

    def annotate(self, items: list[Annotation], batch_sizes: dict[str, int] | None = None,
                 on_error: OnError | None = None) -> None:
        for name, step in self.steps.items():
            run_step(step, items, (batch_sizes or {}).get(name), on_error)

    def __call__(self, keys: list[str], images: list[Image.Image], captions: list[str],
                 batch_sizes: dict[str, int] | None = None) -> list[Sample | Rejection]:
        items = [Annotation(key, image, caption) for key, image, caption in zip(keys, images, captions)]
        self.annotate(items, batch_sizes)
        return [self.builder(item) for item in items]


# What an exception of ``step`` on an item (run alone) makes of it: (item, step name, exception) -> Rejection.
OnError = Callable[[Annotation, str, Exception], Rejection]


def run_step(step: Any, items: list[Annotation], batch_size: int | None = None, on_error: OnError | None = None) -> None:
    """``step`` over the items not rejected yet, in order, in batches of ``batch_size`` (None: one batch).

    With ``on_error``, a batch that raises is rerun one item at a time from the state it started with,
    and an item that raises alone gets ``on_error``'s rejection; without it the exception propagates."""
    live = [a for a in items if a.rejection is None]
    size = batch_size or max(1, len(live))
    for start in range(0, len(live), size):
        batch = live[start : start + size]
        before = [copy.copy(item) for item in batch]  # steps assign fields, never change them in place
        try:
            step(batch)
            continue
        except Exception:  # noqa: BLE001 - narrowed below to the item that raises
            if on_error is None:
                raise
        for item, state in zip(batch, before):
            item.__dict__.update(state.__dict__)
            try:
                step([item])
            except Exception as exc:  # noqa: BLE001
                item.__dict__.update(state.__dict__)
                item.rejection = on_error(item, step.name, exc)

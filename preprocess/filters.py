"""Keep the detections that make an image a usable training sample (METHOD.md, "Training data").

Per image: drop detections under the box threshold, not tied to a phrase, or tied to a counted/plural
phrase ("two dogs"); suppress overlapping boxes (NMS, class-agnostic: two phrases on one object is
ambiguous); keep the best box per phrase; accept the image if it has ``min_entities`` to
``max_entities`` distinct entities whose head words are distinct (so each subject binds to its own word).
The text threshold belongs to the detector, which uses it to tie a box to a phrase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torchvision.ops import nms

from mmdiff.configuration import ConfigModel
from preprocess.phrases import Phrase

__all__ = ["FilterConfig", "Kept", "FilterResult", "EntityFilter"]


class Detection(Protocol):
    """What the filter reads from a detector's output (preprocess.detect.Detection)."""

    box: Any  # (x0, y0, x1, y1) pixels
    score: float
    phrase_index: int | None


class FilterConfig(ConfigModel):
    box_threshold: float = 0.3
    nms_iou: float = 0.5
    min_entities: int = 1
    max_entities: int = 2
    min_box_fraction: float = 0.01  # boxes smaller than this share of the image are noise


@dataclass(frozen=True)
class Kept:
    phrase: Phrase
    box: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class FilterResult:
    entities: list[Kept]  # in caption order
    reason: str | None = None  # rejection code when the image is not usable
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.reason is None


class EntityFilter:
    """``entity_filter(phrases, detections, size) -> FilterResult`` for one image."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config

    def __call__(self, phrases: list[Phrase], detections: list[Detection], size: tuple[int, int]) -> FilterResult:
        c = self.config
        width, height = size
        candidates = []
        for det in detections:
            index = det.phrase_index
            if index is None or not 0 <= index < len(phrases) or not phrases[index].is_single_entity:
                continue
            x0, y0, x1, y1 = (float(v) for v in det.box)
            x0, x1 = max(0.0, min(x0, x1)), min(float(width), max(x0, x1))
            y0, y1 = max(0.0, min(y0, y1)), min(float(height), max(y0, y1))
            if det.score < c.box_threshold or (x1 - x0) * (y1 - y0) < c.min_box_fraction * width * height:
                continue
            if min(x1 - x0, y1 - y0) < 1.0:  # a sub-pixel sliver: no mask pixel can be trusted to it
                continue
            candidates.append((index, (x0, y0, x1, y1), float(det.score)))
        if not candidates:
            return FilterResult([], "no_entities", f"no detection passed the filters (phrases: "
                                f"{[p.text for p in phrases]})")
        boxes = torch.tensor([b for _, b, _ in candidates], dtype=torch.float64)
        scores = torch.tensor([s for _, _, s in candidates], dtype=torch.float64)
        survivors = nms(boxes, scores, c.nms_iou).tolist()  # sorted by descending score
        best: dict[int, tuple[tuple[float, float, float, float], float]] = {}
        for i in survivors:
            index, box, score = candidates[i]
            best.setdefault(index, (box, score))
        kept = [Kept(phrases[i], *best[i]) for i in sorted(best)]
        words = [k.phrase.head.lower() for k in kept]
        if len(set(words)) != len(words):
            return FilterResult([], "ambiguous_words", f"two entities share a head word: {words}")
        if len(kept) < c.min_entities:
            return FilterResult([], "too_few_entities", f"{len(kept)} < {c.min_entities}")
        if len(kept) > c.max_entities:
            return FilterResult([], "too_many_entities", f"{len(kept)} > {c.max_entities}: {words}")
        return FilterResult(kept)


"""Quality filters, each optional, each rejecting with its own reason (config ``quality:``).

Image filters (the curation pass's hash stage, before any model):
- ``blur``: the variance of the Laplacian of the gray image, shrunk so its long side is at most
  ``blur_side`` (the measure then does not depend on the resolution); below ``min_sharpness``:
  ``blurry``;
- ``aspect_ratio``: width / height outside [``min_aspect``, ``max_aspect``]: ``aspect_ratio`` (a
  landscape-only or portrait-only set; ``image.max_aspect_ratio`` already bounds long / short side).

Embedding heads (the embedding actors, on the same embeddings as dedup, so ``dedup.embedding`` is needed):
``aesthetic`` (score below ``min_score``: ``low_aesthetic``), ``watermark`` and ``nsfw`` (probability at or
above ``max_probability``: ``watermark`` / ``nsfw``); each a zoo ``embedding_head`` entry.

After segmentation (the sample builder's result): ``min_subject_area``, the smallest entity mask's share of
the image below it: ``small_subject``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import Field
from scipy.ndimage import laplace

from mmdiff.configuration import ConfigModel
from mmdiff.zoo.spec import ModelSpec

__all__ = ["HeadFilter", "QualityConfig", "image_rejection", "sharpness", "subject_rejection", "QualityHeads"]


class HeadFilter(ConfigModel):
    model: ModelSpec  # family embedding_head
    threshold: float  # aesthetic: the lowest score kept; watermark / nsfw: the probability rejected from


class QualityConfig(ConfigModel):
    min_sharpness: float | None = None  # variance of the Laplacian (0..255 gray) at blur_side; None: off
    blur_side: int = Field(default=512, ge=32)
    min_aspect: float | None = Field(default=None, gt=0)  # width / height
    max_aspect: float | None = Field(default=None, gt=0)
    min_subject_area: float | None = Field(default=None, gt=0, lt=1)  # smallest entity mask / image area
    aesthetic: HeadFilter | None = None
    watermark: HeadFilter | None = None
    nsfw: HeadFilter | None = None

    @property
    def image_filters(self) -> bool:
        return self.min_sharpness is not None or self.min_aspect is not None or self.max_aspect is not None

    @property
    def heads(self) -> dict[str, HeadFilter]:
        return {name: head for name in ("aesthetic", "watermark", "nsfw") if (head := getattr(self, name)) is not None}


def sharpness(image: Image.Image, side: int) -> float:
    """Variance of the Laplacian of ``image`` in gray, its long side shrunk to at most ``side``."""
    gray = image.convert("L")
    if max(gray.size) > side:
        scale = side / max(gray.size)
        gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))), Image.Resampling.BOX)
    return float(laplace(np.asarray(gray, dtype=np.float64)).var())


def image_rejection(image: Image.Image, config: QualityConfig, source: str) -> tuple[str, str] | None:
    """(reason, detail) of the first image filter ``image`` fails, or None."""
    aspect = image.width / image.height
    if config.min_aspect is not None and aspect < config.min_aspect:
        return "aspect_ratio", f"{source}: {image.width}x{image.height}, width / height {aspect:.3f} < {config.min_aspect}"
    if config.max_aspect is not None and aspect > config.max_aspect:
        return "aspect_ratio", f"{source}: {image.width}x{image.height}, width / height {aspect:.3f} > {config.max_aspect}"
    if config.min_sharpness is not None:
        value = sharpness(image, config.blur_side)
        if value < config.min_sharpness:
            return "blurry", f"{source}: variance of the Laplacian {value:.1f} < {config.min_sharpness}"
    return None


def subject_rejection(masks: np.ndarray, config: QualityConfig, source: str, words: list[str]) -> tuple[str, str] | None:
    """(``small_subject``, detail) when an entity mask (``masks`` [N, H, W], nonzero = subject) covers less
    than ``min_subject_area`` of the image; None otherwise (or when the filter is off)."""
    if config.min_subject_area is None or not len(masks):
        return None
    shares = (np.asarray(masks) > 0).reshape(len(masks), -1).mean(axis=1)
    smallest = int(np.argmin(shares))
    if shares[smallest] < config.min_subject_area:
        return "small_subject", (f"{source}: entity {words[smallest]!r} covers {shares[smallest]:.4f} of the image "
                                 f"< {config.min_subject_area}")
    return None


class QualityHeads:
    """The configured heads, built once (an embedding actor); ``rejection(embeddings)`` per input."""

    REASONS = {"aesthetic": "low_aesthetic", "watermark": "watermark", "nsfw": "nsfw"}

    def __init__(self, config: QualityConfig) -> None:
        from mmdiff.zoo import build

        self.filters = config.heads
        self.heads = {name: build(head.model) for name, head in self.filters.items()}

    def __call__(self, embeddings: np.ndarray, sources: list[str]) -> list[tuple[str, str] | None]:
        """Per embedding row, the first head that rejects it as (reason, detail), or None."""
        import torch

        out: list[tuple[str, str] | None] = [None] * len(embeddings)
        if not len(embeddings):
            return out
        for name, head in self.heads.items():
            device = next(head.parameters()).device
            with torch.inference_mode():
                values = head(torch.from_numpy(np.ascontiguousarray(embeddings)).to(device)).cpu().numpy()
            threshold = self.filters[name].threshold
            for i, value in enumerate(values):
                if out[i] is not None:
                    continue
                if name == "aesthetic" and value < threshold:
                    out[i] = (self.REASONS[name], f"{sources[i]}: aesthetic score {value:.3f} < {threshold}")
                elif name != "aesthetic" and value >= threshold:
                    out[i] = (self.REASONS[name], f"{sources[i]}: {name} probability {value:.3f} >= {threshold}")
        return out

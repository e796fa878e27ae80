"""The scores of generated images: CLIP-T, CLIP-I, DINO, ArcFace identity, and per-subject region scores.

All similarities are plain cosines of L2-normalised embeddings, as DreamBench reports them (CLIP-T is not
rescaled to CLIPScore's 2.5 x max(cos, 0)). Every scorer takes PIL images and returns float32 numpy
rows, so one embedding serves several scores (an image against its prompt, its references, other
subjects' references).

Multi-subject images: :class:`SubjectLocator` finds each subject's region (Grounding DINO prompted with
the subject's word, the preprocessing detector), and :func:`region_scores` scores each region against
every subject's references. A region whose closest reference belongs to another subject is *leaked*; an
image in which two regions share the same closest subject is *collapsed* (one identity in two places,
another missing), the failure CLIP-I over the whole image misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmdiff import zoo
from mmdiff.zoo.spec import ModelSpec
from preprocess.detect import DetectConfig, Detector

__all__ = [
    "ClipScorer",
    "DinoScorer",
    "FaceScorer",
    "RegionScores",
    "SubjectLocator",
    "crop",
    "mean_cosine",
    "region_scores",
]

BATCH = 32  # images per forward pass


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [image.convert("RGB") for image in images]


def mean_cosine(embedding: np.ndarray, references: np.ndarray) -> float:
    """Mean cosine of one normalised row against normalised reference rows [R, D]."""
    return float(np.mean(references @ embedding))


class ClipScorer:
    """CLIP image and text embeddings (family ``clip``): CLIP-I is image-image, CLIP-T image-prompt."""

    def __init__(self, spec: ModelSpec | dict):
        self.clip = zoo.build(spec)
        self.dtype = self.clip.model.dtype

    @torch.inference_mode()
    def image_embeds(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = []
        for start in range(0, len(images), BATCH):
            pixels = self.clip.processor(images=_rgb(images[start:start + BATCH]), return_tensors="pt").pixel_values
            rows.append(_normalised(self.clip.model.get_image_features(
                pixel_values=pixels.to(self.clip.device, self.dtype)).pooler_output))
        return np.concatenate(rows) if rows else np.zeros((0, self.clip.model.config.projection_dim), np.float32)

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
        tokenizer = self.clip.processor.tokenizer
        rows = []
        for start in range(0, len(texts), BATCH):
            tokens = tokenizer(list(texts[start:start + BATCH]), padding=True, truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt").to(self.clip.device)
            rows.append(_normalised(self.clip.model.get_text_features(**tokens).pooler_output))
        return np.concatenate(rows) if rows else np.zeros((0, self.clip.model.config.projection_dim), np.float32)


class DinoScorer:
    """DINO ViT embeddings (family ``dino``): the last layer's CLS token, as DreamBench scores DINO."""

    def __init__(self, spec: ModelSpec | dict):
        self.dino = zoo.build(spec)
        self.dtype = self.dino.model.dtype

    @torch.inference_mode()
    def image_embeds(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = []
        for start in range(0, len(images), BATCH):
            pixels = self.dino.processor(images=_rgb(images[start:start + BATCH]), return_tensors="pt").pixel_values
            hidden = self.dino.model(pixel_values=pixels.to(self.dino.device, self.dtype)).last_hidden_state
            rows.append(_normalised(hidden[:, 0]))
        return np.concatenate(rows) if rows else np.zeros((0, self.dino.model.config.hidden_size), np.float32)


class FaceScorer:
    """ArcFace identity (family ``insightface``): the most confident face's normalised embedding."""

    def __init__(self, spec: ModelSpec | dict):
        self.app = zoo.build(spec)

    def embed(self, image: Image.Image) -> np.ndarray | None:
        """The most confident face's 512-d normalised embedding, or None when no face is found."""
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        faces = self.app.get(bgr)
        if not faces:
            return None
        best = max(faces, key=lambda face: float(face.det_score))
        return np.asarray(best.normed_embedding, dtype=np.float32)


def crop(image: Image.Image, box: Sequence[float]) -> Image.Image:
    x0, y0, x1, y1 = (round(v) for v in box)
    return image.crop((x0, y0, x1, y1))


class SubjectLocator:
    """Each subject's box in a generated image: Grounding DINO prompted with the subjects' words.

    ``locate(images, words)`` -> per image, per word, the best box (x0, y0, x1, y1) or None when the
    detector finds no box of at least ``min_side`` pixels (a crop the scorers can use) for that word.
    """

    def __init__(self, config: DetectConfig | dict, min_side: int = 2):
        self.detector = Detector(config if isinstance(config, DetectConfig) else DetectConfig.model_validate(config))
        self.min_side = min_side

    def locate(self, images: Sequence[Image.Image], words: Sequence[Sequence[str]]) -> list[list[tuple | None]]:
        detections = self.detector(list(images), [list(w) for w in words])
        located = []
        for image_words, found in zip(words, detections):
            boxes: list[tuple | None] = [None] * len(image_words)
            best: list[float] = [-1.0] * len(image_words)
            for d in found:
                x0, y0, x1, y1 = d.box
                if min(x1 - x0, y1 - y0) >= self.min_side and d.score > best[d.phrase_index]:
                    boxes[d.phrase_index], best[d.phrase_index] = d.box, d.score
            located.append(boxes)
        return located


@dataclass(frozen=True)
class RegionScores:
    own: list[float]  # per region: mean similarity to its own subject's references
    other: list[float]  # per region: highest mean similarity to another subject's references
    identities: list[int]  # per region: the subject whose references it is closest to
    leaked: list[bool]  # per region: closest to another subject
    collapsed: bool  # some subject's identity shows in two or more regions


def region_scores(region_embeds: np.ndarray, reference_embeds: Sequence[np.ndarray]) -> RegionScores:
    """Score region s (row s of [S, D]) against every subject's references (S arrays [R_j, D])."""
    n = len(reference_embeds)
    if region_embeds.shape[0] != n or n < 2:
        raise ValueError(f"region_scores: {region_embeds.shape[0]} regions for {n} subjects (needs one region "
                         "per subject, at least two subjects)")
    similarity = np.array([[mean_cosine(region, refs) for refs in reference_embeds] for region in region_embeds])
    identities = [int(np.argmax(row)) for row in similarity]
    own = [float(similarity[s, s]) for s in range(n)]
    other = [float(max(similarity[s, j] for j in range(n) if j != s)) for s in range(n)]
    return RegionScores(own=own, other=other, identities=identities,
                        leaked=[identities[s] != s for s in range(n)], collapsed=len(set(identities)) < n)

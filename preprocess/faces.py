"""ArcFace identity embeddings of the person entities in portraits (insightface).

For each entity box, the face assigned to it is the most confident detected face whose box lies
inside the entity's box (at least ``min_inside`` of the face's area); entities without one get a NaN
row, which training reads as "no face condition for this subject".

insightface runs ONNX graphs (onnxruntime, CUDA or CPU execution provider) at the precision they were
exported in, float32 for the buffalo_l pack; ``model.dtype`` names that precision, so it must be
``float32``. The stage is cheap next to the others (docs/SIZING.md: 12.6 GFLOP per face for the
recogniser), so a half-precision export is not needed to size the job.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mmdiff import zoo
from mmdiff.configuration import ConfigModel
from mmdiff.zoo.spec import ModelSpec

__all__ = ["FaceConfig", "FaceEmbedder", "EMBEDDING_DIM"]

EMBEDDING_DIM = 512


class FaceConfig(ConfigModel):
    model: ModelSpec
    min_inside: float = 0.8  # share of a face's box area that must lie inside the entity's box


def _inside_fraction(face: np.ndarray, box: np.ndarray) -> float:
    x0, y0 = max(face[0], box[0]), max(face[1], box[1])
    x1, y1 = min(face[2], box[2]), min(face[3], box[3])
    area = max(face[2] - face[0], 0.0) * max(face[3] - face[1], 0.0)
    return float(max(x1 - x0, 0.0) * max(y1 - y0, 0.0) / area) if area > 0 else 0.0


class FaceEmbedder:
    """``FaceEmbedder(config)(images, boxes) -> list[np.ndarray float32 [k, 512]]`` (L2-normalised rows)."""

    def __init__(self, config: FaceConfig):
        if config.model.family != "insightface":
            raise ValueError(f"FaceEmbedder needs an insightface model, got family {config.model.family!r}")
        if config.model.dtype != "float32":
            raise ValueError(f"FaceEmbedder: model.dtype {config.model.dtype!r}: insightface runs its ONNX graphs at "
                             "their exported precision (float32 for buffalo_l); set model.dtype: float32")
        self.config = config
        self.app = zoo.build(config.model)

    def __call__(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        if len(images) != len(boxes):
            raise ValueError(f"FaceEmbedder: {len(images)} images but {len(boxes)} box arrays")
        out = []
        for index, (image, image_boxes) in enumerate(zip(images, boxes)):
            image_boxes = np.asarray(image_boxes, dtype=np.float32).reshape(-1, 4)
            embeddings = np.full((len(image_boxes), EMBEDDING_DIM), np.nan, dtype=np.float32)
            if len(image_boxes):
                bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
                faces = sorted(self.app.get(bgr), key=lambda f: -float(f.det_score))
                for row, box in enumerate(image_boxes):
                    match = next((f for f in faces if _inside_fraction(f.bbox, box) >= self.config.min_inside), None)
                    if match is not None:
                        if match.normed_embedding.shape != (EMBEDDING_DIM,):
                            raise ValueError(f"FaceEmbedder: recogniser gives {match.normed_embedding.shape} embeddings, "
                                             f"expected ({EMBEDDING_DIM},) (image {index})")
                        embeddings[row] = match.normed_embedding
            out.append(embeddings)
        return out

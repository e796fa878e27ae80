"""Image embeddings for semantic dedup and decontamination: a zoo ``clip_vision`` model (CLIP ViT-L/14 in
production, its tiny twin in tests), L2-normalised projected image embeddings as float32 numpy rows.

Images are embedded in micro-batches of ``batch_size`` in the order given, so the same list always gives
the same batches (batched inference is not bit-exact across batch compositions).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmdiff.zoo import ModelSpec, build

__all__ = ["ImageEmbedder"]


class ImageEmbedder:
    """``embedder(images) -> float32 [N, D]``, unit rows."""

    def __init__(self, spec: ModelSpec, batch_size: int) -> None:
        self.encoder = build(spec)
        self.batch_size = batch_size
        self.device = torch.device(spec.device)
        self.dtype = next(self.encoder.model.parameters()).dtype

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.encoder.processor(images=images[start:start + self.batch_size], return_tensors="pt")
            values = pixels["pixel_values"].to(self.device, self.dtype, non_blocking=True)
            embeds = self.encoder.model(pixel_values=values).image_embeds
            out.append(torch.nn.functional.normalize(embeds.float(), dim=-1))
        if not out:
            return np.zeros((0, self.encoder.model.config.projection_dim), np.float32)
        return torch.cat(out).cpu().numpy()  # one transfer for all micro-batches

"""DINO ViT (family ``dino``): the self-supervised image model behind DreamBench's DINO score.

``build(spec)`` returns a :class:`Dino` holding a :class:`~transformers.ViTModel` (no pooling layer: the
score uses the last layer's CLS token) and its :class:`~transformers.ViTImageProcessor`: from a local
folder or hub id (``from_pretrained``; DreamBench uses DINO ViT-S/16, ``facebook/dino-vits16``),
``tiny`` (2 layers, 32 px images) or ``random`` (the ViT-S/16 architecture with random weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from mmdiff.zoo.clip_vision import DTYPES
from mmdiff.zoo.spec import ModelSpec

__all__ = ["Dino", "build", "save_tiny"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class Dino:
    model: ViTModel
    processor: ViTImageProcessor

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.cls_token.device


def _config(tiny: bool) -> ViTConfig:
    if tiny:
        return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                         image_size=32, patch_size=8)
    return ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                     image_size=224, patch_size=16, layer_norm_eps=1e-6)


def build(spec: ModelSpec) -> Dino:
    dtype = DTYPES[spec.dtype]
    if spec.is_tiny or spec.is_random:
        config = _config(spec.is_tiny)
        torch.manual_seed(spec.seed)
        model = ViTModel(config, add_pooling_layer=False).to(dtype)
        side = config.image_size
        # as the released facebook/dino-vits16 processor: resize to the square input, ImageNet normalisation
        processor = ViTImageProcessor(do_resize=True, size={"height": side, "width": side},
                                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    else:
        try:
            model = ViTModel.from_pretrained(spec.source, dtype=dtype, add_pooling_layer=False)
            processor = ViTImageProcessor.from_pretrained(spec.source)
        except OSError as exc:
            raise OSError(f"dino: cannot load {spec.source!r} (a local ViT folder or a cached hub id): {exc}") from exc
    return Dino(model.eval().to(spec.device), processor)


def save_tiny(path: Path, seed: int = 0) -> Path:
    """Write the tiny DINO ViT and its processor as a transformers folder (safetensors) at ``path``."""
    dino = build(ModelSpec(family="dino", source="tiny", seed=seed))
    dino.model.save_pretrained(path)
    dino.processor.save_pretrained(path)
    return Path(path)

"""CLIP image encoders (family ``clip_vision``): the vision tower with projection plus its processor.

``build(spec)`` returns a :class:`ClipVision` holding a :class:`~transformers.CLIPVisionModelWithProjection`
and a :class:`~transformers.CLIPImageProcessor`: from a local folder or hub id (``from_pretrained`` of both),
``tiny`` (a 2-layer ViT on 32 px images) or ``random`` (ViT-L/14 at 224 px, the official MM-Diff encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from mmdiff.zoo.spec import ModelSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ClipVision:
    model: CLIPVisionModelWithProjection
    processor: CLIPImageProcessor

    @property
    def image_size(self) -> int:
        return self.model.config.image_size


def _config(tiny: bool) -> CLIPVisionConfig:
    if tiny:
        return CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=32)
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def _processor(size: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build(spec: ModelSpec) -> ClipVision:
    dtype = DTYPES[spec.dtype]
    if spec.is_tiny or spec.is_random:
        torch.manual_seed(spec.seed)
        config = _config(spec.is_tiny)
        model = CLIPVisionModelWithProjection(config).to(dtype)
        processor = _processor(config.image_size)
    else:
        model = CLIPVisionModelWithProjection.from_pretrained(spec.source, dtype=dtype)
        processor = CLIPImageProcessor.from_pretrained(spec.source)
    return ClipVision(model.eval().to(spec.device), processor)


def save_tiny(path: Path, seed: int = 0) -> Path:
    """Write the tiny encoder and its processor as a transformers folder (safetensors) at ``path``."""
    encoder = build(ModelSpec(family="clip_vision", source="tiny", seed=seed))
    encoder.model.save_pretrained(path)
    encoder.processor.save_pretrained(path)
    return Path(path)

"""CLIP with both towers (family ``clip``): the image-text model the evaluation scores with (CLIP-I, CLIP-T).

``build(spec)`` returns a :class:`Clip` holding a :class:`~transformers.CLIPModel` and its
:class:`~transformers.CLIPProcessor` (tokenizer + image processor): from a local folder or hub id
(``from_pretrained`` of both; DreamBench reports CLIP ViT-B/32), ``tiny`` (2-layer towers, 32 px images,
the offline tiny CLIP tokenizer) or ``random`` (the ViT-B/32 architecture with random weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
)

from mmdiff.zoo.clip_vision import DTYPES, _processor
from mmdiff.zoo.clip_vision import _config as tiny_vision_config
from mmdiff.zoo.diffusion import _text_config, tiny_tokenizer
from mmdiff.zoo.spec import ModelSpec

__all__ = ["Clip", "build", "save_tiny"]


@dataclass
class Clip:
    model: CLIPModel
    processor: CLIPProcessor

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device


def _vit_b32(vocab_size: int) -> CLIPConfig:
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=8, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=512)


def build(spec: ModelSpec) -> Clip:
    dtype = DTYPES[spec.dtype]
    if spec.is_tiny or spec.is_random:
        tokenizer = tiny_tokenizer()
        if spec.is_tiny:
            config = CLIPConfig(text_config=_text_config("tiny", len(tokenizer)).to_dict(),
                                vision_config=tiny_vision_config(True).to_dict(), projection_dim=32)
        else:
            config = _vit_b32(len(tokenizer))
        torch.manual_seed(spec.seed)
        model = CLIPModel(config).to(dtype)
        processor = CLIPProcessor(image_processor=_processor(config.vision_config.image_size), tokenizer=tokenizer)
    else:
        try:
            model = CLIPModel.from_pretrained(spec.source, dtype=dtype)
            processor = CLIPProcessor.from_pretrained(spec.source)
        except OSError as exc:
            raise OSError(f"clip: cannot load {spec.source!r} (a local CLIP folder or a cached hub id): {exc}") from exc
    return Clip(model.eval().to(spec.device), processor)


def save_tiny(path: Path, seed: int = 0) -> Path:
    """Write the tiny CLIP and its processor as a transformers folder (safetensors) at ``path``."""
    clip = build(ModelSpec(family="clip", source="tiny", seed=seed))
    clip.model.save_pretrained(path)
    clip.processor.save_pretrained(path)
    return Path(path)

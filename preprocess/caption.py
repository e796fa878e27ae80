"""Captions from BLIP-2, the first annotation step (entities are phrases of this caption).

Decoding is deterministic (greedy or beam search, no sampling), so re-running a shard gives the same
captions. ``prompt`` is an optional text prefix (BLIP-2's "a photo of" style); it is not part of the
returned caption.
"""

from __future__ import annotations

import copy

import torch
from PIL import Image

from mmdiff import zoo
from mmdiff.configuration import ConfigModel
from mmdiff.zoo.spec import ModelSpec
from preprocess.image_io import device_pixels

__all__ = ["CaptionConfig", "Captioner"]


class CaptionConfig(ConfigModel):
    model: ModelSpec
    prompt: str = ""
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    num_beams: int = 1
    repetition_penalty: float = 1.0


class Captioner:
    """``Captioner(config)(images) -> list[str]``, one stripped caption per image."""

    def __init__(self, config: CaptionConfig):
        if config.model.family != "blip2":
            raise ValueError(f"Captioner needs a blip2 model, got family {config.model.family!r}")
        self.config = config
        self.model, self.processor = zoo.build(config.model)
        self.device = torch.device(config.model.device)
        self.dtype = getattr(torch, config.model.dtype)
        # the checkpoint's generation config (BLIP-2's generate would drop it when handing over to its
        # language model) with this operator's deterministic decoding settings on top
        self.generation_config = copy.deepcopy(self.model.generation_config)
        self.generation_config.update(
            do_sample=False, num_beams=config.num_beams, max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens, repetition_penalty=config.repetition_penalty,
        )

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        # the processor resizes and normalises with torch on the model's device (uint8 pixels cross over)
        inputs = self.processor(images=device_pixels(images, self.device), device=self.device,
                                text=[self.config.prompt] * len(images), padding="longest", return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        generated = self.model.generate(**inputs, generation_config=self.generation_config)
        # generate returns the prompt (image tokens + text prefix) followed by the new tokens
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

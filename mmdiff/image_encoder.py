"""The subject image encoder: a CLIP vision tower giving a CLS embedding and patch tokens per crop."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModelWithProjection


class SubjectImageEncoder(nn.Module):
    """Wraps :class:`CLIPVisionModelWithProjection`; frozen unless ``trainable``.

    Returns the projected CLS embedding (``image_embeds``) and the penultimate hidden states
    (CLS + patch tokens, 257 x 1024 for ViT-L/14), as the official MM-Diff encoder does.
    """

    def __init__(self, vision_model: CLIPVisionModelWithProjection, trainable: bool = False):
        super().__init__()
        self.vision_model = vision_model
        self.trainable = trainable
        self.vision_model.requires_grad_(trainable)

    @property
    def embed_dim(self) -> int:
        return self.vision_model.config.projection_dim

    @property
    def patch_dim(self) -> int:
        return self.vision_model.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        return out.image_embeds, out.hidden_states[-2]

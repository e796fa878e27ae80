"""The subject image encoder: a CLIP vision tower giving a CLS embedding and patch tokens per crop."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import CLIPVisionModelWithProjection


class SubjectImageEncoder(nn.Module):
    """Wraps :class:`CLIPVisionModelWithProjection`; frozen unless ``trainable_layers`` > 0.

    Returns the projected CLS embedding (``image_embeds``) and the penultimate hidden states
    (CLS + patch tokens, 257 x 1024 for ViT-L/14), as the official MM-Diff encoder does.

    ``trainable_layers`` = n > 0 trains the last n transformer layers, the post-LayerNorm and the
    projection (partial fine-tuning, as the official release does) and keeps a frozen copy of the
    original tower, which gives the patch tokens: the refiner reads the pretrained features while the
    CLS embedding adapts (the official code keeps such a frozen copy for its refiner input).
    """

    def __init__(self, vision_model: CLIPVisionModelWithProjection, trainable_layers: int = 0):
        super().__init__()
        layers = vision_model.vision_model.encoder.layers
        if not 0 <= trainable_layers <= len(layers):
            raise ValueError(f"image_encoder_trainable_layers={trainable_layers}: the image encoder has "
                             f"{len(layers)} layers")
        self.trainable_layers = trainable_layers
        self.vision_model = vision_model.requires_grad_(False)
        self.patch_model = None
        if trainable_layers:
            self.patch_model = copy.deepcopy(vision_model)
            for module in [*layers[len(layers) - trainable_layers:], vision_model.vision_model.post_layernorm,
                           vision_model.visual_projection]:
                module.requires_grad_(True)

    @property
    def embed_dim(self) -> int:
        return self.vision_model.config.projection_dim

    @property
    def patch_dim(self) -> int:
        return self.vision_model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.visual_projection.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(bool(self.trainable_layers) and torch.is_grad_enabled()):
            out = self.vision_model(pixel_values=pixel_values, output_hidden_states=self.patch_model is None)
        if self.patch_model is None:
            return out.image_embeds, out.hidden_states[-2]
        with torch.no_grad():
            patches = self.patch_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return out.image_embeds, patches

"""Vision-augmented text embeddings: the subject's CLS embedding fused into its class word's embedding."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    """LayerNorm -> Linear -> GELU -> Linear: CLS embedding to a text encoder's width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class TextFusion(nn.Module):
    """``word + MLP([word ; project(cls)])`` with the MLP (2d -> d -> d) ending in a zero-initialised layer.

    The residual form makes the fused embedding equal the word embedding at initialisation, so the
    untrained model is exactly the base model (the official code replaces the embedding instead).
    """

    def __init__(self, image_dim: int, text_dim: int):
        super().__init__()
        self.project = ProjectionHead(image_dim, text_dim)
        self.fuse = nn.Sequential(nn.Linear(2 * text_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
        nn.init.zeros_(self.fuse[-1].weight)
        nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, word_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        image = self.project(image_embeds.to(word_embeds.dtype))
        return word_embeds + self.fuse(torch.cat([word_embeds, image], dim=-1))


@contextlib.contextmanager
def fused_word_embeddings(
    text_encoder: nn.Module,
    fusion: TextFusion,
    token_index: torch.Tensor,
    valid: torch.Tensor,
    image_embeds: torch.Tensor,
) -> Iterator[None]:
    """While active, the text encoder's input embedding of token ``token_index[b, s]`` (valid slots only)
    is replaced by its fusion with ``image_embeds[b, s]`` (before position embeddings are added)."""
    rows, slots = valid.nonzero(as_tuple=True)
    tokens = token_index[rows, slots]

    def replace(_module, _inputs, embeds: torch.Tensor) -> torch.Tensor:
        # runs even with no valid slot (empty rows): data-parallel ranks must all use the fusion weights
        embeds = embeds.clone()
        embeds[rows, tokens] = fusion(embeds[rows, tokens], image_embeds[rows, slots])
        return embeds

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()

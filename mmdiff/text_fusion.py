"""Vision-augmented text embeddings: the subject's CLS embedding fused into its class word's embedding."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    """LayerNorm -> Linear -> GELU -> Linear: CLS embedding to a text encoder's width (hidden width
    ``hidden_dim``, the output width unless given)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        hidden_dim = hidden_dim or out_dim
        super().__init__(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class TextFusion(nn.Module):
    """``word + MLP([word ; project(cls)])`` with the MLP (2d -> d -> d) ending in a zero-initialised layer.

    The residual form makes the fused embedding equal the word embedding at initialisation, so the
    untrained model is exactly the base model. ``residual=False`` is the official form, where the MLP's
    output replaces the word embedding (for converted official weights). ``input_norm`` puts a LayerNorm
    on the MLP's 2d input, as the official fusion MLP has; ``projection_hidden`` is the projection head's
    hidden width (the official head's is the CLS width).
    """

    def __init__(self, image_dim: int, text_dim: int, input_norm: bool = False, residual: bool = True,
                 projection_hidden: int | None = None):
        super().__init__()
        self.residual = residual
        self.project = ProjectionHead(image_dim, text_dim, projection_hidden)
        layers = [nn.LayerNorm(2 * text_dim)] if input_norm else []
        self.fuse = nn.Sequential(*layers, nn.Linear(2 * text_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))
        nn.init.zeros_(self.fuse[-1].weight)
        nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, word_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        image = self.project(image_embeds.to(self.fuse[-1].weight.dtype))
        fused = self.fuse(torch.cat([word_embeds.to(image.dtype), image], dim=-1))
        return word_embeds + fused.to(word_embeds.dtype) if self.residual else fused.to(word_embeds.dtype)


@dataclass(frozen=True)
class FusionRequest:
    """Which input embeddings to fuse in one text-encoder call: token ``token_index[b, s]`` of valid slots."""

    token_index: torch.Tensor  # [B, S]
    valid: torch.Tensor  # [B, S] bool
    image_embeds: torch.Tensor  # [B, S, E]


# The text encoder's forward has no argument for extra inputs, so the request reaches the embedding
# hook through a context variable: each thread (and asyncio task) sees only the value it set, so
# concurrent calls on one model never see each other's subjects.
_REQUEST: contextvars.ContextVar[FusionRequest | None] = contextvars.ContextVar("mmdiff_fusion", default=None)


def fuse_at_tokens(embeds: torch.Tensor, request: FusionRequest, fusion: TextFusion) -> torch.Tensor:
    """``embeds`` [B, L, D] with token ``token_index[b, s]`` of every valid slot replaced by its fusion with
    ``image_embeds[b, s]``.

    Shapes stay fixed whatever the batch holds (no ``nonzero`` or boolean indexing): every slot is fused
    and a one-hot over (token, slot) picks the results, so no device-to-host read sizes a tensor. Every
    slot going through the fusion also means data-parallel ranks all use its weights, even when a batch
    has no valid slot.
    """
    positions = torch.arange(embeds.shape[1], device=embeds.device)
    # [B, L, S]: token l is slot s's class word, for valid slots only
    hits = (request.token_index[:, None, :] == positions[None, :, None]) & request.valid[:, None, :].bool()
    words = embeds.gather(1, request.token_index.clamp(min=0)[..., None].expand(-1, -1, embeds.shape[-1]))
    fused = fusion(words, request.image_embeds)  # [B, S, D]
    slot = hits.to(torch.int64).argmax(-1)  # the (first) slot whose word each token is
    per_token = fused.gather(1, slot[..., None].expand(-1, -1, embeds.shape[-1]))
    return torch.where(hits.any(-1)[..., None], per_token, embeds)


def install_fusion(text_encoder: nn.Module, fusion: TextFusion) -> None:
    """Hook ``fusion`` into the encoder's input embeddings; it acts only inside :func:`fused_word_embeddings`."""

    def replace(_module, _inputs, embeds: torch.Tensor) -> torch.Tensor:
        request = _REQUEST.get()
        return embeds if request is None else fuse_at_tokens(embeds, request, fusion)

    text_encoder.get_input_embeddings().register_forward_hook(replace)


@contextlib.contextmanager
def fused_word_embeddings(token_index: torch.Tensor, valid: torch.Tensor, image_embeds: torch.Tensor) -> Iterator[None]:
    """While active (in this thread), every hooked text encoder's input embedding of token
    ``token_index[b, s]`` (valid slots only) is replaced by its fusion with ``image_embeds[b, s]``
    (before position embeddings are added)."""
    reset = _REQUEST.set(FusionRequest(token_index, valid, image_embeds))
    try:
        yield
    finally:
        _REQUEST.reset(reset)

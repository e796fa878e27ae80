"""Make groundingdino-py 0.4.0 run on transformers 5.

Its ``BertModelWarper`` copies three helpers off ``BertModel`` that transformers 5 removed:
``get_extended_attention_mask``, ``invert_attention_mask`` and ``get_head_mask``. :func:`install` puts
back the transformers 4 behaviour of exactly those three (additive masks in the model's dtype) and
nothing else. Grounding DINO passes a 3-D ``[batch, tokens, tokens]`` mask that keeps each phrase's
tokens from attending to other phrases and to padding, so the 3-D case matters here.
"""

from __future__ import annotations

import torch
from transformers import BertModel

__all__ = ["install"]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 = attend, 0 = masked  ->  0 / dtype-min, broadcastable over heads."""
    if mask.dim() == 3:
        mask = mask[:, None, :, :]
    elif mask.dim() == 2:
        mask = mask[:, None, None, :]
    else:
        raise ValueError(f"attention mask must be 2-D or 3-D, got shape {tuple(mask.shape)}")
    mask = mask.to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def get_extended_attention_mask(self, attention_mask, input_shape=None, device=None, dtype=None):
    return _additive(attention_mask, dtype or self.dtype)


def invert_attention_mask(self, encoder_attention_mask):
    return _additive(encoder_attention_mask, self.dtype)


def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:  # [heads] -> [layers, batch, heads, query, key]
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:  # [layers, heads]
        head_mask = head_mask[:, None, :, None, None]
    return head_mask.to(self.dtype)


def install() -> None:
    """Restore the three helpers on ``BertModel`` where missing; idempotent."""
    for helper in (get_extended_attention_mask, invert_attention_mask, get_head_mask):
        if not hasattr(BertModel, helper.__name__):
            setattr(BertModel, helper.__name__, helper)

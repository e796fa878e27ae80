"""Multi-modal cross-attention: text attention + scale * subject attention, with LoRA and capture.

Each UNet cross-attention layer gets a :class:`MMDiffAttnProcessor`. It keeps the layer's (frozen,
peft-LoRA-wrapped) projections for the text path and adds image LoRAs on the frozen ``to_k``/``to_v``
for the subject path; the two softmaxes are separate and the outputs summed. Both outputs come from
``scaled_dot_product_attention``. On supervised layers the processor also records the attention
probabilities of the subject columns only (see :func:`column_probabilities`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


class LoRA(nn.Module):
    """A low-rank branch ``up(down(x))``; ``up`` starts at zero so the branch starts as the zero map."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


@dataclass
class CapturedAttention:
    """Attention of one layer, probabilities per subject: ``text`` / ``subject`` are [B, heads, N, S]."""

    layer: str
    text: torch.Tensor | None
    subject: torch.Tensor | None


@dataclass
class SubjectContext:
    """Per-forward state the model hands to its processors (set before a UNet call, cleared after).

    ``tokens`` [B, S*K, D] subject tokens; ``valid`` [B, S] real (not padded) subjects;
    ``text_index`` [B, S] the class word's token index (-1 for none); ``capture`` turns recording on.
    """

    num_tokens: int
    tokens: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    text_index: torch.Tensor | None = None
    scale: float = 0.0
    capture: bool = False
    captured: list[CapturedAttention] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.tokens is not None and self.scale != 0.0

    def clear(self) -> None:
        self.tokens = self.valid = self.text_index = None
        self.scale, self.capture = 0.0, False
        self.captured = []


def column_probabilities(
    q: torch.Tensor, k: torch.Tensor, columns: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d))[..., columns] without forming the softmax of every column.

    q [B, h, N, d], k [B, h, L, d], columns [B, C] (indices into L). Only the row log-sum-exp needs
    all keys; the probabilities are then exp(score - lse) for the C requested columns. ``key_mask``
    [B, L] (True = attend) excludes keys from the normalisation.
    """
    scale = q.shape[-1] ** -0.5
    logits = torch.einsum("bhnd,bhld->bhnl", q, k) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked_k = torch.gather(k, 2, columns[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1]))
    picked = torch.einsum("bhnd,bhcd->bhnc", q, picked_k) * scale
    probs = torch.exp(picked - lse)
    if key_mask is not None:
        probs = probs * torch.gather(key_mask, 1, columns)[:, None, None, :].to(probs.dtype)
    return probs


class MMDiffAttnProcessor(nn.Module):
    """Cross-attention processor of MM-Diff (mirrors diffusers' ``AttnProcessor2_0`` for the text path)."""

    def __init__(self, name: str, hidden_size: int, cross_attention_dim: int, rank: int,
                 context: SubjectContext, supervised: bool):
        super().__init__()
        self.name, self.supervised = name, supervised
        self.lora_k_img = LoRA(cross_attention_dim, hidden_size, rank) if rank else None
        self.lora_v_img = LoRA(cross_attention_dim, hidden_size, rank) if rank else None
        # A plain attribute, not a submodule: the context is shared, stateful and has no weights.
        object.__setattr__(self, "context", context)

    def _subject_kv(self, attn: Attention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The frozen base projection without the text path's LoRA, plus the image LoRA.
        to_k = getattr(attn.to_k, "base_layer", attn.to_k)
        to_v = getattr(attn.to_v, "base_layer", attn.to_v)
        key, value = to_k(tokens), to_v(tokens)
        if self.lora_k_img is not None:
            key, value = key + self.lora_k_img(tokens), value + self.lora_v_img(tokens)
        return key, value

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)

        ctx = self.context
        if ctx.active:
            s = ctx.valid.shape[1]
            token_mask = ctx.valid.repeat_interleave(ctx.num_tokens, dim=1)  # [B, S*K]
            any_valid = token_mask.any(dim=1)
            # Rows without any subject attend to all (padded) tokens and are then zeroed: an
            # all-masked softmax would be NaN, and NaN * 0 is still NaN.
            attend = token_mask | ~any_valid[:, None]
            subject_key, subject_value = self._subject_kv(attn, ctx.tokens.to(query.dtype))
            subject_key, subject_value = heads(subject_key), heads(subject_value)
            subject_out = F.scaled_dot_product_attention(query, subject_key, subject_value,
                                                         attn_mask=attend[:, None, None, :])
            out = out + ctx.scale * subject_out * any_valid[:, None, None, None].to(out.dtype)
            if self.supervised and ctx.capture:
                text_probs = None
                if ctx.text_index is not None:
                    text_probs = column_probabilities(query, key, ctx.text_index.clamp(min=0))
                columns = torch.arange(s * ctx.num_tokens, device=query.device).expand(batch, -1)
                subject_probs = column_probabilities(query, subject_key, columns, attend)
                subject_probs = subject_probs.unflatten(-1, (s, ctx.num_tokens)).mean(-1)
                ctx.captured.append(CapturedAttention(self.name, text_probs, subject_probs))

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

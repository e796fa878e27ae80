"""Multi-modal cross-attention: text attention + scale * subject attention, with LoRA and capture.

Each UNet cross-attention layer gets a :class:`MMDiffAttnProcessor`. It keeps the layer's (frozen,
peft-LoRA-wrapped) projections for the text path and adds image LoRAs on the frozen ``to_k``/``to_v``
for the subject path; the two softmaxes are separate and the outputs summed. Both outputs come from
``scaled_dot_product_attention``. On supervised layers the processor also records the attention
probabilities of the subject columns only (see :func:`column_probabilities`).

Per-call state (the subject tokens, their scale, what to capture) reaches the processors as a
:class:`SubjectConditioning` in the UNet's ``cross_attention_kwargs["subjects"]``. The processors hold
none, so concurrent calls on one model and activation checkpointing (which re-runs a block's forward
during backward, with the same arguments) both see the right subjects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
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
    """Attention of one layer, fp32 probabilities per subject: ``text`` / ``subject`` are [B, heads, N, S]."""

    layer: str
    text: torch.Tensor | None
    subject: torch.Tensor


@dataclass(frozen=True)
class SubjectConditioning:
    """The subjects of one UNet call.

    ``tokens`` [B, S*K, D] subject tokens; ``valid`` [B, S] real (not padded) subjects; ``scale`` the
    weight of the subject attention; ``text_index`` [B, S] the class word's token index (used only by
    the capture). ``captured``: when a dict is given, supervised layers record their
    :class:`CapturedAttention` into it, keyed by layer name. It belongs to this call alone (a
    checkpointed block re-run during backward overwrites its own entry, after the loss has used it).
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    scale: float
    num_tokens: int
    text_index: torch.Tensor | None = None
    captured: dict[str, CapturedAttention] | None = field(default=None, compare=False)


class _ColumnProbabilities(torch.autograd.Function):
    """``softmax(q k^T * scale)[..., columns]`` in fp32 (fp64 for fp64 inputs), saving only q, k, the row log-sum-exp and the output.

    The [B, heads, N, L] logits exist only transiently, in forward and again in backward; autograd
    keeps q and k (which the attention output keeps anyway) and a [B, heads, N] log-sum-exp.
    """

    @staticmethod
    def _logits(q, k, key_mask, key_bias):
        scale, dtype = q.shape[-1] ** -0.5, torch.promote_types(q.dtype, torch.float32)
        logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
        if key_bias is not None:
            logits = logits + key_bias.to(dtype)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return logits

    @staticmethod
    def forward(ctx, q, k, columns, key_mask, key_bias):
        logits = _ColumnProbabilities._logits(q, k, key_mask, key_bias)
        lse = torch.logsumexp(logits, dim=-1)
        index = columns[:, None, None, :].expand(*logits.shape[:3], -1)
        probs = torch.exp(torch.gather(logits, -1, index) - lse[..., None])
        del logits
        ctx.save_for_backward(q, k, columns, key_mask, key_bias, lse, probs)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        q, k, columns, key_mask, key_bias, lse, probs = ctx.saved_tensors
        scale, dtype = q.shape[-1] ** -0.5, torch.promote_types(q.dtype, torch.float32)
        qf, kf = q.to(dtype), k.to(dtype)
        logits = _ColumnProbabilities._logits(q, k, key_mask, key_bias)
        softmax = torch.exp(logits - lse[..., None])
        # d p_c / d s_j = p_c (1[j = col_c] - softmax_j)
        weighted = grad_probs * probs
        grad_logits = -softmax * weighted.sum(-1, keepdim=True)
        index = columns[:, None, None, :].expand_as(weighted)
        grad_logits = grad_logits.scatter_add(-1, index, weighted) * scale
        grad_q = torch.matmul(grad_logits, kf).to(q.dtype) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad_logits.transpose(-1, -2), qf).to(k.dtype) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, None, None, None


def column_probabilities(
    q: torch.Tensor, k: torch.Tensor, columns: torch.Tensor, key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d))[..., columns] in fp32, whatever the dtype of q and k.

    q [B, h, N, d], k [B, h, L, d], columns [B, C] (indices into L) -> [B, h, N, C] float32.
    ``key_mask`` [B, L] (True = attend) excludes keys from the normalisation; a masked column gets 0.
    ``key_bias`` (broadcast to [B, h, N, L]) is added to the logits, as an additive attention mask is.
    """
    return _ColumnProbabilities.apply(q, k, columns, key_mask, key_bias)


class SelfAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` that accepts (and has no use for) the per-call ``subjects``.

    The UNet hands ``cross_attention_kwargs`` to every attention layer; diffusers warns about, and
    drops, keys a processor does not declare.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 subjects: SubjectConditioning | None = None) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class MMDiffAttnProcessor(nn.Module):
    """Cross-attention processor of MM-Diff (mirrors diffusers' ``AttnProcessor2_0`` for the text path)."""

    def __init__(self, name: str, hidden_size: int, cross_attention_dim: int, rank: int, supervised: bool,
                 null_key: bool = False):
        super().__init__()
        self.name, self.supervised = name, supervised
        self.lora_k_img = LoRA(cross_attention_dim, hidden_size, rank) if rank else None
        self.lora_v_img = LoRA(cross_attention_dim, hidden_size, rank) if rank else None
        # A learned background key with a zero value, in the subject softmax: without it every pixel must
        # give all its subject attention to some subject (one subject's map is then 1/K everywhere, two
        # subjects' maps sum to a constant), so no subject's map can localise. Zero at start (logit 0).
        self.null_key = nn.Parameter(torch.zeros(hidden_size)) if null_key else None

    def _subject_kv(self, attn: Attention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The frozen base projection without the text path's LoRA, plus the image LoRA.
        to_k = getattr(attn.to_k, "base_layer", attn.to_k)
        to_v = getattr(attn.to_v, "base_layer", attn.to_v)
        key, value = to_k(tokens), to_v(tokens)
        if self.lora_k_img is not None:
            key, value = key + self.lora_k_img(tokens), value + self.lora_v_img(tokens)
        return key, value

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 subjects: SubjectConditioning | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attention_mask is not None:
            # a mask over the keys (encoder_attention_mask): prepared to the key length
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        # contiguous once: the attention kernels and the capture then share one copy of q
        query, key, value = heads(query).contiguous(), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)

        if subjects is not None and subjects.scale != 0.0:
            s, num_tokens = subjects.valid.shape[1], subjects.num_tokens
            token_mask = subjects.valid.to(query.device).repeat_interleave(num_tokens, dim=1)  # [B, S*K]
            subject_key, subject_value = self._subject_kv(attn, subjects.tokens.to(query.dtype))
            subject_key, subject_value = heads(subject_key), heads(subject_value)
            if self.null_key is not None:
                # the null key is always attended, so rows without subjects get exactly zero (its value)
                null = self.null_key.to(query.dtype).view(1, attn.heads, 1, head_dim).expand(batch, -1, -1, -1)
                subject_key = torch.cat([subject_key, null], dim=2)
                subject_value = torch.cat([subject_value, torch.zeros_like(subject_value[:, :, :1])], dim=2)
                attend = torch.cat([token_mask, token_mask.new_ones(batch, 1)], dim=1)
                keep = None
            else:
                # Rows without any subject attend to all (padded) tokens and are then zeroed: an
                # all-masked softmax would be NaN, and NaN * 0 is still NaN.
                any_valid = token_mask.any(dim=1)
                attend = token_mask | ~any_valid[:, None]
                keep = any_valid[:, None, None, None].to(out.dtype)
            subject_out = F.scaled_dot_product_attention(query, subject_key, subject_value,
                                                         attn_mask=attend[:, None, None, :])
            out = out + subjects.scale * (subject_out if keep is None else subject_out * keep)
            if self.supervised and subjects.captured is not None:
                text_probs = None
                if subjects.text_index is not None:
                    text_probs = column_probabilities(query, key, subjects.text_index.clamp(min=0),
                                                      key_bias=attention_mask)
                columns = torch.arange(s * num_tokens, device=query.device).expand(batch, -1)
                subject_probs = column_probabilities(query, subject_key, columns, attend)
                subject_probs = subject_probs.unflatten(-1, (s, num_tokens)).mean(-1)
                subjects.captured[self.name] = CapturedAttention(self.name, text_probs, subject_probs)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

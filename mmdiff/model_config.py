"""The MM-Diff model's settings (configs/mmdiff/*.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmdiff.configuration import ConfigModel

# FastComposer's supervised layers: the 32x32, 16x16 and (mid_block) 8x8 cross-attention of SD1.5 at 512 px.
FASTCOMPOSER_LAYERS = ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2"]


class MMDiffConfig(ConfigModel):
    """Sizes of the trainable parts, inference defaults and the training losses.

    ``supervised_layers`` are prefixes of UNet attention-module names ("up_blocks.1"); every
    cross-attention layer under them is captured for the attention constraint.
    ``attention_loss_tokens`` picks which maps are supervised: the class word's column of the text
    attention, the subject's K tokens (averaged) of the subject attention, or both averaged.
    ``subject_null_key`` adds a learned background key (zero value) to the subject softmax of every
    cross-attention layer, so a subject's map can localise (docs/MODEL.md). Without it (the official
    layout) the subject form only acts on samples with two or more subjects: with one, the softmax covers
    only that subject's K tokens, so their mean is 1/K everywhere and carries no signal.
    """

    base_family: Literal["sd15", "sdxl"]
    num_tokens: int = Field(4, ge=1)
    refiner_depth: int = Field(4, ge=1)
    refiner_heads: int = Field(8, ge=1)
    refiner_dim_head: int = Field(256, ge=1)  # official: 8 heads of 256
    fusion_input_norm: bool = True  # official: LayerNorm on the fusion MLP's input
    # false = the official form: the fusion MLP's output replaces the word embedding (converted weights)
    fusion_residual: bool = True
    # the CLS projection head's hidden width: the text encoder's ("text") or the CLS embedding's ("image",
    # the official head, whose first layers both encoders share)
    fusion_projection_hidden: Literal["text", "image"] = "text"
    lora_rank: int = Field(64, ge=0)  # cross-attention: text path (q, k, v, out) and image path (k, v)
    self_attn_lora_rank: int = Field(64, ge=0)
    text_encoder_lora_rank: int = Field(0, ge=0)  # LoRA on every text encoder's q, k, v, out (official: yes)
    max_subjects: int = Field(3, ge=1)
    subject_scale: float = 0.8  # official default
    subject_null_key: bool = True  # official: no null key (set false for converted official weights)
    # denoising step at which subject conditioning starts (inference); 0 as every official demo
    start_step: int = Field(0, ge=0)
    supervised_layers: list[str] = Field(default_factory=lambda: list(FASTCOMPOSER_LAYERS))
    # chosen on the learning check's validation split, in fp32 and bf16 (docs/MODEL.md)
    attention_loss_kind: Literal["balanced_l1", "mask_nll"] = "mask_nll"
    attention_loss_tokens: Literal["text", "subject", "both"] = "both"
    attention_loss_weight: float = Field(0.3, ge=0)
    denoise_in_mask_prob: float = Field(0.0, ge=0, le=1)
    portrait: bool = False  # queries from a 512-d ArcFace embedding instead of the CLIP CLS embedding
    face_embed_dim: int = 512
    image_encoder_trainable_layers: int = Field(0, ge=0)  # last n CLIP layers trained, frozen copy for patches
    gradient_checkpointing: bool = False  # UNet activation checkpointing in training

"""Diffusion base models (families ``sd15`` and ``sdxl``): a diffusers pipeline object.

``build(spec)`` returns a :class:`~diffusers.StableDiffusionPipeline` (sd15) or
:class:`~diffusers.StableDiffusionXLPipeline` (sdxl):

- a local diffusers folder or hub id -> ``from_pretrained`` with ``torch_dtype`` from ``spec.dtype``;
- ``tiny`` -> the same classes with tiny configs (cross-attention at two latent resolutions plus the
  mid block, so attention capture has layers to hook), weights deterministic from ``spec.seed``;
- ``random`` -> the real SD1.5 / SDXL architectures (configs written below) with random weights.

``spec.options``: ``prediction_type`` ("epsilon" | "v_prediction", tiny/random only).
``spec.dtype`` applies to every component, except that under float16 a VAE whose config sets
``force_upcast`` stays in float32 (MMDiffModel and MMDiffPipeline run it in its own dtype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from mmdiff.zoo.spec import ModelSpec

TOKENIZER_ASSETS = Path(__file__).parent / "assets" / "clip_tokenizer"
TEXT_LENGTH = 77


def tiny_tokenizer() -> CLIPTokenizer:
    """The offline CLIP tokenizer (byte-level BPE, small vocabulary) used by tiny and random models."""
    return CLIPTokenizer(
        vocab=str(TOKENIZER_ASSETS / "vocab.json"),
        merges=str(TOKENIZER_ASSETS / "merges.txt"),
        model_max_length=TEXT_LENGTH,
    )


def _scheduler(prediction_type: str) -> DDIMScheduler:
    # SD1.5 / SDXL training schedule.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def _text_config(size: str, vocab_size: int, **overrides: Any) -> CLIPTextConfig:
    sizes = {
        "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=32),
        "clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       projection_dim=768, hidden_act="quick_gelu"),
        "bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     projection_dim=1280, hidden_act="gelu"),
    }[size]
    return CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=TEXT_LENGTH, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **{**sizes, **overrides})


def _vae(tiny: bool) -> AutoencoderKL:
    if tiny:
        return AutoencoderKL(block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             norm_num_groups=32, sample_size=64)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=512, scaling_factor=0.18215)


def _unet(family: str, tiny: bool) -> UNet2DConditionModel:
    if family == "sd15" and tiny:
        return UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=32,
        )
    if family == "sd15":
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    if tiny:
        return UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
        )
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )


def _generated(family: str, tiny: bool, seed: int, prediction_type: str):
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    unet, vae = _unet(family, tiny), _vae(tiny)
    if family == "sd15":
        text_encoder = CLIPTextModel(_text_config("tiny" if tiny else "clip_l", vocab))
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(prediction_type),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    text_encoder = CLIPTextModel(_text_config("tiny" if tiny else "clip_l", vocab))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config("tiny" if tiny else "bigg", vocab))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=_scheduler(prediction_type),
    )


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build(spec: ModelSpec):
    """The diffusers pipeline for ``spec`` (see the module docstring), on ``spec.device``."""
    if spec.family not in ("sd15", "sdxl"):
        raise ValueError(f"diffusion zoo: family {spec.family!r} is not sd15 or sdxl")
    unknown = set(spec.options) - {"prediction_type"}
    if unknown:
        raise ValueError(f"diffusion zoo: unknown options {sorted(unknown)} for {spec.family}")
    dtype = DTYPES[spec.dtype]
    if spec.is_tiny or spec.is_random:
        pipe = _generated(spec.family, spec.is_tiny, spec.seed, spec.options.get("prediction_type", "epsilon"))
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif spec.family == "sd15":
        pipe = StableDiffusionPipeline.from_pretrained(
            spec.source, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(spec.source, dtype=dtype)
    if dtype == torch.float16 and pipe.vae.config.force_upcast:
        # the VAE overflows in fp16 (SDXL's does); its config says so, and it stays in fp32
        pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(spec.device)


def save_tiny(path: Path, seed: int = 0, family: str = "sd15") -> Path:
    """Write the tiny ``family`` pipeline as a diffusers folder (safetensors weights) at ``path``."""
    pipe = build(ModelSpec(family=family, source="tiny", seed=seed))
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)

"""ZeRO-3 that fits: the frozen base is partitioned across the ranks as it is built, never whole on a rank.

Under ZeRO-3 the base (UNet, VAE, text encoders, image encoder) is built inside ``deepspeed.zero.Init``,
which partitions each module's weights as soon as the module exists, so per-rank memory falls as ranks
are added. Tiny and random twins are built from their configs directly. A checkpoint folder (diffusers
layout for the base, transformers layout for the image encoder) is built from its config files inside
the context, then its safetensors weights are streamed in one module at a time: the module's partitions
are gathered, rank 0 copies the tensors in from the memory-mapped files, and the module is re-partitioned.

MM-Diff's own trainable parts are built afterwards, outside the context: their initialisation (zero
LoRA "up" weights, zero fusion output) writes into freshly built tensors, which ``zero.Init`` would
already have partitioned away. They are small; DeepSpeed partitions them when the engine is created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from mmdiff.zoo.spec import ModelSpec

__all__ = ["partitioned_base", "stream_weights"]


def _safetensors(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights (ZeRO-3 loading reads safetensors only; convert the "
                         f"checkpoint with save_pretrained(safe_serialization=True))")
    return files


def stream_weights(module: nn.Module, folder: Path) -> None:
    """Copy ``folder``'s safetensors weights into the partitioned ``module``, one submodule at a time."""
    import deepspeed

    handles = [safe_open(str(path), framework="pt") for path in _safetensors(folder)]  # headers only; mmap
    where = {key: handle for handle in handles for key in handle.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    missing = sorted(name for name, _ in module.named_parameters() if name not in where)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} weights of {type(module).__name__}, "
                         f"e.g. {missing[:3]}")
    rank = dist.get_rank()
    for prefix, sub in module.named_modules():
        params = dict(sub.named_parameters(recurse=False))
        for name, buffer in sub.named_buffers(recurse=False):  # buffers are not partitioned: every rank reads
            key = f"{prefix}.{name}" if prefix else name
            if key in where:
                buffer.copy_(where[key].get_tensor(key).to(buffer.dtype))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
            if rank == 0:
                for name, param in params.items():
                    key = f"{prefix}.{name}" if prefix else name
                    tensor = where[key].get_tensor(key)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ValueError(f"{folder}: {key} has shape {tuple(tensor.shape)}, the model {tuple(param.shape)}")
                    param.copy_(tensor.to(param.dtype))


def _base_architecture(spec: ModelSpec) -> tuple[Any, list[tuple[nn.Module, Path]]]:
    """The diffusers pipeline of a checkpoint folder built from its config files (random weights), and
    the (module, weights folder) pairs to fill."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(spec.source)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"model.base.source {spec.source}: ZeRO-3 loads a local diffusers folder (model_index.json)")
    index = json.loads((folder / "model_index.json").read_text())
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "scheduler": getattr(diffusers, index["scheduler"][1]).from_pretrained(folder, subfolder="scheduler"),
    }
    if spec.family == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    modules = [(parts[name], folder / name) for name in ("unet", "vae", "text_encoder", "text_encoder_2") if name in parts]
    return pipe, modules


def _encoder_architecture(spec: ModelSpec) -> tuple[Any, list[tuple[nn.Module, Path]]]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from mmdiff.zoo.clip_vision import ClipVision

    folder = Path(spec.source)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model.image_encoder.source {spec.source}: ZeRO-3 loads a local transformers folder")
    model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(folder)).eval()
    return ClipVision(model, CLIPImageProcessor.from_pretrained(folder)), [(model, folder)]


def partitioned_base(base: ModelSpec, image_encoder: ModelSpec, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """The base pipeline and the image encoder (zoo objects), partitioned across the ranks from the start."""
    import deepspeed

    from mmdiff import zoo

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        pipe, fill = (zoo.build(base), []) if base.is_tiny or base.is_random else _base_architecture(base)
        encoder, fill_encoder = ((zoo.build(image_encoder), []) if image_encoder.is_tiny or image_encoder.is_random
                                 else _encoder_architecture(image_encoder))
    for module, folder in fill + fill_encoder:
        stream_weights(module, folder)
    return pipe, encoder

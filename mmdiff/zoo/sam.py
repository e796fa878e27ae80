"""Segment Anything, prompted with each entity's box to get its mask.

``build(spec)`` returns, by ``spec.backend``:

- ``transformers``: a :class:`SamBundle` ``(model, processor)`` with ``transformers.SamModel`` (eval mode)
  and ``SamProcessor``. Source: a local folder or hub id of an HF-format checkpoint (``facebook/sam-vit-base``).
- ``official``: a segment-anything 1.0 ``Sam`` (eval mode). Source: an official ``.pth`` state dict
  (``sam_vit_h_4b8939.pth``), read with ``torch.load(weights_only=True)`` (the package's own loader
  unpickles freely, so it is not used). Options: ``model_type`` (``vit_h`` | ``vit_l`` | ``vit_b``, the
  package's registry builds the architecture) or ``config`` (a JSON file of :data:`ARCHITECTURE_KEYS`,
  for architectures outside the registry such as the tiny twin).

``tiny``: the same classes with a 2-layer ViT (width 32, 64 px input, patch 8) and a 32-wide prompt
encoder and mask decoder, deterministic from ``spec.seed``. ``save_tiny(path, backend=...)`` writes an
HF folder, or ``sam.pth`` + ``config.json`` (the architecture) for the official backend.
``random``: the real architecture named by ``options.model_type`` (default ``vit_h``) with random weights,
in either backend.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

from mmdiff.zoo import default_dtype
from mmdiff.zoo.spec import ModelSpec

__all__ = ["SamBundle", "build", "save_tiny", "ARCHITECTURE_KEYS", "OFFICIAL_CHECKPOINT", "OFFICIAL_CONFIG"]

OFFICIAL_CHECKPOINT = "sam.pth"
OFFICIAL_CONFIG = "config.json"
TINY_ARCHITECTURE = dict(
    image_size=64, patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
    encoder_global_attn_indexes=[1], window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2,
)
ARCHITECTURE_KEYS = tuple(TINY_ARCHITECTURE)
# Image-encoder sizes of the released SAM models (segment-anything's build_sam registry)
VIT_SIZES = {
    "vit_b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "global_attn_indexes": [2, 5, 8, 11]},
    "vit_l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "global_attn_indexes": [5, 11, 17, 23]},
    "vit_h": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
              "global_attn_indexes": [7, 15, 23, 31]},
}


class SamBundle(NamedTuple):
    model: SamModel
    processor: SamProcessor


def _tiny_transformers(seed: int) -> SamBundle:
    a = TINY_ARCHITECTURE
    config = SamConfig(
        vision_config=dict(hidden_size=a["encoder_embed_dim"], output_channels=a["prompt_embed_dim"],
                           num_hidden_layers=a["encoder_depth"], num_attention_heads=a["encoder_num_heads"],
                           image_size=a["image_size"], patch_size=a["patch_size"], window_size=a["window_size"],
                           global_attn_indexes=a["encoder_global_attn_indexes"],
                           num_pos_feats=a["prompt_embed_dim"] // 2, mlp_dim=4 * a["encoder_embed_dim"]),
        prompt_encoder_config=dict(hidden_size=a["prompt_embed_dim"], image_size=a["image_size"],
                                   patch_size=a["patch_size"], mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=a["prompt_embed_dim"], mlp_dim=a["decoder_mlp_dim"],
                                 num_attention_heads=a["decoder_num_heads"], iou_head_hidden_dim=a["prompt_embed_dim"]),
    )
    side, mask_side = a["image_size"], 4 * a["image_size"] // a["patch_size"]
    processor = SamProcessor(SamImageProcessor(
        size={"longest_edge": side}, pad_size={"height": side, "width": side},
        mask_size={"longest_edge": mask_side}, mask_pad_size={"height": mask_side, "width": mask_side},
    ))
    torch.manual_seed(seed)
    return SamBundle(SamModel(config).eval(), processor)


def _model_type(spec: ModelSpec) -> str:
    model_type = spec.options.get("model_type", "vit_h")
    if model_type not in VIT_SIZES:
        raise ValueError(f"sam: unknown model_type {model_type!r}; expected one of {sorted(VIT_SIZES)}")
    return model_type


def _random_transformers(spec: ModelSpec) -> SamBundle:
    torch.manual_seed(spec.seed)
    model = SamModel(SamConfig(vision_config=VIT_SIZES[_model_type(spec)])).eval()
    return SamBundle(model, SamProcessor(SamImageProcessor()))


def _official(architecture: dict) -> torch.nn.Module:
    """A segment-anything ``Sam`` of the given architecture, laid out as the package's ``_build_sam``."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    unknown = set(architecture) - set(ARCHITECTURE_KEYS)
    if unknown:
        raise ValueError(f"sam: unknown architecture keys {sorted(unknown)}; expected {ARCHITECTURE_KEYS}")
    a = architecture
    embedding = a["image_size"] // a["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=a["encoder_depth"], embed_dim=a["encoder_embed_dim"], img_size=a["image_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a["encoder_num_heads"],
            patch_size=a["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=a["encoder_global_attn_indexes"], window_size=a["window_size"],
            out_chans=a["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a["prompt_embed_dim"], image_embedding_size=(embedding, embedding),
            input_image_size=(a["image_size"], a["image_size"]), mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=a["prompt_embed_dim"], mlp_dim=a["decoder_mlp_dim"],
                                          num_heads=a["decoder_num_heads"]),
            transformer_dim=a["prompt_embed_dim"], iou_head_depth=3, iou_head_hidden_dim=a["prompt_embed_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _load_official(spec: ModelSpec) -> torch.nn.Module:
    from segment_anything import sam_model_registry

    checkpoint = Path(spec.source)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"sam: official checkpoint {checkpoint} not found (backend 'official' needs a local .pth)")
    if "config" in spec.options:
        model = _official(json.loads(Path(spec.options["config"]).read_text()))
    else:
        model_type = spec.options.get("model_type", "vit_h")
        if model_type not in sam_model_registry:
            raise ValueError(f"sam: unknown model_type {model_type!r}; expected one of {sorted(sam_model_registry)}")
        model = sam_model_registry[model_type](checkpoint=None)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"sam: checkpoint {checkpoint} does not match the architecture: {exc}") from exc
    return model.eval()


def build(spec: ModelSpec):
    """Built in ``spec.dtype`` from the start: no float32 copy of the weights on the host (a checkpoint
    in float32 is cast as it is copied in)."""
    dtype = getattr(torch, spec.dtype)
    with default_dtype(dtype):
        return _build(spec, dtype)


def _build(spec: ModelSpec, dtype: torch.dtype):
    if spec.backend == "official":
        if spec.is_tiny:
            torch.manual_seed(spec.seed)
            model = _official(TINY_ARCHITECTURE).eval()
        elif spec.is_random:
            from segment_anything import sam_model_registry

            torch.manual_seed(spec.seed)
            model = sam_model_registry[_model_type(spec)](checkpoint=None).eval()
        else:
            model = _load_official(spec)
        return model.to(device=spec.device, dtype=dtype)
    if spec.is_tiny or spec.is_random:
        bundle = _tiny_transformers(spec.seed) if spec.is_tiny else _random_transformers(spec)
    else:
        try:
            bundle = SamBundle(SamModel.from_pretrained(spec.source, dtype=dtype).eval(),
                               SamProcessor.from_pretrained(spec.source))
        except OSError as exc:
            raise OSError(f"sam: cannot load model {spec.source!r} (a local folder or a cached hub id): {exc}") from exc
    bundle.model.to(device=spec.device, dtype=dtype)
    return bundle


def save_tiny(path: Path, seed: int = 0, backend: str = "transformers") -> Path:
    """Write the tiny twin in the real format of ``backend``; returns ``path``."""
    path = Path(path)
    if backend == "official":
        path.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        torch.save(_official(TINY_ARCHITECTURE).state_dict(), path / OFFICIAL_CHECKPOINT)
        (path / OFFICIAL_CONFIG).write_text(json.dumps(TINY_ARCHITECTURE, indent=1))
        return path
    bundle = _tiny_transformers(seed)
    bundle.model.save_pretrained(path)
    bundle.processor.save_pretrained(path)
    return path

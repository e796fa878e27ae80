"""Convert the official MM-Diff release (alibaba/mm-diff checkpoint folder) into an mmdiff adapter folder.

``python -m mmdiff.convert_official CHECKPOINT_DIR OUT_DIR --base SDXL_FOLDER_OR_HUB_ID --image-encoder CLIP``

The official folder holds three torch files (read with ``weights_only=True``, never unpickled; a
``.safetensors`` file of the same stem is preferred when present):

* ``unet_adapter_weights.bin``: the state dict of a ``ModuleList`` of the UNet's attention processors,
  in the order of ``unet.attn_processors``: ``{i}.to_{q,k,v,out}_lora.{down,up}.weight`` (self- and
  cross-attention) and ``{i}.to_{k,v}_lora_image.{down,up}.weight`` (cross-attention, the subject path);
* ``text_encoder_adapter_weights.bin``: diffusers-0.21 text-encoder LoRA,
  ``text_encoder[_2].<module>.{q,k,v,out}_proj.lora_linear_layer.{down,up}.weight``;
* ``custom_weights.bin``: ``image_encoder`` (the fine-tuned part of CLIP, keys of ``vision_model`` and
  ``visual_projection``), ``obj_embeds_proj`` (the CLS projection head shared by both text encoders),
  ``face_embeds_proj`` (face-embedding MLP + SE-Refiner), ``mm_fuse_one`` / ``mm_fuse_two`` (the fusion
  MLPs).

Every official tensor lands in exactly one of our parameters, or the conversion fails naming it; the
settings that make our model compute the official function are derived from the weights
(:func:`official_config`, docs/MODEL.md "Converting the official checkpoint"). What the official model
carries but never uses (LoRA on the last layer of SDXL's first text encoder, whose output SDXL does not
read) is dropped and recorded in ``converted_from.json`` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mmdiff import zoo
from mmdiff.configuration import load_config
from mmdiff.model_config import MMDiffConfig
from mmdiff.modeling import MMDiffModel
from mmdiff.zoo.spec import ModelSpec

log = logging.getLogger(__name__)

FILES = {"unet": "unet_adapter_weights", "text_encoder": "text_encoder_adapter_weights", "custom": "custom_weights"}
CUSTOM_PARTS = ("image_encoder", "obj_embeds_proj", "face_embeds_proj", "mm_fuse_one", "mm_fuse_two")
PORTRAIT_CONFIG = "configs/mmdiff/portrait_sdxl.yaml"
OFFICIAL_FILL = (0, 0, 0)  # the official pipeline pads subject images with black
OFFICIAL_DIM_HEAD = 256  # the official refiner: heads of 256 (heads = width / 256)


class OfficialCheckpointError(ValueError):
    """The official checkpoint cannot be converted; the message names the file and key at fault."""


def read_official(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The three official state dicts (``custom`` is a dict of per-module state dicts)."""
    folder, out = Path(folder), {}
    for part, stem in FILES.items():
        safe, pickled = folder / f"{stem}.safetensors", folder / f"{stem}.bin"
        try:
            if safe.is_file():
                out[part] = load_file(safe)
            elif pickled.is_file():
                out[part] = torch.load(pickled, map_location="cpu", weights_only=True)
            else:
                raise OfficialCheckpointError(f"{folder}: no {stem}.bin or {stem}.safetensors (not an official "
                                              f"MM-Diff checkpoint folder?)")
        except OfficialCheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many types; name the file
            raise OfficialCheckpointError(f"{safe if safe.is_file() else pickled}: not readable as plain "
                                          f"tensors ({type(exc).__name__}: {exc})") from None
        if not isinstance(out[part], dict):
            raise OfficialCheckpointError(f"{folder / stem}: expected a state dict, got {type(out[part]).__name__}")
    missing = [k for k in CUSTOM_PARTS if k not in out["custom"]]
    if missing:
        raise OfficialCheckpointError(f"{folder / FILES['custom']}: no {missing} (the released portrait model has "
                                      f"{list(CUSTOM_PARTS)})")
    return out


def _shape(state: dict[str, torch.Tensor], key: str, where: str) -> torch.Size:
    if key not in state:
        raise OfficialCheckpointError(f"{where}: no key {key!r}")
    return state[key].shape


def _rank(unet: dict[str, torch.Tensor], processor_names: list[str], attn: str) -> int:
    """The one LoRA rank of the ``attn`` ("attn1" self, "attn2" cross) processors' layers."""
    ranks = {v.shape[0] for k, v in unet.items() if k.endswith(".down.weight")
             and f".{attn}." in processor_names[int(k.split(".")[0])]} if processor_names else set()
    if len(ranks) != 1:
        raise OfficialCheckpointError(f"{FILES['unet']}: {attn} LoRA ranks {sorted(ranks)}: mmdiff needs exactly one "
                                      f"per kind of attention layer")
    return ranks.pop()


def official_config(official: dict[str, dict[str, Any]], unet_dim: int, processor_names: list[str],
                    refiner_dim_head: int = OFFICIAL_DIM_HEAD, image_encoder_trainable_layers: int = 0) -> MMDiffConfig:
    """Our settings for the official model's function, read from its weights' shapes (``processor_names``:
    the base UNet's ``attn_processors`` order, which the official ModuleList follows)."""
    custom, unet, text = official["custom"], official["unet"], official["text_encoder"]
    where = FILES["custom"]
    if "proj_2.weight" not in custom["obj_embeds_proj"]:
        raise OfficialCheckpointError(f"{where}: obj_embeds_proj has no proj_2 (the official code is SDXL only)")
    face = custom["face_embeds_proj"]
    face_dim = _shape(face, "proj.0.weight", f"{where}[face_embeds_proj]")[1]
    tokens_out = _shape(face, "proj.2.weight", f"{where}[face_embeds_proj]")[0]
    if tokens_out % unet_dim:
        raise OfficialCheckpointError(f"{where}[face_embeds_proj] proj.2.weight: {tokens_out} outputs are not a "
                                      f"multiple of the UNet's cross-attention width {unet_dim} (another base?)")
    depth = len({k.split(".")[2] for k in face if k.startswith("refiner.layers.")})
    inner = _shape(face, "refiner.layers.0.0.to_q.weight", f"{where}[face_embeds_proj]")[0]
    if inner % refiner_dim_head:
        raise OfficialCheckpointError(f"{where}[face_embeds_proj] refiner.layers.0.0.to_q.weight: width {inner} is "
                                      f"not a multiple of the head width {refiner_dim_head}")
    bad = [k for k in unet if not re.fullmatch(r"\d+\..+", k) or int(k.split(".")[0]) >= len(processor_names)]
    if bad:
        raise OfficialCheckpointError(f"{FILES['unet']}: keys {bad[:4]} fit no attention processor of the base given "
                                      f"({len(processor_names)} processors): another base?")
    text_ranks = {v.shape[0] for k, v in text.items() if k.endswith("lora_linear_layer.down.weight")}
    if len(text_ranks) > 1:
        raise OfficialCheckpointError(f"{FILES['text_encoder']}: LoRA ranks {sorted(text_ranks)}: mmdiff uses one")
    return load_config(PORTRAIT_CONFIG, MMDiffConfig, {
        "num_tokens": tokens_out // unet_dim, "face_embed_dim": face_dim, "portrait": True,
        "refiner_depth": depth, "refiner_heads": inner // refiner_dim_head, "refiner_dim_head": refiner_dim_head,
        "lora_rank": _rank(unet, processor_names, "attn2"), "self_attn_lora_rank": _rank(unet, processor_names, "attn1"),
        "text_encoder_lora_rank": next(iter(text_ranks), 0),
        "image_encoder_trainable_layers": image_encoder_trainable_layers,
        # the official function: the fusion output replaces the word, one CLS head shared by both encoders
        # (its shared first layers are copied into each of ours), no background key in the subject softmax
        "fusion_input_norm": "layernorm.weight" in custom["mm_fuse_one"], "fusion_residual": False,
        "fusion_projection_hidden": "image", "subject_null_key": False,
    })


def is_position_ids(key: str, value: torch.Tensor) -> bool:
    """Older transformers versions saved CLIP's ``embeddings.position_ids`` (0, 1, 2, ...) in its state dict."""
    return key.endswith("embeddings.position_ids") and torch.equal(value.flatten().long(), torch.arange(value.numel()))


def changed_image_encoder_layers(official_encoder: dict[str, torch.Tensor], vision: Any) -> int:
    """How many last CLIP layers the official image encoder weights change (the rest must equal the
    pretrained encoder's, since our model keeps them frozen)."""
    pretrained = vision.model.state_dict()
    num_layers = vision.model.config.num_hidden_layers
    lowest, frozen_changed = num_layers, []
    for key, value in official_encoder.items():
        if is_position_ids(key, value) and key not in pretrained:
            continue  # a fixed buffer older transformers saved (recorded as dropped by convert_state_dict)
        if key not in pretrained:
            raise OfficialCheckpointError(f"{FILES['custom']}[image_encoder] {key!r}: not a parameter of the image "
                                          f"encoder given (another CLIP?)")
        if pretrained[key].shape == value.shape and torch.equal(pretrained[key], value.to(pretrained[key].dtype)):
            continue
        layer = re.match(r"vision_model\.encoder\.layers\.(\d+)\.", key)
        if layer:
            lowest = min(lowest, int(layer.group(1)))
        elif key.startswith(("vision_model.post_layernorm.", "visual_projection.")):
            lowest = min(lowest, num_layers - 1)
        else:
            frozen_changed.append(key)
    if frozen_changed:
        raise OfficialCheckpointError(f"{FILES['custom']}[image_encoder] changes {frozen_changed[:4]}, which mmdiff "
                                      f"keeps frozen (only the last layers, post-LayerNorm and projection train)")
    return num_layers - lowest


def _lora_pair(prefix: str, down: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ours (peft, alpha = rank: scale 1) from a diffusers-0.21 ``LoRALinearLayer`` without network alpha."""
    return {f"{prefix}.lora_A.default.weight": down, f"{prefix}.lora_B.default.weight": up}


def convert_state_dict(official: dict[str, dict[str, Any]], model: MMDiffModel, processor_names: list[str]
                       ) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:
    """(our trainable weights, dropped official keys with the reason) for ``model`` built from
    :func:`official_config`; ``processor_names`` = the base UNet's ``attn_processors`` order."""
    ours: dict[str, torch.Tensor] = {}
    dropped: list[dict[str, str]] = []
    unet = dict(official["unet"])
    for i, name in enumerate(processor_names):
        path = "unet." + name.removesuffix(".processor")
        for official_name, target in (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"),
                                      ("to_out_lora", "to_out.0")):
            down, up = unet.pop(f"{i}.{official_name}.down.weight", None), unet.pop(f"{i}.{official_name}.up.weight", None)
            if down is None or up is None:
                raise OfficialCheckpointError(f"{FILES['unet']}: no {i}.{official_name}.down/up.weight for {name}")
            ours.update(_lora_pair(f"{path}.{target}", down, up))
        if ".attn2." in name:
            for official_name, target in (("to_k_lora_image", "lora_k_img"), ("to_v_lora_image", "lora_v_img")):
                for side in ("down", "up"):
                    key = f"{i}.{official_name}.{side}.weight"
                    if key not in unet:
                        raise OfficialCheckpointError(f"{FILES['unet']}: no {key} for {name}")
                    ours[f"{path}.processor.{target}.{side}.weight"] = unet.pop(key)
    if unet:
        raise OfficialCheckpointError(f"{FILES['unet']}: keys {sorted(unet)[:4]} are no LoRA of their processor")

    trainable = model.trainable_state_dict()
    for key, value in official["text_encoder"].items():
        match = re.fullmatch(r"(text_encoder(?:_2)?)\.(.*)\.lora_linear_layer\.(down|up)\.weight", key)
        if not match:
            raise OfficialCheckpointError(f"{FILES['text_encoder']}: {key!r} is not a diffusers text-encoder LoRA "
                                          f"weight (`<encoder>.<module>.lora_linear_layer.down|up.weight`); network "
                                          f"alphas and MLP LoRA are not supported")
        index = 0 if match.group(1) == "text_encoder" else 1
        module = match.group(2).removeprefix("text_model.")
        side = "lora_A" if match.group(3) == "down" else "lora_B"
        candidates = [k for k in (f"text_encoders.{index}.{module}.{side}.default.weight",
                                  f"text_encoders.{index}.text_model.{module}.{side}.default.weight") if k in trainable]
        if candidates:
            ours[candidates[0]] = value
            continue
        layer = re.search(r"encoder\.layers\.(\d+)\.", module)
        num_layers = model.text_encoders[index].config.num_hidden_layers
        if index == 0 and len(model.text_encoders) == 2 and layer and int(layer.group(1)) == num_layers - 1:
            dropped.append({"key": key, "reason": "LoRA on the last layer of SDXL's first text encoder, whose output "
                                                  "SDXL never reads (it uses the penultimate hidden states)"})
            continue
        raise OfficialCheckpointError(f"{FILES['text_encoder']}: {key!r} matches no LoRA layer of text encoder "
                                      f"{index} (another base, or LoRA on modules mmdiff does not adapt)")

    custom = official["custom"]
    for key, value in custom["image_encoder"].items():
        target = f"image_encoder.vision_model.{key}"
        if target in trainable:
            ours[target] = value
        elif is_position_ids(key, value) and target not in model.state_dict():
            dropped.append({"key": f"image_encoder.{key}", "reason": "position ids (0, 1, 2, ...), a fixed buffer "
                                                                    "this transformers version does not store"})
        # else: equal to the pretrained encoder's (checked by changed_image_encoder_layers)
    face = custom["face_embeds_proj"]
    renames = {"proj.0.": "query_mlp.net.0.", "proj.2.": "query_mlp.net.2.", "layer_norm.": "query_mlp.norm.",
               "refiner.proj_in.": "refiner.proj_in.", "refiner.proj_out.": "refiner.proj_out.",
               "refiner.norm_out.": "refiner.norm_out."}
    for key, value in face.items():
        attention = re.fullmatch(r"refiner\.layers\.(\d+)\.0\.(norm1|norm2|to_q|to_kv|to_out)\.(weight|bias)", key)
        feed_forward = re.fullmatch(r"refiner\.layers\.\d+\.1\.[013]\.(weight|bias)", key)  # same layout as ours
        prefix = next((p for p in renames if key.startswith(p)), None)
        if attention:
            part = {"norm1": "norm_patches", "norm2": "norm_queries"}.get(attention.group(2), attention.group(2))
            ours[f"refiner.layers.{attention.group(1)}.0.{part}.{attention.group(3)}"] = value
        elif feed_forward:
            ours[key] = value
        elif prefix:
            ours[renames[prefix] + key[len(prefix):]] = value
        else:
            raise OfficialCheckpointError(f"{FILES['custom']}[face_embeds_proj]: unknown key {key!r}")
    head = custom["obj_embeds_proj"]
    for index, fuse_name in enumerate(("mm_fuse_one", "mm_fuse_two")):
        project, fuse = f"text_fusions.{index}.project", f"text_fusions.{index}.fuse"
        # the official head's LayerNorm and first Linear are shared by both encoders: copied into each of ours
        for official_key, target in (("layernorm", "0"), ("fc", "1"), (f"proj_{index + 1}", "3")):
            for kind in ("weight", "bias"):
                ours[f"{project}.{target}.{kind}"] = head[f"{official_key}.{kind}"]
        mlp = custom[fuse_name]
        layers = (("layernorm", "0"), ("fc1", "1"), ("fc2", "3")) if "layernorm.weight" in mlp else (("fc1", "0"), ("fc2", "2"))
        for official_key, target in layers:
            for kind in ("weight", "bias"):
                ours[f"{fuse}.{target}.{kind}"] = mlp[f"{official_key}.{kind}"]
    return ours, dropped


def check_complete(ours: dict[str, torch.Tensor], model: MMDiffModel) -> None:
    """Every trainable parameter of ``model`` gets an official tensor of its shape (the image encoder's
    unchanged layers keep the pretrained weights); nothing official is left over."""
    trainable = model.trainable_state_dict()
    unexpected = sorted(set(ours) - set(trainable))
    missing = sorted(k for k in set(trainable) - set(ours) if not k.startswith("image_encoder."))
    wrong = [f"{k}: {tuple(ours[k].shape)} vs {tuple(trainable[k].shape)}" for k in sorted(set(ours) & set(trainable))
             if ours[k].shape != trainable[k].shape]
    if unexpected or missing or wrong:
        raise OfficialCheckpointError(f"the official weights do not fit the model built for them: unexpected "
                                      f"{unexpected[:3]}, missing {missing[:3]}, wrong shape {wrong[:3]}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(checkpoint_dir: str | Path, out_dir: str | Path, base: ModelSpec, image_encoder: ModelSpec,
            refiner_dim_head: int = OFFICIAL_DIM_HEAD) -> Path:
    """Write an mmdiff adapter folder (loadable by ``MMDiffPipeline.from_pretrained``) computing the official
    model's function on ``base`` (SDXL) and ``image_encoder`` (the CLIP the official code loads)."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    official = read_official(checkpoint_dir)
    pipe, vision = zoo.build(base), zoo.build(image_encoder)
    processor_names = list(pipe.unet.attn_processors)  # the official ModuleList's order, before ours replace them
    layers = changed_image_encoder_layers(official["custom"]["image_encoder"], vision)
    config = official_config(official, pipe.unet.config.cross_attention_dim, processor_names, refiner_dim_head, layers)
    model = MMDiffModel(pipe, vision, config, base, image_encoder)
    ours, dropped = convert_state_dict(official, model, processor_names)
    check_complete(ours, model)
    model.load_state_dict({k: v.to(model.device) for k, v in ours.items()}, strict=False)
    model.subject_fill = OFFICIAL_FILL
    model.save_pretrained(out_dir)
    record = {"official_files": {p.name: _sha256(p) for p in sorted(checkpoint_dir.iterdir())
                                 if p.stem in FILES.values()},
              "derived_settings": {k: getattr(config, k) for k in (
                  "num_tokens", "refiner_depth", "refiner_heads", "refiner_dim_head", "lora_rank",
                  "self_attn_lora_rank", "text_encoder_lora_rank", "image_encoder_trainable_layers",
                  "fusion_residual", "fusion_projection_hidden", "subject_null_key")},
              "subject_fill": list(OFFICIAL_FILL), "dropped": dropped}
    (out_dir / "converted_from.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    for item in dropped:
        log.info("dropped %s: %s", item["key"], item["reason"])
    return out_dir


def main(argv: list[str] | None = None) -> None:
    from mmdiff.cli import CommandParser

    parser = CommandParser(prog="python -m mmdiff.convert_official", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint_dir", type=Path, help="the official release's checkpoint folder")
    parser.add_argument("out_dir", type=Path, help="where to write the mmdiff adapter folder")
    parser.add_argument("--base", required=True, help="SDXL base: a diffusers folder or hub id "
                                                      "(the official demos: stabilityai/stable-diffusion-xl-base-1.0)")
    parser.add_argument("--image-encoder", required=True, help="the CLIP vision model the official code loads "
                                                              "(openai/clip-vit-large-patch14)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert(args.checkpoint_dir, args.out_dir, ModelSpec(family="sdxl", source=args.base),
                      ModelSpec(family="clip_vision", source=args.image_encoder))
    except OfficialCheckpointError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

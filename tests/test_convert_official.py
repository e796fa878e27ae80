"""The official MM-Diff checkpoint layout converts into an mmdiff adapter that computes the official function.

The classes below re-declare the official release's modules (alibaba/mm-diff, ``mmdiff/model.py`` and
``mmdiff/attention_processor.py``) with the same parameter names and shapes, sized by the same rules as
its ``load_from_checkpoint``, and with forward passes written from the official code's definitions. A
tiny checkpoint written from them (the three official files, torch-saved state dicts) is converted and
loaded; the converted model must give what these official-form modules give (face tokens, fused word
embeddings, text-encoder LoRA, the whole UNet with every LoRA and the subject path), and generate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

from mmdiff import MMDiffPipeline, Subject, zoo
from mmdiff.attention import SubjectConditioning
from mmdiff.convert_official import FILES, OfficialCheckpointError, convert
from mmdiff.zoo.spec import ModelSpec

BASE = ModelSpec(family="sdxl", source="tiny")
CLIP = ModelSpec(family="clip_vision", source="tiny")
RANK, TEXT_RANK, DIM_HEAD, DEPTH, NUM_TOKENS = 4, 2, 16, 2, 4


# -- the official module layout (names and shapes), with its forward math ---------------------------
def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


class LoRALinearLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x):
        return self.up(self.down(x))


class OfficialSelfProcessor(nn.Module):
    def __init__(self, hidden: int, cross: int | None, rank: int):
        super().__init__()
        self.to_q_lora = LoRALinearLayer(hidden, hidden, rank)
        self.to_k_lora = LoRALinearLayer(cross or hidden, hidden, rank)
        self.to_v_lora = LoRALinearLayer(cross or hidden, hidden, rank)
        self.to_out_lora = LoRALinearLayer(hidden, hidden, rank)

    def _attend(self, attn, q, k, v, mask=None):
        q, k, v = (split_heads(t, attn.heads) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, official=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states) + self.to_q_lora(hidden_states)
        k = attn.to_k(context) + self.to_k_lora(context)
        v = attn.to_v(context) + self.to_v_lora(context)
        out = self._attend(attn, q, k, v)
        if isinstance(self, OfficialCrossProcessor) and official is not None:
            image = official["image_hidden_states"]
            image_k = attn.to_k(image) + self.to_k_lora_image(image)
            image_v = attn.to_v(image) + self.to_v_lora_image(image)
            valid = official["valid"].repeat_interleave(NUM_TOKENS, dim=1)  # [B, S*K]
            bias = torch.zeros(valid.shape, dtype=q.dtype).masked_fill(~valid, -1e6)
            bias = bias.masked_fill(~valid.any(1, keepdim=True), 0)[:, None, None, :]
            image_out = self._attend(attn, q, image_k, image_v, bias) * valid.any(1)[:, None, None]
            out = out + official["fuse_scale"] * image_out
        return attn.to_out[0](out) + self.to_out_lora(out)


class OfficialCrossProcessor(OfficialSelfProcessor):
    def __init__(self, hidden: int, cross: int, rank: int):
        super().__init__(hidden, cross, rank)
        self.to_k_lora_image = LoRALinearLayer(cross, hidden, rank)
        self.to_v_lora_image = LoRALinearLayer(cross, hidden, rank)


class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):  # use_residual=False, as the official fusion MLPs are built
        return self.fc2(F.gelu(self.fc1(self.layernorm(x))))


class CLIPEmbedsProjHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim_1: int, out_dim_2: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, hidden_dim)
        self.proj_1 = nn.Linear(hidden_dim, out_dim_1)
        self.proj_2 = nn.Linear(hidden_dim, out_dim_2)

    def forward(self, x):
        h = F.gelu(self.fc(self.layernorm(x)))
        return self.proj_1(h), self.proj_2(h)


class SEAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, query, dense):
        dense, query = self.norm1(dense), self.norm2(query)
        k, v = self.to_kv(torch.cat([dense, query], dim=-2)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(query), k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5, dim=-1)
        return self.to_out((weights @ v).transpose(1, 2).flatten(2))


class SERefiner(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, embedding_dim, output_dim):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([
            SEAttention(dim, dim_head, heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * 2, bias=False), nn.GELU(),
                          nn.Linear(dim * 2, dim, bias=False))]) for _ in range(depth))

    def forward(self, query, dense):
        dense = self.proj_in(dense)
        for attention, feed_forward in self.layers:
            query = attention(query, dense) + query
            query = feed_forward(query) + query
        return self.norm_out(self.proj_out(query))


class FaceEmbedsProjHead(nn.Module):
    def __init__(self, face_dim: int, clip_dim: int, cross_dim: int, num_tokens: int):
        super().__init__()
        self.cross_dim, self.num_tokens = cross_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(face_dim, face_dim * 2), nn.GELU(),
                                  nn.Linear(face_dim * 2, cross_dim * num_tokens))
        self.layer_norm = nn.LayerNorm(cross_dim)
        self.refiner = SERefiner(cross_dim, DEPTH, DIM_HEAD, cross_dim // DIM_HEAD, clip_dim, cross_dim)

    def forward(self, face, clip_hidden):
        x = self.layer_norm(self.proj(face).reshape(-1, self.num_tokens, self.cross_dim))
        return x + self.refiner(x, clip_hidden)


def official_processors(unet) -> dict[str, OfficialSelfProcessor]:
    """Sized as the official ``load_from_checkpoint`` sizes them, in ``unet.attn_processors`` order."""
    out, channels = {}, unet.config.block_out_channels
    for name in unet.attn_processors:
        block = name.split(".")
        hidden = (channels[-1] if block[0] == "mid_block" else
                  list(reversed(channels))[int(block[1])] if block[0] == "up_blocks" else channels[int(block[1])])
        out[name] = (OfficialSelfProcessor(hidden, None, RANK) if name.endswith("attn1.processor")
                     else OfficialCrossProcessor(hidden, unet.config.cross_attention_dim, RANK))
    return out


def perturb(module: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return module


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official modules with random weights, and the checkpoint folder written from them."""
    g = torch.Generator().manual_seed(0)
    pipe, vision = zoo.build(BASE), zoo.build(CLIP)
    te_1, te_2 = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    projection = vision.model.config.projection_dim
    modules = {
        "processors": {k: perturb(v, g) for k, v in official_processors(pipe.unet).items()},
        "obj_embeds_proj": perturb(CLIPEmbedsProjHead(projection, projection, te_1, te_2), g),
        "face_embeds_proj": perturb(FaceEmbedsProjHead(512, vision.model.config.hidden_size,
                                                       pipe.unet.config.cross_attention_dim, NUM_TOKENS), g),
        "mm_fuse_one": perturb(MLP(2 * te_1, te_1, te_1), g),
        "mm_fuse_two": perturb(MLP(2 * te_2, te_2, te_2), g),
    }
    # the fine-tuned CLIP: last layer, post-LayerNorm and projection changed; saved whole (strict=False load)
    encoder = vision.model.state_dict()
    last = vision.model.config.num_hidden_layers - 1
    for key in encoder:
        if key.startswith((f"vision_model.encoder.layers.{last}.", "vision_model.post_layernorm.", "visual_projection.")):
            encoder[key] = encoder[key] + torch.randn(encoder[key].shape, generator=g) * 0.05
    # transformers of the official release's time also saved CLIP's position ids (a fixed buffer)
    positions = vision.model.config.image_size // vision.model.config.patch_size
    encoder["vision_model.embeddings.position_ids"] = torch.arange(positions ** 2 + 1)[None]
    # diffusers-0.21 text-encoder LoRA on q/k/v/out of every layer of both encoders
    text_lora = {}
    for prefix, encoder_model in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
        for i in range(encoder_model.config.num_hidden_layers):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                key = f"{prefix}.text_model.encoder.layers.{i}.self_attn.{proj}.lora_linear_layer"
                width = encoder_model.config.hidden_size
                text_lora[f"{key}.down.weight"] = torch.randn(TEXT_RANK, width, generator=g) * 0.05
                text_lora[f"{key}.up.weight"] = torch.randn(width, TEXT_RANK, generator=g) * 0.05
    folder = tmp_path_factory.mktemp("official")
    torch.save(nn.ModuleList(modules["processors"].values()).state_dict(), folder / f"{FILES['unet']}.bin")
    torch.save(text_lora, folder / f"{FILES['text_encoder']}.bin")
    torch.save({"image_encoder": encoder, **{k: modules[k].state_dict() for k in (
        "obj_embeds_proj", "face_embeds_proj", "mm_fuse_one", "mm_fuse_two")}}, folder / f"{FILES['custom']}.bin")
    converted = convert(folder, tmp_path_factory.mktemp("converted") / "adapter", BASE, CLIP, refiner_dim_head=DIM_HEAD)
    return {"folder": folder, "modules": modules, "encoder": encoder, "text_lora": text_lora,
            "pipe": MMDiffPipeline.from_pretrained(BASE, converted), "converted": converted}


def test_converted_model_computes_the_official_function_and_generates(official):
    model, modules = official["pipe"].model, official["modules"]
    record = json.loads((official["converted"] / "converted_from.json").read_text())
    settings = record["derived_settings"]
    assert (settings["refiner_depth"], settings["refiner_heads"], settings["lora_rank"],
            settings["text_encoder_lora_rank"], settings["image_encoder_trainable_layers"]) == (DEPTH, 4, RANK, TEXT_RANK, 1)
    assert not settings["fusion_residual"] and not settings["subject_null_key"] and model.subject_fill == (0, 0, 0)
    # LoRA on the last layer of SDXL's first text encoder is unused by SDXL: dropped, with the reason recorded
    assert {d["key"].split(".self_attn")[0] for d in record["dropped"]} == {
        "text_encoder.text_model.encoder.layers.1", "image_encoder.vision_model.embeddings.position_ids"}

    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    faces = torch.randn(2, 512, generator=g)
    pretrained, finetuned = zoo.build(CLIP).model, zoo.build(CLIP).model
    finetuned.load_state_dict(official["encoder"], strict=False)  # as the official code loads it
    with torch.no_grad():
        cls, patches = model.image_encoder(pixels)
        # the official refiner reads the pretrained CLIP's penultimate states; the fusion reads the fine-tuned CLS
        official_patches = pretrained(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        official_cls = finetuned(pixel_values=pixels).image_embeds
        torch.testing.assert_close(patches, official_patches)
        torch.testing.assert_close(cls, official_cls)
        tokens = model.refiner(model.query_mlp(faces), patches)
        torch.testing.assert_close(tokens, modules["face_embeds_proj"](faces, official_patches), atol=1e-5, rtol=1e-4)
        # fused word embedding: the official MLP's output replaces the word's
        words = [torch.randn(2, fusion.fuse[-1].out_features, generator=g) for fusion in model.text_fusions]
        for fusion, word, official_fuse, projected in zip(model.text_fusions, words,
                                                          (modules["mm_fuse_one"], modules["mm_fuse_two"]),
                                                          modules["obj_embeds_proj"](official_cls)):
            torch.testing.assert_close(fusion(word, cls), official_fuse(torch.cat([word, projected], -1)),
                                       atol=1e-5, rtol=1e-4)

        # text-encoder LoRA: the converted encoders equal the base ones with the official LoRA merged in
        base = zoo.build(BASE)
        for prefix, encoder in (("text_encoder", base.text_encoder), ("text_encoder_2", base.text_encoder_2)):
            for name, module in encoder.named_modules():
                key = f"{prefix}.text_model.{name.removeprefix('text_model.')}.lora_linear_layer"
                if f"{key}.down.weight" in official["text_lora"]:
                    module.weight += official["text_lora"][f"{key}.up.weight"] @ official["text_lora"][f"{key}.down.weight"]
        ids = [tok("a woman", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
               for tok in model.tokenizers]
        expected = torch.cat([enc(i, output_hidden_states=True).hidden_states[-2]
                              for enc, i in zip((base.text_encoder, base.text_encoder_2), ids)], -1)
        torch.testing.assert_close(model.encode_text(ids)[0], expected, atol=1e-5, rtol=1e-4)

        # the whole UNet: every LoRA (self, cross, image path), the subject attention and its mask
        base.unet.set_attn_processor(modules["processors"])
        latents = torch.randn(2, 4, 8, 8, generator=g)
        context = torch.randn(2, 77, base.unet.config.cross_attention_dim, generator=g)
        added = {"text_embeds": torch.randn(2, base.text_encoder_2.config.projection_dim, generator=g),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        subject_tokens = torch.randn(2, 2 * NUM_TOKENS, base.unet.config.cross_attention_dim, generator=g)
        valid = torch.tensor([[True, True], [True, False]])
        ours = model.unet(latents, 500, context, added_cond_kwargs=added, cross_attention_kwargs={
            "subjects": SubjectConditioning(subject_tokens, valid, 0.8, NUM_TOKENS)}).sample
        theirs = base.unet(latents, 500, context, added_cond_kwargs=added, cross_attention_kwargs={"official": {
            "image_hidden_states": subject_tokens, "valid": valid, "fuse_scale": 0.8}}).sample
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    images = official["pipe"]("a woman on the beach", [Subject("woman", data.astronaut(), faces[0])], seed=0,
                              num_inference_steps=2, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_what_cannot_map_is_refused_naming_it(official, tmp_path):
    custom = torch.load(official["folder"] / f"{FILES['custom']}.bin", weights_only=True)
    for name in FILES.values():
        if name != FILES["custom"]:
            (tmp_path / f"{name}.bin").write_bytes((official["folder"] / f"{name}.bin").read_bytes())
    cases = {
        "'refiner.extra.weight'": {**custom, "face_embeds_proj": {**custom["face_embeds_proj"],
                                                                  "refiner.extra.weight": torch.zeros(1)}},
        "changes .*embeddings": {**custom, "image_encoder": {**custom["image_encoder"], **{
            k: v + 1 for k, v in custom["image_encoder"].items() if "patch_embedding" in k}}},
        "no \\['mm_fuse_two'\\]": {k: v for k, v in custom.items() if k != "mm_fuse_two"},
    }
    for message, bad in cases.items():
        torch.save(bad, tmp_path / f"{FILES['custom']}.bin")
        with pytest.raises(OfficialCheckpointError, match=message):
            convert(tmp_path, tmp_path / "out", BASE, CLIP, refiner_dim_head=DIM_HEAD)
    torch.save({"not": "tensors", "fn": print}, tmp_path / f"{FILES['custom']}.bin")  # never unpickled
    with pytest.raises(OfficialCheckpointError, match=f"{FILES['custom']}.bin: not readable as plain tensors"):
        convert(tmp_path, tmp_path / "out", BASE, CLIP, refiner_dim_head=DIM_HEAD)
    (tmp_path / f"{FILES['unet']}.bin").unlink()
    with pytest.raises(OfficialCheckpointError, match=f"no {FILES['unet']}.bin"):
        convert(tmp_path, tmp_path / "out", BASE, CLIP, refiner_dim_head=DIM_HEAD)

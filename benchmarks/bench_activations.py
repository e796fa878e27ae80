"""Saved activations of one MM-Diff training forward at real SDXL size, counted on meta tensors.

SDXL at 1024 px, batch 4, bf16, 2 subjects per sample (real architecture, no weights, no compute: every
tensor lives on the meta device, so the count takes seconds and no memory). Counted: the bytes of the
distinct storages autograd keeps for backward during the UNet call and the attention loss (parameters
left out), plus, with activation checkpointing, the block inputs the checkpoint keeps to recompute from.
Three modes: no capture (subject path on, no supervised layers), capture + constraint (the shipped
sdxl.yaml), and the same with gradient checkpointing. Goals: capture <= 1.05x no capture; checkpointing
<= 0.35x no checkpointing.

On meta tensors ``scaled_dot_product_attention`` falls back to the math path, which keeps the full
attention matrix; the GPU kernels (flash / memory-efficient) keep only q, k, v, the output and a
log-sum-exp. The count therefore runs attention through the fused op with that autograd contract
(``_scaled_dot_product_flash_attention_for_cpu``, which has meta kernels), as a GPU run would.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from benchmarks.report import write_result
from mmdiff import MMDiffConfig, MMDiffModel
from mmdiff.attention import SubjectConditioning
from mmdiff.configuration import load_config
from mmdiff.zoo import clip_vision, diffusion


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward in the block, parameters left out.

    Storages are told apart by their C++ object (``_cdata``), which also works for meta tensors.
    """

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.params and storage._cdata not in self.seen:
            self.seen.add(storage._cdata)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self):
        self.seen, self.bytes = set(), 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.add, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """``scaled_dot_product_attention`` as the fused kernels save it for backward (see the module docstring)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def build(dtype: torch.dtype) -> MMDiffModel:
    config = load_config("configs/mmdiff/sdxl.yaml", MMDiffConfig)
    with torch.device("meta"):
        pipe = diffusion._generated("sdxl", tiny=False, seed=0, prediction_type="epsilon").to(dtype=dtype)
        encoder = clip_vision.ClipVision(clip_vision.CLIPVisionModelWithProjection(clip_vision._config(tiny=False)).to(dtype),
                                         clip_vision._processor(224))
        return MMDiffModel(pipe, encoder, config)


def count(model: MMDiffModel, capture: bool, checkpointing: bool, batch: int, size: int, subjects: int) -> int:
    """Saved bytes of one UNet call plus the attention loss (meta tensors)."""
    cfg, unet = model.config, model.unet
    saved = SavedActivations(model)

    def checkpoint_counting_inputs(module, *args):
        for arg in args:  # the checkpoint keeps its inputs to recompute the block from
            if isinstance(arg, torch.Tensor):
                saved.add(arg)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_counting_inputs)
    else:
        unet.disable_gradient_checkpointing()
    dtype, device = unet.conv_in.weight.dtype, "meta"
    latent = size // 8
    noisy = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    tokens = torch.randn(batch, subjects * cfg.num_tokens, unet.config.cross_attention_dim, device=device,
                         dtype=dtype, requires_grad=True)  # from the trainable refiner
    valid = torch.ones(batch, subjects, dtype=torch.bool, device=device)
    index = torch.arange(2, 2 + 3 * subjects, 3, device=device).expand(batch, -1)
    added = {"text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
             "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}
    conditioning = SubjectConditioning(tokens, valid, cfg.subject_scale, cfg.num_tokens, index,
                                       captured={} if capture else None)
    masks = torch.rand(batch, subjects, size, size, device=device)
    with saved:
        prediction = unet(noisy, torch.full((batch,), 500, device=device), text, added_cond_kwargs=added,
                          cross_attention_kwargs={"subjects": conditioning}).sample
        loss = (prediction.float() ** 2).mean()
        if capture:
            loss = loss + model._attention_loss(list(conditioning.captured.values()), masks, valid, index,
                                                (latent, latent))
    return saved.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--subjects", type=int, default=2)
    args = parser.parse_args()
    model = build(torch.bfloat16)
    F.scaled_dot_product_attention = fused_attention  # this process only counts, never computes
    run = functools.partial(count, model, batch=args.batch, size=args.size, subjects=args.subjects)
    gib = {"no_capture": run(capture=False, checkpointing=False) / 2**30,
           "capture": run(capture=True, checkpointing=False) / 2**30,
           "capture_checkpointing": run(capture=True, checkpointing=True) / 2**30}
    result = {"model": "sdxl (configs/mmdiff/sdxl.yaml), real size, meta tensors", "dtype": "bfloat16",
              "batch": args.batch, "size": args.size, "subjects": args.subjects, "saved_activations_gib": gib,
              "capture_ratio": gib["capture"] / gib["no_capture"],
              "checkpointing_ratio": gib["capture_checkpointing"] / gib["capture"]}
    write_result("bench_activations", result)
    print(f"bench_activations: SDXL {args.size}px batch {args.batch} bf16 saved activations: "
          f"{gib['no_capture']:.2f} GiB without capture, {gib['capture']:.2f} GiB with "
          f"({result['capture_ratio']:.3f}x), {gib['capture_checkpointing']:.2f} GiB with checkpointing "
          f"({result['checkpointing_ratio']:.3f}x)")


if __name__ == "__main__":
    main()

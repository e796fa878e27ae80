"""Training losses: the denoising loss (optionally inside subject regions) and the attention constraint."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def denoise_loss(prediction: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with ``region`` [B, 1, h, w] (0/1) only inside it (FastComposer's mask loss)."""
    error = (prediction.float() - target.float()) ** 2
    if region is None:
        return error.mean()
    weight = region.expand_as(error)
    return (error * weight).sum() / weight.sum().clamp(min=1.0)


def masks_at(masks: torch.Tensor, num_positions: int, aspect: float) -> torch.Tensor:
    """Subject masks [B, S, H, W] resized to a layer with ``num_positions`` = h*w tokens -> [B, S, h*w] in {0,1}."""
    h = round(math.sqrt(num_positions / aspect))
    w = num_positions // h
    resized = F.interpolate(masks.float(), size=(h, w), mode="area")
    return (resized >= 0.5).float().flatten(2)


def attention_constraint_sum(probs: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor,
                             kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-subject constraint over present subjects, their count); see :func:`attention_constraint`.

    Returning both lets a caller pool terms of several layers and forms into one mean, leaving out
    terms with nothing present instead of counting them as zero. Computed in fp32 whatever the maps'
    dtype, with masked sums only (no boolean indexing: no host sync, and the same graph for every batch).
    """
    probs = probs.to(torch.float32).permute(0, 1, 3, 2)  # [B, h, S, N]
    masks = masks.to(device=probs.device, dtype=torch.float32)
    inside = masks[:, None]
    if kind == "balanced_l1":
        mean_in = (probs * inside).sum(-1) / inside.sum(-1).clamp(min=1.0)
        mean_out = (probs * (1 - inside)).sum(-1) / (1 - inside).sum(-1).clamp(min=1.0)
        per_subject = mean_out - mean_in
    elif kind == "mask_nll":
        share = (probs * inside).sum(-1) / probs.sum(-1).clamp(min=1e-12)
        per_subject = -torch.log(share.clamp(min=1e-6))
    else:
        raise ValueError(f"unknown attention loss kind {kind!r}")
    # A small subject can vanish from a coarse layer's mask; it has nothing to be attracted to there.
    present = (valid.to(probs.device) & (masks.sum(-1) > 0)).to(torch.float32)
    return (per_subject.mean(1) * present).sum(), present.sum()


def attention_constraint(probs: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, kind: str) -> torch.Tensor:
    """probs [B, heads, N, S] attention of each subject's tokens; masks [B, S, N] (0/1); valid [B, S].

    ``balanced_l1`` (FastComposer): mean attention outside the mask minus mean attention inside, per
    head and subject. ``mask_nll``: -log of the share of the subject's attention mass (summed over
    positions) that lies inside its mask; it is invariant to how much the token is attended overall,
    so it cannot be lowered by shrinking or inflating the map, only by moving it into the mask.
    Averaged over heads, then over the valid subjects present in the mask (0 if none).
    """
    total, count = attention_constraint_sum(probs, masks, valid, kind)
    return total / count.clamp(min=1.0)


def inside_share(probs: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Share of each valid subject's attention mass inside its own mask, averaged (a metric; NaN if none valid).

    A masked mean, not ``share[valid]``: boolean indexing would make the host wait for the device.
    """
    probs = probs.to(torch.float32).mean(1).transpose(1, 2)  # [B, S, N]
    share = (probs * masks.to(probs)).sum(-1) / probs.sum(-1).clamp(min=1e-12)
    weight = valid.to(device=probs.device, dtype=torch.float32)
    return (share * weight).sum() / weight.sum()

"""Sample images for the run: training images with their subjects' attention maps laid over them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["attention_overlay"]

# One colour per subject slot (red, green, blue, yellow ...), cycled.
COLOURS = np.array([[255, 40, 40], [40, 220, 40], [60, 90, 255], [240, 220, 40], [220, 60, 220]], np.float32)


def _to_image(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def attention_overlay(batch: dict, attention_maps: torch.Tensor, max_rows: int = 4) -> Image.Image:
    """A grid: per example, the training image, then one panel per valid subject with its attention map
    (normalised per map) tinted over the darkened image; the subject's mask region is a little brighter,
    so attention inside versus outside the mask is visible at a glance."""
    rows = []
    masks = batch["subject_masks"]  # the loader's: uint8 coverage at the latent resolution
    masks = masks.float() / 255 if masks.dtype == torch.uint8 else masks.float()
    for b in range(min(max_rows, masks.shape[0])):
        if "pixel_values" in batch:
            image = _to_image(batch["pixel_values"][b]).astype(np.float32)
        else:  # cached latents: the image was never decoded; a grey ground at 8x the mask (the VAE's factor)
            image = np.full((masks.shape[-2] * 8, masks.shape[-1] * 8, 3), 128.0, np.float32)
        h, w = image.shape[:2]
        panels = [image]
        for s in range(attention_maps.shape[1]):
            if not bool(batch["subject_valid"][b, s]):
                continue
            amap = torch.nn.functional.interpolate(attention_maps[b, s][None, None].float().cpu(), size=(h, w),
                                                   mode="bilinear", align_corners=False)[0, 0].numpy()
            amap = (amap - amap.min()) / max(float(amap.max() - amap.min()), 1e-12)
            mask = torch.nn.functional.interpolate(masks[b, s][None, None].cpu(), size=(h, w),
                                                   mode="nearest")[0, 0].numpy()[..., None]
            colour = COLOURS[s % len(COLOURS)]
            base = image * (0.55 + 0.15 * mask)  # the mask region slightly brighter
            panels.append(base * (1 - 0.6 * amap[..., None]) + colour * 0.6 * amap[..., None])
        row = np.concatenate(panels, axis=1)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return Image.fromarray(np.concatenate(rows, axis=0).clip(0, 255).astype(np.uint8))

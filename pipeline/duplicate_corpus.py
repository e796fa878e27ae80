"""A near-duplicate corpus from scikit-image's offline photos: distinct photos plus, of some, copies that
are resized, re-encoded, centre-cropped, mirrored and colour-jittered. Tests and
``benchmarks/bench_dedup.py`` (precision and recall of the detector) use it; the truth is returned.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance

from pipeline.example_inputs import photo

__all__ = ["DISTINCT", "COPIES", "write_corpus"]

# Distinct photos (scikit-image names); natural photos and textures, none a copy of another.
DISTINCT = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "camera", "coins", "page",
            "hubble_deep_field", "retina", "moon", "grass", "gravel", "brick")


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    width, height = image.size
    dx, dy = round(width * (1 - fraction) / 2), round(height * (1 - fraction) / 2)
    return image.crop((dx, dy, width - dx, height - dy))


def _jitter(image: Image.Image) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(1.2)
    image = ImageEnhance.Contrast(image).enhance(0.85)
    image = ImageEnhance.Color(image).enhance(1.4)
    pixels = np.asarray(image).astype(np.int16)
    pixels[..., 0] += 15  # a warmer tint
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resized": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC),
    "reencoded": lambda im: _jpeg(im, 30),
    "cropped": lambda im: _centre_crop(im, 0.85),
    "flipped": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "jittered": _jitter,
}


def write_corpus(folder: str | Path, with_copies: tuple[str, ...], names: tuple[str, ...] = DISTINCT) -> dict[str, str | None]:
    """Write ``names`` as ``<name>.jpg`` and, for each of ``with_copies``, ``<name>_<copy>.jpg`` per kind of
    copy. Returns file name -> the file name of its original (None for an original)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truth: dict[str, str | None] = {}
    for name in names:
        image = photo(name)
        image.save(folder / f"{name}.jpg", quality=95)
        truth[f"{name}.jpg"] = None
        if name in with_copies:
            for kind, make in COPIES.items():
                make(image).save(folder / f"{name}_{kind}.jpg", quality=85)  # copies travel re-encoded
                truth[f"{name}_{kind}.jpg"] = f"{name}.jpg"
    return truth

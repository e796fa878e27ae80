"""Load and validate input images: the first operator of the preprocessing job.

Every input either becomes a clean RGB image (EXIF orientation applied, alpha composited onto a fill
colour, long side capped) or an :class:`ImageRejected` error whose ``reason`` is a short stable code
that the pipeline counts (``empty_file``, ``not_an_image``, ``truncated``, ``too_many_pixels``,
``too_small``, ``bad_aspect_ratio``, ``unreadable``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmdiff.configuration import ConfigModel

__all__ = ["ImageConfig", "ImageRejected", "LoadedImage", "ImageLoader", "load_image", "to_rgb"]


class ImageConfig(ConfigModel):
    """Validation limits and normalisation of input images."""

    max_pixels: int = 64_000_000  # declared width x height above this is a decompression bomb
    min_side: int = 32  # shorter side below this (after EXIF rotation) is rejected
    max_aspect_ratio: float = 4.0  # long / short side above this is rejected
    max_side: int = 1024  # images are resized so their long side is at most this
    fill: tuple[int, int, int] = (255, 255, 255)  # colour transparent pixels are composited onto


class ImageRejected(ValueError):
    """An input that is not a usable image; ``reason`` is a short code, the message names the input."""

    def __init__(self, source: str, reason: str, detail: str) -> None:
        super().__init__(f"{source}: {reason}: {detail}")
        self.source = source
        self.reason = reason
        self.detail = detail


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, at most max_side on its long side
    original_size: tuple[int, int]  # (width, height) after EXIF rotation, before resizing
    original_mode: str


def to_rgb(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB deterministically (alpha composited onto ``fill``)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: scale the full-range integer values to 8 bits rather than clipping them.
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 1.0
        if image.mode == "I" and array.max(initial=0) > 65535:
            scale = 255.0 / array.max()
        grey = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*fill, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(data: bytes, source: str, config: ImageConfig) -> LoadedImage:
    """Decode ``data`` (the bytes of file ``source``) into a validated RGB image, or raise ImageRejected."""
    if not data:
        raise ImageRejected(source, "empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) on large images; we enforce our own limit from the header.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(source, "not_an_image", "no image format recognised") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(source, "too_many_pixels", str(exc)) from None
    except OSError as exc:  # the file ends inside its header
        raise ImageRejected(source, "truncated", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of this input
        raise ImageRejected(source, "unreadable", f"{type(exc).__name__}: {exc}") from None
    width, height = opened.size  # from the header only; nothing is decoded yet
    if width * height > config.max_pixels:
        raise ImageRejected(source, "too_many_pixels", f"declared {width}x{height} > {config.max_pixels} pixels")
    mode = opened.mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except OSError as exc:
        raise ImageRejected(source, "truncated", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected(source, "unreadable", f"{type(exc).__name__}: {exc}") from None
    image = to_rgb(image, config.fill)
    width, height = image.size
    if min(width, height) < config.min_side:
        raise ImageRejected(source, "too_small", f"{width}x{height}, shorter side < {config.min_side}")
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        raise ImageRejected(
            source, "bad_aspect_ratio", f"{width}x{height}, aspect ratio > {config.max_aspect_ratio}"
        )
    original = (width, height)
    if max(width, height) > config.max_side:
        scale = config.max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return LoadedImage(image=image, original_size=original, original_mode=mode)


class ImageLoader:
    """Batched operator: ``loader(batch)`` with ``batch = [(source, bytes), ...]`` returns, per input,
    a :class:`LoadedImage` or the :class:`ImageRejected` that explains why it was refused."""

    def __init__(self, config: ImageConfig) -> None:
        self.config = config

    def __call__(self, batch: list[tuple[str, bytes]]) -> list[LoadedImage | ImageRejected]:
        out: list[LoadedImage | ImageRejected] = []
        for source, data in batch:
            try:
                out.append(load_image(data, source, self.config))
            except ImageRejected as rejected:
                out.append(rejected)
        return out

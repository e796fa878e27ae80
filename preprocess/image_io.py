"""Load and validate input images: the first operator of the preprocessing job.

Every input either becomes a clean RGB image (EXIF orientation applied, alpha composited onto a fill
colour, long side capped) or an :class:`ImageRejected` error whose ``reason`` is a short stable code
that the pipeline counts (``empty_file``, ``not_an_image``, ``truncated``, ``too_many_pixels``,
``over_decode_budget``, ``too_small``, ``bad_aspect_ratio``, ``unreadable``).

:func:`check_decode_budget` is the header-only guard (also used by serving): it reads an image's header
and refuses, before any pixel is decoded, an image whose decoded size (pixels x channels x bytes per
channel) exceeds a byte budget, so a 141 KB 16-bit 8000x8000 PNG cannot cost gigabytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmdiff.configuration import ConfigModel

__all__ = ["ImageConfig", "ImageRejected", "ImageHeader", "LoadedImage", "ImageLoader", "check_decode_budget",
           "load_image", "to_rgb", "resize_bicubic", "device_pixels", "processor_pixels", "as_rgb"]


class ImageConfig(ConfigModel):
    """Validation limits and normalisation of input images."""

    max_pixels: int = 64_000_000  # declared width x height above this is a decompression bomb
    # declared width x height x channels x bytes per channel above this is refused before decoding
    # (8-bit RGB at max_pixels fits; 16-bit RGB at 8000x8000 does not)
    max_decoded_bytes: int = 256 * 2**20
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


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares, before any pixel is decoded."""

    format: str
    mode: str  # PIL mode the decoder will produce
    width: int
    height: int
    channels: int
    bytes_per_channel: int

    @property
    def decoded_bytes(self) -> int:
        return self.width * self.height * self.channels * self.bytes_per_channel


def _bytes_per_channel(image: Image.Image) -> int:
    if image.mode in ("I", "F", "I;32", "I;32B"):
        return 4
    if image.mode.startswith("I;16"):
        return 2
    raw = image.tile[0].args if image.tile else None  # e.g. "RGB;16B": the file's samples are 16-bit
    raw = raw[0] if isinstance(raw, tuple) else raw
    return 2 if isinstance(raw, str) and ";16" in raw else 1


def _open(data: bytes | str | Path | BinaryIO, source: str) -> Image.Image:
    """Open (header only) or raise ImageRejected; nothing is decoded."""
    if isinstance(data, (bytes, bytearray)):
        if not data:
            raise ImageRejected(source, "empty_file", "0 bytes")
        data = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) on large images; we enforce our own limits from the header.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(data)
    except UnidentifiedImageError:
        raise ImageRejected(source, "not_an_image", "no image format recognised") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected(source, "too_many_pixels", str(exc)) from None
    except OSError as exc:  # the file ends inside its header
        raise ImageRejected(source, "truncated", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of this input
        raise ImageRejected(source, "unreadable", f"{type(exc).__name__}: {exc}") from None


def _header(opened: Image.Image) -> ImageHeader:
    return ImageHeader(format=opened.format or "", mode=opened.mode, width=opened.width, height=opened.height,
                       channels=len(opened.getbands()), bytes_per_channel=_bytes_per_channel(opened))


def _check_budget(header: ImageHeader, max_bytes: int, source: str) -> None:
    if header.decoded_bytes > max_bytes:
        raise ImageRejected(source, "over_decode_budget", (
            f"declared {header.width}x{header.height} {header.format} {header.mode}, {header.channels} channel(s) "
            f"x {8 * header.bytes_per_channel} bit = {header.decoded_bytes} bytes decoded > budget {max_bytes}"))


def check_decode_budget(data: bytes | str | Path | BinaryIO, max_bytes: int, source: str = "image") -> ImageHeader:
    """Read only the header of ``data`` (bytes, a path or a binary file) and return what it declares;
    raise :class:`ImageRejected` (``over_decode_budget``, ``not_an_image``, ``truncated``, ...) naming
    ``source`` when it is not an image or decoding it would take more than ``max_bytes``."""
    header = _header(_open(data, source))
    _check_budget(header, max_bytes, source)
    return header


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, at most max_side on its long side
    original_size: tuple[int, int]  # (width, height) after EXIF rotation, before resizing
    original_mode: str


_SIXTEEN_TO_EIGHT = np.rint(np.arange(65536) * (255.0 / 65535.0)).astype(np.uint8)


def to_rgb(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB deterministically (alpha composited onto ``fill``)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit grey: scale the full range to 8 bits (a lookup table: no float copy of a large image).
        return Image.fromarray(_SIXTEEN_TO_EIGHT[np.asarray(image)], "L").convert("RGB")
    if image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max(initial=0)
        scale = 255.0 / (top if top > 65535 else 65535.0) if top > 255 else 1.0
        grey = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*fill, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_bicubic(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """RGB ``image`` resized to ``size`` (width, height) with an antialiased bicubic filter: torch's uint8
    kernel (SIMD), a fifth of PIL's CPU time at 2 MP, within 2 levels of PIL's bicubic."""
    import torch

    pixels = _pixel_memory(image)
    with warnings.catch_warnings():  # read only, and only read: interpolate writes a new tensor
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    # A one-image batch in channels-last strides is ambiguous to torch, which then allocates the output
    # channels-first and repacks it; a batch stride past the data says channels-last (as torchvision does).
    tensor = tensor.as_strided(tensor.shape, (tensor.numel() + 1, *tensor.stride()[1:]))
    resized = torch.nn.functional.interpolate(tensor, size=(size[1], size[0]), mode="bicubic", antialias=True)
    raw = "RGBX" if pixels.shape[2] == 4 else "RGB"  # channels are resampled apart: the 4th is dropped
    return Image.frombytes("RGB", size, resized[0].permute(1, 2, 0).numpy(), "raw", raw)


def _pixel_memory(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, C] pixels of RGB ``image``: Pillow's own memory (4 bytes a pixel, the 4th unused) seen
    through Arrow without a copy when its rows lie in one block; else (an image above Pillow's 16 MB block)
    a packed RGB copy. Read only."""
    import pyarrow as pa

    try:
        buffer = pa.array(image).buffers()[-1]
    except ValueError:  # "Image rows are not contiguous in memory"
        return np.asarray(image)
    return np.frombuffer(buffer, np.uint8).reshape(image.height, image.width, 4)


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB: itself when it is (PIL's convert would copy it), else converted."""
    return image if image.mode == "RGB" else image.convert("RGB")


def device_pixels(images: list[Image.Image], device: Any) -> list[Any]:
    """Each image as an RGB uint8 [3, H, W] tensor on ``device``: what a processor's torch path takes to
    resize and normalise there (only uint8 pixels cross from the host)."""
    import torch

    return [torch.from_numpy(np.array(as_rgb(image))).to(device).permute(2, 0, 1) for image in images]


def processor_pixels(processor: Any, images: list[Image.Image], device: Any) -> tuple[Any, Any, list[tuple[int, int]]]:
    """What a transformers torchvision image processor (Grounding DINO's, SAM's) makes of ``images``, on
    ``device``: ``pixel_values`` float32 [n, 3, H, W] (its own resize; rescale and normalise fused as it
    fuses them; zero padding at the bottom and right to its ``pad_size`` or the largest image),
    ``pixel_mask`` bool [n, H, W] (True on the image) and each image's resized (height, width). One image
    at a time in the layout the pixels arrive in, written straight into the batch: the processor's batch
    path stacks the images channels-first, where torch's uint8 antialiased resize is about 4x slower, and
    allocates the float batch three times over (convert, pad, stack)."""
    import torch

    resized = [processor.resize(pixels, size=processor.size, resample=processor.resample) if processor.do_resize
               else pixels for pixels in device_pixels(images, device)]
    pad = getattr(processor, "pad_size", None)
    height, width = ((pad.height, pad.width) if pad else
                     (max(r.shape[-2] for r in resized), max(r.shape[-1] for r in resized)))
    pixel_values = torch.empty((len(resized), 3, height, width), dtype=torch.float32, device=device)
    pixel_mask = torch.zeros((len(resized), height, width), dtype=torch.bool, device=device)
    scale = 1.0 / processor.rescale_factor if processor.do_rescale else 1.0
    mean = torch.tensor(processor.image_mean, device=device).view(-1, 1, 1) * scale
    std = torch.tensor(processor.image_std, device=device).view(-1, 1, 1) * scale
    sizes = []
    for i, image in enumerate(resized):
        h, w = image.shape[-2:]
        target = pixel_values[i, :, :h, :w].copy_(image)
        if processor.do_normalize:
            target.sub_(mean).div_(std)
        elif processor.do_rescale:
            target.mul_(processor.rescale_factor)
        pixel_values[i, :, h:].zero_()
        pixel_values[i, :, :h, w:].zero_()
        pixel_mask[i, :h, :w] = True
        sizes.append((int(h), int(w)))
    return pixel_values, pixel_mask, sizes


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled down so its long side is at most ``max_side``."""
    width, height = size
    if max(width, height) <= max_side:
        return size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_image(data: bytes, source: str, config: ImageConfig) -> LoadedImage:
    """Decode ``data`` (the bytes of file ``source``) into a validated RGB image, or raise ImageRejected."""
    opened = _open(data, source)
    header = _header(opened)
    if header.width * header.height > config.max_pixels:
        raise ImageRejected(source, "too_many_pixels",
                            f"declared {header.width}x{header.height} > {config.max_pixels} pixels")
    _check_budget(header, config.max_decoded_bytes, source)
    mode = opened.mode
    # The checks hold whichever way the image turns (EXIF orientation): made on the header, before decoding.
    width, height = header.width, header.height
    if min(width, height) < config.min_side:
        raise ImageRejected(source, "too_small", f"{width}x{height}, shorter side < {config.min_side}")
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        raise ImageRejected(
            source, "bad_aspect_ratio", f"{width}x{height}, aspect ratio > {config.max_aspect_ratio}"
        )
    # JPEG draft: the decoder scales by 1/2, 1/4 or 1/8 in the DCT while staying at least the output size
    # (a 12 MP photo decodes at 3 MP for a 1024 px output); other formats ignore it.
    opened.draft(None, _fit((width, height), config.max_side))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened.load()
            decoded = opened.size
            ImageOps.exif_transpose(opened, in_place=True)  # no copy when there is nothing to turn
    except OSError as exc:
        raise ImageRejected(source, "truncated", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected(source, "unreadable", f"{type(exc).__name__}: {exc}") from None
    if opened.size != decoded:  # turned by 90 degrees
        width, height = height, width
    image = to_rgb(opened, config.fill)
    size = _fit((width, height), config.max_side)
    if image.size != size:
        image = resize_bicubic(image, size)
    return LoadedImage(image=image, original_size=(width, height), original_mode=mode)


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

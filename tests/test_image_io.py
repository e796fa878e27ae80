"""Image loading + validation: every kind of bad input is either normalised or rejected with its reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.example_inputs import photo
from preprocess.image_io import ImageConfig, ImageLoader, ImageRejected, load_image, resize_bicubic, to_rgb

CONFIG = ImageConfig(max_pixels=4_000_000, min_side=16, max_aspect_ratio=4.0, max_side=256)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rejected(data: bytes, config: ImageConfig = CONFIG) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        load_image(data, "in/bad.jpg", config)
    assert "in/bad.jpg" in str(info.value)  # the error names the input
    return info.value


def test_zero_byte_file():
    assert rejected(b"").reason == "empty_file"


def test_text_file_named_jpg():
    assert rejected(b"this is not an image, just text\n" * 10).reason == "not_an_image"


def test_truncated_jpeg():
    data = encode(photo("chelsea"), "JPEG", quality=90)
    assert rejected(data[: len(data) // 2]).reason == "truncated"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` RGB pixels but holding almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    # Over our limit (4 M pixels) but under Pillow's: our header check refuses it before decoding.
    error = rejected(png_header_only(5000, 5000))
    assert error.reason == "too_many_pixels" and "5000x5000" in error.detail
    # Far over Pillow's own limit: Pillow refuses at open, still reported as the same reason.
    assert rejected(png_header_only(100_000, 100_000)).reason == "too_many_pixels"


def test_one_pixel_and_extreme_aspect_ratio():
    assert rejected(encode(Image.new("RGB", (1, 1), "red"))).reason == "too_small"
    assert rejected(encode(Image.new("RGB", (400, 40), "red"))).reason == "bad_aspect_ratio"


def test_cmyk_grayscale_palette_become_rgb():
    source = photo("astronaut").resize((64, 64))
    for image in (source.convert("CMYK"), source.convert("L"), source.convert("P")):
        fmt = "JPEG" if image.mode == "CMYK" else "PNG"
        loaded = load_image(encode(image, fmt), "x", CONFIG)
        assert loaded.image.mode == "RGB" and loaded.image.size == (64, 64)
        assert loaded.original_mode == image.mode
    grey = load_image(encode(source.convert("L")), "x", CONFIG).image
    channels = np.asarray(grey)
    assert (channels[..., 0] == channels[..., 1]).all() and (channels[..., 1] == channels[..., 2]).all()


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    loaded = load_image(encode(Image.fromarray(ramp)), "x", CONFIG)
    pixels = np.asarray(loaded.image)[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255  # full range kept, not saturated at 255 everywhere
    assert 100 < pixels.mean() < 155


def test_rgba_alpha_goes_onto_the_fill_colour():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 16:, 3] = 255  # right half opaque red, left half fully transparent
    loaded = load_image(encode(Image.fromarray(rgba, "RGBA")), "x", ImageConfig(min_side=16, fill=(0, 0, 255)))
    pixels = np.asarray(loaded.image)
    assert tuple(pixels[5, 5]) == (0, 0, 255)
    assert tuple(pixels[5, 25]) == (200, 0, 0)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (80, 40), "white")
    image.paste((255, 0, 0), (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    loaded = load_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), "x", CONFIG)
    assert loaded.image.size == (40, 80) and loaded.original_size == (40, 80)
    pixels = np.asarray(loaded.image).astype(int)
    assert pixels[10, 20, 1] < 60 and pixels[70, 20, 1] > 200  # red half is now on top


def test_large_images_are_resized_to_max_side():
    loaded = load_image(encode(photo("coffee"), "JPEG"), "x", CONFIG)  # 600 x 400
    assert loaded.image.size == (256, 171) and loaded.original_size == (600, 400)


def test_to_rgb_is_deterministic_and_loader_keeps_going():
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA")
    assert np.array_equal(np.asarray(to_rgb(source, (1, 2, 3))), np.asarray(to_rgb(source, (1, 2, 3))))
    results = ImageLoader(CONFIG)([("a.jpg", b""), ("b.png", encode(photo("rocket")))])
    assert isinstance(results[0], ImageRejected) and results[0].reason == "empty_file"
    assert results[1].image.mode == "RGB"


def test_large_jpegs_decode_in_draft_close_to_a_full_decode_and_keep_their_true_sizes():
    """A large JPEG is decoded scaled in the DCT (draft: here by 1/4, as a 12 MP photo for 1024 px): within
    a level of a full decode + PIL bicubic on average, sizes from the file (EXIF turn included), the checks
    unchanged."""
    config = ImageConfig(max_side=480, min_side=100)
    exif = Image.Exif()
    exif[0x0112] = 8  # turned: the 2000 x 1500 file displays as 1500 x 2000
    big = photo("chelsea").convert("RGB").resize((2000, 1500), Image.Resampling.BICUBIC)
    for exif_bytes, shown in ((b"", (2000, 1500)), (exif.tobytes(), (1500, 2000))):
        data = encode(big, "JPEG", quality=92, exif=exif_bytes)
        loaded = load_image(data, "big.jpg", config)
        assert loaded.original_size == shown and loaded.image.size == (shown[0] * 480 // 2000, shown[1] * 480 // 2000)
        full = Image.open(io.BytesIO(data))
        full = ImageOps.exif_transpose(full).resize(loaded.image.size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        difference = np.abs(np.asarray(full, np.int16) - np.asarray(loaded.image, np.int16))
        assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 6
    strip = encode(Image.new("RGB", (2000, 450)), "JPEG")
    assert rejected(strip, config).reason == "bad_aspect_ratio"


def test_resize_reads_pillow_memory_in_place_or_copied_with_the_same_result():
    """resize_bicubic reads an RGB image in Pillow's own memory (4 bytes a pixel) when its rows lie in one
    block and a packed copy when they do not (an image above Pillow's block, 16 MB; here the block is made
    small instead): both give torch's bicubic of the packed pixels."""
    import torch

    pixels = np.random.default_rng(0).integers(0, 256, (517, 333, 3), dtype=np.uint8)
    packed = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()
    expected = torch.nn.functional.interpolate(packed, size=(172, 111), mode="bicubic", antialias=True)
    block = Image.core.get_block_size()
    for block_size in (block, 64 * 1024):  # one block; many
        Image.core.set_block_size(block_size)
        try:
            resized = resize_bicubic(Image.fromarray(pixels), (111, 172))
        finally:
            Image.core.set_block_size(block)
        assert resized.mode == "RGB" and np.array_equal(np.asarray(resized), expected[0].permute(1, 2, 0).numpy())

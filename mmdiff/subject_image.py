"""The one preparation rule for subject reference images, shared by training crops and inference.

Training crops (preprocess/crops.py) are square, with everything outside the subject set to
``SUBJECT_FILL``; a user's reference image at inference is padded to a square with the same fill, so
the image encoder sees the same kind of input in both (the official code also pads to square).
This module imports no torch: data-pipeline workers use it.
"""

from __future__ import annotations

from PIL import Image

SUBJECT_FILL = (255, 255, 255)


def square_subject_image(image: Image.Image, size: int, fill: tuple[int, int, int] = SUBJECT_FILL) -> Image.Image:
    """``image`` padded to a centred square with ``fill``, then resized to ``size`` x ``size`` (bicubic)."""
    image = image.convert("RGB")
    width, height = image.size
    side = max(width, height)
    if width != height:
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)

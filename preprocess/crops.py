"""Subject crops: the reference images the image encoder sees in training.

A crop is the entity's box grown to a square (plus a margin), with every pixel outside the entity's mask
(and outside the image) set to the fill colour, resized to ``size``. Filling the background keeps the
encoder from learning the training scene instead of the subject.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mmdiff.configuration import ConfigModel
from mmdiff.subject_image import SUBJECT_FILL, square_subject_image
from preprocess.image_io import as_rgb

__all__ = ["CropConfig", "SubjectCropper", "square_box"]


class CropConfig(ConfigModel):
    size: int = 224
    margin: float = 0.1  # fraction of the box's long side added on every side
    fill: tuple[int, int, int] = SUBJECT_FILL  # inference pads user images with the same fill


def square_box(box: tuple[float, float, float, float], margin: float) -> tuple[int, int, int, int]:
    """The integer square (x0, y0, x1, y1) centred on ``box`` with side = long side * (1 + 2 margin)."""
    x0, y0, x1, y1 = box
    side = max(1.0, max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = int(np.floor(cx - side / 2.0)), int(np.floor(cy - side / 2.0))
    s = int(np.ceil(side))
    return left, top, left + s, top + s


class SubjectCropper:
    """``cropper(image, boxes, masks) -> uint8 [N, size, size, 3]``."""

    def __init__(self, config: CropConfig) -> None:
        self.config = config

    def __call__(self, image: Image.Image, boxes: np.ndarray, masks: np.ndarray) -> np.ndarray:
        c = self.config
        image = as_rgb(image)
        width, height = image.size
        if masks.shape[1:] != (height, width) or len(masks) != len(boxes):
            raise ValueError(f"masks {masks.shape} do not match {len(boxes)} boxes on a {width}x{height} image")
        crops = np.empty((len(boxes), c.size, c.size, 3), np.uint8)
        for i, (box, mask) in enumerate(zip(boxes, masks)):
            x0, y0, x1, y1 = square_box(tuple(float(v) for v in box), c.margin)
            canvas = Image.new("RGB", (x1 - x0, y1 - y0), c.fill)
            # Paste the part of the square inside the image through its mask (PIL's masked paste: a few
            # times cheaper than numpy's boolean indexing or a broadcast fill of the canvas).
            sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
            if sx1 > sx0 and sy1 > sy0:
                canvas.paste(image.crop((sx0, sy0, sx1, sy1)), (sx0 - x0, sy0 - y0),
                             Image.fromarray(np.ascontiguousarray(mask[sy0:sy1, sx0:sx1])))
            crops[i] = np.asarray(square_subject_image(canvas, c.size, c.fill))
        return crops

"""Entity masks from SAM prompted with the detector's boxes (either backend).

One call runs the image encoder once over all images of the batch (one embedding per image, however many
boxes it has), then the prompt encoder and mask decoder once per image with all of that image's boxes as
one prompt batch. One mask per box
(``multimask_output=False``, as in Grounded-SAM annotation).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmdiff import zoo
from mmdiff.configuration import ConfigModel
from mmdiff.zoo.spec import ModelSpec
from preprocess.image_io import as_rgb, processor_pixels

__all__ = ["SegmentConfig", "Segmenter"]


class SegmentConfig(ConfigModel):
    model: ModelSpec


def _check_boxes(boxes: np.ndarray, index: int) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"Segmenter: boxes of image {index} must have shape [k, 4], got {boxes.shape}")
    if len(boxes) and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise ValueError(f"Segmenter: image {index} has a box with x1 <= x0 or y1 <= y0: {boxes.tolist()}")
    return boxes


class Segmenter:
    """``Segmenter(config)(images, boxes) -> list[np.ndarray bool [k, H, W]]``, boxes in pixels (x0, y0, x1, y1)."""

    def __init__(self, config: SegmentConfig):
        if config.model.family != "sam":
            raise ValueError(f"Segmenter needs a sam model, got family {config.model.family!r}")
        self.config = config
        self.backend = config.model.backend
        self.model = zoo.build(config.model)
        self.device = torch.device(config.model.device)
        self.dtype = getattr(torch, config.model.dtype)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[np.ndarray]:
        if len(images) != len(boxes):
            raise ValueError(f"Segmenter: {len(images)} images but {len(boxes)} box arrays")
        images = [as_rgb(image) for image in images]
        boxes = [_check_boxes(b, i) for i, b in enumerate(boxes)]
        results = [np.zeros((0, image.height, image.width), bool) for image in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        if todo:
            forward = self._official if self.backend == "official" else self._transformers
            for i, masks in zip(todo, forward([images[i] for i in todo], [boxes[i] for i in todo])):
                results[i] = masks
        return results

    def _transformers(self, images, boxes):
        model, processor = self.model
        pixel_values, _, resized = processor_pixels(processor.image_processor, images, self.device)
        embeddings = model.get_image_embeddings(pixel_values.to(self.dtype))
        out = []
        for i, (image, image_boxes) in enumerate(zip(images, boxes)):
            (h, w), (new_h, new_w) = (image.height, image.width), resized[i]
            scaled = torch.from_numpy(image_boxes) * torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
            outputs = model(image_embeddings=embeddings[i : i + 1], input_boxes=scaled[None].to(self.device, self.dtype),
                            multimask_output=False)
            # upsampled to the image and thresholded on the device: only the boolean masks come back
            masks = processor.post_process_masks(outputs.pred_masks.float(), [(h, w)], [resized[i]])[0]
            out.append(masks[:, 0].cpu().numpy())
        return out

    def _official(self, images, boxes):
        from segment_anything.utils.transforms import ResizeLongestSide

        transform = ResizeLongestSide(self.model.image_encoder.img_size)
        batch = []
        for image, image_boxes in zip(images, boxes):
            pixels = transform.apply_image(np.asarray(image))
            batch.append({
                "image": torch.as_tensor(pixels, device=self.device).permute(2, 0, 1).contiguous().to(self.dtype),
                "original_size": (image.height, image.width),
                "boxes": transform.apply_boxes_torch(torch.from_numpy(image_boxes), (image.height, image.width))
                .to(self.device, self.dtype),
            })
        # the official prompt encoder casts box coordinates to float32; autocast runs it in the model's dtype
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            outputs = self.model(batch, multimask_output=False)
        return [o["masks"][:, 0].cpu().numpy().astype(bool) for o in outputs]

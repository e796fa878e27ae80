"""Open-set detection of caption phrases with Grounding DINO (either backend).

Each image gets its own phrases. They are joined into one prompt the way Grounding DINO was trained
("a man . a flag ."), so each phrase is a token span of that prompt. A query becomes a
:class:`Detection` when its best token probability exceeds ``box_threshold`` and the phrase whose span
holds the highest token probability exceeds ``text_threshold`` (official defaults 0.3 / 0.25); boxes
then go through class-agnostic NMS at ``nms_iou`` (0.5 in the official annotation). Phrases whose tokens
fall beyond the model's text length (256 tokens) cannot be matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_convert, nms

from mmdiff import zoo
from mmdiff.configuration import ConfigModel
from mmdiff.zoo.spec import ModelSpec
from preprocess.image_io import as_rgb, processor_pixels

__all__ = ["DetectConfig", "Detection", "Detector", "build_prompt"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectConfig(ConfigModel):
    model: ModelSpec
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    # official backend: short side the image is resized to (long side capped at max_size), as in its demo
    image_size: int = 800
    max_size: int = 1333


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the input image
    score: float
    phrase_index: int  # index into that image's phrase list
    label: str  # the phrase text


def build_prompt(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """``["a man", "a flag"]`` -> ``("a man . a flag .", [(0, 5), (8, 14)])`` (character spans)."""
    prompt, spans = "", []
    for phrase in phrases:
        phrase = phrase.strip().lower()
        spans.append((len(prompt), len(prompt) + len(phrase)))
        prompt += phrase + " . "
    return prompt.strip(), spans


def _phrase_token_masks(tokenizer, prompts: list[str], spans: list[list[tuple[int, int]]], length: int) -> list[torch.Tensor]:
    """Per image a bool [phrases, length] mask of the tokens inside each phrase's character span."""
    encoded = tokenizer(prompts, return_offsets_mapping=True)
    masks = []
    for offsets, image_spans in zip(encoded["offset_mapping"], spans):
        mask = torch.zeros(len(image_spans), length, dtype=torch.bool)
        for p, (start, end) in enumerate(image_spans):
            for t, (a, b) in enumerate(offsets[:length]):
                if b > a and a >= start and b <= end:
                    mask[p, t] = True
        masks.append(mask)
    return masks


class Detector:
    """``Detector(config)(images, phrases) -> list[list[Detection]]``, one list per image."""

    def __init__(self, config: DetectConfig):
        if config.model.family != "grounding_dino":
            raise ValueError(f"Detector needs a grounding_dino model, got family {config.model.family!r}")
        self.config = config
        self.backend = config.model.backend
        self.model = zoo.build(config.model)
        self.device = torch.device(config.model.device)
        self.dtype = getattr(torch, config.model.dtype)
        self.tokenizer = self.model.tokenizer if self.backend == "official" else self.model.processor.tokenizer

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], phrases: list[list[str]]) -> list[list[Detection]]:
        if len(images) != len(phrases):
            raise ValueError(f"Detector: {len(images)} images but {len(phrases)} phrase lists")
        results: list[list[Detection]] = [[] for _ in images]
        todo = [i for i, p in enumerate(phrases) if p]
        if not todo:
            return results
        images = [as_rgb(images[i]) for i in todo]
        prompts, spans = zip(*(build_prompt(phrases[i]) for i in todo))
        logits, boxes = (self._forward_official if self.backend == "official" else self._forward_transformers)(images, list(prompts))
        probs = logits.float().sigmoid().cpu()
        token_masks = _phrase_token_masks(self.tokenizer, list(prompts), list(spans), probs.shape[-1])
        for row, i in enumerate(todo):
            results[i] = self._select(probs[row], boxes[row].float().cpu(), token_masks[row], images[row].size, phrases[i])
        return results

    def _forward_transformers(self, images, prompts):
        # Prompts longer than the model's text length are cut, as the official code does.
        inputs = self.model.processor.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.model.model.config.max_text_len,
            return_token_type_ids=True, return_tensors="pt").to(self.device)
        pixel_values, pixel_mask = self._image_inputs(images)
        outputs = self.model.model(**inputs, pixel_values=pixel_values.to(self.dtype), pixel_mask=pixel_mask)
        return outputs.logits, outputs.pred_boxes

    def _image_inputs(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` and ``pixel_mask`` on the model's device, as Grounding DINO's processor makes them."""
        pixel_values, pixel_mask, _ = processor_pixels(self.model.processor.image_processor, images, self.device)
        return pixel_values, pixel_mask

    def _forward_official(self, images, prompts):
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        tensors = []
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        for image in images:
            w, h = image.size
            scale = min(self.config.image_size / min(w, h), self.config.max_size / max(w, h))
            resized = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
            tensors.append(((pixels - mean) / std).to(self.device, self.dtype))
        # the official code builds some tensors in float32 itself; autocast runs them in the model's dtype
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            outputs = self.model(nested_tensor_from_tensor_list(tensors), captions=prompts)
        return outputs["pred_logits"], outputs["pred_boxes"]

    def _select(self, probs, boxes, token_masks, size, phrases) -> list[Detection]:
        """probs [queries, tokens], boxes [queries, 4] normalised cxcywh -> thresholded, NMS'd detections."""
        phrase_scores = torch.stack([(probs * m).max(dim=-1).values for m in token_masks], dim=-1)  # [Q, P]
        best_phrase_score, phrase_index = phrase_scores.max(dim=-1)
        score = probs.max(dim=-1).values
        keep = (score > self.config.box_threshold) & (best_phrase_score > self.config.text_threshold)
        if not keep.any():
            return []
        w, h = size
        xyxy = box_convert(boxes[keep], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
        kept_scores, kept_phrases = score[keep], phrase_index[keep]
        order = nms(xyxy, kept_scores, self.config.nms_iou)
        return [
            Detection(tuple(float(v) for v in xyxy[j]), float(kept_scores[j]), int(kept_phrases[j]), phrases[int(kept_phrases[j])])
            for j in order.tolist()
        ]

"""Prompt and subject-image preparation shared by training data and the inference pipeline."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmdiff.subject_image import square_subject_image

MARKER = re.compile(r"\[([^\[\]]+)\]")


def tokenize_with_subjects(tokenizer: Any, prompt: str, spans: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``prompt`` (padded to the tokenizer's max length) -> (input_ids [L], token_index [S]).

    ``spans[i] = (start, end)`` locates subject i's word in ``prompt``; its token index is the last
    token overlapping the span (the official code and FastComposer take the word's last piece: CLIP's
    text encoder is causal, so only the last piece has seen the whole word). Raises ValueError if a span is outside the prompt or truncated away.
    """
    encoded = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    indices = []
    for start, end in spans:
        if not 0 <= start < end <= len(prompt):
            raise ValueError(f"subject span ({start}, {end}) is not inside the prompt {prompt!r}")
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not hits:
            raise ValueError(f"subject word {prompt[start:end]!r} falls beyond the tokenizer's "
                             f"{tokenizer.model_max_length} tokens in prompt {prompt!r}")
        indices.append(hits[-1])
    return torch.tensor(encoded["input_ids"], dtype=torch.long), torch.tensor(indices, dtype=torch.long)


def find_words(prompt: str, words: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each word (whole word, case-insensitive, first unused occurrence) in ``prompt``."""
    spans: list[tuple[int, int]] = []
    for word in words:
        matches = [m.span() for m in re.finditer(rf"\b{re.escape(word)}\b", prompt, flags=re.IGNORECASE)]
        free = [span for span in matches if span not in spans]
        if not free:
            raise ValueError(f"subject word {word!r} is not in the prompt {prompt!r}")
        spans.append(free[0])
    return spans


def parse_markers(prompt: str) -> tuple[str, list[tuple[int, int]]]:
    """``"a [dog] next to a [cat]"`` -> ("a dog next to a cat", spans of dog and cat), in order."""
    spans, pieces, cursor, length = [], [], 0, 0
    for match in MARKER.finditer(prompt):
        before = prompt[cursor:match.start()]
        pieces.append(before)
        length += len(before)
        word = match.group(1).strip()
        if not word:
            raise ValueError(f"empty subject marker in prompt {prompt!r}")
        spans.append((length, length + len(word)))
        pieces.append(word)
        length += len(word)
        cursor = match.end()
    pieces.append(prompt[cursor:])
    return "".join(pieces), spans


def load_subject_image(image: Any, name: str) -> Image.Image:
    """A PIL image, a uint8 array [h, w, 3] or a path -> RGB PIL; errors name the subject."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unusable
            raise ValueError(f"{name}: cannot read image file {str(image)!r}: {exc}") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{name}: expected a uint8 array [h, w, 3], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"{name}: expected a PIL image, uint8 array or path, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name}: image is empty ({image.width}x{image.height})")
    return image.convert("RGB")


def subject_pixel_values(processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """Subject images (PIL, uint8 arrays or paths) -> image-encoder input [S, 3, h, w].

    Training crops and user images alike are padded to a square with the training fill and resized to
    the encoder's input size (:func:`mmdiff.subject_image.square_subject_image`); the processor then
    only rescales and normalises.
    """
    size = processor.crop_size["height"]
    squared = [square_subject_image(load_subject_image(image, f"subject {i}"), size) for i, image in enumerate(images)]
    return processor(images=squared, do_resize=False, do_center_crop=False, return_tensors="pt").pixel_values

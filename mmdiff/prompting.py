"""Prompt and subject-image preparation shared by training data and the inference pipeline."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmdiff.subject_image import SUBJECT_FILL, square_subject_image

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
    read = max(b for _, b in offsets)
    if read < len(prompt.rstrip()):
        warnings.warn(f"prompt {prompt!r} is longer than the {tokenizer.model_max_length} tokens the text encoder "
                      f"reads: {prompt[read:].strip()!r} is dropped (shorten the prompt)", TruncatedPromptWarning,
                      stacklevel=3)
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


class TruncatedPromptWarning(UserWarning):
    """A prompt longer than the text encoder reads: its end is dropped."""


def _plural_hint(prompt: str, word: str) -> str:
    """A hint when ``prompt`` holds ``word`` as a plural ("two dogs"): each subject needs its own word."""
    stem = word[:-1] if word.endswith("y") else word
    plural = re.search(rf"\b{re.escape(stem)}(s|es|ies)\b", prompt, flags=re.IGNORECASE)
    if plural is None:
        return ""
    return (f"; the prompt has the plural {plural.group(0)!r}: a subject is bound to one singular class word, "
            f"so name each subject on its own, e.g. 'a {word} and a {word}' with two subjects, or 'a {word}' "
            "with one")


def find_words(prompt: str, words: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each word (whole word, case-insensitive, first unused occurrence) in ``prompt``."""
    spans: list[tuple[int, int]] = []
    for word in words:
        matches = [m.span() for m in re.finditer(rf"\b{re.escape(word)}\b", prompt, flags=re.IGNORECASE)]
        free = [span for span in matches if span not in spans]
        if not free:
            taken = " again (each occurrence is bound to an earlier subject)" if matches else ""
            raise ValueError(f"subject word {word!r} is not in the prompt {prompt!r}{taken}"
                             f"{'' if matches else _plural_hint(prompt, word)}")
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


def subject_pixel_values(processor: Any, images: Sequence[Any], fill: Sequence[int] = SUBJECT_FILL,
                         names: Sequence[str] | None = None) -> torch.Tensor:
    """Subject images (PIL, uint8 arrays or paths) -> image-encoder input [S, 3, h, w].

    Training crops and user images alike are padded to a square with the training crops' ``fill`` (the
    adapter records it) and resized to the encoder's input size
    (:func:`mmdiff.subject_image.square_subject_image`); the processor then only rescales and
    normalises. ``names`` name the images in errors (default ``subject <i>``).
    """
    size = processor.crop_size["height"]
    names = names or [f"subject {i}" for i in range(len(images))]
    squared = [square_subject_image(load_subject_image(image, name), size, tuple(fill))
               for image, name in zip(images, names)]
    return processor(images=squared, do_resize=False, do_center_crop=False, return_tensors="pt").pixel_values

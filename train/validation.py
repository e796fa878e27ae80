"""Validation images during training: fixed prompts and subjects from held-out shards, fixed seeds.

Every ``validation.every`` steps the model being trained generates, for each of the first
``validation.num_samples`` held-out samples (in key order), its caption with the subject words marked,
conditioned on the sample's own subject crops, once per seed in ``validation.seeds``. The grid (one row
per sample: the subject crops, then one image per seed) is logged to MLflow as the image series
``validation`` at that step (``log_image(key=, step=)``), so runs and steps compare image for image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from preprocess.sample import Sample

__all__ = ["ValidationSet", "marked_caption"]

log = logging.getLogger("train")


def marked_caption(sample: Sample, max_subjects: int) -> tuple[str, list[Image.Image]]:
    """The caption with its first ``max_subjects`` subject words as ``[word]``, and their crops in order."""
    entities = sorted(sample.entities[:max_subjects], key=lambda e: e.start)
    order = [sample.entities.index(e) for e in entities]
    text, last = [], 0
    for entity in entities:
        text += [sample.caption[last: entity.start], f"[{sample.caption[entity.start: entity.end]}]"]
        last = entity.end
    return "".join(text + [sample.caption[last:]]), [Image.fromarray(sample.crops[i]) for i in order]


class ValidationSet:
    """The held-out samples a run validates on (read once, on every rank that generates)."""

    def __init__(self, folder: str | Path, num_samples: int, max_subjects: int,
                 storage_options: dict[str, Any] | None = None):
        from train.shards import Dataset, ShardSkipped, read_samples

        samples = []
        for shard in Dataset.open(str(folder), storage_options).shards:
            try:
                for raw in read_samples(shard):
                    try:
                        samples.append(Sample.from_wds(raw.wds(shard.location.url)))
                    except ValueError:
                        continue  # a held-out sample training could not read either; the next one stands in
            except ShardSkipped as exc:
                log.warning("validation: skipped shard %s", exc)
        samples = sorted((s for s in samples if s.entities), key=lambda s: s.key)[:num_samples]
        if not samples:
            raise ValueError(f"validation.shards {folder}: no readable sample with a subject")
        self.items = [(s.key, *marked_caption(s, max_subjects)) for s in samples]

    def grid(self, pipe: Any, seeds: list[int], steps: int, size: tuple[int, int], guidance_scale: float) -> Image.Image:
        """One row per sample: its subject crops, then one generated image per seed, at ``size`` (h, w)."""
        rows = []
        for _key, prompt, crops in self.items:
            panels = [np.asarray(c.convert("RGB").resize((size[1], size[0]))) for c in crops]
            for seed in seeds:
                image = pipe(prompt, crops, num_inference_steps=steps, guidance_scale=guidance_scale,
                             height=size[0], width=size[1], seed=seed).images[0]
                panels.append(np.asarray(image.convert("RGB")))
            rows.append(np.concatenate(panels, axis=1))
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        return Image.fromarray(np.concatenate(rows, axis=0))

"""Training batches from the preprocessing shards (preprocess/sample.py format).

The stream is deterministic so a resumed run sees exactly the samples an uninterrupted one would:
every epoch reshuffles the shard order and the samples (seeded by run seed, epoch and reader slot), a
reader slot is one DataLoader worker of one rank, and each slot reports its position (epoch, raw samples
consumed) with every batch. Resuming replays the undecoded stream up to that position, so the shuffle
buffer is rebuilt exactly. Shards are split across slots (``split_by_node`` x ``split_by_worker``) when
there are enough of them, otherwise samples are dealt round-robin. A shard that cannot be read or a
sample that cannot be decoded is skipped, and reported with the next batch, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmdiff.prompting import subject_pixel_values, tokenize_with_subjects
from preprocess.sample import Sample
from mmdiff.zoo.spec import ModelSpec
from train.config import DataSection
from train.latents import LatentSidecars, decode_latent, latent_dir, member_name

__all__ = [
    "BatchBuilder",
    "ReaderPosition",
    "Rejected",
    "ShardStream",
    "dataset_profile",
    "make_loader",
    "manifest_hash",
    "shard_paths",
]

@dataclass(frozen=True)
class Rejected:
    """A shard or sample the stream skipped: ``source`` names the shard, ``key`` the sample (if known)."""

    source: str
    key: str
    reason: str


@dataclass
class ReaderPosition:
    epoch: int = 0
    offset: int = 0  # raw samples consumed from the epoch's shuffled stream
    pending: list[int] = field(default_factory=list)  # consumed but waiting in an unfilled bucket (1-based)

    @classmethod
    def of_batch(cls, batch: dict[str, Any]) -> ReaderPosition:
        """Where the reader that made ``batch`` stands after it."""
        reader = batch["reader"]
        return cls(reader["epoch"], reader["offset"], list(reader["pending"]))


def shard_paths(folder: str | Path) -> list[str]:
    paths = sorted(str(p) for p in (Path(folder) / "shards").glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no shards/*.tar")
    return paths


def manifest_hash(folder: str | Path) -> str:
    """The data identity logged with every run: the pipeline's manifest hash, else a hash of the shards."""
    manifest = Path(folder) / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        if "manifest_hash" in data:
            return str(data["manifest_hash"])
    digest = hashlib.sha256()
    for path in shard_paths(folder):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def dataset_profile(folder: str | Path) -> dict[str, Any]:
    """Counts describing the shards folder (logged with the run's dataset input): from the pipeline's
    manifest when there is one (inputs, written samples, rejected by reason), else the shard count."""
    profile: dict[str, Any] = {"shard_files": len(shard_paths(folder))}
    manifest = Path(folder) / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        profile.update({k: data[k] for k in ("inputs", "written", "rejected") if k in data})
    return profile


def aspect_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """SDXL-style buckets (height, width): sides multiples of ``step``, area at most ``resolution``^2 and as
    large as the step allows, aspect ratio within ``max_aspect``; the square first."""
    area, buckets = resolution * resolution, set()
    for width in range(step, int(resolution * max_aspect ** 0.5) + step, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            buckets.update({(height, width), (width, height)})
    square = (resolution // step * step,) * 2
    return [square] + sorted(buckets - {square}, key=lambda b: b[1] / b[0])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to that of ``size`` (height, width)."""
    aspect = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


def cover_crop(image: Image.Image, target: tuple[int, int], resample: int) -> tuple[Image.Image, tuple[int, int], float]:
    """``image`` resized to cover ``target`` (height, width) and centre-cropped to it; returns the crop, its
    top-left corner in resized pixels (SDXL's ``crops_coords_top_left``) and the scale factor."""
    w, h = image.size
    scale = max(target[0] / h, target[1] / w)
    rw, rh = max(target[1], round(w * scale)), max(target[0], round(h * scale))
    top, left = (rh - target[0]) // 2, (rw - target[1]) // 2
    resized = image.resize((rw, rh), resample)
    return resized.crop((left, top, left + target[1], top + target[0])), (top, left), scale


class BatchBuilder:
    """Decoded samples -> one batch in the model's contract (MMDiffModel.training_loss).

    ``tokenizers`` are the base model's (two for SDXL) and ``processor`` the image encoder's, so prompts
    and subject crops are prepared exactly as at inference (mmdiff.prompting).
    """

    def __init__(self, data: DataSection, tokenizers: list[Any], processor: Any):
        self.data, self.tokenizers, self.processor = data, list(tokenizers), processor
        self.buckets = (aspect_buckets(data.resolution, data.bucket_step, data.bucket_max_aspect)
                        if data.aspect_buckets else [(data.resolution, data.resolution)])

    def crop(self, image: Image.Image) -> tuple[tuple[int, int], torch.Tensor, tuple[int, int], float]:
        """The training crop of ``image``: its bucket, pixels [3, h, w] in [-1, 1], the crop's top-left
        corner in resized pixels and the resize factor (train/latents.py caches latents of these pixels)."""
        bucket = nearest_bucket((image.height, image.width), self.buckets)
        cropped, corner, scale = cover_crop(image, bucket, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(cropped, np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return bucket, pixels, corner, scale

    def example(self, sample: Sample, rng: random.Random, latents: dict[str, bytes] | None = None) -> dict[str, Any]:
        """One training example; ``latents`` (``latent:<h>x<w>.npy`` -> bytes) are the sample's cached VAE
        latents, used when there are some for its bucket."""
        d = self.data
        drop_text = rng.random() < d.text_dropout
        drop_subjects = drop_text or rng.random() < d.subject_dropout
        entities = sample.entities[: d.max_subjects]
        caption = "" if drop_text else sample.caption
        spans = [] if drop_text else [(e.start, e.end) for e in entities]
        try:
            encoded = [tokenize_with_subjects(tokenizer, caption, spans) for tokenizer in self.tokenizers]
        except ValueError as exc:
            raise ValueError(f"sample {sample.key}: {exc}") from None
        token_index = encoded[0][1]
        s = d.max_subjects
        index = torch.full((s,), -1, dtype=torch.long)
        index[: len(token_index)] = token_index
        valid = (index >= 0) & (not drop_subjects)
        index[~valid] = -1
        bucket, pixels, crop_top_left, scale = self.crop(sample.image)
        masks = torch.zeros((s, *bucket))
        boxes = torch.zeros((s, 4))  # [x0, y0, x1, y1] in the training image's pixels, clipped to it
        top, left = crop_top_left
        for i, entity in enumerate(entities):
            mask = Image.fromarray(sample.masks[i].astype(np.uint8) * 255)
            masks[i] = torch.from_numpy(np.asarray(cover_crop(mask, bucket, Image.NEAREST)[0]) > 127)
            x0, y0, x1, y1 = entity.box
            boxes[i] = torch.tensor([x0 * scale - left, y0 * scale - top, x1 * scale - left, y1 * scale - top])
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([bucket[1], bucket[0]] * 2, dtype=boxes.dtype))
        crops = subject_pixel_values(self.processor, list(sample.crops[: len(entities)])) if entities else None
        size = self.processor.crop_size["height"], self.processor.crop_size["width"]
        subject_pixels = torch.zeros((s, 3, *size))
        if crops is not None:
            subject_pixels[: len(crops)] = crops
        out = {
            "pixel_values": pixels,
            "input_ids": encoded[0][0],
            "subject_pixel_values": subject_pixels,
            "subject_token_index": index,
            "subject_valid": valid,
            "subject_masks": masks,
            "subject_boxes": boxes,
            "caption": caption,
            "key": sample.key,
        }
        cached = (latents or {}).get(f"latent:{member_name(bucket)}")
        if cached is not None and self.data.cached_latents:
            out["latent_parameters"] = decode_latent(cached)
        if len(encoded) == 2:  # SDXL: second text encoder and the size conditioning
            out["input_ids_2"] = encoded[1][0]
            out["original_size"] = torch.tensor([sample.image.height, sample.image.width])
            out["crop_top_left"] = torch.tensor(crop_top_left)
        if sample.faces is not None:
            faces = torch.zeros((s, sample.faces.shape[1]))
            rows = torch.from_numpy(np.nan_to_num(sample.faces[: len(entities)], nan=0.0))
            faces[: len(rows)] = rows
            out["face_embeds"] = faces
        return out

    @staticmethod
    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stacked tensors, lists of the rest; a key some examples lack (cached latents) is left out."""
        batch: dict[str, Any] = {}
        for name in [k for k in examples[0] if all(k in e for e in examples)]:
            values = [e[name] for e in examples]
            batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return batch


class ShardStream(IterableDataset):
    """Endless, resumable stream of batches of one rank; ``positions`` restarts each reader slot."""

    def __init__(
        self, folder: str | Path, data: DataSection, builder: BatchBuilder, seed: int, rank: int = 0,
        world_size: int = 1, positions: dict[int, ReaderPosition] | None = None, first_worker: int = 0,
        base: ModelSpec | None = None,
    ):
        self.paths = shard_paths(folder)
        self.data, self.builder, self.seed = data, builder, seed
        self.rank, self.world_size = rank, world_size
        self.positions = positions or {}
        self.first_worker = first_worker  # the logical reader whose batch the loader yields first
        folder_latents = latent_dir(folder, base) if base is not None and data.cached_latents else None
        self.latents = LatentSidecars(folder_latents) if folder_latents and folder_latents.is_dir() else None

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        logical = ((info.id if info else 0) + self.first_worker) % workers
        return logical, self.rank * workers + logical, self.world_size * workers

    def raw_epoch(self, epoch: int, slot: int, slots: int, rejected: list[Rejected]) -> Iterator[dict[str, Any]]:
        """The undecoded samples of one slot for one epoch, in their shuffled order."""
        rng = random.Random(f"{self.seed}/{epoch}/{slot}")
        order = list(self.paths)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)  # same shard order on every slot
        by_shard = len(order) >= slots
        mine = order[slot::slots] if by_shard else order

        failed: set[str] = set()

        def record(exn: Exception) -> bool:
            # webdataset reports one broken tar both per member and per shard; keep one line per shard
            text = " ".join(str(a) for a in exn.args)
            shard = next((p for p in mine if p in text), "?")
            if shard not in failed:
                failed.add(shard)
                rejected.append(Rejected(shard, "", f"unreadable shard: {str(exn.args[0]) if exn.args else exn!r}"))
            return True

        source = wds.tariterators.tarfile_samples([{"url": p} for p in mine], handler=record)
        if self.latents is not None:
            source = self.latents.attach(source)
        if not by_shard:
            source = (s for i, s in enumerate(source) if i % slots == slot)
        buffer: list[dict[str, Any]] = []
        for sample in source:
            buffer.append(sample)
            if len(buffer) >= self.data.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        logical, slot, slots = self._slot()
        start = self.positions.get(logical, ReaderPosition())
        epoch, offset, replay = start.epoch, start.offset, set(start.pending)
        # decoded examples waiting for their bucket to fill, by shape: [(consumed, example), ...]
        waiting: dict[tuple[int, ...], list[tuple[int, dict[str, Any]]]] = {}
        rejected: list[Rejected] = []
        barren_epochs = 0

        def emit(shape: tuple[int, ...], consumed: int) -> dict[str, Any]:
            batch = BatchBuilder.collate([example for _, example in waiting.pop(shape)])
            pending = sorted(c for group in waiting.values() for c, _ in group)
            batch["reader"] = {"worker": logical, "epoch": epoch, "offset": consumed, "pending": pending}
            batch["rejected"] = [r.__dict__ for r in rejected]
            rejected.clear()  # the same list the raw stream appends to
            return batch

        while True:
            decoded = consumed = 0
            for consumed, raw in enumerate(self.raw_epoch(epoch, slot, slots, rejected), start=1):
                if consumed <= offset and consumed not in replay:
                    continue  # replayed to rebuild the shuffle state; yielded by the run that saved it
                example_rng = random.Random(f"{self.seed}/{epoch}/{slot}/{consumed}")
                try:
                    example = self.builder.example(Sample.from_wds(raw), example_rng,
                                                   {k: v for k, v in raw.items() if k.startswith("latent:")})
                except ValueError as exc:
                    rejected.append(Rejected(str(raw.get("__url__", "?")), str(raw.get("__key__", "?")), str(exc)))
                    continue
                decoded += 1
                shape = tuple(example["pixel_values"].shape)
                waiting.setdefault(shape, []).append((consumed, example))
                # a resumed stream refills the buckets it had waiting before going on
                if consumed > offset and len(waiting[shape]) == self.data.micro_batch_size:
                    yield emit(shape, consumed)
            # the epoch's incomplete buckets go out as smaller batches, oldest first: nothing is dropped
            while waiting:
                yield emit(min(waiting, key=lambda shape: waiting[shape][0][0]), max(consumed, offset))
            barren_epochs = 0 if decoded else barren_epochs + 1
            if barren_epochs > 1:  # the resumed epoch may be spent; two in a row means no usable data
                raise RuntimeError(f"rank {self.rank} reader {logical}: shards {self.paths} yield no usable sample")
            epoch, offset, replay = epoch + 1, 0, set()


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)

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
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from preprocess.sample import Sample
from train.config import DataSection

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "Rejected", "ReaderPosition", "TokenizerPromptEncoder", "BatchBuilder",
    "ShardStream", "shard_paths", "manifest_hash", "make_loader",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


class TokenizerPromptEncoder:
    """Caption -> padded input ids, and for each character span the index of its first token."""

    def __init__(self, tokenizer: Any, max_length: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"{type(tokenizer).__name__}: a fast tokenizer (with offsets) is needed")
        self.tokenizer = tokenizer
        self.max_length = max_length or tokenizer.model_max_length

    def __call__(self, caption: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        encoded = self.tokenizer(
            caption, padding="max_length", max_length=self.max_length, truncation=True,
            return_offsets_mapping=True,
        )
        offsets = encoded["offset_mapping"]
        indices = []
        for start, end in spans:
            hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            indices.append(hit[0] if hit else -1)  # -1: the word fell off the truncated prompt
        return list(encoded["input_ids"]), indices


def _center_square(image: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), resample)


class BatchBuilder:
    """Decoded samples -> one batch in the model's contract (see docs/DESIGN.md and MMDiffModel)."""

    def __init__(self, data: DataSection, encode_prompt: Callable[[str, list[tuple[int, int]]], tuple[list[int], list[int]]]):
        self.data = data
        self.encode_prompt = encode_prompt

    def example(self, sample: Sample, rng: random.Random) -> dict[str, Any]:
        d = self.data
        drop_text = rng.random() < d.text_dropout
        drop_subjects = drop_text or rng.random() < d.subject_dropout
        entities = sample.entities[: d.max_subjects]
        caption = "" if drop_text else sample.caption
        spans = [] if drop_text else [(e.start, e.end) for e in entities]
        input_ids, token_index = self.encode_prompt(caption, spans)
        s = d.max_subjects
        index = torch.full((s,), -1, dtype=torch.long)
        index[: len(token_index)] = torch.tensor(token_index, dtype=torch.long)
        valid = (index >= 0) & (not drop_subjects)
        index[~valid] = -1
        image = _center_square(sample.image, d.resolution, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        masks = torch.zeros((s, d.resolution, d.resolution))
        crops = torch.zeros((s, 3, d.subject_size, d.subject_size))
        mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
        for i in range(len(entities)):
            mask = Image.fromarray(sample.masks[i].astype(np.uint8) * 255)
            masks[i] = torch.from_numpy(np.asarray(_center_square(mask, d.resolution, Image.NEAREST)) > 127)
            crop = Image.fromarray(sample.crops[i]).resize((d.subject_size, d.subject_size), Image.BICUBIC)
            crops[i] = (torch.from_numpy(np.asarray(crop, np.float32)).permute(2, 0, 1) / 255.0 - mean) / std
        out = {
            "pixel_values": pixels,
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "subject_pixel_values": crops,
            "subject_token_index": index,
            "subject_valid": valid,
            "subject_masks": masks,
            "caption": caption,
            "key": sample.key,
        }
        if sample.faces is not None:
            faces = torch.zeros((s, sample.faces.shape[1]))
            rows = torch.from_numpy(np.nan_to_num(sample.faces[: len(entities)], nan=0.0))
            faces[: len(rows)] = rows
            out["face_embeds"] = faces
        return out

    @staticmethod
    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for name in examples[0]:
            values = [e[name] for e in examples]
            batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return batch


class ShardStream(IterableDataset):
    """Endless, resumable stream of batches of one rank; ``positions`` restarts each reader slot."""

    def __init__(
        self, folder: str | Path, data: DataSection, builder: BatchBuilder, seed: int, rank: int = 0,
        world_size: int = 1, positions: dict[int, ReaderPosition] | None = None, first_worker: int = 0,
    ):
        self.paths = shard_paths(folder)
        self.data, self.builder, self.seed = data, builder, seed
        self.rank, self.world_size = rank, world_size
        self.positions = positions or {}
        self.first_worker = first_worker  # the logical reader whose batch the loader yields first

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
        epoch, offset = start.epoch, start.offset
        examples: list[dict[str, Any]] = []
        rejected: list[Rejected] = []
        barren_epochs = 0
        while True:
            decoded = 0
            for consumed, raw in enumerate(self.raw_epoch(epoch, slot, slots, rejected), start=1):
                if consumed <= offset:
                    continue  # replayed to rebuild the shuffle state; decoded by the run that saved it
                try:
                    sample = Sample.from_wds(raw)
                except ValueError as exc:
                    rejected.append(Rejected(str(raw.get("__url__", "?")), str(raw.get("__key__", "?")), str(exc)))
                    continue
                example_rng = random.Random(f"{self.seed}/{epoch}/{slot}/{consumed}")
                decoded += 1
                examples.append(self.builder.example(sample, example_rng))
                if len(examples) == self.data.micro_batch_size:
                    batch = BatchBuilder.collate(examples)
                    batch["reader"] = {"worker": logical, "epoch": epoch, "offset": consumed}
                    batch["rejected"] = [r.__dict__ for r in rejected]
                    examples = []
                    rejected.clear()  # the same list the raw stream appends to
                    yield batch
            barren_epochs = 0 if decoded else barren_epochs + 1
            if barren_epochs > 1:  # the resumed epoch may be spent; two in a row means no usable data
                raise RuntimeError(f"rank {self.rank} reader {logical}: shards {self.paths} yield no usable sample")
            epoch, offset = epoch + 1, 0


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)

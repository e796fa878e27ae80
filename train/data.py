"""Training batches from the preprocessing shards (preprocess/sample.py format), local or on object storage.

A rank reads with one or more reader slots (DataLoader workers); slot = rank x workers + worker. Each epoch
the shards of a dataset are shuffled (seeded by run seed and epoch) and dealt to the slots, balanced by
their recorded sample counts (:func:`assign_shards`), so every sample of an epoch is read exactly once
across the world; with fewer shards than slots every slot reads every shard and keeps every n-th sample.
A slot streams its shards (train/shards.py: byte ranges, retries, size/sha256 checks) through a shuffle
buffer whose every draw is seeded by (run seed, source, epoch, slot, draw), and decodes what it draws.

Resume is constant-time: each batch carries its slot's :class:`ReaderPosition` (per source: the epoch, the
shard being read and the byte and number of its next sample, and the byte ranges of the samples waiting in
the shuffle buffer; the examples waiting in unfilled aspect buckets), and a resumed slot opens that shard
at that byte and fetches the waiting samples by range: nothing before them is read again.

``data.sources`` mixes datasets: every draw takes the source furthest behind its weighted share of the
slot's draws so far, so the mixture follows the weights at every step; each source keeps its own epochs,
and the counts drawn per source travel with the position (the run logs them). A shard or sample
that cannot be used is skipped, and reported with the next batch (shard and sample named), never fatal.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmdiff.prompting import subject_pixel_values, tokenize_with_subjects
from mmdiff.zoo.spec import ModelSpec
from preprocess.sample import Sample
from train.config import DataSection
from train.latents import LatentSidecar, decode_latent, member_name, vae_tag
from train.shards import Dataset, RawSample, ShardInfo, ShardSkipped, read_sample, read_samples

__all__ = [
    "BatchBuilder",
    "ReaderPosition",
    "Rejected",
    "ShardStream",
    "Source",
    "SourcePosition",
    "assign_shards",
    "data_sources",
    "default_num_workers",
    "make_loader",
]

log = logging.getLogger("train.data")


@dataclass(frozen=True)
class Rejected:
    """A shard or sample the stream skipped: ``source`` names the shard, ``key`` the sample (if known)."""

    source: str
    key: str
    reason: str


@dataclass
class SourcePosition:
    """Where a reader slot stands in one source. A sample reference is [shard, number, start, end]: its
    shard as a position in the slot's shard list for the epoch, its number in that shard, its bytes."""

    epoch: int = 0
    shard: int = 0  # the shard being read (position in the slot's list for the epoch) ...
    byte: int = 0  # ... the byte of its next sample ...
    index: int = 0  # ... and that sample's number in the shard
    buffer: list[list[int]] = field(default_factory=list)  # the shuffle buffer's samples, in buffer order
    taken: int = 0  # samples taken into the buffer this epoch (seeds the draws)
    drawn: int = 0  # samples drawn from this source by the slot, all epochs


@dataclass
class ReaderPosition:
    """Where one reader slot stands after a batch (saved per rank and worker in the checkpoint)."""

    sources: list[SourcePosition] = field(default_factory=list)
    draws: int = 0  # samples drawn by the slot, all sources and epochs
    # decoded examples waiting in unfilled aspect buckets, oldest first: [source, epoch, *sample reference]
    pending: list[list[int]] = field(default_factory=list)
    slots: int = 0  # ranks x workers of the run that saved it
    seed: int = 0  # the shuffle seed (the run seed)

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourcePosition) else SourcePosition(**s) for s in self.sources]

    @property
    def epoch(self) -> int:
        return self.sources[0].epoch if self.sources else 0

    @classmethod
    def of_batch(cls, batch: dict[str, Any]) -> ReaderPosition:
        """Where the reader that made ``batch`` stands after it."""
        reader = dict(batch["reader"])
        reader.pop("worker", None)
        return cls(**reader)


@dataclass(frozen=True)
class Source:
    """One dataset of the mixture and its sampling weight."""

    dataset: Dataset
    weight: float = 1.0


def data_sources(data: DataSection) -> list[Source]:
    """``data.sources`` (a mixture), else ``data.shards`` alone."""
    if data.sources:
        return [Source(Dataset.open(s.shards, s.storage_options or data.storage_options), s.weight) for s in data.sources]
    return [Source(Dataset.open(data.shards, data.storage_options))]


# CPU seconds per training image of one reader slot (one core), measured by benchmarks.bench_loader at 512 px
# and 1024 px (docs/SIZING.md), with cached latents (True) and decoding the image for the VAE (False) ...
LOADER_CPU_S_PER_IMAGE = {True: {512: 0.0120, 1024: 0.0219}, False: {512: 0.0300, 1024: 0.0946}}
# ... and the training images/s one GPU consumes at most there (docs/SIZING.md: an H100 at 40 % MFU,
# SD1.5 at 512 px, SDXL at 1024 px)
PLANNED_IMAGES_PER_S = {True: {512: 182.5, 1024: 25.5}, False: {512: 120.5, 1024: 19.4}}


def default_num_workers(data: DataSection, ranks_per_node: int, cores: int | None = None) -> int:
    """DataLoader workers per rank that keep up with the planned images/s at the measured CPU cost per image
    (both interpolated in pixels between the measured resolutions), with 25 % headroom, within this node's
    cores less one per rank (the training process itself)."""

    def at_resolution(table: dict[int, float]) -> float:
        (low, low_value), (high, high_value) = sorted(table.items())
        share = min(1.0, max(0.0, (data.resolution ** 2 - low ** 2) / (high ** 2 - low ** 2)))
        return low_value + share * (high_value - low_value)

    cores_needed = (at_resolution(LOADER_CPU_S_PER_IMAGE[data.cached_latents])
                    * at_resolution(PLANNED_IMAGES_PER_S[data.cached_latents]))
    available = (cores or os.cpu_count() or 1) // max(1, ranks_per_node) - 1
    return max(0, min(math.ceil(cores_needed * 1.25), available))


def assign_shards(shards: list[ShardInfo], seed: int, epoch: int, slot: int, slots: int) -> tuple[list[int], bool]:
    """The shards (indices into ``shards``) slot ``slot`` of ``slots`` reads in ``epoch``, in reading order,
    and whether it keeps only every ``slots``-th sample of them (fewer shards than slots: it reads all).

    The epoch's order is a seeded shuffle; with enough shards each goes, in that order, to the slot with
    the fewest recorded samples so far (ties: the lowest slot), so slots get about equal work."""
    order = list(range(len(shards)))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    if len(shards) < slots:
        return order, True
    load = [0] * slots
    mine = []
    for index in order:
        target = min(range(slots), key=lambda s: (load[s], s))
        load[target] += shards[index].samples if shards[index].samples is not None else 1
        if target == slot:
            mine.append(index)
    return mine, False


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


def cover_geometry(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], float]:
    """How an image of ``size`` (height, width) is resized to cover ``target`` (height, width) and centre-cropped
    to it: the resized size (height, width), the crop's top-left corner in resized pixels, the scale factor."""
    h, w = size
    scale = max(target[0] / h, target[1] / w)
    rw, rh = max(target[1], round(w * scale)), max(target[0], round(h * scale))
    return (rh, rw), ((rh - target[0]) // 2, (rw - target[1]) // 2), scale


def cover_crop(image: Image.Image, target: tuple[int, int], resample: int) -> tuple[Image.Image, tuple[int, int], float]:
    """``image`` resized to cover ``target`` (height, width) and centre-cropped to it; returns the crop, its
    top-left corner in resized pixels (SDXL's ``crops_coords_top_left``) and the scale factor."""
    (rh, rw), (top, left), scale = cover_geometry((image.height, image.width), target)
    resized = image.resize((rw, rh), resample)
    return resized.crop((left, top, left + target[1], top + target[0])), (top, left), scale


class BatchBuilder:
    """Decoded samples -> one batch in the model's contract (MMDiffModel.training_loss).

    ``tokenizers`` are the base model's (two for SDXL) and ``processor`` the image encoder's, so prompts
    and subject crops are prepared exactly as at inference (mmdiff.prompting). ``latent_factor`` is the
    VAE's downsampling (8 for SD1.5 and SDXL): subject masks travel at the latent resolution, the largest
    the loss uses them at, as uint8 coverage (0..255, the share of each latent pixel's image pixels
    inside the mask), from which every smaller supervised size follows by area averaging. With cached
    latents for its bucket an example carries no pixels: the image is never decoded.
    """

    def __init__(self, data: DataSection, tokenizers: list[Any], processor: Any, latent_factor: int = 8):
        self.data, self.tokenizers, self.processor = data, list(tokenizers), processor
        self.latent_factor = latent_factor
        self.buckets = (aspect_buckets(data.resolution, data.bucket_step, data.bucket_max_aspect)
                        if data.aspect_buckets else [(data.resolution, data.resolution)])

    def crop(self, image: Image.Image) -> tuple[tuple[int, int], torch.Tensor, tuple[int, int], float]:
        """The training crop of ``image``: its bucket, pixels [3, h, w] in [-1, 1], the crop's top-left
        corner in resized pixels and the resize factor (train/latents.py caches latents of these pixels)."""
        bucket = nearest_bucket((image.height, image.width), self.buckets)
        cropped, corner, scale = cover_crop(image if image.mode == "RGB" else image.convert("RGB"), bucket, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(cropped, np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return bucket, pixels, corner, scale

    def example(self, sample: Sample, rng: random.Random, latents: dict[str, bytes] | None = None) -> dict[str, Any]:
        """One training example; ``latents`` (``latent:<h>x<w>.npy`` -> bytes) are the sample's cached VAE
        latents, used when there are some for its bucket (``sample.image`` may then be undecoded: only its
        size is read). Keys starting with ``_`` are the stream's, left out of batches."""
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
        size = (sample.image.height, sample.image.width)
        bucket = nearest_bucket(size, self.buckets)
        (rh, rw), (top, left), scale = cover_geometry(size, bucket)
        # the crop in the stored image's pixels, averaged down to the latent grid (PIL's BOX filter)
        region = (left * size[1] / rw, top * size[0] / rh, (left + bucket[1]) * size[1] / rw,
                  (top + bucket[0]) * size[0] / rh)
        grid = (bucket[1] // self.latent_factor, bucket[0] // self.latent_factor)
        masks = torch.zeros((s, grid[1], grid[0]), dtype=torch.uint8)
        boxes = torch.zeros((s, 4))  # [x0, y0, x1, y1] in the training image's pixels, clipped to it
        for i, entity in enumerate(entities):
            mask = Image.fromarray(sample.masks[i].astype(np.uint8) * 255)
            masks[i] = torch.from_numpy(np.array(mask.resize(grid, Image.BOX, box=region)))
            x0, y0, x1, y1 = entity.box
            boxes[i] = torch.tensor([x0 * scale - left, y0 * scale - top, x1 * scale - left, y1 * scale - top])
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([bucket[1], bucket[0]] * 2, dtype=boxes.dtype))
        crops = subject_pixel_values(self.processor, list(sample.crops[: len(entities)])) if entities else None
        crop_size = self.processor.crop_size["height"], self.processor.crop_size["width"]
        subject_pixels = torch.zeros((s, 3, *crop_size))
        if crops is not None:
            subject_pixels[: len(crops)] = crops
        out = {
            "input_ids": encoded[0][0],
            "subject_pixel_values": subject_pixels,
            "subject_token_index": index,
            "subject_valid": valid,
            "subject_masks": masks,
            "subject_boxes": boxes,
            "caption": caption,
            "key": sample.key,
            "_bucket": bucket,
            "_pixels": lambda: self.crop(sample.image)[1],  # decoded only if the batch runs the VAE
        }
        cached = (latents or {}).get(f"latent:{member_name(bucket)}")
        if cached is not None and self.data.cached_latents:
            out["latent_parameters"] = decode_latent(cached)
        else:
            out["pixel_values"] = out.pop("_pixels")()
        if len(encoded) == 2:  # SDXL: second text encoder and the size conditioning
            out["input_ids_2"] = encoded[1][0]
            out["original_size"] = torch.tensor(size)
            out["crop_top_left"] = torch.tensor((top, left))
        if sample.faces is not None:
            faces = torch.zeros((s, sample.faces.shape[1]))
            rows = torch.from_numpy(np.nan_to_num(sample.faces[: len(entities)], nan=0.0))
            faces[: len(rows)] = rows
            out["face_embeds"] = faces
        return out

    @staticmethod
    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stacked tensors, lists of the rest. When some example has no cached latents the VAE runs for the
        whole batch, so every example gets its pixels (decoded now); otherwise the batch has none."""
        if any("latent_parameters" not in e for e in examples):
            for example in examples:
                example.pop("latent_parameters", None)
                if "pixel_values" not in example:
                    example["pixel_values"] = example["_pixels"]()
        batch: dict[str, Any] = {}
        for name in [k for k in examples[0] if not k.startswith("_") and all(k in e for e in examples)]:
            values = [e[name] for e in examples]
            batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return batch


class _SourceReader:
    """One source's stream of raw samples for one slot: shards in the slot's order, a seeded shuffle
    buffer, epochs one after another; its :class:`SourcePosition` is always current."""

    def __init__(self, stream: ShardStream, number: int, position: SourcePosition, slot: int, slots: int,
                 rejected: list[Rejected]):
        self.stream, self.number, self.position = stream, number, position
        self.dataset = stream.sources[number].dataset
        self.slot, self.slots, self.rejected = slot, slots, rejected
        tag = stream.latent_tag
        self.latents = self.dataset.latents(tag) if tag else None
        self._sidecars: dict[str, LatentSidecar] = {}
        self._plans: dict[int, tuple[list[int], bool]] = {}
        self._head: Iterator[tuple[list[int], RawSample]] | None = None
        self._barren = 0  # epochs in a row that gave no sample
        # the buffer's samples themselves, fetched by range on resume
        self.buffer: list[tuple[list[int], dict[str, Any]]] = [
            (ref, raw) for ref in position.buffer if (raw := self.fetch(position.epoch, ref)) is not None]
        position.buffer = [ref for ref, _ in self.buffer]

    def plan(self, epoch: int) -> tuple[list[int], bool]:
        if epoch not in self._plans:
            shards = self.dataset.shards
            self._plans = {e: plan for e, plan in self._plans.items() if e >= epoch - 1}  # pending may be one older
            self._plans[epoch] = assign_shards(shards, self.stream.seed, epoch, self.slot, self.slots)
            mine, every_nth = self._plans[epoch]
            names = [shards[i].name for i in mine]
            log.info("rank %d slot %d/%d source %d (%s) epoch %d: %d shards, %s samples%s: %s%s",
                     self.stream.rank, self.slot, self.slots, self.number, self.dataset.url, epoch, len(mine),
                     sum(shards[i].samples or 0 for i in mine) or "?", " (every n-th of each)" if every_nth else "",
                     ", ".join(names[:8]), " ..." if len(names) > 8 else "")
        return self._plans[epoch]

    def shard(self, epoch: int, position: int) -> ShardInfo:
        return self.dataset.shards[self.plan(epoch)[0][position]]

    def fetch(self, epoch: int, ref: list[int]) -> dict[str, Any] | None:
        """The raw sample a reference names (one ranged read), None (reported) if it cannot be read."""
        shard = self.shard(epoch, ref[0])
        try:
            return self._raw(shard, read_sample(shard, ref[2], ref[3], self.stream.data.read_retries))
        except ShardSkipped as exc:
            self._skip(exc)
            return None

    def _raw(self, shard: ShardInfo, sample: RawSample) -> dict[str, Any]:
        raw = sample.wds(shard.location.url)
        if self.latents is not None:
            if shard.name not in self._sidecars:
                for old in self._sidecars.values():
                    old.close()
                self._sidecars = {shard.name: LatentSidecar(self.latents / shard.name, self.stream.data.read_retries)}
            raw.update(self._sidecars[shard.name].find(sample.key))
        return raw

    def _skip(self, exc: ShardSkipped) -> None:
        log.warning("rank %d slot %d: skipped shard %s", self.stream.rank, self.slot, exc)
        self.rejected.append(Rejected(exc.shard, "", exc.reason))

    def _read(self) -> Iterator[tuple[list[int], dict[str, Any]]]:
        """The slot's samples of the position's epoch from the position's shard and byte on."""
        p, data = self.position, self.stream.data
        mine, every_nth = self.plan(p.epoch)
        while p.shard < len(mine):
            shard = self.dataset.shards[mine[p.shard]]
            try:
                for number, sample in enumerate(read_samples(shard, data.verify, data.read_retries, p.byte), p.index):
                    p.byte, p.index = sample.end, number + 1
                    # the deal turns with the epoch, so with fewer samples than slots each slot gets its turn
                    if every_nth and (number + p.shard + p.epoch) % self.slots != self.slot:
                        continue
                    yield [p.shard, number, sample.start, sample.end], self._raw(shard, sample)
            except ShardSkipped as exc:
                self._skip(exc)
            p.shard, p.byte, p.index = p.shard + 1, 0, 0

    def next(self) -> tuple[int, list[int], dict[str, Any]]:
        """The next sample drawn from the shuffle buffer: (its epoch, its reference, the raw sample)."""
        p, size = self.position, self.stream.data.shuffle_buffer
        while True:
            if self._head is None:
                self._head = self._read()
            while len(self.buffer) < size:
                item = next(self._head, None)
                if item is None:
                    break
                self.buffer.append(item)
                p.buffer.append(item[0])
                p.taken += 1
            if self.buffer:
                self._barren = 0
                pick = random.Random(f"{self.stream.seed}/{self.number}/{p.epoch}/{self.slot}/{p.taken}/"
                                     f"{len(self.buffer)}").randrange(len(self.buffer))
                ref, raw = self.buffer.pop(pick)
                p.buffer.pop(pick)
                p.drawn += 1
                return p.epoch, ref, raw
            self._barren += 1
            # an epoch may be spent (on resume) or dealt this slot nothing (fewer samples than slots, the deal
            # turns each epoch): a whole turn of the deal plus one with no sample means no usable data
            if self._barren > self.slots + 1:
                raise RuntimeError(f"rank {self.stream.rank} slot {self.slot}: source {self.dataset.url} yields "
                                   "no usable sample (see the skipped shards above)")
            p.epoch, p.shard, p.byte, p.index, p.taken = p.epoch + 1, 0, 0, 0, 0
            self._head = None

    def close(self) -> None:
        for sidecar in self._sidecars.values():
            sidecar.close()


class ShardStream(IterableDataset):
    """Endless, resumable stream of batches of one rank; ``positions`` (by worker) restart each reader slot.

    ``shards`` is a dataset URL (or path) or a list of :class:`Source` (a mixture); ``base`` names the VAE
    whose cached latents are used (``data.cached_latents``)."""

    def __init__(
        self, shards: str | Path | list[Source], data: DataSection, builder: BatchBuilder, seed: int, rank: int = 0,
        world_size: int = 1, positions: dict[int, ReaderPosition] | None = None, first_worker: int = 0,
        base: ModelSpec | None = None,
    ):
        self.sources = (list(shards) if isinstance(shards, list)
                        else [Source(Dataset.open(str(shards), data.storage_options))])
        total = sum(s.weight for s in self.sources)
        self.weights = [s.weight / total for s in self.sources]
        self.data, self.builder, self.seed = data, builder, seed
        self.rank, self.world_size = rank, world_size
        self.positions = positions or {}
        self.first_worker = first_worker  # the logical reader whose batch the loader yields first
        self.latent_tag = vae_tag(base) if base is not None and data.cached_latents else None

    def check_resume(self, num_workers: int) -> None:
        """Refuse positions saved by another split of the data (ranks x workers) or another seed or mixture:
        their shards and samples would be read twice or never."""
        slots = self.world_size * max(1, num_workers)
        for worker, p in sorted(self.positions.items()):
            if p.slots != slots or worker >= max(1, num_workers):
                raise ValueError(
                    f"the checkpoint's data positions were saved by {p.slots} reader slots (ranks x data.num_workers), "
                    f"this run has {slots} ({self.world_size} x {max(1, num_workers)}): resume with the same number "
                    "of ranks and data.num_workers, or start a new run (output_dir) from the exported adapter")
            if p.seed != self.seed or len(p.sources) != len(self.sources):
                raise ValueError(f"the checkpoint's data positions were saved with seed {p.seed} and "
                                 f"{len(p.sources)} sources, this run has seed {self.seed} and {len(self.sources)}")

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        logical = ((info.id if info else 0) + self.first_worker) % workers
        return logical, self.rank * workers + logical, self.world_size * workers

    def _example(self, source: int, epoch: int, raw: dict[str, Any]) -> dict[str, Any]:
        # seeded by the sample itself: its dropout does not depend on which slot read it, or when
        rng = random.Random(f"{self.seed}/{source}/{epoch}/{raw['__url__'].rpartition('/')[2]}/{raw['__key__']}")
        latents = {k: v for k, v in raw.items() if k.startswith("latent:")}
        # with latents cached the image is only opened (its size), decoded later if the batch needs it
        return self.builder.example(Sample.from_wds(raw, decode_image=not latents), rng, latents)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        logical, slot, slots = self._slot()
        saved = self.positions.get(logical)
        position = ReaderPosition(
            [SourcePosition(**asdict(s)) for s in saved.sources] if saved else [SourcePosition() for _ in self.sources],
            saved.draws if saved else 0, [], slots, self.seed)
        rejected: list[Rejected] = []
        readers = [_SourceReader(self, i, p, slot, slots, rejected) for i, p in enumerate(position.sources)]
        # decoded examples waiting for their bucket to fill, by shape: [(draw, [source, epoch, *ref], example)]
        waiting: dict[tuple[int, ...], list[tuple[int, list[int], dict[str, Any]]]] = {}

        def wait(draw: int, ref: list[int], raw: dict[str, Any]) -> tuple[int, ...] | None:
            try:
                example = self._example(ref[0], ref[1], raw)
            except ValueError as exc:
                rejected.append(Rejected(str(raw.get("__url__", "?")), str(raw.get("__key__", "?")), str(exc)))
                return None
            shape = example["_bucket"]
            waiting.setdefault(shape, []).append((draw, ref, example))
            return shape

        def emit(shape: tuple[int, ...]) -> dict[str, Any]:
            batch = BatchBuilder.collate([example for _, _, example in waiting.pop(shape)])
            position.pending = [ref for _, ref, _ in sorted(e for group in waiting.values() for e in group)]
            batch["reader"] = {"worker": logical, **asdict(position)}
            batch["rejected"] = [r.__dict__ for r in rejected]
            rejected.clear()  # the same list the readers append to
            return batch

        for draw, ref in enumerate(saved.pending if saved else []):  # the examples that were waiting
            raw = readers[ref[0]].fetch(ref[1], ref[2:])
            if raw is not None:
                wait(-len(saved.pending) + draw, ref, raw)
        try:
            while True:
                # the source furthest behind its share of the draws so far (ties: the first): every prefix
                # of a slot's draws follows the weights to within one sample, deterministically
                source = max(range(len(readers)), key=lambda i: (
                    (position.draws + 1) * self.weights[i] - position.sources[i].drawn, -i))
                epoch, ref, raw = readers[source].next()
                position.draws += 1
                shape = wait(position.draws, [source, epoch, *ref], raw)
                if shape is not None and len(waiting[shape]) == self.data.micro_batch_size:
                    yield emit(shape)
                # a source's epoch end sends its incomplete buckets out as smaller batches: nothing waits forever
                if len(readers) == 1 and not readers[0].buffer and readers[0].position.shard >= len(
                        readers[0].plan(readers[0].position.epoch)[0]):
                    while waiting:
                        yield emit(min(waiting, key=lambda s: waiting[s][0][0]))
        finally:
            for reader in readers:
                reader.close()


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Workers start from a fork server, never by forking the trainer: the trainer runs threads (fsspec's IO
    loop, NCCL's, MLflow's), and a fork copies a lock one of them holds into the worker, which then waits on
    it forever (the suite's loader reading ``s3://`` shards hung so in some runs). Python 3.14 made the fork
    server Linux's default for this reason."""
    stream.check_resume(num_workers)
    if num_workers == 0:
        return DataLoader(stream, batch_size=None, pin_memory=pin_memory)
    context = multiprocessing.get_context("forkserver")
    # what a worker imports to unpickle the stream (the image processor's module alone takes seconds); read
    # when this process's server starts, so a later loader's other classes are imported by its workers
    parts = (stream, stream.builder, stream.builder.processor, *stream.builder.tokenizers)
    context.set_forkserver_preload(sorted({type(part).__module__ for part in parts}))
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=True,
                      pin_memory=pin_memory, multiprocessing_context=context)

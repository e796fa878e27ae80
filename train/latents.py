"""Cached VAE latents: each training image's VAE posterior, computed once ahead of training.

    python -m train.latents --config configs/train/sd15.yaml [--resolutions 512 768] [--set KEY=VALUE ...]
    torchrun --nproc_per_node 8 -m train.latents --config ...      # one process per GPU

Each process encodes its share of the shards in batches of one aspect bucket, on its GPU in half
precision (bfloat16; ``--dtype float16`` / ``float32`` to choose), and publishes each shard's sidecar
whole (a local rename or one object-store upload), then its counts; a rerun skips the shards done.

Every sample of ``data.shards`` is cropped exactly as training crops it (its aspect bucket, see
train/data.py) at each resolution asked for, and encoded by the base model's VAE. The posterior's
parameters (mean and log-variance, float16) go into a sidecar tar per shard, beside the pipeline's own
shards, which stay byte for byte what the pipeline wrote (their sha256 are in its index and manifest):

    <shards>/latents/<vae tag>/shard-000000.tar   members <key>.<height>x<width>.npy, [2C, h/8, w/8]
    <shards>/latents/<vae tag>/latents.json       the VAE's model spec, resolutions, counts

The tag names the VAE: a hash of the base model spec, so latents of another VAE are never used.
Training (``data.cached_latents: true``, the default) looks up each sample's latents for its bucket in
the sidecar of the shard it reads, and runs the VAE for any sample without them.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m train.latents`: parse (and answer --help) before the heavy imports below
    import sys

    import train.cli

    sys.exit(train.cli.latents())

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmdiff.zoo.spec import ModelSpec
from pipeline.storage import Location
from preprocess.sample import Sample
from train import cli

__all__ = ["LatentSidecar", "ShardEncoder", "cache_latents", "latent_dir", "member_name", "vae_tag"]

log = logging.getLogger("train.latents")


def vae_tag(base: ModelSpec) -> str:
    """The name of a base model's VAE in the cache: stable across machines for one spec."""
    spec = json.dumps({k: base.model_dump(mode="json")[k] for k in ("family", "source", "seed", "options")}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def latent_dir(shards: str | Path | Location, base: ModelSpec, storage_options: dict[str, Any] | None = None) -> Location:
    """Where the latents of ``base``'s VAE for the dataset at ``shards`` live (a folder or an object prefix)."""
    root = shards if isinstance(shards, Location) else Location(str(shards), dict(storage_options or {}))
    return root / "latents" / vae_tag(base)


def member_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}.npy"


class LatentSidecar:
    """The cached latents of one shard (its sidecar tar), looked up by sample key (``latent:<h>x<w>.npy`` ->
    .npy bytes). The sidecar streams forward: keys asked in the order it was written (the shard's, sorted by
    the pipeline) read it once; an earlier key reopens it. A missing sidecar has no latents."""

    def __init__(self, location: Location, retries: int = 3):
        self.location, self.retries = location, retries
        self._samples: Iterator[Any] | None = None
        self._current: Any = None
        self._absent = False

    def find(self, key: str) -> dict[str, bytes]:
        from train.shards import ShardInfo, ShardSkipped, read_samples

        if self._absent:
            return {}
        if self._samples is None or (self._current is not None and key < self._current.key):
            self._samples, self._current = read_samples(ShardInfo(self.location), retries=self.retries), None
        try:
            while self._current is None or self._current.key < key:
                self._current = next(self._samples, None)
                if self._current is None:
                    self._samples = iter(())  # spent: only an earlier key reopens it
                    return {}
        except ShardSkipped as exc:
            self._absent = True
            if exc.reason != "missing":
                log.warning("latents %s: not used: %s", self.location, exc.reason)
            return {}
        if self._current.key != key:
            return {}
        return {f"latent:{ext}": payload for ext, payload in self._current.members.items()}

    def close(self) -> None:
        if self._samples is not None and hasattr(self._samples, "close"):
            self._samples.close()


def decode_latent(payload: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(payload), allow_pickle=False).astype(np.float32))


class ShardEncoder:
    """Encodes the samples of one shard in batches (one bucket at a time) on ``device`` in ``dtype``, and
    writes the shard's sidecar whole; one per process (one process per GPU)."""

    def __init__(self, config: Any, resolutions: list[int], batch_size: int, device: str, dtype: torch.dtype):
        from mmdiff import zoo
        from train.data import BatchBuilder

        self.config, self.batch_size, self.device, self.dtype = config, batch_size, torch.device(device), dtype
        self.vae = zoo.build(config.model.base).vae.eval().to(self.device, dtype)
        self.layouts = [BatchBuilder(config.data.model_copy(update={"resolution": r}), [], None) for r in resolutions]

    @torch.no_grad()
    def encode(self, pixels: list[torch.Tensor]) -> np.ndarray:
        """The posterior parameters [n, 2C, h/f, w/f] (float16) of same-size crops [3, h, w] in [-1, 1]."""
        batch = torch.stack(pixels).to(self.device, self.dtype, non_blocking=True)
        moments = self.vae.encode(batch).latent_dist.parameters
        return moments.to(torch.float16).cpu().numpy()  # one copy back per batch

    def shard(self, shard: Any, target: Location) -> dict[str, int]:
        """Encode ``shard`` and publish its sidecar at ``target``; the counts of what happened to its samples."""
        from train.shards import read_samples

        counts = {"samples": 0, "latents": 0, "unreadable": 0}
        waiting: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
        encoded: dict[str, dict[str, np.ndarray]] = {}  # key -> member name -> parameters, written in key order

        def flush(bucket: tuple[int, int]) -> None:
            group = waiting.pop(bucket)
            for (key, _), moments in zip(group, self.encode([p for _, p in group])):
                encoded.setdefault(key, {})[member_name(bucket)] = moments

        order = []
        for raw in read_samples(shard, self.config.data.verify, self.config.data.read_retries):
            try:
                sample = Sample.from_wds(raw.wds(shard.location.url))
            except ValueError as exc:  # training skips and reports it too
                counts["unreadable"] += 1
                log.warning("%s %s: not cached: %s", shard.location, raw.key, exc)
                continue
            counts["samples"] += 1
            order.append(sample.key)
            for bucket, pixels in _crops(self.layouts, sample.image):
                waiting.setdefault(bucket, []).append((sample.key, pixels))
                if len(waiting[bucket]) == self.batch_size:
                    flush(bucket)
        for bucket in list(waiting):
            flush(bucket)
        partial = target.staging_file()
        try:
            with tarfile.open(partial, "w") as tar:  # the shard's order: training reads both in step
                for key in order:
                    for name, moments in encoded[key].items():
                        payload = io.BytesIO()
                        np.save(payload, moments, allow_pickle=False)
                        info = tarfile.TarInfo(f"{key}.{name}")
                        info.size = payload.tell()
                        payload.seek(0)
                        tar.addfile(info, payload)
                        counts["latents"] += 1
            target.publish(partial)  # a sidecar is complete or absent
        finally:
            partial.unlink(missing_ok=True)
        return counts


def cache_latents(config: Any, resolutions: list[int] | None = None, batch_size: int = 16, device: str = "auto",
                  dtype: str = "auto", rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Write the sidecars for ``config`` (a TrainConfig) at ``resolutions`` (default: data.resolution).

    Process ``rank`` of ``world_size`` (one per GPU) takes shards rank, rank + world_size, ...; a shard
    whose sidecar and counts are there from an earlier run at these resolutions is done (resume). Each
    shard's counts are written beside its sidecar after it; rank 0 sums them all once every shard is done
    (``latents.json``), and checks that every sample of every shard is accounted for."""
    from mmdiff.placement import resolve_placement
    from train.shards import Dataset, ShardSkipped

    base, resolutions = config.model.base, list(resolutions or [config.data.resolution])
    device, dtype_name = resolve_placement(device, dtype, who="train.latents")
    dataset = Dataset.open(config.data.shards, config.data.storage_options)
    out = dataset.latents(vae_tag(base))
    encoder: ShardEncoder | None = None
    mine = dataset.shards[rank::world_size]
    for number, shard in enumerate(mine, start=1):
        done = out / f"{shard.name}.counts.json"
        try:
            if json.loads(done.read_text()).get("resolutions") == resolutions:
                continue
        except FileNotFoundError:
            pass
        if encoder is None:
            encoder = ShardEncoder(config, resolutions, batch_size, device, getattr(torch, dtype_name))
        try:
            counts = {**encoder.shard(shard, out / shard.name), "skipped": None}
        except ShardSkipped as exc:
            log.warning("latents: shard skipped: %s", exc)
            counts = {"samples": 0, "latents": 0, "unreadable": 0, "skipped": exc.reason}
        done.write_atomic(json.dumps({"resolutions": resolutions, "recorded": shard.samples, **counts}).encode())
        log.info("latents: rank %d shard %d/%d %s: %s", rank, number, len(mine), shard.name, counts)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        return {}
    per_shard = {s.name: json.loads((out / f"{s.name}.counts.json").read_text()) for s in dataset.shards}
    totals = {k: sum(c[k] for c in per_shard.values()) for k in ("samples", "latents", "unreadable")}
    skipped = {name: c["skipped"] for name, c in per_shard.items() if c["skipped"]}
    unaccounted = {name: c for name, c in per_shard.items() if not c["skipped"] and c["recorded"] is not None
                   and c["samples"] + c["unreadable"] != c["recorded"]}
    if unaccounted:
        raise RuntimeError(f"{out}: samples unaccounted for (encoded + unreadable != the index's count): {unaccounted}")
    summary = {"vae": base.model_dump(mode="json"), "tag": vae_tag(base), "resolutions": resolutions,
               "aspect_buckets": config.data.aspect_buckets, "dtype": "float16", "compute_dtype": dtype_name,
               **totals, "skipped_shards": skipped,
               "skipped_samples": sum(per_shard[n]["recorded"] or 0 for n in skipped)}
    (out / "latents.json").write_atomic(json.dumps(summary, indent=1).encode())
    return summary


def _crops(layouts: list[Any], image: Image.Image) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """The training crop of ``image`` for each layout, once per distinct bucket."""
    crops: dict[tuple[int, int], torch.Tensor] = {}
    for layout in layouts:
        bucket, pixels, _, _ = layout.crop(image)
        crops.setdefault(bucket, pixels)
    return list(crops.items())


def run(args: argparse.Namespace) -> int:
    """``python -m train.latents``'s parsed arguments (train/cli.py) -> this process's share of the cache."""
    from mmdiff.configuration import parse_overrides
    from train.config import load_train_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_train_config(args.config, parse_overrides(args.set))
    # one process per GPU (torchrun / the DeepSpeed launcher set these); a process group only to wait for all
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    summary = cache_latents(config, args.resolutions, args.batch_size, device, args.dtype, rank, world_size)
    if rank == 0:
        print(json.dumps(summary))
    return 0


main = cli.latents  # the command itself (parsed in train/cli.py)

"""Cached VAE latents: each training image's VAE posterior, computed once ahead of training.

    python -m train.latents --config configs/train/sd15.yaml [--resolutions 512 768] [KEY=VALUE ...]

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

import argparse
import hashlib
import io
import json
import logging
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

__all__ = ["LatentSidecar", "cache_latents", "latent_dir", "member_name", "vae_tag"]

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


def cache_latents(config: Any, resolutions: list[int] | None = None) -> dict[str, Any]:
    """Write the sidecars for ``config`` (a TrainConfig) at ``resolutions`` (default: data.resolution)."""
    from mmdiff import zoo
    from train.data import BatchBuilder
    from train.shards import Dataset, ShardSkipped, read_samples

    base = config.model.base
    vae = zoo.build(base).vae.eval()
    dataset = Dataset.open(config.data.shards, config.data.storage_options)
    out = dataset.latents(vae_tag(base))
    layouts = [BatchBuilder(config.data.model_copy(update={"resolution": r}), [], None)
               for r in (resolutions or [config.data.resolution])]
    counts = {"samples": 0, "latents": 0, "unreadable": 0}
    for number, shard in enumerate(dataset.shards, start=1):
        target = out / shard.name
        partial = target.staging_file()
        try:
            with tarfile.open(partial, "w") as tar:
                for raw in read_samples(shard, config.data.verify, config.data.read_retries):
                    try:
                        sample = Sample.from_wds(raw.wds(shard.location.url))
                    except ValueError as exc:  # training skips and reports it too
                        counts["unreadable"] += 1
                        log.warning("%s %s: not cached: %s", shard.location, raw.key, exc)
                        continue
                    counts["samples"] += 1
                    for bucket, pixels in _crops(layouts, sample.image):
                        with torch.no_grad():
                            moments = vae.encode(pixels[None].to(vae.dtype)).latent_dist.parameters[0]
                        payload = io.BytesIO()
                        np.save(payload, moments.float().numpy().astype(np.float16), allow_pickle=False)
                        info = tarfile.TarInfo(f"{sample.key}.{member_name(bucket)}")
                        info.size = payload.tell()
                        payload.seek(0)
                        tar.addfile(info, payload)
                        counts["latents"] += 1
            target.publish(partial)  # a sidecar is complete or absent
        except ShardSkipped as exc:
            log.warning("latents: shard skipped: %s", exc)
        finally:
            partial.unlink(missing_ok=True)
        log.info("latents: shard %d/%d %s (%d samples so far)", number, len(dataset.shards), shard.name, counts["samples"])
    summary = {"vae": base.model_dump(mode="json"), "tag": vae_tag(base), "resolutions": resolutions or [config.data.resolution],
               "aspect_buckets": config.data.aspect_buckets, "dtype": "float16", **counts}
    (out / "latents.json").write_atomic(json.dumps(summary, indent=1).encode())
    return summary


def _crops(layouts: list[Any], image: Image.Image) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """The training crop of ``image`` for each layout, once per distinct bucket."""
    crops: dict[tuple[int, int], torch.Tensor] = {}
    for layout in layouts:
        bucket, pixels, _, _ = layout.crop(image)
        crops.setdefault(bucket, pixels)
    return list(crops.items())


def main(argv: list[str] | None = None) -> int:
    from mmdiff.configuration import ConfigError, parse_overrides
    from train.config import load_train_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resolutions", type=int, nargs="*", help="default: the config's data.resolution")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_train_config(args.config, parse_overrides(args.overrides))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(cache_latents(config, args.resolutions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

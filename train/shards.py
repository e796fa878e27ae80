"""The preprocessing output as training reads it, on any filesystem ``pipeline.storage.Location`` reaches.

A dataset is the folder (or object-store prefix) ``pipeline.preprocess`` wrote (docs/SHARDS.md):
``shards/shard-*.index.json`` list the shards with their sample keys, size and sha256, ``manifest.json``
identifies the data. Shards are read as streams of byte ranges (``Location.open``), a transient read
error is retried from the byte it stopped at, and a shard that is missing, truncated or not what its
index recorded is skipped with a reason naming it (:class:`ShardSkipped`), never read silently:

- ``verify="size"`` (the default, as preprocessing resumes check): the size is compared before reading,
  and the sha256 is computed as the shard streams by; a mismatch found at its end is reported (the
  samples read before it were used: the report says so).
- ``verify="sha256"``: the shard is read whole and its hash checked before any sample is used.

A sample is located by ``(start, end)``, the byte range of its tar members, so a reader can reopen a shard
at any sample (constant-time resume) and fetch one sample alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import Location

__all__ = ["Dataset", "RawSample", "ShardInfo", "ShardSkipped", "read_samples"]

log = logging.getLogger("train.data")
_TRANSIENT_EXCLUDED = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ShardSkipped(Exception):
    """A shard that training does not read (or stopped reading): ``shard`` names it, the message says why."""

    def __init__(self, shard: str, reason: str):
        super().__init__(f"{shard}: {reason}")
        self.shard, self.reason = shard, reason


@dataclass(frozen=True)
class ShardInfo:
    """One shard and what its index recorded (None where there is no index: a hand-made folder)."""

    location: Location
    samples: int | None = None
    size: int | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        return self.location.name


@dataclass
class RawSample:
    """One sample's members (``ext`` -> bytes, WebDataset's naming) and where it lies in its shard."""

    key: str
    members: dict[str, bytes]
    start: int  # byte offset of its first tar header
    end: int  # byte offset after its last member

    def wds(self, url: str) -> dict[str, Any]:
        return {"__key__": self.key, "__url__": url, **self.members}


@dataclass
class Dataset:
    """A preprocessing output folder: its shards (from the index files), manifest, hash and profile."""

    root: Location
    shards: list[ShardInfo] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> Dataset:
        root = Location(str(url), dict(storage_options or {}))
        manifest_file = root / "manifest.json"
        try:
            manifest = json.loads(manifest_file.read_text())
        except FileNotFoundError:
            manifest = None
        except ValueError as exc:
            raise ValueError(f"{manifest_file}: not JSON: {exc}") from None
        return cls(root, list_shards(root), manifest)

    @property
    def url(self) -> str:
        return self.root.url

    def manifest_hash(self) -> str:
        """The data identity logged with every run: the pipeline's manifest hash, else a hash of the shards'
        names and recorded sha256 (or sizes, for shards without an index)."""
        if self.manifest and "manifest_hash" in self.manifest:
            return str(self.manifest["manifest_hash"])
        digest = hashlib.sha256()
        for shard in self.shards:
            recorded = shard.sha256 or str(shard.size if shard.size is not None else shard.location.size())
            digest.update(f"{shard.name}\t{recorded}\n".encode())
        return digest.hexdigest()[:16]

    def profile(self) -> dict[str, Any]:
        """Counts logged with the run's dataset input: shard files, and the manifest's inputs, written and
        rejected by reason when there is a manifest."""
        profile: dict[str, Any] = {"shard_files": len(self.shards)}
        profile.update({k: self.manifest[k] for k in ("inputs", "written", "rejected") if k in (self.manifest or {})})
        return profile

    def latents(self, tag: str) -> Location:
        return self.root / "latents" / tag


def list_shards(root: Location) -> list[ShardInfo]:
    """The shards of a dataset folder, in name order: from ``shards/*.index.json`` (fetched concurrently),
    else every ``shards/*.tar`` (a folder made by hand, with nothing recorded to check against)."""
    folder = root / "shards"
    indexes = folder.glob("*.index.json")
    if not indexes:
        tars = folder.glob("*.tar")
        if not tars:
            raise FileNotFoundError(f"no shards/*.tar (nor shards/*.index.json) under {root}")
        return [ShardInfo(t) for t in tars]
    found = folder.fs.cat([i.path for i in indexes], on_error="return")
    shards = []
    for index in indexes:
        payload = found.get(index.path)
        if isinstance(payload, BaseException):
            raise OSError(f"{index}: cannot read the shard index: {payload}") from payload
        try:
            data = json.loads(payload)
            samples, size = len(data["samples"]), int(data["bytes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a shard index (keys samples, bytes, sha256): {exc!r}") from None
        tar = folder / f"{index.name.removesuffix('.index.json')}.tar"
        shards.append(ShardInfo(tar, samples, size, data.get("sha256")))
    return shards


class _RetryingReader(io.RawIOBase):
    """A shard's bytes from ``start`` on, fetched as they are read; a failed read is retried from the byte
    it stopped at (reopening the file), up to ``retries`` times with exponential backoff."""

    def __init__(self, location: Location, start: int, retries: int, backoff_s: float = 0.5):
        self.location, self.position, self.retries, self.backoff_s = location, start, retries, backoff_s
        self.digest = hashlib.sha256() if start == 0 else None  # the hash of a whole read
        self._handle = self._open()

    def _open(self) -> Any:
        handle = self.location.open()
        if self.position:
            handle.seek(self.position)
        return handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        for attempt in range(self.retries + 1):
            try:
                data = self._handle.read(len(buffer))
                break
            except _TRANSIENT_EXCLUDED:
                raise
            except Exception as exc:  # noqa: BLE001 - network and server errors vary by filesystem
                if attempt == self.retries:
                    raise OSError(f"{self.location}: read failed at byte {self.position} after "
                                  f"{self.retries + 1} attempts: {exc!r}") from exc
                log.warning("%s: read failed at byte %d (%r); retry %d/%d", self.location, self.position, exc,
                            attempt + 1, self.retries)
                time.sleep(self.backoff_s * 2 ** attempt)
                try:
                    self._handle.close()
                finally:
                    self._handle = self._open()
        buffer[: len(data)] = data
        self.position += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return len(data)

    def close(self) -> None:
        try:
            self._handle.close()
        finally:
            super().close()


def _tar_samples(stream: Any, base: int) -> Iterator[RawSample]:
    """Samples (members grouped by WebDataset key) of a tar stream whose first byte is shard byte ``base``."""
    current: RawSample | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rpartition("/")[2]
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            key = info.name[: len(info.name) - len(name)] + stem
            payload = tar.extractfile(info).read()
            end = base + info.offset_data + -(-info.size // 512) * 512
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = RawSample(key, {}, base + info.offset, end)
            current.members[ext] = payload
            current.end = end
    if current is not None:
        yield current


def read_samples(shard: ShardInfo, verify: str = "size", retries: int = 3, start: int = 0) -> Iterator[RawSample]:
    """The samples of ``shard`` from byte ``start`` (a sample's ``start``) on. Raises :class:`ShardSkipped`
    before the first sample when the shard is missing or not the size (``verify="sha256"``: the hash) its
    index recorded, and after the last one readable when it turns out damaged."""
    url = shard.location.url
    try:
        size = shard.location.size()
    except FileNotFoundError:
        raise ShardSkipped(url, "missing") from None
    if shard.size is not None and size != shard.size:
        raise ShardSkipped(url, f"size {size} B, its index recorded {shard.size} B (truncated or replaced)")
    checked_first = verify == "sha256" and shard.sha256 is not None
    reader = _RetryingReader(shard.location, 0 if checked_first else start, retries)
    try:
        if checked_first:
            data = io.BufferedReader(reader, 1 << 20).read()
            if reader.digest.hexdigest() != shard.sha256:
                raise ShardSkipped(url, f"sha256 {reader.digest.hexdigest()[:16]}... differs from its index's "
                                        f"{shard.sha256[:16]}... (damaged); none of its samples is used")
            stream: Any = io.BytesIO(data[start:])
        else:
            stream = io.BufferedReader(reader, 1 << 20)
        try:
            yield from _tar_samples(stream, start)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ShardSkipped(url, f"unreadable shard (after byte {reader.position}): {exc}") from exc
        if not checked_first and shard.sha256 and reader.digest is not None:
            stream.read()  # the rest (the tar's end-of-archive blocks) joins the hash
            if reader.digest.hexdigest() != shard.sha256:
                raise ShardSkipped(url, "sha256 differs from its index's (damaged); its samples were read "
                                        "before the end showed it: data.verify=sha256 checks before use")
    finally:
        reader.close()


def read_sample(shard: ShardInfo, start: int, end: int, retries: int = 3) -> RawSample:
    """The one sample at bytes ``[start, end)`` of ``shard`` (one ranged read)."""
    url = shard.location.url
    for attempt in range(retries + 1):
        try:
            data = shard.location.read_bytes(start, end)
            break
        except _TRANSIENT_EXCLUDED:
            raise ShardSkipped(url, "missing") from None
        except Exception as exc:  # noqa: BLE001 - as _RetryingReader
            if attempt == retries:
                raise ShardSkipped(url, f"bytes {start}-{end}: read failed after {retries + 1} attempts: {exc!r}") from exc
            time.sleep(0.5 * 2 ** attempt)
    samples = list(_tar_samples(io.BytesIO(data), start))
    if len(samples) != 1:
        raise ShardSkipped(url, f"bytes {start}-{end} hold {len(samples)} samples, not one (the shard changed)")
    return samples[0]

"""Shard layout on disk: the listing, staging, atomic finalisation, verification, and reading back.

```
<out>/listing/part-000003.jsonl          partition 3's fixed batches (the dataset's source rows), this run only
<out>/listing/part-000003.rejects.jsonl  partition 3's inputs rejected by the listing itself, this run only
<out>/staging/p000003/<batch hash>.tar   samples of partition 3 made by one batch (overwritten on retry)
<out>/shards/shard-000003.tar            WebDataset tar, samples sorted by key, byte-reproducible
<out>/shards/shard-000003.index.json     keys, counts, bytes and sha256 of the shard and its rejects: written last
<out>/rejects/part-000003.jsonl          {"key", "source", "reason", "detail"} per rejected input
<out>/skipped.jsonl                      {"source", "reason", "detail"} per entry the listing saw that is no input
<out>/plan.json                          which job this folder belongs to (resume refuses another job)
<out>/lock.json                          the lease of the job running in this folder (pipeline.lock)
<out>/manifest.json                      seen, written, rejected and skipped by reason, shards, config, hashes
```
``<out>`` is a local folder or an object-store prefix (``s3://bucket/out``): every file is a
:class:`pipeline.storage.Location`, written whole (:meth:`~pipeline.storage.Location.write_atomic`, or
:class:`JsonlStream`): a partial file or object is never visible under its final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import webdataset as wds

from pipeline.storage import Location, writing
from preprocess.sample import Sample

__all__ = ["ShardLayout", "JsonlStream", "stage_samples", "read_staged", "finalize_partition", "reject_counts",
           "read_samples", "write_json_atomic"]

Verify = Literal["size", "sha256"]


class ShardLayout:
    """The files of one output folder: ``root`` is a local path, a URL (``s3://bucket/out``, with the
    filesystem's ``storage_options``) or a :class:`~pipeline.storage.Location`."""

    def __init__(self, root: str | Path | Location, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root if isinstance(root, Location) else Location(root, storage_options or {})
        self.shards = self.root / "shards"
        self.rejects = self.root / "rejects"
        self.staging = self.root / "staging"
        self.listing = self.root / "listing"
        self.plan = self.root / "plan.json"
        self.manifest = self.root / "manifest.json"
        self.lock = self.root / "lock.json"
        self.skipped = self.root / "skipped.jsonl"

    def shard(self, partition: int) -> Location:
        return self.shards / f"shard-{partition:06d}.tar"

    def index(self, partition: int) -> Location:
        return self.shards / f"shard-{partition:06d}.index.json"

    def rejects_file(self, partition: int) -> Location:
        return self.rejects / f"part-{partition:06d}.jsonl"

    def staging_dir(self, partition: int) -> Location:
        return self.staging / f"p{partition:06d}"

    def listing_file(self, partition: int) -> Location:
        return self.listing / f"part-{partition:06d}.jsonl"

    def listing_rejects(self, partition: int) -> Location:
        return self.listing / f"part-{partition:06d}.rejects.jsonl"

    def read_index(self, partition: int) -> dict[str, Any]:
        return json.loads(self.index(partition).read_text())

    def is_finished(self, partition: int, verify: Verify = "size") -> bool:
        """Shard, rejects and index present, and the shard and rejects match the sizes the index recorded
        when they were written (``verify="sha256"``: their hashes too, reading both in full)."""
        shard, rejects = self.shard(partition), self.rejects_file(partition)
        try:
            recorded = self.read_index(partition)
            sizes = (shard.size(), rejects.size())
        except (OSError, ValueError):
            return False
        if recorded.get("partition") != partition or sizes != (recorded.get("bytes"), recorded.get("rejects_bytes")):
            return False
        return verify == "size" or (_file_sha256(shard), _file_sha256(rejects)) == (
            recorded.get("sha256"), recorded.get("rejects_sha256"))

    def unfinish(self, partition: int) -> None:
        """Make ``partition`` pending: drop its index (what marks it finished) and any half-staged batches."""
        self.index(partition).remove()
        self.staging_dir(partition).remove()

    def write_listing(self, partition: int, batches: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> None:
        self.listing_file(partition).write_atomic(_jsonl(batches))
        self.listing_rejects(partition).write_atomic(_jsonl(rejects))

    def read_listing(self, partition: int) -> list[dict[str, Any]]:
        """The fixed-batch rows :meth:`write_listing` wrote for ``partition``."""
        return _read_jsonl(self.listing_file(partition))

    def read_listing_rejects(self, partition: int) -> list[dict[str, Any]]:
        """The inputs of ``partition`` the listing rejected (:meth:`write_listing`)."""
        return _read_jsonl(self.listing_rejects(partition))

    def all_rejects(self) -> list[dict[str, Any]]:
        return [row for path in self.rejects.glob("part-*.jsonl") for row in _read_jsonl(path)]

    def remove_temporaries(self) -> None:
        """The temporary files that writes killed mid-way left beside their final names (not the lease's:
        another job may be trying to create it right now)."""
        for folder in (self.root, self.shards, self.rejects, self.listing):
            folder.remove_temporaries(keep=f".{self.lock.name}.")

    def remove_scratch(self) -> None:
        """What only a running job needs: the listing and the staging folders."""
        self.listing.remove()
        self.staging.remove()


class JsonlStream:
    """JSON lines written one at a time to a local temporary file (:meth:`Location.staging_file`);
    :meth:`commit` puts it in place whole, :meth:`discard` removes it (a job that turns out not to own
    the folder)."""

    def __init__(self, path: Location) -> None:
        self.path = path
        self._tmp = path.staging_file()
        self._handle = self._tmp.open("wb")

    def write(self, row: dict[str, Any]) -> None:
        with writing(self.path):
            self._handle.write(_jsonl([row]))

    def commit(self) -> None:
        try:
            with writing(self.path):
                self._handle.close()
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self.path.publish(self._tmp)

    def discard(self) -> None:
        try:
            self._handle.close()  # may fail again flushing onto a full disk: the file goes all the same
        except OSError:
            pass
        finally:
            self._tmp.unlink(missing_ok=True)


def write_json_atomic(path: Location, data: Any) -> None:
    path.write_atomic((json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def _read_jsonl(path: Location) -> list[dict[str, Any]]:
    with path.open() as raw, io.TextIOWrapper(raw, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _file_sha256(path: Location) -> str:
    digest = hashlib.sha256()
    with path.open() as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    # ASCII JSON: a file name that is not UTF-8 (a lone surrogate here) still makes a valid line
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("ascii")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    # mtime=0 and fixed owner/mode: the same samples always give the same bytes.
    with wds.TarWriter(buffer, encoder=False, mtime=0, user="mmdiff", group="mmdiff") as writer:
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def stage_samples(layout: ShardLayout, partition: int, samples: list[dict[str, Any]]) -> Location:
    """Write one batch's encoded samples of ``partition``; the name depends only on the keys, so a
    retried batch overwrites its earlier attempt instead of adding a copy."""
    keys = sorted(s["__key__"] for s in samples)
    name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20]
    path = layout.staging_dir(partition) / f"{name}.tar"
    path.write_atomic(_tar_bytes(sorted(samples, key=lambda s: s["__key__"])))
    return path


def read_staged(layout: ShardLayout, partition: int) -> dict[str, dict[str, Any]]:
    """Every staged sample of ``partition`` by key (a key staged twice is the same sample: kept once)."""
    samples: dict[str, dict[str, Any]] = {}
    for path in layout.staging_dir(partition).glob("*.tar"):
        with path.open() as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for info in tar:
                key, _, member = info.name.partition(".")
                samples.setdefault(key, {"__key__": key})
                samples[key][member] = tar.extractfile(info).read()
    return samples


def finalize_partition(layout: ShardLayout, partition: int, written: list[str],
                       rejects: list[dict[str, Any]]) -> dict[str, Any]:
    """Pack the staged samples ``written`` into shard ``partition``; its rejects are ``rejects`` plus the
    inputs the listing rejected. The index is written last, so a partition is finished exactly when its
    index is on disk and matches. Idempotent: a rerun of a finished call (a task retried after its node
    died) returns the index it wrote."""
    keys = sorted(set(written))
    if layout.is_finished(partition) and layout.read_index(partition)["samples"] == keys:
        return layout.read_index(partition)
    staged = read_staged(layout, partition)
    missing = sorted(set(keys) - set(staged))
    if missing:
        raise RuntimeError(f"partition {partition}: staged samples missing for keys {missing[:5]}")
    listed = layout.listing_rejects(partition)
    rejects = sorted([*rejects, *(_read_jsonl(listed) if listed.is_file() else [])],
                     key=lambda r: (r["key"], r["source"]))
    data = _tar_bytes([staged[key] for key in keys])
    rejects_data = _jsonl(rejects)
    layout.shard(partition).write_atomic(data)
    layout.rejects_file(partition).write_atomic(rejects_data)
    index = {"shard": layout.shard(partition).name, "partition": partition, "samples": keys,
             "rejected": len(rejects), "reasons": reject_counts(rejects), "bytes": len(data), "sha256": _sha256(data),
             "rejects_bytes": len(rejects_data), "rejects_sha256": _sha256(rejects_data)}
    write_json_atomic(layout.index(partition), index)
    layout.staging_dir(partition).remove()
    return index


def reject_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(r["reason"] for r in rows).items()))


def read_samples(root: str | Path | Location) -> Iterator[Sample]:
    """Read a finished output folder back through webdataset's tar reader, in shard and key order."""
    for shard in ShardLayout(root).shards.glob("shard-*.tar"):
        with shard.open() as stream:
            files = wds.tariterators.tar_file_expander([{"url": shard.url, "stream": stream}])
            for raw in wds.tariterators.group_by_keys(files):
                yield Sample.from_wds(raw)

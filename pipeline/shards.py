"""Shard layout on disk: staging, atomic finalisation, verification, the manifest, and reading back.

```
<out>/staging/p000003/<batch hash>.tar   samples of partition 3 made by one batch (overwritten on retry)
<out>/shards/shard-000003.tar            WebDataset tar, samples sorted by key, byte-reproducible
<out>/shards/shard-000003.index.json     {"shard", "partition", "samples", "bytes", "sha256"}: written last
<out>/rejects/part-000003.jsonl          {"key", "source", "reason", "detail"} per rejected input
<out>/skipped.jsonl                      {"source", "reason", "detail"} per entry the listing saw that is no input
<out>/plan.json                          which job this folder belongs to (resume refuses another job)
<out>/lock.json                          the lease of the job running in this folder (pipeline.lock)
<out>/manifest.json                      seen, written, rejected and skipped by reason, shards, config, hashes
```
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds

from preprocess.sample import Sample

__all__ = ["ShardLayout", "stage_samples", "read_staged", "finalize_partition", "reject_counts", "read_samples",
           "write_json_atomic"]


class ShardLayout:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.rejects = self.root / "rejects"
        self.staging = self.root / "staging"
        self.plan = self.root / "plan.json"
        self.manifest = self.root / "manifest.json"
        self.lock = self.root / "lock.json"
        self.skipped = self.root / "skipped.jsonl"

    def shard(self, partition: int) -> Path:
        return self.shards / f"shard-{partition:06d}.tar"

    def index(self, partition: int) -> Path:
        return self.shards / f"shard-{partition:06d}.index.json"

    def rejects_file(self, partition: int) -> Path:
        return self.rejects / f"part-{partition:06d}.jsonl"

    def staging_dir(self, partition: int) -> Path:
        return self.staging / f"p{partition:06d}"

    def is_finished(self, partition: int) -> bool:
        """Shard, index and rejects all present and the shard's bytes match its index."""
        shard, index, rejects = self.shard(partition), self.index(partition), self.rejects_file(partition)
        if not (shard.is_file() and index.is_file() and rejects.is_file()):
            return False
        try:
            recorded = json.loads(index.read_text(encoding="utf-8"))
        except ValueError:
            return False
        return recorded.get("sha256") == _sha256(shard.read_bytes()) and recorded.get("partition") == partition

    def finished_indexes(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(self.shards.glob("shard-*.index.json"))]

    def write_skipped(self, rows: list[dict[str, Any]]) -> None:
        _write_atomic(self.skipped, _jsonl(sorted(rows, key=lambda r: (r["source"], r["reason"]))))

    def all_rejects(self) -> list[dict[str, Any]]:
        rows = []
        for path in sorted(self.rejects.glob("part-*.jsonl")):
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        return rows


def write_json_atomic(path: Path, data: Any) -> None:
    _write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def stage_samples(layout: ShardLayout, partition: int, samples: list[dict[str, Any]]) -> Path:
    """Write one batch's encoded samples of ``partition``; the name depends only on the keys, so a
    retried batch overwrites its earlier attempt instead of adding a copy."""
    keys = sorted(s["__key__"] for s in samples)
    name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20]
    path = layout.staging_dir(partition) / f"{name}.tar"
    _write_atomic(path, _tar_bytes(sorted(samples, key=lambda s: s["__key__"])))
    return path


def read_staged(layout: ShardLayout, partition: int) -> dict[str, dict[str, Any]]:
    """Every staged sample of ``partition`` by key (a key staged twice is the same sample: kept once)."""
    samples: dict[str, dict[str, Any]] = {}
    for path in sorted(layout.staging_dir(partition).glob("*.tar")):
        with tarfile.open(path, "r") as tar:
            for info in tar:
                key, _, member = info.name.partition(".")
                samples.setdefault(key, {"__key__": key})
                samples[key][member] = tar.extractfile(info).read()
    return samples


def finalize_partition(layout: ShardLayout, partition: int, written: list[str],
                       rejects: list[dict[str, Any]]) -> dict[str, Any]:
    """Pack the staged samples ``written`` into shard ``partition`` and write its rejects; the index
    is written last, so a partition is finished exactly when its index is on disk and verifies."""
    staged = read_staged(layout, partition)
    missing = sorted(set(written) - set(staged))
    if missing:
        raise RuntimeError(f"partition {partition}: staged samples missing for keys {missing[:5]}")
    data = _tar_bytes([staged[key] for key in sorted(set(written))])
    _write_atomic(layout.shard(partition), data)
    _write_atomic(layout.rejects_file(partition), _jsonl(sorted(rejects, key=lambda r: (r["key"], r["source"]))))
    index = {"shard": layout.shard(partition).name, "partition": partition, "samples": sorted(set(written)),
             "rejected": len(rejects), "bytes": len(data), "sha256": _sha256(data)}
    write_json_atomic(layout.index(partition), index)
    shutil.rmtree(layout.staging_dir(partition), ignore_errors=True)
    return index


def reject_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(r["reason"] for r in rows).items()))


def read_samples(root: str | Path) -> Iterator[Sample]:
    """Read a finished output folder back through webdataset, in shard and key order."""
    urls = [str(p) for p in sorted(ShardLayout(root).shards.glob("shard-*.tar"))]
    if not urls:
        return
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield Sample.from_wds(raw)

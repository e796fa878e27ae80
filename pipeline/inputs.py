"""List a job's inputs as rows with stable keys, and read an input's bytes.

Keys are WebDataset-safe (no dots, ASCII): a slug of the input's relative path plus a short hash of the
full relative path, so they are unique, stable across runs and machines, and still readable. Inputs are
sorted by key and cut into partitions of ``shard_size``; partition k becomes shard k. An input whose key
was already seen (a path listed twice, a repeated key inside a tar) is marked ``duplicate_key``.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import InputConfig

__all__ = ["InputRecord", "make_key", "list_inputs", "assign_partitions", "read_bytes"]

IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class InputRecord:
    key: str
    source: str  # what a human recognises: relative path, or "shard.tar:member"
    path: str  # the file to read (an image, or the tar holding it)
    offset: int = -1  # byte range inside a tar, -1 for a plain file
    size: int = -1
    caption: str = ""  # a caption the input brings (shards' txt member)
    annotation: str = ""  # annotated inputs: the JSON file; the segmentation map sits beside it
    partition: int = -1
    duplicate: bool = False
    order: int = field(default=0, repr=False)  # position in the listing, breaks ties between duplicates


def make_key(relative: str) -> str:
    """``"photos/Été 1.jpg"`` -> ``"photos_ete_1_jpg_3f2a9c1d"``: slug + 8 hex of sha1(relative)."""
    ascii_text = unicodedata.normalize("NFKD", relative).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[-80:] or "input"
    digest = hashlib.sha1(relative.encode("utf-8")).hexdigest()[:8]
    return f"{slug}_{digest}"


def list_inputs(config: InputConfig) -> list[InputRecord]:
    """All inputs in listing order (duplicates included; see :func:`assign_partitions`)."""
    root = Path(config.path)
    if not root.exists():
        raise FileNotFoundError(f"input.path {root} does not exist")
    extensions = tuple(e.lower() for e in config.extensions)
    if config.kind == "folder":
        files = _image_files(root, extensions)
        if config.annotated:
            # "name.png" beside "name.jpg" is that image's segmentation map, not an input.
            stems = {}
            for p in files:
                stems.setdefault(p.with_suffix(""), []).append(p)
            files = [p for p in files if not (p.suffix.lower() == ".png" and len(stems[p.with_suffix("")]) > 1)]
        records = [_file_record(p, p.relative_to(root).as_posix()) for p in files]
    elif config.kind == "list":
        records = []
        for line in root.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line) if Path(line).is_absolute() else root.parent / line
                records.append(_file_record(path, line))
    else:
        tars = sorted(root.rglob("*.tar")) if root.is_dir() else [root]
        records = [r for tar in tars for r in _tar_records(tar, tar.name)]
    if config.annotated:
        for record in records:
            record.annotation = str(Path(record.path).with_suffix(".json"))
    for order, record in enumerate(records):
        record.order = order
    return records


def assign_partitions(records: list[InputRecord], shard_size: int) -> list[InputRecord]:
    """Sort by key, mark repeated keys as duplicates, and number partitions of ``shard_size`` inputs."""
    records = sorted(records, key=lambda r: (r.key, r.order))
    seen: set[str] = set()
    for index, record in enumerate(records):
        record.duplicate = record.key in seen
        seen.add(record.key)
        record.partition = index // shard_size
    return records


def read_bytes(record: InputRecord) -> bytes:
    with open(record.path, "rb") as handle:
        if record.offset < 0:
            return handle.read()
        handle.seek(record.offset)
        return handle.read(record.size)


def _image_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def _file_record(path: Path, relative: str) -> InputRecord:
    return InputRecord(key=make_key(relative), source=relative, path=str(path))


def _tar_records(tar_path: Path, name: str) -> list[InputRecord]:
    """One record per sample (WebDataset: consecutive members sharing a key) that has an image member;
    a ``txt`` member is its caption. A key repeated later in the tar yields a second (duplicate) record."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo], list[str]]] = []
    with tarfile.open(tar_path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            directory, _, base = info.name.rpartition("/")
            stem, dot, extension = base.partition(".")
            if not dot:
                continue
            sample_key = f"{directory}/{stem}" if directory else stem
            if not groups or groups[-1][0] != sample_key:
                groups.append((sample_key, {}, [""]))
            groups[-1][1][extension.lower()] = info
            if extension.lower() == "txt":
                groups[-1][2][0] = tar.extractfile(info).read().decode("utf-8", "replace").strip()
    records = []
    for sample_key, members, caption in groups:
        image = next((members[e] for e in IMAGE_MEMBER_EXTENSIONS if e in members), None)
        if image is not None:
            records.append(InputRecord(
                key=make_key(f"{name}/{sample_key}"), source=f"{name}:{image.name}", path=str(tar_path),
                offset=image.offset_data, size=image.size, caption=caption[0],
            ))
    return records

"""List a job's inputs as a stream of rows with stable keys, account for everything else the listing sees,
cut the stream into partitions, and read an input's bytes.

Every folder entry, list line or tar sample the listing sees ends as exactly one of:
- an input (:class:`InputRecord`), which the job writes or rejects; a few are rejected by the listing
  itself (``missing_file`` for a listed path that does not exist, ``damaged_tar`` for the unreadable rest
  of a truncated or corrupt tar, ``duplicate_key`` for a second input with a key already used);
- a skip (:class:`Skip`) with a reason: ``dangling_symlink``, ``symlink_loop``, ``not_a_file`` (a
  directory named like an image, a FIFO, a socket), ``unreadable`` (a folder that cannot be listed),
  ``unsupported_extension``, ``annotation_file`` (the JSON/map beside an annotated image),
  ``duplicate`` (the same file spelled or linked twice), ``no_image_member`` (a tar sample without an image).

Keys are WebDataset-safe (ASCII, no dots): a readable slug plus 80 bits of sha256 of the input's path
relative to the input root (for a tar sample: the tar's relative path, then the sample's key in the tar).
They are stable across runs and machines and do not collide in practice (2^-40 for a billion inputs).

The listing is a stream in a deterministic order (folders: names sorted within a folder, depth first; a
list: line order; tars: tar order, then member order), so the driver never holds it whole. Input number
i of the stream belongs to partition i // shard_size; partition k becomes shard k, its samples sorted by
key. State kept for the whole listing: one :class:`DigestTable` entry per input (duplicate keys, and
duplicate lines of a list; 46 bytes or less per input) and, for folders, the identity of each folder and
of each file that could be reached twice (a link, or a file with several hard links).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import re
import stat
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import InputConfig
from pipeline.storage import Location, UnsupportedStorage

__all__ = ["InputRecord", "Skip", "Listing", "DigestTable", "make_key", "iter_listing", "list_inputs",
           "iter_partitions", "assign_partitions", "read_bytes"]

IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ANNOTATION_EXTENSIONS = (".json", ".npy", ".png")  # beside an annotated image: segments, map (npy or png)


@dataclass
class InputRecord:
    key: str
    source: str  # what a human recognises: relative path, or "shards/a.tar:member"
    path: str  # the file to read (an image, or the tar holding it)
    offset: int = -1  # byte range inside a tar, -1 for a plain file
    size: int = -1
    caption: str = ""  # a caption the input brings (shards' txt member)
    annotation: str = ""  # annotated inputs: the JSON file; the segmentation map sits beside it
    partition: int = -1
    reason: str = ""  # set when the listing already rejects the input (missing_file, damaged_tar, ...)
    detail: str = ""


@dataclass(frozen=True)
class Skip:
    source: str
    reason: str
    detail: str = ""

    def row(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


@dataclass
class Listing:
    inputs: list[InputRecord]
    skipped: list[Skip] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return len(self.inputs) + len(self.skipped)


class DigestTable:
    """64-bit digests, each with one integer, in two numpy arrays (open addressing, linear probing): 16
    bytes a slot, between 35 % and 70 % of the slots used, so 23 to 46 bytes per entry, where a Python
    dict of the strings takes well over 100."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._digests = np.zeros(capacity, np.uint64)  # 0 marks an empty slot
        self._values = np.zeros(capacity, np.int64)
        self._used = 0

    def __len__(self) -> int:
        return self._used

    @staticmethod
    def digest(text: str) -> int:
        value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
        return value or 1

    def setdefault(self, text: str, value: int) -> int | None:
        """The value stored earlier for ``text``, or None after storing ``value`` for it."""
        digest = self.digest(text)
        slot = self._slot(digest)
        if self._digests[slot]:
            return int(self._values[slot])
        self._digests[slot], self._values[slot] = digest, value
        self._used += 1
        if 10 * self._used > 7 * len(self._digests):
            self._grow()
        return None

    def _slot(self, digest: int) -> int:
        mask = len(self._digests) - 1
        slot = digest & mask
        while self._digests[slot] and int(self._digests[slot]) != digest:
            slot = (slot + 1) & mask
        return slot

    def _grow(self) -> None:
        digests, values = self._digests, self._values
        self._digests = np.zeros(2 * len(digests), np.uint64)
        self._values = np.zeros(2 * len(digests), np.int64)
        used = np.flatnonzero(digests)
        for start in range(0, len(used), 1 << 16):  # in chunks: no Python list of the whole table at once
            chunk = used[start : start + (1 << 16)]
            for digest, value in zip(digests[chunk].tolist(), values[chunk].tolist()):
                slot = self._slot(digest)
                self._digests[slot], self._values[slot] = digest, value


def make_key(relative: str) -> str:
    """``"photos/Été 1.jpg"`` -> ``"photos_ete_1_jpg_<20 hex of sha256(relative)>"``."""
    ascii_text = unicodedata.normalize("NFKD", relative).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[-60:].strip("_") or "input"
    digest = hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return f"{slug}_{digest}"


def iter_listing(config: InputConfig) -> Iterator[InputRecord | Skip]:
    """Everything under ``config.path``, inputs and skips, in listing order, one at a time."""
    root = Location(config.path, config.storage_options)
    if config.annotated and not root.is_local:
        raise UnsupportedStorage(f"input.path {root}: annotated inputs are imported from local files (the "
                                 "annotation beside each image); copy them to a local folder first")
    if not root.exists():
        raise FileNotFoundError(f"input.path {root} does not exist")
    extensions = tuple(e.lower() for e in config.extensions)
    if config.kind == "list":
        yield from _list_file(root, extensions, config.annotated)  # keys already unique (duplicate lines)
        return
    if config.kind == "folder":
        entries = _walk(root, extensions + ANNOTATION_EXTENSIONS if config.annotated else extensions)
        items = _annotated_images(entries) if config.annotated else _flatten(entries)
        records: Iterator[InputRecord | Skip] = (
            item if isinstance(item, Skip) else _file_record(*item, annotated=config.annotated) for item in items)
    else:
        tars = _flatten(_walk(root, (".tar",))) if root.is_dir() else iter([(root.url, root.name)])
        records = (r for tar in tars
                   for r in ([tar] if isinstance(tar, Skip) else _tar_records(Location(tar[0], root.options), tar[1])))
    keys = DigestTable()
    position = 0
    for item in records:
        if isinstance(item, InputRecord):
            # a tar repeating a sample key is caught (and named) in _tar_records; this catches a hash collision
            earlier = keys.setdefault(item.key, position)
            if earlier is not None and not item.reason:
                item.reason, item.detail = "duplicate_key", f"key {item.key} already used by input {earlier} of the listing"
            position += 1
        yield item


def list_inputs(config: InputConfig) -> Listing:
    """The whole listing in memory (tests, small jobs): inputs in listing order and skips."""
    listing = Listing([], [])
    for item in iter_listing(config):
        (listing.skipped if isinstance(item, Skip) else listing.inputs).append(item)
    return listing


def iter_partitions(items: Iterable[InputRecord | Skip], shard_size: int,
                    on_skip: Callable[[Skip], None] = lambda skip: None) -> Iterator[list[InputRecord]]:
    """Cut the listing into partitions of ``shard_size`` inputs (input i -> partition i // shard_size), each
    sorted by key; skips go to ``on_skip`` as they come. Holds one partition at a time."""
    members: list[InputRecord] = []
    partition = 0
    for item in items:
        if isinstance(item, Skip):
            on_skip(item)
            continue
        item.partition = partition
        members.append(item)
        if len(members) == shard_size:
            yield sorted(members, key=lambda r: r.key)  # stable: of equal keys, the first listed stays first
            members, partition = [], partition + 1
    if members:
        yield sorted(members, key=lambda r: r.key)


def assign_partitions(records: Iterable[InputRecord], shard_size: int) -> list[InputRecord]:
    """All inputs numbered into partitions, in partition then key order (see :func:`iter_partitions`)."""
    return [r for members in iter_partitions(records, shard_size) for r in members]


class NotAFileError(OSError):
    """A path that exists but is not a regular file (a directory, a FIFO): never opened for reading."""


def read_bytes(record: InputRecord, storage_options: dict[str, Any] | None = None) -> bytes:
    """The input's bytes: its file, or its member's byte range inside a tar (one ranged request on an
    object store). ``storage_options``: the job's ``input.storage_options``."""
    location = Location(record.path, storage_options or {})
    # stat first: opening a FIFO would block the worker forever (object stores hold only objects)
    if location.is_local and not stat.S_ISREG(os.stat(location.path).st_mode):
        raise NotAFileError(f"{record.path} is not a regular file")
    if record.offset < 0:
        return location.read_bytes()
    return location.read_bytes(record.offset, record.offset + record.size)


# -- folders and lists -----------------------------------------------------------------------------
def _classify(path: str, relative: str) -> os.stat_result | Skip:
    """stat ``path`` following links; a skip for a broken link or an unreadable entry."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return Skip(relative, "dangling_symlink", f"-> {os.readlink(path)}")
        raise
    except OSError as exc:
        reason = "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
        return Skip(relative, reason, f"{type(exc).__name__}: {exc.strerror or exc}")


FolderEntries = Iterator[list[tuple[str, str] | Skip]]


def _walk(root: Location, extensions: tuple[str, ...]) -> FolderEntries:
    return _walk_folder(Path(root.path), extensions) if root.is_local else _walk_objects(root, extensions)


def _walk_folder(root: Path, extensions: tuple[str, ...]) -> FolderEntries:
    """Per folder, its regular files with one of ``extensions`` as (path, path relative to root) and its
    other entries as skips, in name order. Links are followed; each folder and each file is listed once:
    a link to a file inside the root is a ``duplicate`` (the file is listed under its own name), and only
    files that can be reached twice (links to outside the root, hard links) are remembered."""
    real_root = os.path.realpath(root)
    root_stat = os.stat(root)
    folders = {(root_stat.st_dev, root_stat.st_ino): ""}
    reached_twice: dict[tuple[int, int], str] = {}  # identity -> relative path, for links and hard links
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield [Skip(prefix or ".", "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")]
            continue
        out: list[tuple[str, str] | Skip] = []
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            info = _classify(entry.path, relative)
            if isinstance(info, Skip):
                out.append(info)
                continue
            identity = (info.st_dev, info.st_ino)
            if stat.S_ISDIR(info.st_mode):
                if Path(entry.name).suffix.lower() in extensions:
                    out.append(Skip(relative, "not_a_file", "a folder named like an image (its contents are listed)"))
                if identity in folders:
                    earlier = folders[identity]
                    inside = not earlier or relative.startswith(earlier + "/")
                    out.append(Skip(relative, "symlink_loop" if inside else "duplicate",
                                    f"folder already listed as {earlier or '.'!r}"))
                    continue
                folders[identity] = relative
                stack.append((entry.path, relative + "/"))
            elif not stat.S_ISREG(info.st_mode):
                out.append(Skip(relative, "not_a_file", f"file type {stat.filemode(info.st_mode)[0]!r}"))
            elif Path(entry.name).suffix.lower() not in extensions:
                out.append(Skip(relative, "unsupported_extension", Path(entry.name).suffix or "no extension"))
            elif entry.is_symlink() and (target := _inside(os.path.realpath(entry.path), real_root, extensions)):
                out.append(Skip(relative, "duplicate", f"same file as {target!r}"))
            elif entry.is_symlink() or info.st_nlink > 1:
                if identity in reached_twice:
                    out.append(Skip(relative, "duplicate", f"same file as {reached_twice[identity]!r}"))
                else:
                    reached_twice[identity] = relative
                    out.append((entry.path, relative))
            else:
                out.append((entry.path, relative))
        yield out


def _walk_objects(root: Location, extensions: tuple[str, ...]) -> FolderEntries:
    """:func:`_walk_folder` for an object store, in the same order (so a folder copied there lists, keys and
    partitions the same): per folder (prefix), its objects with one of ``extensions`` as (URL, path
    relative to root), the others as ``unsupported_extension``; one listing request per folder and page."""
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        out: list[tuple[str, str] | Skip] = []
        for child, is_folder in folder.entries():
            relative = f"{prefix}{child.name}"
            suffix = posixpath.splitext(child.name)[1]
            if is_folder:
                if suffix.lower() in extensions:
                    out.append(Skip(relative, "not_a_file", "a folder named like an image (its contents are listed)"))
                stack.append((child, relative + "/"))
            elif suffix.lower() not in extensions:
                out.append(Skip(relative, "unsupported_extension", suffix or "no extension"))
            else:
                out.append((child.url, relative))
        yield out


def _inside(real: str, real_root: str, extensions: tuple[str, ...]) -> str:
    """``real`` relative to ``real_root`` if the walk lists it under that name (inside, listed extension)."""
    relative = os.path.relpath(real, real_root)
    listed = not relative.startswith(os.pardir) and Path(real).suffix.lower() in extensions
    return relative if listed else ""


def _flatten(entries: FolderEntries) -> Iterator[tuple[str, str] | Skip]:
    return (item for folder in entries for item in folder)


def _annotated_images(entries: FolderEntries) -> Iterator[tuple[str, str] | Skip]:
    """Annotated folders: ``name.json``/``.npy``/``.png`` beside an image ``name.<ext>`` are its annotation
    (a ``.png`` is an input only when no other image has its stem). A stem's files share a folder."""
    for folder in entries:
        by_stem: dict[str, list[tuple[str, str]]] = {}
        for item in folder:
            if isinstance(item, Skip):
                yield item
            else:
                by_stem.setdefault(os.path.splitext(item[0])[0], []).append(item)
        for group in by_stem.values():
            suffixes = {os.path.splitext(p)[1].lower() for p, _ in group}
            image_suffixes = suffixes - {".json", ".npy", ".png"} or (suffixes & {".png"})
            for path, relative in group:
                suffix = os.path.splitext(path)[1]
                if suffix.lower() in image_suffixes:
                    yield path, relative
                elif image_suffixes:
                    yield Skip(relative, "annotation_file", "segments or segmentation map of an annotated image")
                else:
                    yield Skip(relative, "unsupported_extension", f"{suffix} without an image beside it")


def _file_record(path: str, relative: str, annotated: bool = False) -> InputRecord:
    return InputRecord(key=make_key(relative), source=relative, path=path,
                       annotation=os.path.splitext(path)[0] + ".json" if annotated else "")


def _list_file(list_file: Location, extensions: tuple[str, ...], annotated: bool) -> Iterator[InputRecord | Skip]:
    """One input per line; paths are normalised (``a/x.jpg``, ``./a/x.jpg`` and its absolute path are one
    input, found by the digest of its key: a later line with the same key is a ``duplicate``) and keyed
    relative to the list's folder. A list on an object store names objects relative to its own prefix
    (or as full URLs); each line costs one metadata request there."""
    base = list_file.parent
    first_line = DigestTable()
    with list_file.open() as raw_lines, io.TextIOWrapper(raw_lines, "utf-8", "surrogateescape") as lines:
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            source = f"{list_file.name}:{number}:{line}"
            target = base.resolve(line)
            path = target.url
            relative = posixpath.relpath(target.path, base.path) if target.protocol == base.protocol else path
            if os.path.splitext(path)[1].lower() not in extensions:
                yield Skip(source, "unsupported_extension", os.path.splitext(path)[1] or "no extension")
                continue
            record = _file_record(path, relative, annotated)
            if (earlier := first_line.setdefault(record.key, number)) is not None:
                yield Skip(source, "duplicate", f"same file as line {earlier}")
                continue
            try:
                info = _classify(path, source) if target.is_local else target.kind()
            except FileNotFoundError:
                record.reason, record.detail = "missing_file", f"{path} does not exist (list line {number})"
                yield record
                continue
            if isinstance(info, Skip):
                yield info
            elif isinstance(info, str) and info != "file":
                yield Skip(source, "not_a_file", f"an object-store {info}")
            elif isinstance(info, os.stat_result) and not stat.S_ISREG(info.st_mode):
                yield Skip(source, "not_a_file", f"file type {stat.filemode(info.st_mode)[0]!r}")
            else:
                yield record


# -- tars ------------------------------------------------------------------------------------------
def _tar_records(tar: Location, relative: str) -> list[InputRecord | Skip]:
    """One record per sample (WebDataset: consecutive members sharing a key) that has an image member;
    a ``txt`` member is its caption; a sample key the tar repeats is a ``duplicate_key``. A damaged tar
    yields the samples that can be read in full plus one ``damaged_tar`` record naming the tar and what
    was lost."""
    size = tar.size()
    out: list[InputRecord | Skip] = []
    groups: list[tuple[str, dict[str, tarfile.TarInfo], list[str]]] = []
    lost: list[str] = []
    problem = ""
    end = 0
    try:
        with tar.open() as stream, tarfile.open(fileobj=stream, mode="r:") as archive:
            for info in archive:
                end = info.offset_data + info.size
                if end > size:
                    lost.append(info.name)
                    problem = f"member {info.name!r} is cut off ({size - info.offset_data} of {info.size} bytes)"
                    break
                if not info.isfile():
                    if not info.isdir():
                        out.append(Skip(f"{relative}:{info.name}", "not_a_file", "a link or special member"))
                    continue
                directory, _, base = info.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                sample_key = f"{directory}/{stem}" if directory else stem
                if not groups or groups[-1][0] != sample_key:
                    groups.append((sample_key, {}, [""]))
                groups[-1][1][extension.lower() if dot else ""] = info
                if extension.lower() == "txt":
                    groups[-1][2][0] = archive.extractfile(info).read().decode("utf-8", "replace").strip()
            if not problem:
                problem = _tail_problem(tar, archive.offset, size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    first: dict[str, str] = {}  # sample key -> source, within this tar
    read = 0
    for sample_key, members, caption in groups:
        image = next((members[e] for e in IMAGE_MEMBER_EXTENSIONS if e in members), None)
        if image is None:
            out.append(Skip(f"{relative}:{sample_key}", "no_image_member", f"members: {sorted(members)}"))
            continue
        record = InputRecord(key=make_key(f"{relative}/{sample_key}"), source=f"{relative}:{image.name}",
                             path=tar.url, offset=image.offset_data, size=image.size, caption=caption[0])
        if sample_key in first:
            record.reason, record.detail = "duplicate_key", f"key {record.key} already used by {first[sample_key]}"
        first.setdefault(sample_key, record.source)
        out.append(record)
        read += 1
    if problem:
        out.append(InputRecord(key=make_key(relative), source=relative, path=tar.url, reason="damaged_tar",
                               detail=f"{relative}: {problem}; {read} sample(s) read in full up to byte {end}; "
                                      f"the rest of the {size}-byte tar is lost"
                                      + (f" (first lost member {lost[0]!r})" if lost else "")))
    return out


def _tail_problem(tar: Location, offset: int, size: int) -> str:
    """After the last member a tar holds only zero blocks; anything else is data tarfile could not read."""
    with tar.open() as handle:
        handle.seek(offset)
        position = offset
        while chunk := handle.read(1 << 20):
            stripped = chunk.lstrip(b"\0")
            if stripped:
                return f"unreadable data at byte {position + len(chunk) - len(stripped)} (a corrupt member header)"
            position += len(chunk)
    if size - offset < 1024:
        return f"no end-of-archive marker after byte {offset} (the tar was cut; later members may be lost)"
    return ""

"""List a job's inputs as rows with stable keys, account for everything else the listing sees, and read
an input's bytes.

Every folder entry, list line or tar sample the listing sees ends as exactly one of:
- an input (:class:`InputRecord`), which the job writes or rejects; a few are rejected by the listing
  itself (``missing_file`` for a listed path that does not exist, ``damaged_tar`` for the unreadable rest
  of a truncated or corrupt tar);
- a skip (:class:`Skip`) with a reason: ``dangling_symlink``, ``symlink_loop``, ``not_a_file`` (a
  directory named like an image, a FIFO, a socket), ``unreadable`` (a folder that cannot be listed),
  ``unsupported_extension``, ``annotation_file`` (the JSON/map beside an annotated image),
  ``duplicate`` (the same file spelled or linked twice), ``no_image_member`` (a tar sample without an image).

Keys are WebDataset-safe (ASCII, no dots): a readable slug plus 80 bits of sha256 of the input's path
relative to the input root (for a tar sample: the tar's relative path, then the sample's key in the tar).
They are stable across runs and machines and do not collide in practice (2^-40 for a billion inputs).
Inputs are sorted by key and cut into partitions of ``shard_size``; partition k becomes shard k.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tarfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import InputConfig

__all__ = ["InputRecord", "Skip", "Listing", "make_key", "list_inputs", "assign_partitions", "read_bytes"]

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
    order: int = field(default=0, repr=False)  # position in the listing, breaks ties between equal keys


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
    skipped: list[Skip]

    @property
    def seen(self) -> int:
        return len(self.inputs) + len(self.skipped)


def make_key(relative: str) -> str:
    """``"photos/Été 1.jpg"`` -> ``"photos_ete_1_jpg_<20 hex of sha256(relative)>"``."""
    ascii_text = unicodedata.normalize("NFKD", relative).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[-60:].strip("_") or "input"
    digest = hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return f"{slug}_{digest}"


def list_inputs(config: InputConfig) -> Listing:
    """Everything under ``config.path``: inputs in listing order and skips with their reasons."""
    root = Path(config.path)
    if not root.exists():
        raise FileNotFoundError(f"input.path {root} does not exist")
    extensions = tuple(e.lower() for e in config.extensions)
    skipped: list[Skip] = []
    if config.kind == "folder":
        if config.annotated:
            files = _split_annotation_files(_walk_folder(root, extensions + ANNOTATION_EXTENSIONS, skipped), skipped)
        else:
            files = _walk_folder(root, extensions, skipped)
        records = [_file_record(path, relative) for path, relative in files]
    elif config.kind == "list":
        records = _list_file(root, extensions, skipped)
    else:
        tars = _walk_folder(root, (".tar",), skipped) if root.is_dir() else [(root, root.name)]
        records = [r for tar, relative in tars for r in _tar_records(tar, relative, skipped)]
    if config.annotated:
        for record in records:
            record.annotation = str(Path(record.path).with_suffix(".json"))
    for order, record in enumerate(records):
        record.order = order
    return Listing(records, skipped)


def assign_partitions(records: list[InputRecord], shard_size: int) -> list[InputRecord]:
    """Sort by key, reject a key that two different inputs share (``duplicate_key``: a hash collision or a
    tar holding a sample key twice), and number partitions of ``shard_size`` inputs."""
    records = sorted(records, key=lambda r: (r.key, r.order))
    first: dict[str, str] = {}
    for index, record in enumerate(records):
        if record.key in first and not record.reason:
            record.reason, record.detail = "duplicate_key", f"key {record.key} already used by {first[record.key]}"
        first.setdefault(record.key, record.source)
        record.partition = index // shard_size
    return records


class NotAFileError(OSError):
    """A path that exists but is not a regular file (a directory, a FIFO): never opened for reading."""


def read_bytes(record: InputRecord) -> bytes:
    # stat first: opening a FIFO would block the worker forever
    if not stat.S_ISREG(os.stat(record.path).st_mode):
        raise NotAFileError(f"{record.path} is not a regular file")
    with open(record.path, "rb") as handle:
        if record.offset < 0:
            return handle.read()
        handle.seek(record.offset)
        return handle.read(record.size)


# -- folders and lists -----------------------------------------------------------------------------
def _classify(path: str, relative: str, skipped: list[Skip]) -> os.stat_result | None:
    """stat ``path`` following links; None (and a skip recorded) for a broken link or an unreadable entry."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            skipped.append(Skip(relative, "dangling_symlink", f"-> {os.readlink(path)}"))
            return None
        raise
    except OSError as exc:
        reason = "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
        skipped.append(Skip(relative, reason, f"{type(exc).__name__}: {exc.strerror or exc}"))
        return None


def _walk_folder(root: Path, extensions: tuple[str, ...], skipped: list[Skip]) -> list[tuple[Path, str]]:
    """Regular files with one of ``extensions`` under ``root`` (links followed, each file and folder once),
    as (path, path relative to root); everything else becomes a skip."""
    root_stat = os.stat(root)
    folders = {(root_stat.st_dev, root_stat.st_ino): ""}
    files: dict[tuple[int, int], int] = {}  # identity -> index in out
    out: list[tuple[Path, str]] = []
    stack = [(str(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.append(Skip(prefix or ".", "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}"))
            continue
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            info = _classify(entry.path, relative, skipped)
            if info is None:
                continue
            identity = (info.st_dev, info.st_ino)
            if stat.S_ISDIR(info.st_mode):
                if Path(entry.name).suffix.lower() in extensions:
                    skipped.append(Skip(relative, "not_a_file", "a folder named like an image (its contents are listed)"))
                if identity in folders:
                    earlier = folders[identity]
                    inside = not earlier or relative.startswith(earlier + "/")
                    skipped.append(Skip(relative, "symlink_loop" if inside else "duplicate",
                                        f"folder already listed as {earlier or '.'!r}"))
                    continue
                folders[identity] = relative
                stack.append((entry.path, relative + "/"))
            elif not stat.S_ISREG(info.st_mode):
                skipped.append(Skip(relative, "not_a_file", f"file type {stat.filemode(info.st_mode)[0]!r}"))
            elif Path(entry.name).suffix.lower() not in extensions:
                skipped.append(Skip(relative, "unsupported_extension", Path(entry.name).suffix or "no extension"))
            elif identity in files:
                index = files[identity]
                dropped = relative
                if out[index][0].is_symlink() and not entry.is_symlink():  # keep the file's own name, skip the link
                    dropped = out[index][1]
                    out[index] = (Path(entry.path), relative)
                skipped.append(Skip(dropped, "duplicate", f"same file as {out[index][1]!r}"))
            else:
                files[identity] = len(out)
                out.append((Path(entry.path), relative))
    return out


def _split_annotation_files(files: list[tuple[Path, str]], skipped: list[Skip]) -> list[tuple[Path, str]]:
    """Annotated folders: ``name.json``/``.npy``/``.png`` beside an image ``name.<ext>`` are its annotation
    (a ``.png`` is an input only when no other image has its stem)."""
    by_stem: dict[Path, list[tuple[Path, str]]] = {}
    for path, relative in files:
        by_stem.setdefault(path.with_suffix(""), []).append((path, relative))
    images = []
    for group in by_stem.values():
        suffixes = {p.suffix.lower() for p, _ in group}
        image_suffixes = suffixes - {".json", ".npy", ".png"} or (suffixes & {".png"})
        for path, relative in group:
            if path.suffix.lower() in image_suffixes:
                images.append((path, relative))
            elif image_suffixes:
                skipped.append(Skip(relative, "annotation_file", "segments or segmentation map of an annotated image"))
            else:
                skipped.append(Skip(relative, "unsupported_extension", f"{path.suffix} without an image beside it"))
    return images


def _file_record(path: Path, relative: str) -> InputRecord:
    return InputRecord(key=make_key(relative), source=relative, path=str(path))


def _list_file(list_path: Path, extensions: tuple[str, ...], skipped: list[Skip]) -> list[InputRecord]:
    """One input per line; paths are normalised (``a/x.jpg``, ``./a/x.jpg`` and its absolute path are one
    input) and keyed relative to the list's folder."""
    base = os.path.abspath(list_path.parent)
    records: list[InputRecord] = []
    first: dict[str, str] = {}
    for number, raw in enumerate(list_path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        source = f"{list_path.name}:{number}:{line}"
        path = os.path.normpath(os.path.join(base, line))
        relative = os.path.relpath(path, base)
        if os.path.splitext(path)[1].lower() not in extensions:
            skipped.append(Skip(source, "unsupported_extension", os.path.splitext(path)[1] or "no extension"))
            continue
        if path in first:
            skipped.append(Skip(source, "duplicate", f"same file as line {first[path]}"))
            continue
        first[path] = f"{number}:{line}"
        record = InputRecord(key=make_key(relative), source=relative, path=path)
        try:
            info = _classify(path, source, skipped)
        except FileNotFoundError:
            record.reason, record.detail = "missing_file", f"{path} does not exist (list line {number})"
            records.append(record)
            continue
        if info is None:
            continue
        if not stat.S_ISREG(info.st_mode):
            skipped.append(Skip(source, "not_a_file", f"file type {stat.filemode(info.st_mode)[0]!r}"))
            continue
        records.append(record)
    return records


# -- tars ------------------------------------------------------------------------------------------
def _tar_records(tar_path: Path, relative: str, skipped: list[Skip]) -> list[InputRecord]:
    """One record per sample (WebDataset: consecutive members sharing a key) that has an image member;
    a ``txt`` member is its caption. A damaged tar yields the samples that can be read in full plus one
    ``damaged_tar`` record naming the tar and what was lost."""
    size = os.path.getsize(tar_path)
    groups: list[tuple[str, dict[str, tarfile.TarInfo], list[str]]] = []
    lost: list[str] = []
    problem = ""
    end = 0
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for info in tar:
                end = info.offset_data + info.size
                if end > size:
                    lost.append(info.name)
                    problem = f"member {info.name!r} is cut off ({size - info.offset_data} of {info.size} bytes)"
                    break
                if not info.isfile():
                    if not info.isdir():
                        skipped.append(Skip(f"{relative}:{info.name}", "not_a_file", "a link or special member"))
                    continue
                directory, _, base = info.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                sample_key = f"{directory}/{stem}" if directory else stem
                if not groups or groups[-1][0] != sample_key:
                    groups.append((sample_key, {}, [""]))
                groups[-1][1][extension.lower() if dot else ""] = info
                if extension.lower() == "txt":
                    groups[-1][2][0] = tar.extractfile(info).read().decode("utf-8", "replace").strip()
            if not problem:
                problem = _tail_problem(tar_path, tar.offset, size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    records = []
    for sample_key, members, caption in groups:
        image = next((members[e] for e in IMAGE_MEMBER_EXTENSIONS if e in members), None)
        source = f"{relative}:{sample_key}"
        if image is None:
            skipped.append(Skip(source, "no_image_member", f"members: {sorted(members)}"))
            continue
        records.append(InputRecord(
            key=make_key(f"{relative}/{sample_key}"), source=f"{relative}:{image.name}", path=str(tar_path),
            offset=image.offset_data, size=image.size, caption=caption[0],
        ))
    if problem:
        read = f"{len(records)} sample(s) read in full up to byte {end}"
        records.append(InputRecord(key=make_key(relative), source=relative, path=str(tar_path),
                                   reason="damaged_tar",
                                   detail=f"{relative}: {problem}; {read}; the rest of the {size}-byte tar is lost"
                                          + (f" (first lost member {lost[0]!r})" if lost else "")))
    return records


def _tail_problem(tar_path: Path, offset: int, size: int) -> str:
    """After the last member a tar holds only zero blocks; anything else is data tarfile could not read."""
    with open(tar_path, "rb") as handle:
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

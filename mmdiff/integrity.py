"""Integrity of saved artifacts (adapters, registered models): size and sha256 per file, checked at load.

A folder's ``checksums.json`` lists ``{"files": {name: {"size": n, "sha256": hex}}}``. Loading checks
every listed file before reading any, so a flipped byte or a truncated file is an error that names the
file, never weights that load silently. JSON is read through :func:`read_json`, whose errors name the
file too. No torch import (config code uses it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_NAME", "IntegrityError", "file_sha256", "folder_sha256", "read_json", "verify_artifacts", "verify_files",
           "verify_manifest", "write_manifest"]

MANIFEST_NAME = "checksums.json"
logger = logging.getLogger(__name__)


class IntegrityError(ValueError):
    """A file that is missing, truncated or not what its manifest recorded."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path) -> Any:
    """The JSON document at ``path``; a missing, unreadable or truncated file is an error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path}: not a readable JSON document (truncated or corrupt?): {exc}") from None


def write_manifest(folder: str | Path, names: Iterable[str]) -> Path:
    """Record size and sha256 of ``names`` (paths relative to ``folder``) in ``folder/checksums.json``."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
             for name in sorted(names)}
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({"files": files}, indent=2, sort_keys=True), encoding="utf-8")
    return path


def verify_files(paths: Mapping[str, str | Path], files: Mapping[str, Any], manifest: str | Path) -> None:
    """Check each recorded ``files[name]`` against the file at ``paths[name]``; errors name the file."""
    for name, record in files.items():
        if name not in paths:
            raise IntegrityError(f"{manifest}: lists {name!r}, which this artifact does not have")
        path = Path(paths[name])
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in {manifest})")
        try:
            size, sha256 = int(record["size"]), str(record["sha256"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{manifest}: entry {name!r} has no size and sha256") from None
        if path.stat().st_size != size:
            raise IntegrityError(f"{path}: {path.stat().st_size} bytes, {manifest} records {size} "
                                 "(truncated or replaced)")
        if file_sha256(path) != sha256:
            raise IntegrityError(f"{path}: sha256 does not match the one {manifest} records (the file is "
                                 "corrupt or was modified)")


def verify_artifacts(paths: Mapping[str, str | Path], manifest: str | Path | None) -> bool:
    """Check the files ``paths`` names (artifact name -> local file) against ``manifest``, a
    ``checksums.json`` listing them by the same names; without a manifest (an older artifact) warn."""
    if manifest is None:
        logger.warning("no %s: %s cannot be verified (written by an older version?)", MANIFEST_NAME,
                       ", ".join(str(p) for p in paths.values()))
        return False
    files = read_json(manifest).get("files")
    if not isinstance(files, dict) or sorted(set(paths) - set(files)):
        raise IntegrityError(f"{manifest}: does not list {sorted(set(paths) - set(files or {}))}")
    verify_files(paths, {name: files[name] for name in paths}, manifest)
    return True


def verify_manifest(folder: str | Path, required: Iterable[str]) -> bool:
    """Check ``folder``'s files against its manifest, which must list every name in ``required``.

    A folder without a manifest (written before manifests existed) is loaded with a warning; returns
    whether it was verified.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        logger.warning("%s: no %s, so its files cannot be verified (written by an older version?)",
                       folder, MANIFEST_NAME)
        return False
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise IntegrityError(f"{path}: no 'files' mapping")
    unlisted = sorted(set(required) - set(files))
    if unlisted:
        raise IntegrityError(f"{path}: does not list {unlisted}")
    verify_files({name: folder / name for name in files}, files, path)
    return True


def folder_sha256(folder: str | Path) -> str:
    """One sha256 over every file under ``folder`` (relative path and content), hidden entries skipped:
    the content hash of a model folder, whatever its layout. Cached per process by path, size and mtime."""
    folder = Path(folder).resolve()
    listing = tuple(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                           for p in folder.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)))
    return _listing_sha256(str(folder), listing)


@functools.lru_cache(maxsize=32)
def _listing_sha256(folder: str, listing: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in listing:
        digest.update(f"{name}\0{file_sha256(Path(folder) / name)}\n".encode())
    return digest.hexdigest()

"""Where the pipeline's files live: a local folder or an fsspec URL, behind one small set of primitives.

A :class:`Location` is a path or URL plus the fsspec options its filesystem is built with, e.g.
``Location("s3://bucket/out", {"endpoint_url": "http://10.0.0.5:9000", "key": ..., "secret": ...})``.
It is plain data: Ray workers receive it pickled and rebuild the filesystem from it (fsspec keeps one
instance per process and options, so that costs once per worker). Without options the filesystem finds
its credentials itself (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3``,
``~/.aws``).

- Reading works for any protocol whose fsspec package is installed (``s3://`` with s3fs, ``gs://`` with
  gcsfs, ...); local paths and ``file://`` URLs are plain files.
- Writing is whole or nothing: a local file is written beside its name and renamed over it; an object is
  written by one PUT, or by one multipart upload that S3 publishes only when it completes. A reader sees
  the previous object, the new one, or none; never a part. Outputs therefore need a local path or
  ``s3://``: other filesystems (sftp, hdfs, ...) may show a file while it is being written, and the
  output lease below is implemented for these two only.
- The output lease needs an exclusive create and a compare-and-swap: ``O_EXCL``-like hard links and a
  lock on the folder locally; S3's conditional writes (``If-None-Match: *``, ``If-Match: <etag>``)
  on object stores. A server that ignores those headers is detected and refused
  (:meth:`Location.check_exclusive_create`).
- A write that fails (a full disk, a read-only or unreachable output) raises :class:`OutputUnwritable`
  naming the file, and leaves no temporary file behind: it is a failure of the job, never of an input.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import fsspec

__all__ = ["Location", "UnsupportedStorage", "OutputUnwritable", "writing", "TEMPORARY_PATTERN"]

LOCAL_PROTOCOLS = ("file", "local")
S3_PROTOCOLS = ("s3", "s3a")
# S3 answers a conditional request that lost a race with one of these codes.
_S3_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")
# The names of the temporary files written beside their final name (:meth:`Location.staging_file`).
TEMPORARY_PATTERN = ".*.tmp-*"


class UnsupportedStorage(ValueError):
    """The URL's protocol cannot do what the job asks of it there (the message says what and why)."""


class OutputUnwritable(OSError):
    """Writing a file of the output failed for a reason of the environment, not of the data: no space left,
    a read-only, unreachable or refusing filesystem (the message names the file and the cause)."""


@contextmanager
def writing(location: "Location", what: str = "write") -> Iterator[None]:
    """Raise any OSError of the block as :class:`OutputUnwritable` naming ``location``."""
    try:
        yield
    except OutputUnwritable:
        raise
    except OSError as exc:
        raise _unwritable(location, exc, what) from exc


def _unwritable(location: "Location", exc: BaseException, what: str = "write") -> OutputUnwritable:
    return OutputUnwritable(f"cannot {what} {location.url}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Location:
    """A file or folder: ``url`` (a local path or ``protocol://...``) and its filesystem's ``options``."""

    url: str
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold keys: kept out of repr

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", os.fspath(self.url))

    # -- naming ------------------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        protocol, sep, _ = self.url.partition("://")
        return protocol.lower() if sep else "file"

    @property
    def is_local(self) -> bool:
        return self.protocol in LOCAL_PROTOCOLS

    @property
    def path(self) -> str:
        """The path as the filesystem names it: a local path, or ``bucket/key`` for S3."""
        if self.is_local:
            return self.url.partition("://")[2] if "://" in self.url else self.url
        return self.fs._strip_protocol(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rpartition("/")[2]

    @property
    def parent(self) -> "Location":
        if self.is_local:
            return Location(os.path.dirname(os.path.abspath(self.path)), self.options)
        return Location(self.url.rstrip("/").rpartition("/")[0], self.options)

    def resolve(self, name: str) -> "Location":
        """What ``name`` names from this folder: a relative path (``.`` and ``..`` resolved, as for a path),
        an absolute local path, or a URL."""
        if "://" in name:
            return Location(name, self.options)
        if self.is_local:
            return Location(os.path.normpath(os.path.join(os.path.abspath(self.path), name)), self.options)
        return self._child(posixpath.normpath(posixpath.join(self.path, name)))

    def __truediv__(self, name: str) -> "Location":
        return Location(f"{self.url.rstrip('/')}/{name}", self.options)

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        """Local locations are paths (``open(location)``, ``Path(location)``); a URL is not."""
        if not self.is_local:
            raise TypeError(f"{self.url} is not a local path; read it through its Location")
        return self.path

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.is_local:
            return fsspec.filesystem("file")
        # No listing cache: other processes (Ray workers, a second job) write here, and a cached
        # listing would hide their objects.
        return fsspec.filesystem(self.protocol, **{"use_listings_cache": False, **self.options})

    def arrow_filesystem(self) -> Any:
        """This filesystem for readers that take a pyarrow one (Ray Data's ``read_*(paths, filesystem=)``,
        given :attr:`path` s); None for local paths, which they read themselves."""
        if self.is_local:
            return None
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs))

    def _child(self, fs_path: str) -> "Location":
        return Location(fs_path if self.is_local else self.fs.unstrip_protocol(fs_path), self.options)

    # -- reading -----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def kind(self) -> str:
        """``"file"`` or ``"directory"`` (one metadata request); FileNotFoundError if nothing is there."""
        return self.fs.info(self.path)["type"]

    def size(self) -> int:
        return int(self.fs.size(self.path))

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        """The whole file, or bytes ``[start, end)`` (a tar member) with one ranged request."""
        return self.fs.cat_file(self.path, start=start, end=end)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self) -> IO[bytes]:
        """A binary reader that fetches as it goes (list files, tars): nothing is read whole."""
        return self.fs.open(self.path, "rb")

    def glob(self, pattern: str) -> list["Location"]:
        """Files under this folder matching ``pattern`` (``"shard-*.tar"``, ``"**/*.jpg"``), sorted."""
        found = self.fs.glob(f"{glob.escape(self.path.rstrip('/'))}/{pattern}", detail=True)
        return [self._child(p) for p in sorted(found) if found[p]["type"] == "file"]

    def entries(self) -> list[tuple["Location", bool]]:
        """This folder's entries in name order, each with whether it is a folder (one listing request per
        page; object stores have no links, devices or empty folders to report)."""
        found = self.fs.ls(self.path, detail=True)
        children = [(self._child(e["name"]), e["type"] == "directory") for e in found
                    if e["name"].rstrip("/") != self.path.rstrip("/")]  # some stores list the folder itself
        return sorted(children, key=lambda child: child[0].name)

    # -- writing -----------------------------------------------------------------------------------
    def require_writable(self) -> None:
        if not (self.is_local or self.protocol in S3_PROTOCOLS):
            raise UnsupportedStorage(
                f"{self.url}: outputs need a local path or s3://; {self.protocol}:// is not known here to "
                "publish a file only once it is whole, nor to create one exclusively (the output lease)")

    def write_atomic(self, data: bytes) -> None:
        """Make the file hold ``data``; readers see the old file, the new one or none, never a part."""
        self.require_writable()
        if self.is_local:
            tmp = self._written_beside(data)
            with writing(self), _removed_on_failure(tmp):
                os.replace(tmp, self.path)
        else:
            # One PUT below s3fs's multipart threshold (100 MB), else one multipart upload: S3 publishes
            # the key only when the upload completes, and s3fs aborts an upload that fails. Never write
            # the final key through open(..., "wb") in pieces: leaving that `with` block on an exception
            # closes the file, and closing completes the upload with whatever was written so far.
            with writing(self):
                self.fs.pipe_file(self.path, data)

    def publish(self, local: Path) -> None:
        """Move the finished local file ``local`` here, whole (a rename locally when ``local`` is in this
        file's folder, else one upload that is published when it completes); ``local`` is gone after."""
        self.require_writable()
        with writing(self), _removed_on_failure(local):
            if self.is_local:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(local, self.path)  # os.rename within a filesystem
            else:
                self.fs.put_file(local, self.path)  # one PUT, or a multipart upload completed at the end
                os.unlink(local)

    def staging_file(self) -> Path:
        """A new local temporary path for a file that :meth:`publish` will put here: beside it locally (so
        publishing is a rename), in the temporary folder for object stores."""
        hidden = f".{self.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.is_local:
            with writing(self, "create the folder of"):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            return Path(self.path).with_name(hidden)
        return Path(tempfile.gettempdir()) / hidden

    def check_writable(self, size: int) -> None:
        """Raise :class:`OutputUnwritable` unless a file of ``size`` bytes can be written in this folder
        now (it is removed again)."""
        probe = self / f".write-probe-{uuid.uuid4().hex[:12]}"
        try:
            probe.write_atomic(bytes(size))
        finally:
            probe.remove()

    def remove_temporaries(self, keep: str | None = None) -> None:
        """Remove the temporary files of writes that never finished in this folder (a killed writer's),
        except those whose name starts with ``keep``."""
        for tmp in self.glob(TEMPORARY_PATTERN):
            if not (keep and tmp.name.startswith(keep)):
                tmp.remove()

    def remove(self) -> None:
        """Remove the file, or the folder (prefix) and everything under it; nothing there is fine."""
        if self.is_local:
            path = Path(self.path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        try:
            # s3fs's rm expands glob patterns: a name holding [ or * stands for itself here
            self.fs.rm(glob.escape(self.path), recursive=True)
        except FileNotFoundError:
            pass

    # -- the output lease: exclusive create and compare-and-swap ------------------------------------
    # A tag names one version of a file: its sha256 locally, its ETag on S3.
    def check_exclusive_create(self) -> None:
        """Raise :class:`UnsupportedStorage` unless a second exclusive create of one key fails here (an
        S3-compatible server that ignores ``If-None-Match`` would let two jobs hold one lease)."""
        self.require_writable()
        if self.is_local:
            return
        probe = self.parent / f".exclusive-create-probe-{uuid.uuid4().hex[:12]}"
        try:
            first, second = probe.create_exclusive(b"probe"), probe.create_exclusive(b"probe")
        finally:
            probe.remove()
        if first is None or second is not None:
            raise UnsupportedStorage(f"{self.url}: the server ignores conditional writes (If-None-Match: *), so "
                                     "an output lease there could be held by two jobs; use a server that "
                                     "supports them (AWS S3, MinIO, ...) or a local output.path")

    def create_exclusive(self, data: bytes) -> str | None:
        """Create the file holding ``data`` unless it exists; its tag, or None if it existed."""
        self.require_writable()
        if self.is_local:
            tmp = self._written_beside(data)
            try:
                os.link(tmp, self.path)  # fails if the name exists; the file appears with all its bytes
            except FileExistsError:
                return None
            except OSError as exc:
                raise _unwritable(self, exc) from exc
            finally:
                tmp.unlink()
            return _sha256(data)
        created = self._s3_if("put_object", Body=data, IfNoneMatch="*")
        return created and created["ETag"]

    def read_tagged(self) -> tuple[bytes, str] | None:
        """The file's bytes and a tag at least as old as them, or None if there is no file."""
        try:
            if self.is_local:
                data = Path(self.path).read_bytes()
                return data, _sha256(data)
            bucket, key, _ = self.fs.split_path(self.path)
            # HEAD, then GET: if the object changes in between, the bytes are newer than the tag and a
            # swap conditional on that tag fails, which is what the caller must see.
            tag = self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
            return self.fs.cat_file(self.path), tag
        except FileNotFoundError:
            return None

    def replace_if(self, data: bytes, tag: str) -> str | None:
        """Replace the file with ``data`` if it still is version ``tag``; the new tag, or None."""
        self.require_writable()
        if self.is_local:
            with self._local_version_is(tag) as unchanged:
                if unchanged:
                    self.write_atomic(data)
            return _sha256(data) if unchanged else None
        replaced = self._s3_if("put_object", Body=data, IfMatch=tag)
        return replaced and replaced["ETag"]

    def remove_if(self, tag: str) -> bool:
        """Remove the file if it still is version ``tag``; whether it was removed."""
        self.require_writable()
        if self.is_local:
            with self._local_version_is(tag) as unchanged, writing(self, "remove"):
                if unchanged:
                    os.unlink(self.path)
            return unchanged
        return self._s3_if("delete_object", IfMatch=tag) is not None

    @contextmanager
    def _local_version_is(self, tag: str) -> Iterator[bool]:
        """Local compare-and-swap, one process at a time: holds an flock on the file's folder (no lock file
        is left behind) and yields whether the file still is version ``tag``. Creation needs no lock:
        :meth:`create_exclusive` never overwrites."""
        folder = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            current = self.read_tagged()
            yield current is not None and current[1] == tag
        finally:
            os.close(folder)  # releases the flock

    def _written_beside(self, data: bytes) -> Path:
        """Local: a temporary file holding ``data`` in this file's folder (so a rename or link is atomic);
        removed again if writing it fails."""
        tmp = self.staging_file()
        with writing(self), _removed_on_failure(tmp):
            tmp.write_bytes(data)
        return tmp

    def _s3_if(self, method: str, **kwargs: Any) -> dict[str, Any] | None:
        """One conditional S3 request on this key; None when its condition did not hold (another writer
        came first). A missing bucket and every other error raise."""
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except OSError as exc:
            if isinstance(exc, FileExistsError) or _s3_code(exc) in _S3_CONDITION_FAILED:
                return None
            raise _unwritable(self, exc) from exc


@contextmanager
def _removed_on_failure(tmp: Path) -> Iterator[None]:
    """Remove the temporary file ``tmp`` if the block raises (a full disk must not keep a partial copy)."""
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (it keeps botocore's error as the cause)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code")

"""One job per output folder: a lease file ``<out>/lock.json`` = {host, pid, job_id, started, heartbeat}.

The output may be a local folder or an object store (``s3://``, see :mod:`pipeline.storage`); the lease
works the same way on both, through two storage primitives:

- it is created exclusively (a hard link locally, ``If-None-Match: *`` on S3): of two jobs started at
  once exactly one gets it; the other refuses, naming the holder;
- it is refreshed every ``lease_seconds / 4`` and taken over by compare-and-swap on the version that was
  read (under a folder lock locally, ``If-Match: <etag>`` on S3): of two jobs taking over a stale lease
  only one succeeds, and a holder whose lease was taken finds out at its next refresh and stops.

A lease is stale when it has had no heartbeat for ``lease_seconds`` (its driver died or lost the storage),
or at once when it names a process of this host that no longer exists. Heartbeats are wall-clock times:
hosts sharing an output need clocks that agree to well within ``lease_seconds``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.storage import Location

__all__ = ["OutputLocked", "OutputLock"]


class OutputLocked(RuntimeError):
    """The output folder is held by another job (the message names it)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}  # not a lease this code wrote (edited by hand, truncated by a full disk): treated as expired
    return holder if isinstance(holder, dict) else {}


class OutputLock:
    """``with OutputLock(location, lease_seconds): ...``; :meth:`check` raises if the lease was lost.

    ``location``: the lease file, a :class:`~pipeline.storage.Location` or a local path."""

    def __init__(self, location: Location | str | Path, lease_seconds: float = 120.0,
                 job_id: str | None = None) -> None:
        self.location = location if isinstance(location, Location) else Location(location)
        self.lease_seconds = lease_seconds
        self.job_id = job_id or uuid.uuid4().hex[:12]
        self.lease = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": self.job_id,
                      "started": time.time(), "heartbeat": time.time()}
        self._tag: str | None = None  # the version of the lease this job wrote last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self.taken_over: str | None = None

    def _payload(self) -> bytes:
        self.lease["heartbeat"] = time.time()
        return json.dumps(self.lease).encode("utf-8")

    # -- acquiring -------------------------------------------------------------------------------
    def acquire(self) -> None:
        folder = self.location.parent
        self.location.check_exclusive_create()
        for _ in range(3):  # a lease that changes between our reads: look again, boundedly
            self._tag = self.location.create_exclusive(self._payload())
            if self._tag is not None:
                break
            current = self.location.read_tagged()
            if current is None:
                continue
            holder, tag = _parse(current[0]), current[1]
            stale = self._stale_because(holder)
            if stale is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise OutputLocked(
                    f"{folder} is in use by job {holder.get('job_id')} (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, heartbeat {age:.0f} s ago, lease {self.lease_seconds:.0f} s); wait for it "
                    f"to finish or use another output.path")
            self._tag = self.location.replace_if(self._payload(), tag)  # of two takers one wins
            if self._tag is not None:
                self.taken_over = f"took over the lease of job {holder.get('job_id')} ({stale})"
                break
        else:
            raise OutputLocked(f"{self.location}: could not acquire the lease (it keeps changing)")
        self._thread = threading.Thread(target=self._heartbeat, name="output-lease", daemon=True)
        self._thread.start()

    def _stale_because(self, holder: dict[str, Any]) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if age > self.lease_seconds:
            return f"no heartbeat for {age:.0f} s > lease {self.lease_seconds:.0f} s"
        if holder.get("host") == self.lease["host"] and not _pid_alive(int(holder.get("pid", 0) or 0)):
            return f"its driver pid {holder.get('pid')} no longer runs on this host"
        return None

    # -- holding ---------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                tag = self.location.replace_if(self._payload(), self._tag)
                holder = None if tag is not None else self.location.read_tagged()
            except OSError as exc:  # storage unreachable: retry at the next beat until the lease runs out
                if time.monotonic() - refreshed > self.lease_seconds:
                    self.lost = f"could not refresh it for {self.lease_seconds:.0f} s: {type(exc).__name__}: {exc}"
                    return
                continue
            if tag is None:
                self.lost = f"lease taken by job {_parse(holder[0]).get('job_id') if holder else None}"
                return
            self._tag, refreshed = tag, time.monotonic()

    def check(self) -> None:
        if self.lost:
            raise OutputLocked(f"{self.location.parent}: this job ({self.job_id}) lost its lease: {self.lost}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._tag is not None and not self.lost:
            self.location.remove_if(self._tag)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.release()
        except OSError:
            if exc_type is None:
                raise
            # the job already failed (often with the storage that the lease is on): keep its error; the
            # lease expires by itself, and this host's next job takes it over at once (its pid is gone)

"""One job per output folder: a lease file ``<out>/lock.json`` = {host, pid, job_id, started, heartbeat}.

The lease is created with O_EXCL (exactly one of two jobs started at once gets it) and refreshed by a
background thread every ``lease_seconds / 4``. A second job refuses, naming the holder. A lease is taken
over when it has expired (no heartbeat for ``lease_seconds``: its driver died or lost the storage), or at
once when it names a process of this host that no longer exists. Taking over renames the stale lease
away first, so of two jobs taking over at once only one succeeds.
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


class OutputLock:
    """``with OutputLock(path, lease_seconds): ...``; :meth:`check` raises if the lease was lost."""

    def __init__(self, path: str | Path, lease_seconds: float = 120.0, job_id: str | None = None) -> None:
        self.path = Path(path)
        self.lease_seconds = lease_seconds
        self.job_id = job_id or uuid.uuid4().hex[:12]
        self.lease = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": self.job_id,
                      "started": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self.taken_over: str | None = None

    # -- acquiring -------------------------------------------------------------------------------
    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lease that vanishes between our reads: try again, boundedly
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue
            stale = self._stale_because(holder)
            if stale is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise OutputLocked(
                    f"{self.path.parent} is in use by job {holder.get('job_id')} (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, heartbeat {age:.0f} s ago, lease {self.lease_seconds:.0f} s); wait for it "
                    f"to finish or use another output.path")
            aside = self.path.with_name(f"{self.path.name}.stale-{self.job_id}")
            try:
                os.rename(self.path, aside)  # atomic: one taker wins, the others find no file
            except FileNotFoundError:
                continue
            if self._read(aside) != holder:  # refreshed meanwhile: the holder is alive, give it back
                os.rename(aside, self.path)
                raise OutputLocked(f"{self.path.parent}: job {holder.get('job_id')} renewed its lease while it "
                                   "was being taken over; it is alive")
            os.unlink(aside)
            self.taken_over = f"took over the lease of job {holder.get('job_id')} ({stale})"
        else:
            raise OutputLocked(f"{self.path}: could not acquire the lease (it keeps changing)")
        self._thread = threading.Thread(target=self._heartbeat, name="output-lease", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        self.lease["heartbeat"] = time.time()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.lease, handle)
        return True

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        try:
            return json.loads((path or self.path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written by a driver that died while creating it: treated as expired

    def _stale_because(self, holder: dict[str, Any]) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if age > self.lease_seconds:
            return f"no heartbeat for {age:.0f} s > lease {self.lease_seconds:.0f} s"
        if holder.get("host") == self.lease["host"] and not _pid_alive(int(holder.get("pid", 0) or 0)):
            return f"its driver pid {holder.get('pid')} no longer runs on this host"
        return None

    # -- holding ---------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            holder = self._read()
            if holder is None or holder.get("job_id") != self.job_id:
                self.lost = f"lease taken by job {holder.get('job_id') if holder else None}"
                return
            self.lease["heartbeat"] = time.time()
            tmp = self.path.with_name(f".{self.path.name}.{self.job_id}")
            tmp.write_text(json.dumps(self.lease), encoding="utf-8")
            os.replace(tmp, self.path)

    def check(self) -> None:
        if self.lost:
            raise OutputLocked(f"{self.path.parent}: this job ({self.job_id}) lost its lease: {self.lost}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder is not None and holder.get("job_id") == self.job_id:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

"""Fault injection for the pipeline tests: an importer that fails on chosen inputs, the way real operators
fail, and one that is slow and says where it works, so a test can take a node down under it. Ray workers
import them by name (``stages.annotate.operator: tests.faults:FaultyImporter``). And a killer of a stage's
worker process mid-job. A finalize task that fails while others are in flight. And a real small filesystem to
fill up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline.config import PreprocessConfig
from pipeline.importer import AnnotationImporter


class FaultyImporter(AnnotationImporter):
    """The importer, except on inputs whose file name contains ``raise`` (a Python exception), ``exit``
    (the worker process ends itself with ``os._exit``) or ``segv`` (it dies of SIGSEGV)."""

    def __init__(self, config: PreprocessConfig) -> None:
        super().__init__(config.annotate.crops)

    def __call__(self, keys, images, annotations, original_sizes):
        for annotation in annotations:
            name = Path(annotation).name
            if "raise" in name:
                raise RuntimeError(f"injected failure on {name}")
            if "exit" in name:
                os._exit(3)
            if "segv" in name:
                os.kill(os.getpid(), signal.SIGSEGV)
        return super().__call__(keys, images, annotations, original_sizes)


def failing_finalize(root, partition: int, written: list[str], rejects: list[dict[str, Any]]) -> dict[str, Any]:
    """pipeline.preprocess's finalize task, except that partition 0 fails at once and the others take
    ``SLOW_FINALIZE_S`` first, so a job fails while finalize tasks are still in flight."""
    from pipeline.preprocess import _finalize_task

    if partition == 0:
        raise RuntimeError("injected finalize failure")
    time.sleep(SLOW_FINALIZE_S)
    return _finalize_task(root, partition, written, rejects)


SLOW_FINALIZE_S = 20.0


class SlowImporter(AnnotationImporter):
    """The importer, ``SECONDS_PER_INPUT`` slower per input (the time a model would take). If
    ``$SLOW_IMPORTER_TRACE`` names a file, each call appends a ``start`` line before its work and an ``end``
    line after it, with the keys, the Ray node, the process and the time, so a test sees which node holds
    which input and, afterwards, which calls a lost node cut short."""

    SECONDS_PER_INPUT = 3.0

    def __init__(self, config: PreprocessConfig) -> None:
        super().__init__(config.annotate.crops)
        self.trace = os.environ.get("SLOW_IMPORTER_TRACE")

    def _record(self, event: str, keys) -> None:
        if self.trace:
            import ray

            line = json.dumps({"event": event, "keys": list(keys), "node": ray.get_runtime_context().get_node_id(),
                               "pid": os.getpid(), "time": time.time()})
            with open(self.trace, "a", encoding="utf-8") as trace:  # one short append per line: lines never mix
                trace.write(line + "\n")

    def __call__(self, keys, images, annotations, original_sizes):
        self._record("start", keys)
        time.sleep(self.SECONDS_PER_INPUT * len(keys))
        results = super().__call__(keys, images, annotations, original_sizes)
        self._record("end", keys)
        return results


def run_killing_a_worker(job: Callable[[], Any], out: Path, stage: str, timeout_s: float) -> tuple[Any, list[int]]:
    """``job()`` while :func:`kill_worker_once_staged` watches ``out``; returns its result and the pids killed."""
    killed: list[int] = []
    killer = threading.Thread(target=kill_worker_once_staged, args=(out, stage, killed, timeout_s))
    killer.start()
    try:
        return job(), killed
    finally:
        killer.join()


def kill_worker_once_staged(out: Path, stage: str, killed: list[int], timeout_s: float) -> None:
    """SIGKILL one Ray worker process of ``stage`` (a name in its command line, such as the stage's class)
    as soon as the job writing to ``out`` has staged a group; its pid goes into ``killed``. Gives up after
    ``timeout_s``. Only this process's own Ray: its workers descend from this process (embedded Ray)."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not killed:
        if list((out / "staging").glob("*/*.tar")):
            for process in psutil.Process().children(recursive=True):
                try:
                    if stage in " ".join(process.cmdline()):
                        process.send_signal(signal.SIGKILL)
                        killed.append(process.pid)
                        break
                except psutil.Error:
                    continue
        time.sleep(0.02)


@contextmanager
def small_filesystem(folder: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``folder`` (needs root, as on CI's containers)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill up here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill_leaving(folder: Path, free: int) -> Path:
    stat = os.statvfs(folder)
    ballast = folder / "ballast"
    ballast.write_bytes(bytes(stat.f_bavail * stat.f_frsize - free))
    return ballast


class SwitchableProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port`` that can be taken down (new connections refused,
    open ones cut) and brought back on the same port: a server outage without restarting the server."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._connections: list = []
        self._lock = threading.Lock()
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        self._accepting.start()

    @staticmethod
    def _listen(port: int):
        import socket

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        return listener

    def _accept(self, listener) -> None:
        import socket

        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the proxy is down
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.close()
                except OSError:
                    pass

    @property
    def up(self) -> bool:
        return self._listener is not None

    def down(self) -> None:
        import socket

        listener, self._listener = self._listener, None
        if listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone would leave the port listening
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            except OSError:
                pass

    def restore(self) -> None:
        if self._listener is None:
            self._listener = self._listen(self.port)
            threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def close(self) -> None:
        self.down()

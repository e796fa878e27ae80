"""A real S3-compatible server for the object-store tests: moto's standalone server (what s3fs's own tests
use), started on loopback in its own process group, one per test module.

    from tests.object_store import object_store_fixture  # noqa: F401 - registers the fixture
    def test_x_object_store(object_store): url = object_store.url("out")

Workers of a Ray job reach it too: it listens on 127.0.0.1 and the options carry endpoint and keys.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import free_port

# moto's server imports werkzeug, flask and botocore's service models before it listens: about 2 s on an
# idle machine, measured up to 15 s while the other test lanes load the 2 cores; 90 s leaves room.
START_SECONDS = 90


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str
    bucket: str

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage options for s3fs (the keys are moto's: any value is accepted)."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """``moto_server`` on a free loopback port; returns once it answers (bounded), or raises with its log."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: stopped whole, alone
    deadline = time.monotonic() + START_SECONDS
    while not _answers(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"moto_server on {endpoint} did not answer within {START_SECONDS} s "
                               f"(exit {process.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return process, endpoint


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 10 s; only the group this module started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module", name="object_store")
def object_store_fixture(tmp_path_factory) -> Iterator[ObjectStore]:
    """A running server with one empty bucket; each test uses its own prefix in it."""
    import s3fs

    process, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto_server.log")
    try:
        store = ObjectStore(endpoint, f"mmdiff-{uuid.uuid4().hex[:8]}")
        s3fs.S3FileSystem(**store.options, skip_instance_cache=True).mkdir(store.bucket)
        yield store
    finally:
        stop(process)


@contextmanager
def conditions_ignored(endpoint: str) -> Iterator[str]:
    """A loopback proxy to ``endpoint`` that drops ``If-None-Match`` and ``If-Match`` from every request, as
    an S3-compatible server without conditional writes would ignore them; yields the proxy's endpoint."""
    target = endpoint.removeprefix("http://")

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore expects

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("if-none-match", "if-match")}
            upstream = http.client.HTTPConnection(target, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
            finally:
                upstream.close()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        def log_message(self, *args: object) -> None:  # quiet: the test reads its own assertions
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}"
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)

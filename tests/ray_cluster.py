"""A real multi-node Ray cluster on this machine, for tests that need separate nodes (separate raylets).

Each node is its own ``ray start --block`` in its own process group, with its own short temp dir (Ray's
socket paths have a length limit) and its own ports, so a test can kill one node's raylet and, at the end,
stop exactly the processes it started, never another Ray on the machine.

    with LocalRayCluster(tmp_path) as cluster:
        cluster.start_head(num_cpus=2)
        cluster.wait_for_nodes(timeout=120)
        worker = cluster.add_worker(num_cpus=2)
        cluster.wait_for_nodes(timeout=120)
        subprocess.run([RAY, "job", "submit", "--", ...], env=cluster.client_env)
        cluster.kill_raylet(worker)

The nodes listen on the loopback address 127.0.0.2: Ray swaps 127.0.0.1 for the machine's outward address
(``ray._private.services.resolve_ip_for_localhost``), any other loopback address it takes as given. Ray
turns token authentication on by default; the cluster gets a fresh token through the environment, so
nothing reads or writes ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.helpers import free_port

__all__ = ["RAY", "NODE_IP", "RayNode", "LocalRayCluster"]

RAY = str(Path(sys.executable).with_name("ray"))
NODE_IP = "127.0.0.2"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RayNode:
    name: str  # also the node's node_name in the state API
    process: subprocess.Popen  # `ray start --block`, leader of the node's process group
    temp_dir: str
    log: Path  # its stdout and stderr

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""


class LocalRayCluster:
    """A head node and worker nodes on this machine; a context manager that stops them all on exit."""

    def __init__(self, log_dir: str | Path, object_store_mb: int = 256) -> None:
        self.log_dir = Path(log_dir)
        self.object_store_mb = object_store_mb  # Ray's default (30 % of RAM per node) is far too much here
        self.token = secrets.token_hex(16)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes: list[RayNode] = []

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def node_env(self) -> dict[str, str]:
        """Environment of the nodes, and through them of every Ray worker process."""
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "PYTHONPATH": pythonpath,  # the nodes run this checkout, as a cluster's image would
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop() tears down at once instead of draining 30 s

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for `ray job submit` and other clients of this cluster."""
        return {**self.node_env, "RAY_ADDRESS": self.dashboard_url}

    def start_head(self, num_cpus: float, resources: dict[str, float] | None = None) -> RayNode:
        return self._start("head", num_cpus, resources, [
            "--head", "--port", str(self.gcs_port), "--ray-client-server-port", str(free_port()),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port)])

    def add_worker(self, num_cpus: float, resources: dict[str, float] | None = None) -> RayNode:
        return self._start(f"worker{len(self.nodes)}", num_cpus, resources, ["--address", f"{NODE_IP}:{self.gcs_port}"])

    def _start(self, name: str, num_cpus: float, resources: dict[str, float] | None, role: list[str]) -> RayNode:
        temp_dir = tempfile.mkdtemp(prefix=f"ray{name[0]}", dir="/tmp")
        log = self.log_dir / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        ports = {option: str(free_port()) for option in (  # two nodes on one machine: no port may be a default
            "--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")}
        command = [RAY, "start", "--block", *role, "--node-ip-address", NODE_IP, "--node-name", name,
                   "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {}),
                   "--object-store-memory", str(self.object_store_mb * 2**20), "--temp-dir", temp_dir,
                   "--disable-usage-stats", *[x for item in ports.items() for x in item]]
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=self.node_env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = RayNode(name, process, temp_dir, log)
        self.nodes.append(node)
        return node

    # -- the state API of the head's dashboard ---------------------------------------------------
    def state(self, resource: str, **filters: str) -> list[dict[str, Any]]:
        """Rows of the state API (``nodes``, ``actors``, ``tasks``, ...), with ``key=value`` filters."""
        query = [("limit", "10000")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/{resource}?{urllib.parse.urlencode(query)}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["data"]["result"]["result"]

    def node_id(self, node: RayNode) -> str:
        rows = self.state("nodes", node_name=node.name, state="ALIVE")
        if len(rows) != 1:
            raise RuntimeError(f"{node.name}: {len(rows)} alive Ray nodes of that name in the state API")
        return rows[0]["node_id"]

    def wait_for_nodes(self, timeout: float) -> float:
        """Wait until every started node is alive in the state API; returns the seconds it took."""
        started = time.monotonic()
        last_error: Exception | None = None
        while time.monotonic() - started < timeout:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise RuntimeError(f"ray start of {node.name} exited with {node.process.returncode}:\n"
                                       f"{node.log_tail()}")
            try:
                alive = {row["node_name"] for row in self.state("nodes", state="ALIVE")}
                if alive >= {node.name for node in self.nodes}:
                    return time.monotonic() - started
            except OSError as exc:  # the dashboard is not up yet
                last_error = exc
            time.sleep(0.5)
        raise TimeoutError(f"the local Ray cluster ({', '.join(n.name for n in self.nodes)}) was not up after "
                           f"{timeout:.0f} s (last error: {last_error!r}); head log:\n{self.nodes[0].log_tail()}")

    # -- faults and teardown ---------------------------------------------------------------------
    def raylet(self, node: RayNode) -> psutil.Process:
        """The raylet process of ``node``: the one in the node's own process tree."""
        for process in psutil.Process(node.process.pid).children(recursive=True):
            try:
                if process.name() == "raylet":
                    return process
            except psutil.NoSuchProcess:
                continue
        raise RuntimeError(f"{node.name}: no raylet process under ray start (pid {node.process.pid})")

    def kill_raylet(self, node: RayNode) -> int:
        """SIGKILL ``node``'s raylet, the way a node is lost (its workers and object store go with it)."""
        raylet = self.raylet(node)
        raylet.send_signal(signal.SIGKILL)
        return raylet.pid

    def stop(self) -> None:
        """Stop every node this cluster started (their process groups only) and remove their temp dirs."""
        for node in self.nodes:
            _signal_group(node.process, signal.SIGTERM)
        deadline = time.monotonic() + 20  # drain disabled (node_env): idle or loaded, the nodes exit in a few s
        for node in self.nodes:
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node.process, signal.SIGKILL)  # whatever is left in the group, workers included
            node.process.wait()
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # the group is gone already (a node whose raylet was killed ends itself)
        pass

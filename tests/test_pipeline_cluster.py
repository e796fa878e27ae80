"""`ray job submit -- python -m pipeline.preprocess ...` against a real local Ray cluster.

The test starts its own head node (`ray start --head --block` on 127.0.0.1, in its own process group,
own temp dir and ports) and stops only that group at the end, never other Ray instances on the machine.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.example_inputs import write_annotation_folder

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def local_cluster():
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    client_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": address}
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=client_env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the local cluster did not come up in 120 s"
            time.sleep(2)
        yield client_env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # our head and everything it started, nothing else
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_job_on_the_cluster(local_cluster, tmp_path):
    write_annotation_folder(tmp_path / "in")
    out = tmp_path / "out"
    result = subprocess.run(
        [RAY, "job", "submit", "--", sys.executable, "-m", "pipeline.preprocess",
         "--config", str(ROOT / "configs/preprocess/import_fastcomposer.yaml"),
         "--set", f"input.path={tmp_path / 'in'}", f"output.path={out}", "progress=false"],
        env=local_cluster, capture_output=True, text=True, timeout=400, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 inputs -> 4 written" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["written"] == 4 and len(manifest["shards"]) == 2


def test_cluster_launcher_config_is_valid_for_ray_up():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "infra/ray/cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own defaults + schema check, as `ray up` runs them
    assert "mmdiff-preprocess --config" in (ROOT / "infra/ray/cluster.yaml").read_text()  # the console script
    assert any("pip install" in c and "requirements.lock" in c for c in config["setup_commands"])


def test_entry_point_names_a_missing_config(tmp_path):
    # what `mmdiff-preprocess` (and `ray exec ... mmdiff-preprocess`) runs: pipeline.preprocess:main
    result = subprocess.run([sys.executable, "-m", "pipeline.preprocess", "--config", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0 and f"{tmp_path / 'nope.yaml'}: config file not found" in result.stderr

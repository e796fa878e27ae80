"""The runtime lock installed as the runtime image installs it, into a fresh venv that sees no other
site-packages, then every module of the package imported there: nothing the code imports is missing from
the runtime set, and no test tool is in it.

The install runs the Dockerfile's own RUN line (its paths moved into a temporary folder), then the wheel
with --no-deps and `pip check`. Extended: it installs the whole runtime set, torch and its CUDA libraries
included (about 7 GB; tens of minutes on 2 cores):

    make test-extended PYTEST_ARGS=tests/test_packaging_install.py

What it does not check: the image's apt packages (libgl1 for OpenCV is present on this machine), a GPU, and
Python 3.12 (the locks are resolved for the image's 3.11; .ci/check-python312 covers the 3.12 install of
the package itself).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_packaging import wheel  # noqa: F401 -- the fixture: the wheel built from a copy of this tree
from test_packaging_deps import PACKAGES, RUNTIME_LOCK, TEST_TOOLS, dockerfile_instructions

pytestmark = pytest.mark.extended

# Imports every module of the given packages (one process: the shared imports are paid once); prints
# {module: error} for those that fail and the modules found.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
failed, seen = {}, []
for top in sys.argv[1:]:
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        seen.append(info.name)
        try:
            importlib.import_module(info.name)
        except BaseException as exc:  # SystemExit from a module run at import counts as a failure too
            failed[info.name] = f"{type(exc).__name__}: {exc}"
paths = sorted(p for top in sys.argv[1:] for p in importlib.import_module(top).__path__)
print(json.dumps({"failed": failed, "seen": seen, "paths": paths}))
"""


def run(cmd: list, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_runtime_lock_installs_and_every_module_imports(tmp_path, wheel):  # noqa: F811
    (install,) = [i[len("RUN"):].strip() for i in dockerfile_instructions()
                  if i.startswith("RUN") and "/tmp/runtime.lock" in i]
    venv = tmp_path / "venv"
    # the interpreter the shared venv was made from: a venv of a venv would still be a plain venv of it
    run([Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", venv], timeout=300)
    (tmp_path / "runtime.lock").write_bytes(RUNTIME_LOCK.read_bytes())
    script = install.replace("/tmp/", f"{tmp_path}/").replace("/opt/venv", str(venv))
    run(["bash", "-euo", "pipefail", "-c", script], timeout=5400, cwd=tmp_path)
    pip = venv / "bin" / "pip"
    run([pip, "install", "--no-deps", "--disable-pip-version-check", wheel], timeout=600)
    run([pip, "check"], timeout=300)

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MPLCONFIGDIR": str(tmp_path / "mpl"), "OMP_NUM_THREADS": "1"}
    out = run([venv / "bin" / "python", "-c", IMPORT_ALL, *PACKAGES], timeout=1800, cwd=tmp_path, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(p.startswith(str(venv)) for p in result["paths"]), result["paths"]  # the wheel's code, not this tree
    assert len(result["seen"]) > 50 and "mmdiff.zoo.insightface" in result["seen"], result["seen"]
    assert not result["failed"], json.dumps(result["failed"], indent=1)
    found = "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    tools = run([venv / "bin" / "python", "-c", found, "pytest", "moto", "ruff", "hadolint", "onnxscript", "responses"],
                timeout=120, env=env)
    assert tools.stdout.strip() == "[]", tools.stdout
    installed = run([pip, "list", "--format=json"], timeout=120).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(installed)}
    assert not names & TEST_TOOLS, names & TEST_TOOLS

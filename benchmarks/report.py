"""Where a benchmark's figures go: benchmarks/results/<name>.json, and one printed line that says so."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, result: dict) -> Path:
    """Write `result` as indented JSON to benchmarks/results/<name>.json, print where, and return the path."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: figures -> {path.relative_to(RESULTS.parent.parent)}", flush=True)
    return path

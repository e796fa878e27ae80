"""Which commit of mmdiff is running, also from an installed package (no .git beside it).

In order: ``MMDIFF_GIT_COMMIT`` (set by an image build: ``docker build --build-arg``), the git checkout
the package runs from, the commit pip recorded for a VCS install (``direct_url.json``), else "unknown".
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

__all__ = ["source_commit"]

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    if os.environ.get("MMDIFF_GIT_COMMIT"):
        return os.environ["MMDIFF_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    try:
        direct_url = metadata.distribution("mmdiff").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        direct_url = None
    if direct_url:
        commit = json.loads(direct_url).get("vcs_info", {}).get("commit_id")
        if commit:
            return str(commit)
    return "unknown"

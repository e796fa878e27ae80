"""The GPU check suite's --smoke mode (tiny models, CPU, gloo): every section runs the product's code
path and reports its figures, so the suite cannot rot between GPU runs. In its own process, as users run
it (its process group and DeepSpeed's cached groups stay out of this one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_suite import SECTIONS

REPO = Path(__file__).resolve().parent.parent


def test_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_suite_smoke.json"
    job = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--out", str(out)], cwd=REPO,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and set(result["sections"]) == set(SECTIONS)
    failed = {name: s["error"] for name, s in result["sections"].items() if not s["ok"]}
    assert not failed
    sections = result["sections"]
    for name in ("train_sd15", "train_sdxl", "latents", "caption", "detect", "segment", "evaluation"):
        assert sections[name]["images_per_s"] > 0, name
    assert sections["train_sdxl"]["gflops_per_image"] > 0 and sections["train_sd15"]["mfu"] is None  # no peak on CPU
    assert sections["serving"]["mmdiff_s_per_image"] > 0 and sections["serving"]["diffusers_s_per_image"] > 0

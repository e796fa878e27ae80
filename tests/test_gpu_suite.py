"""The GPU check suite's --smoke mode (tiny models, CPU, gloo): every section runs the product's code
path and reports its figures, so the suite cannot rot between GPU runs."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

from benchmarks.gpu_suite import SECTIONS, main  # noqa: E402


def test_smoke_runs_every_section(tmp_path):
    result = main(["--smoke", "--out", str(tmp_path / "gpu_suite_smoke.json")])
    assert result["smoke"] and set(result["sections"]) == set(SECTIONS)
    failed = {name: s["error"] for name, s in result["sections"].items() if not s["ok"]}
    assert not failed
    sections = result["sections"]
    for name in ("train_sd15", "train_sdxl", "latents", "caption", "detect", "segment", "evaluation"):
        assert sections[name]["images_per_s"] > 0, name
    assert sections["train_sdxl"]["gflops_per_image"] > 0 and sections["train_sd15"]["mfu"] is None  # no peak on CPU
    assert sections["serving"]["mmdiff_s_per_image"] > 0 and sections["serving"]["diffusers_s_per_image"] > 0
    assert (tmp_path / "gpu_suite_smoke.json").is_file()

"""The GPU check suite's --smoke mode (tiny models, CPU, gloo): every section runs the product's code
path and reports the full mode's figures, so the suite cannot rot between GPU runs. In a forked child of the
test process: the process group, DeepSpeed's cached groups and MLflow's process-wide URIs it sets die with
the child, while the libraries this session already imported are not imported again (most of a fresh
process's time)."""

from __future__ import annotations

import json
import multiprocessing
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (the child inherits it)

from benchmarks.gpu_suite import SECTIONS, main  # noqa: E402


def smoke(out: str) -> None:
    """The child: one intra-op thread (an OpenMP pool the parent started does not survive a fork), then the
    command as `python -m benchmarks.gpu_suite --smoke` runs it."""
    import torch

    torch.set_num_threads(1)
    main(["--smoke", "--out", out])


def test_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_suite_smoke.json"
    child = multiprocessing.get_context("fork").Process(target=smoke, args=(str(out),))
    child.start()
    child.join(timeout=600)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0 and out.is_file(), f"gpu_suite --smoke exited {child.exitcode}"
    result = json.loads(out.read_text())
    assert result["smoke"] and set(result["sections"]) == set(SECTIONS)
    failed = {name: s["error"] for name, s in result["sections"].items() if not s["ok"]}
    assert not failed
    sections = result["sections"]
    for name in ("train_sd15", "train_sdxl", "latents", "caption", "detect", "segment", "evaluation"):
        assert sections[name]["images_per_s"] > 0, name
    assert sections["train_sdxl"]["gflops_per_image"] > 0 and sections["train_sd15"]["mfu"] is None  # no peak on CPU
    assert sections["serving"]["mmdiff_s_per_image"] > 0 and sections["serving"]["diffusers_s_per_image"] > 0

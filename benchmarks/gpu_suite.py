"""The GPU check suite: one command, one GPU, about 8 minutes, every product path on the device in bf16.

    python -m benchmarks.gpu_suite [--out benchmarks/results/gpu_suite.json] [--only train_sd15 serving ...]
    python -m benchmarks.gpu_suite --smoke      # tiny models on CPU (gloo): the suite's own test

Real-size architectures with random weights (nothing downloaded), bf16, and torch.distributed initialised
with NCCL at world size 1 on the GPU, so a tensor left on the CPU in a collective fails here as it would on
a cluster. Each section runs in its own process with its own time budget (a crash, an out-of-memory or a
hang is recorded as that section's error and the others still run); ``--smoke`` runs them in this process
with the tiny twins on CPU, a step or two each, so the code cannot rot (tests/test_gpu_suite.py).

Sections and their JSON fields (``sections.<name>``; every section also has ``ok``, ``seconds`` and, when
it failed, ``error``):

- ``train_sd15`` / ``train_sdxl``: the real training loop (train/run.py's model and DeepSpeed engine,
  ZeRO-2, train/engine.py's Trainer) at SD1.5 512 px / SDXL 1024 px, micro-batch ``micro_batch``, VAE in
  the step (no cached latents): ``images_per_s`` (per GPU), ``step_s``, ``gflops_per_image`` (forward +
  backward, counted as benchmarks/bench_flops.py counts), ``mfu`` (achieved FLOP rate over the GPU's bf16
  dense peak, ``peak_tflops``; null for a GPU not in ``PEAK_BF16_TFLOPS``).
- ``latents``: the SD1.5 VAE encoder in bf16 on batches of ``batch`` images at 512 px (what latent caching
  computes): ``images_per_s``.
- ``caption`` / ``detect`` / ``segment``: the preprocessing operators (BLIP-2 OPT-2.7b with beam 3 and 30
  new tokens, Grounding DINO Swin-T with three phrases, SAM ViT-B with two boxes) on scikit-image photos:
  ``images_per_s`` per GPU. Random weights: BLIP-2 decodes the full ``max_new_tokens`` (the worst case).
- ``serving``: seconds per 512 px image, ``mmdiff_s_per_image`` (MMDiffPipeline, one subject) against
  ``diffusers_s_per_image`` (the plain diffusers pipeline of the same base, same steps, size and
  guidance), and their ``ratio``.
- ``evaluation``: evaluation/evaluate.py's loop over the demo benchmark with a registered random-SD1.5
  model generating on the GPU: ``images_per_s`` (images scored per second, model loading included).

Top level: ``device`` (the GPU's name), ``torch``, ``smoke``, ``budget_s``, ``wall_s``. Writes
benchmarks/results/gpu_suite.json (gpu_suite_smoke.json with ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import write_result

__all__ = ["PEAK_BF16_TFLOPS", "SECTIONS", "main"]

REPO = Path(__file__).resolve().parent.parent
# bf16 dense tensor-core peaks (vendor datasheets; the sparse figure halved)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.05, "B200": 2250.0}


class Run:
    """What a section is given: full or smoke sizes, the device, the dtype and a time budget."""

    def __init__(self, smoke: bool, budget_s: float):
        self.smoke, self.budget_s = smoke, budget_s
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.source = "tiny" if smoke else "random"
        self.started = time.perf_counter()

    def spec(self, family: str, **extra) -> dict:
        return {"family": family, "source": self.source, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), **extra}

    def timed(self, fn: Callable[[], Any], warmup: int, most: int) -> tuple[int, float]:
        """Runs ``fn`` ``warmup`` times (not with --smoke), then times up to ``most`` calls (at least one),
        stopping when the section's budget is spent; returns (calls, seconds) of the timed part."""
        for _ in range(0 if self.smoke else warmup):
            fn()
        synchronize()
        calls, started = 0, time.perf_counter()
        while calls < most and (calls == 0 or time.perf_counter() - self.started < self.budget_s):
            fn()
            calls += 1
        synchronize()
        return calls, time.perf_counter() - started


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def photos(count: int, size: int | None = None):
    """``count`` scikit-image photos (RGB PIL images), cycled, optionally resized to ``size`` square."""
    from PIL import Image
    from skimage import data as skdata

    names = ["chelsea", "astronaut", "coffee", "rocket", "cat"]
    images = [Image.fromarray(getattr(skdata, names[i % len(names)])()).convert("RGB") for i in range(count)]
    return [im.resize((size, size)) for im in images] if size else images


# -- sections -----------------------------------------------------------------------------------------

def train_section(family: str, resolution: int) -> Callable[[Run], dict]:
    def section(run: Run) -> dict:
        from benchmarks.bench_flops import build_training_model, training_batch, training_flops
        from benchmarks.bench_train_loop import reader_stub
        from mmdiff.configuration import load_config
        from train.config import TrainConfig
        from train.engine import Trainer, TrainerState
        from train.run import build_model, make_engine

        size = 64 if run.smoke else resolution
        with tempfile.TemporaryDirectory() as tmp:
            # the shipped config's model settings and micro-batch; random (tiny) weights, no data, no tracking
            config = load_config(f"configs/train/{family}.yaml", TrainConfig, {
                "output_dir": tmp, "data.shards": tmp, "data.resolution": size, "data.aspect_buckets": False,
                "model.base": run.spec(family), "model.image_encoder": run.spec("clip_vision"),
                "optim.gradient_accumulation_steps": 1, "deepspeed.precision": "fp32" if run.smoke else "bf16",
                "schedule.max_steps": 10**6, "schedule.log_every": 10**6, "schedule.sample_every": 0,
                "schedule.checkpoint_every": 0, "validation.shards": None, "mlflow.registered_model": None,
                **({"model.mmdiff": f"configs/mmdiff/tiny_{family}.yaml", "data.micro_batch_size": 1} if run.smoke else {})})
            model = build_model(config, run.device.type)
            engine = make_engine(config, model)
            subjects = config.data.max_subjects
            one = training_batch(model, size, subjects, device="cpu")
            batch = {**{k: v.expand(config.data.micro_batch_size, *v.shape[1:]).contiguous() for k, v in one.items()},
                     "reader": reader_stub(), "rejected": []}
            trainer = Trainer(config, engine, TrainerState())
            calls, seconds = run.timed(lambda: trainer.advance(batch, time.perf_counter()), warmup=2, most=1 if run.smoke else 30)
        # counted on the meta device at real size; the tiny twin is counted on the CPU, where its real kernels
        # run faster than meta's Python shape rules
        counted = "cpu" if run.smoke else "meta"
        shapes = build_training_model(f"tiny_{family}" if run.smoke else family, run.source, device=counted)
        flops = training_flops(shapes, training_batch(shapes, size, subjects, device=counted))["total"]
        images_per_s = calls * config.data.micro_batch_size / seconds
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name()), None)
        return {"resolution": size, "micro_batch": config.data.micro_batch_size, "subjects": subjects, "steps": calls,
                "step_s": seconds / calls, "images_per_s": images_per_s, "gflops_per_image": flops / 1e9,
                "peak_tflops": peak, "mfu": images_per_s * flops / (peak * 1e12) if peak and not run.smoke else None}
    return section


def latents_section(run: Run) -> dict:
    from mmdiff import zoo

    vae = zoo.build(run.spec("sd15")).vae
    batch, size = (2, 64) if run.smoke else (8, 512)
    pixels = torch.rand(batch, 3, size, size, device=run.device, dtype=vae.dtype) * 2 - 1
    with torch.inference_mode():
        calls, seconds = run.timed(lambda: vae.encode(pixels).latent_dist.parameters, warmup=1, most=2 if run.smoke else 20)
    return {"resolution": size, "batch": batch, "images_per_s": calls * batch / seconds}


def caption_section(run: Run) -> dict:
    from preprocess.caption import CaptionConfig, Captioner

    captioner = Captioner(CaptionConfig(model=run.spec("blip2"), max_new_tokens=4 if run.smoke else 30,
                                        min_new_tokens=4 if run.smoke else 30, num_beams=3))
    images = photos(2 if run.smoke else 16)
    calls, seconds = run.timed(lambda: captioner(images), warmup=1, most=1 if run.smoke else 5)
    return {"batch": len(images), "num_beams": 3, "new_tokens": captioner.config.max_new_tokens,
            "images_per_s": calls * len(images) / seconds}


def detect_section(run: Run) -> dict:
    from preprocess.detect import DetectConfig, Detector

    detector = Detector(DetectConfig(model=run.spec("grounding_dino"), box_threshold=0.0, text_threshold=0.0))
    images = photos(2 if run.smoke else 8)
    phrases = [["a cat", "a cup", "a table"]] * len(images)
    calls, seconds = run.timed(lambda: detector(images, phrases), warmup=1, most=1 if run.smoke else 10)
    return {"batch": len(images), "phrases": 3, "images_per_s": calls * len(images) / seconds}


def segment_section(run: Run) -> dict:
    import numpy as np

    from preprocess.segment import SegmentConfig, Segmenter

    segmenter = Segmenter(SegmentConfig(model=run.spec("sam")))
    images = photos(2 if run.smoke else 8)
    boxes = [np.array([[10, 10, 120, 140], [60, 40, 200, 220]], np.float32)] * len(images)
    calls, seconds = run.timed(lambda: segmenter(images, boxes), warmup=1, most=1 if run.smoke else 10)
    return {"batch": len(images), "boxes": 2, "images_per_s": calls * len(images) / seconds}


def serving_section(run: Run) -> dict:
    from mmdiff import MMDiffConfig, MMDiffModel, MMDiffPipeline, zoo
    from mmdiff.configuration import load_config
    from mmdiff.zoo.spec import ModelSpec

    size, steps = (64, 2) if run.smoke else (512, 20)
    config = load_config("configs/mmdiff/tiny_sd15.yaml", MMDiffConfig) if run.smoke else MMDiffConfig(base_family="sd15")
    torch.manual_seed(0)
    mmdiff = MMDiffPipeline(MMDiffModel.from_specs(ModelSpec(**run.spec("sd15")), ModelSpec(**run.spec("clip_vision")), config))
    plain = zoo.build(run.spec("sd15"))
    plain.set_progress_bar_config(disable=True)
    subject = photos(1)[0]
    settings = {"num_inference_steps": steps, "guidance_scale": 7.5, "height": size, "width": size}
    result = {"resolution": size, "steps": steps, "guidance_scale": 7.5}
    for name, call in (("mmdiff", lambda: mmdiff("a photo of a [cat]", [subject], seed=0, **settings)),
                       ("diffusers", lambda: plain("a photo of a cat", generator=torch.Generator().manual_seed(0), **settings))):
        calls, seconds = run.timed(call, warmup=1, most=1 if run.smoke else 5)
        result[f"{name}_s_per_image"] = seconds / calls
    result["ratio"] = result["mmdiff_s_per_image"] / result["diffusers_s_per_image"]
    return result


def evaluation_section(run: Run) -> dict:
    from benchmarks.bench_eval import register
    from evaluation.benchmark import write_demo
    from evaluation.evaluate import load_evaluation_config, run_evaluation

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri = register(tmp, run.source)
        write_demo(tmp / "bench")
        metric = {"device": str(run.device)} if run.smoke else {"device": str(run.device), "source": "random"}
        config = load_evaluation_config(REPO / "configs/eval/demo.yaml", {
            "benchmark.dreambench": str(tmp / "bench/dataset"), "benchmark.portraits.folder": str(tmp / "bench/portraits"),
            "benchmark.seeds": [0], "generation.steps": 2 if run.smoke else 20, "generation.device": str(run.device),
            "generation.dtype": str(run.dtype).removeprefix("torch."), "output_dir": str(tmp / "out"), "progress": False,
            **{f"metrics.{m}.{k}": v for m in ("clip", "dino") for k, v in metric.items()}})
        started = time.perf_counter()
        result = run_evaluation(config, "models:/bench-eval/1", uri, "loop")
        seconds = time.perf_counter() - started
    images = len(result.table)
    return {"images": images, "generated": int(result.summary["images_scored"]), "seconds_with_loading": seconds,
            "images_per_s": images / seconds}


SECTIONS: dict[str, tuple[Callable[[Run], dict], float]] = {  # name -> (section, budget in seconds on the GPU)
    "train_sd15": (train_section("sd15", 512), 70),
    "train_sdxl": (train_section("sdxl", 1024), 110),
    "latents": (latents_section, 25),
    "caption": (caption_section, 80),
    "detect": (detect_section, 35),
    "segment": (segment_section, 30),
    "serving": (serving_section, 60),
    "evaluation": (evaluation_section, 60),
}


# -- running ------------------------------------------------------------------------------------------

def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def init_distributed(smoke: bool) -> bool:
    """torch.distributed at world size 1: NCCL on the GPU (gloo for --smoke), as a training rank has it.
    True if this call made the group (and set the rendezvous variables that were not set)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if not smoke:
        torch.cuda.set_device(0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        if name not in os.environ:
            os.environ[name] = value
            _SET_HERE.append(name)
    dist.init_process_group("gloo" if smoke else "nccl", device_id=None if smoke else torch.device("cuda", 0))
    return True


_SET_HERE: list[str] = []  # the environment variables init_distributed set, removed again by close_distributed


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    while _SET_HERE:
        os.environ.pop(_SET_HERE.pop(), None)


def run_section(name: str, smoke: bool) -> dict:
    """One section in this process: its figures, or its error; never raises."""
    section, budget = SECTIONS[name]
    started = time.perf_counter()
    try:
        init_distributed(smoke)
        figures = {"ok": True, **section(Run(smoke, budget))}
    except Exception as error:  # noqa: BLE001 - a failing section is recorded, the suite goes on
        figures = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=8)}
    return {**figures, "seconds": time.perf_counter() - started}


def run_isolated(name: str) -> dict:
    """One section in its own process, killed at twice its budget plus start-up (model building)."""
    budget = SECTIONS[name][1]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        try:
            job = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--section", name, "--out", out.name],
                                 cwd=REPO, capture_output=True, text=True, timeout=2 * budget + 60)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {2 * budget + 60} s", "seconds": 2 * budget + 60}
        if job.returncode != 0 or not Path(out.name).stat().st_size:
            return {"ok": False, "error": f"exit {job.returncode}: {job.stderr[-2000:]}"}
        return json.loads(Path(out.name).read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, in this process")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run these sections only")
    parser.add_argument("--out", type=Path, help="the JSON file (default benchmarks/results/gpu_suite[_smoke].json)")
    parser.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:  # a worker of run_isolated
        args.out.write_text(json.dumps(run_section(args.section, smoke=False)))
        return {}
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    elif not torch.cuda.is_available():
        parser.error("no GPU here: run with --smoke (tiny models on CPU), or on a GPU machine")
    import torch.distributed as dist

    started = time.perf_counter()
    sections = {}
    owned = not dist.is_initialized()  # --smoke runs in this process: leave it as it was found
    try:
        for name in args.only or list(SECTIONS):
            sections[name] = run_section(name, smoke=True) if args.smoke else run_isolated(name)
            state = "ok" if sections[name]["ok"] else f"FAILED: {sections[name]['error'].splitlines()[0][:200]}"
            figures = {k: round(v, 4) for k, v in sections[name].items() if isinstance(v, float) and k != "seconds"}
            print(f"gpu_suite {name}: {state} {figures}", flush=True)
    finally:
        if owned:
            close_distributed()
    result = {"device": device_name(), "torch": torch.__version__, "smoke": args.smoke,
              "budget_s": sum(SECTIONS[n][1] for n in sections), "wall_s": time.perf_counter() - started,
              "sections": sections}
    name = "gpu_suite_smoke" if args.smoke else "gpu_suite"
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    else:
        write_result(name, result)
    return result


if __name__ == "__main__":
    main()

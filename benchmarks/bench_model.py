"""MM-Diff cost over the base model at real SD1.5 size (random weights), CPU, 256 px, batch 1 and 4.

1. One denoising step (UNet call, CFG: twice the batch): MM-Diff with 2 subjects vs the base UNet (LoRA
   disabled, diffusers' default processors), same weights. Goal: ratio <= 1.05.
2. One training step (forward + backward): with attention capture + constraint vs without. Goal:
   ratio <= 1.10. Memory both ways: the activations autograd saves for backward (exact, counted by a
   saved-tensors hook, parameters excluded; goal: with <= 1.05x without), and the peak resident memory
   of one training step above the built model, each mode in a fresh process (in one process the
   allocator reuses what the other mode freed, and the figure would depend on the order).
Both ways are measured side by side, alternating, in one process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import psutil
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from mmdiff import MMDiffConfig, MMDiffModel
from mmdiff.attention import SubjectConditioning
from mmdiff.configuration import load_config
from mmdiff.zoo.spec import ModelSpec

from benchmarks.bench_activations import SavedActivations
from benchmarks.report import write_result


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.process, self.base, self.peak, self.running = psutil.Process(), psutil.Process().memory_info().rss, 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def _batch(model: MMDiffModel, size: int, subjects: int, batch: int) -> dict[str, torch.Tensor]:
    crop = model.image_encoder.vision_model.config.image_size
    return {
        "pixel_values": torch.rand(batch, 3, size, size) * 2 - 1, "input_ids": torch.randint(0, 800, (batch, 77)),
        "subject_pixel_values": torch.randn(batch, subjects, 3, crop, crop),
        "subject_token_index": torch.arange(2, 2 + 3 * subjects, 3).expand(batch, -1),
        "subject_valid": torch.ones(batch, subjects, dtype=torch.bool),
        "subject_masks": (torch.rand(batch, subjects, size, size) > 0.5).float(),
    }


def _build() -> tuple[MMDiffModel, MMDiffConfig]:
    config = load_config("configs/mmdiff/sd15.yaml", MMDiffConfig)
    base = load_config("configs/models/sd15_random.yaml", ModelSpec)
    return MMDiffModel.from_specs(base, ModelSpec(family="clip_vision", source="random"), config), config


def _set_constraint(model: MMDiffModel, config: MMDiffConfig, constraint: bool) -> None:
    model.config = config if constraint else config.model_copy(
        update={"supervised_layers": [], "attention_loss_weight": 0.0})


def _step_peak_rss(size: int, batch_size: int, constraint: bool) -> int:
    """Peak resident bytes of one training step above the built model (run in a fresh process)."""
    model, config = _build()
    _set_constraint(model, config, constraint)
    batch = _batch(model, size, 2, batch_size)
    torch.manual_seed(0)
    with PeakRSS() as peak:
        model.training_loss(batch)["loss"].backward()
    return peak.peak


def measure(model: MMDiffModel, config: MMDiffConfig, size: int, batch_size: int, repeats: int) -> dict:
    """Denoise and training-step times and saved activations at one batch size (both ways alternating)."""
    unet = model.unet
    mm_processors = unet.attn_processors
    latents = torch.randn(2 * batch_size, 4, size // 8, size // 8)
    text = torch.randn(2 * batch_size, 77, unet.config.cross_attention_dim)
    batch = _batch(model, size, 2, batch_size)
    with torch.no_grad():
        _, tokens = model.encode_subjects(batch["subject_pixel_values"], batch["subject_valid"])
    subjects = SubjectConditioning(tokens.repeat(2, 1, 1), torch.ones(2 * batch_size, 2, dtype=torch.bool), 1.0,
                                   config.num_tokens)

    def denoise_step(mmdiff: bool) -> float:
        if mmdiff:
            unet.enable_adapters()
            unet.set_attn_processor(dict(mm_processors))  # diffusers pops from the dict
            kwargs = {"cross_attention_kwargs": {"subjects": subjects}}
        else:
            unet.disable_adapters()
            unet.set_attn_processor(AttnProcessor2_0())
            kwargs = {}
        start = time.perf_counter()
        with torch.no_grad():
            unet(latents, torch.full((2 * batch_size,), 500), text, **kwargs)
        return time.perf_counter() - start

    saved = SavedActivations(model)

    def train_step(constraint: bool, count_saved: bool = False) -> float | int:
        """Seconds of one step, or (count_saved, untimed: the hook costs time) its saved-activation bytes."""
        _set_constraint(model, config, constraint)
        torch.manual_seed(0)
        start = time.perf_counter()
        if count_saved:
            with saved:
                loss = model.training_loss(batch)["loss"]
        else:
            loss = model.training_loss(batch)["loss"]
        loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return saved.bytes if count_saved else elapsed

    denoise_step(False), denoise_step(True)  # warm-up
    base_t, mm_t = [], []
    for _ in range(repeats):
        base_t.append(denoise_step(False))
        mm_t.append(denoise_step(True))
    unet.enable_adapters()
    unet.set_attn_processor(dict(mm_processors))
    # these two untimed steps are also the warm-up
    saved_bytes = {"with": train_step(True, count_saved=True), "without": train_step(False, count_saved=True)}
    with_t, without_t = [], []
    for _ in range(repeats):
        with_t.append(train_step(True))
        without_t.append(train_step(False))
    return {
        "denoise_step_s": {"base": min(base_t), "mmdiff_2_subjects": min(mm_t)},
        "denoise_ratio": min(mm_t) / min(base_t),
        "train_step_s": {"with_constraint": min(with_t), "without": min(without_t)},
        "train_ratio": min(with_t) / min(without_t),
        "train_saved_activations_mib": {"with_constraint": saved_bytes["with"] / 2**20,
                                        "without": saved_bytes["without"] / 2**20},
        "saved_activations_ratio": saved_bytes["with"] / saved_bytes["without"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-peak-rss", choices=["with", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_peak_rss:  # child process of the memory measurement
        rss = _step_peak_rss(args.size, args.batch_sizes[0], args.step_peak_rss == "with")
        print(json.dumps({"peak_rss": rss}))
        return
    model, config = _build()
    per_batch = {b: measure(model, config, args.size, b, args.repeats) for b in args.batch_sizes}
    model = None  # free this model (~6 GB) before each child builds its own
    for b, result in per_batch.items():
        peak_rss = {}
        for mode in ("with", "without"):
            child = subprocess.run([sys.executable, "-m", "benchmarks.bench_model", "--size", str(args.size),
                                    "--batch-sizes", str(b), "--step-peak-rss", mode],
                                   capture_output=True, text=True, check=True)
            peak_rss[mode] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss"] / 2**20
        result["train_step_peak_rss_mib"] = {"with_constraint": peak_rss["with"], "without": peak_rss["without"]}
    results = {"device": "cpu", "threads": torch.get_num_threads(), "size": args.size, "repeats": args.repeats,
               "batch": {str(b): r for b, r in per_batch.items()}}
    write_result("bench_model", results)
    for b, r in per_batch.items():
        saved_mib, rss_mib = r["train_saved_activations_mib"], r["train_step_peak_rss_mib"]
        print(f"bench_model batch {b}: denoise step {r['denoise_ratio']:.3f}x base "
              f"({r['denoise_step_s']['mmdiff_2_subjects']:.2f}s vs {r['denoise_step_s']['base']:.2f}s), "
              f"train step with constraint {r['train_ratio']:.3f}x ({r['train_step_s']['with_constraint']:.2f}s vs "
              f"{r['train_step_s']['without']:.2f}s), saved activations {saved_mib['with_constraint']:.0f} vs "
              f"{saved_mib['without']:.0f} MiB ({r['saved_activations_ratio']:.3f}x), step peak RSS "
              f"{rss_mib['with_constraint']:.0f} vs {rss_mib['without']:.0f} MiB")


if __name__ == "__main__":
    main()

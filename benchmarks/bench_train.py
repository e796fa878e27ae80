"""Training step time and peak memory per rank: plain DDP vs DeepSpeed ZeRO-2 (and ZeRO-3), 2 CPU ranks.

ZeRO-3 builds the frozen base partitioned across the ranks (train/partitioned.py), as training does.

    python -m benchmarks.bench_train [--size tiny|sd15] [--steps 5] [--modes ddp zero2 zero3]

Every mode runs the same model (tiny twin, or real SD1.5 + ViT-L/14 sizes with random weights and the
official MM-Diff adapter sizes) on the same fixed batch, in its own 2-rank torchrun job; the modes run
one after another in this one invocation so their ratios compare like with like. Prints one line per
mode and writes benchmarks/results/bench_train_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import write_result

REPO = Path(__file__).resolve().parent.parent
SIZES = {  # base, image encoder, MM-Diff settings, resolution
    "tiny": ("tiny", "tiny", "configs/mmdiff/tiny_sd15.yaml", 64),
    "sd15": ("random", "random", None, 512),
}


def _batch(model, resolution: int, batch_size: int) -> dict[str, torch.Tensor]:
    """A fixed synthetic batch in the training contract (content does not matter for speed)."""
    g = torch.Generator().manual_seed(0)
    size = model.image_processor.crop_size["height"]
    ids = model.tokenizers[0]("a photo of a cat", padding="max_length", max_length=model.tokenizers[0].model_max_length,
                              return_tensors="pt").input_ids
    masks = torch.zeros(batch_size, 2, resolution, resolution)
    masks[:, 0, resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    return {
        "pixel_values": torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1,
        "input_ids": ids.repeat(batch_size, 1),
        "subject_pixel_values": torch.randn(batch_size, 2, 3, size, size, generator=g),
        "subject_token_index": torch.tensor([[4, -1]] * batch_size),
        "subject_valid": torch.tensor([[True, False]] * batch_size),
        "subject_masks": masks,
    }


def worker(mode: str, size: str, steps: int, out: str, resolution: int | None, zero3_config: str | None = None) -> None:
    import torch.distributed as dist
    from mmdiff import MMDiffConfig, MMDiffModel, zoo
    from mmdiff.configuration import load_config
    from mmdiff.zoo.spec import ModelSpec
    from train.engine import TrainingObjective

    base, encoder, mmdiff_yaml, default_resolution = SIZES[size]
    resolution = resolution or default_resolution
    config = load_config(REPO / mmdiff_yaml, MMDiffConfig) if mmdiff_yaml else MMDiffConfig(base_family="sd15")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": int(mode[-1]) if mode != "ddp" else 0},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
    if mode == "zero3" and zero3_config:  # raw DeepSpeed keys, as deepspeed.config passes them in training
        ds_config["zero_optimization"].update(json.loads(zero3_config))
    base_spec, encoder_spec = ModelSpec(family="sd15", source=base), ModelSpec(family="clip_vision", source=encoder)
    if mode == "ddp":
        dist.init_process_group("gloo")
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    if mode == "zero3":  # as train/run.py builds it: the frozen base partitioned while it is built
        from train.partitioned import partitioned_base

        pipe, vision = partitioned_base(base_spec, encoder_spec, ds_config)
    else:
        pipe, vision = zoo.build(base_spec), zoo.build(encoder_spec)
    model = MMDiffModel(pipe, vision, config, base_spec, encoder_spec)
    batch = _batch(model, resolution, batch_size=1)
    objective = TrainingObjective(model)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    if mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(objective)

        def step() -> None:
            ddp(batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)

        def step() -> None:
            loss = engine(batch)["loss"]
            engine.backward(loss)
            engine.step()

    rss_after_init = _rss_mb()
    times = []
    for i in range(steps + 1):  # the first step warms up (allocations, gloo buffers)
        torch.manual_seed(i)
        dist.barrier()
        started = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - started)
    result = {"mode": mode, "rank": dist.get_rank(), "step_s": sorted(times[1:])[len(times[1:]) // 2],
              "rss_after_init_mb": rss_after_init, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.trainable_parameters()),
              "all_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}
    Path(out, f"{mode}-rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", nargs="*", default=["ddp", "zero2", "zero3"])
    parser.add_argument("--resolution", type=int, help="image side; default 64 (tiny) or 512 (sd15)")
    parser.add_argument("--zero3-config", help='JSON merged into zero_optimization for zero3, e.g. \'{"stage3_max_live_parameters": 1e8}\'')
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.size, args.steps, args.out, args.resolution, args.zero3_config)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in args.modes:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  "--master_port", str(port), "-m", "benchmarks.bench_train", "--worker", mode,
                                  "--size", args.size, "--steps", str(args.steps), "--out", out,
                                  *(["--resolution", str(args.resolution)] if args.resolution else []),
                                  *(["--zero3-config", args.zero3_config] if args.zero3_config else [])],
                                 cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if job.returncode != 0:  # e.g. a rank killed for memory: recorded, the other modes still run
                reason = "killed (SIGKILL, out of memory?)" if "exitcode  : -9" in job.stderr else f"exit {job.returncode}"
                rows[mode] = {"failed": reason}
                print(f"bench_train size={args.size} mode={mode} FAILED: {reason}", flush=True)
                continue
            ranks = [json.loads(Path(out, f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]
            rows[mode] = {"step_s": max(r["step_s"] for r in ranks),
                          "peak_rss_mb_per_rank": [round(r["peak_rss_mb"]) for r in ranks],
                          "rss_after_init_mb_per_rank": [round(r["rss_after_init_mb"]) for r in ranks],
                          "trainable_params": ranks[0]["trainable_params"], "all_params": ranks[0]["all_params"]}
            print(f"bench_train size={args.size} mode={mode} step={rows[mode]['step_s']:.3f}s "
                  f"peak_rss_per_rank={rows[mode]['peak_rss_mb_per_rank']} MB", flush=True)
    if "step_s" in rows.get("ddp", {}) and "step_s" in rows.get("zero2", {}):
        ratio = rows["zero2"]["step_s"] / rows["ddp"]["step_s"]
        print(f"bench_train size={args.size} zero2/ddp step time ratio={ratio:.2f}")
    write_result(f"bench_train_{args.size}", {
        "size": args.size, "resolution": args.resolution or SIZES[args.size][3], "ranks": 2, "device": "cpu", "micro_batch": 1,
        "timed_steps": args.steps, "zero3_config": json.loads(args.zero3_config) if args.zero3_config else None, "modes": rows,
        "zero2_over_ddp_step_time": rows["zero2"]["step_s"] / rows["ddp"]["step_s"]
        if "step_s" in rows.get("ddp", {}) and "step_s" in rows.get("zero2", {}) else None})


if __name__ == "__main__":
    main()

"""Training step time with the UNet speed options (mmdiff/speed.py): channels_last and torch.compile.

    python -m benchmarks.bench_speed_options [--size tiny|sd15] [--resolution 64] [--steps 5]
        [--variants plain channels_last compile channels_last+compile]

One process; one model per variant (same seed, same weights), one fixed batch; each timed step is the
training loss forward and backward (``MMDiffModel.training_loss``, as training calls it; the optimizer
step is the same for every variant and left out). After a warm-up (which includes compilation, reported
apart as ``first_step_s``), the variants take turns step by step, so machine load hits all alike; the
median of each and its ratio to ``plain`` are reported. Prints one line per variant and writes
benchmarks/results/bench_speed_options_<size>.json.

On CPU these ratios say whether an option costs anything here; channels_last is meant for the GPU's
convolution kernels and compile's gain depends on the device, so GPU figures need a GPU
(``python -m benchmarks.gpu_suite``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_train import SIZES, _batch
from benchmarks.report import write_result

VARIANTS = {"plain": (False, False), "channels_last": (True, False), "compile": (False, True),
            "channels_last+compile": (True, True)}


def build(size: str, channels_last: bool, compile: bool):
    """The benchmark model of ``size`` (benchmarks/bench_train.py's sizes) with the speed options applied."""
    from mmdiff import MMDiffConfig, MMDiffModel
    from mmdiff.configuration import load_config
    from mmdiff.speed import apply_speed_options
    from mmdiff.zoo.spec import ModelSpec

    base, encoder, mmdiff_yaml, _ = SIZES[size]
    config = load_config(mmdiff_yaml, MMDiffConfig) if mmdiff_yaml else MMDiffConfig(base_family="sd15")
    torch.manual_seed(0)
    model = MMDiffModel.from_specs(ModelSpec(family="sd15", source=base), ModelSpec(family="clip_vision", source=encoder), config)
    apply_speed_options(model.unet, channels_last, compile)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    resolution = args.resolution or SIZES[args.size][3]
    variants = ["plain"] + [v for v in args.variants if v != "plain"]
    models = {v: build(args.size, *VARIANTS[v]) for v in variants}
    batch = _batch(models["plain"], resolution, batch_size=1)

    def step(model) -> float:
        torch.manual_seed(0)
        started = time.perf_counter()
        model.training_loss(batch, return_attention_maps=False)["loss"].backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    first = {v: step(m) for v, m in models.items()}  # warm-up; compilation happens here
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.steps):
        for v, m in models.items():
            times[v].append(step(m))
    median = {v: statistics.median(t) for v, t in times.items()}
    rows = {v: {"step_s": median[v], "first_step_s": first[v], "over_plain": median[v] / median["plain"]} for v in variants}
    for v, row in rows.items():
        print(f"bench_speed_options size={args.size} resolution={resolution} {v}: step={row['step_s']:.3f}s "
              f"({row['over_plain']:.2f}x plain), first step {row['first_step_s']:.1f}s")
    write_result(f"bench_speed_options_{args.size}", {
        "size": args.size, "resolution": resolution, "device": "cpu", "threads": torch.get_num_threads(), "batch": 1,
        "steps": args.steps, "torch": torch.__version__, "variants": rows,
        "note": "CPU ratios; what channels_last and compile buy on a GPU needs a GPU (benchmarks/gpu_suite.py)"})


if __name__ == "__main__":
    main()

"""Training-loop step time of this checkout against another git revision, in one run (1 CPU rank).

    python -m benchmarks.bench_train_loop --before <rev> [--rounds 3] [--steps 6]

Each side runs ``Trainer.run`` (train/engine.py: forward, backward, DeepSpeed step, the step's metrics)
of configs/train/tiny_test.yaml on one fixed synthetic batch, in its own process with that side's code
(the revision is exported with ``git archive``); the two sides take turns for ``--rounds`` rounds, so
machine load hits both alike. The step time is what the trainer itself logs (``step_time_s`` in
losses.jsonl), first step of each process left out; reported as the median per side and their ratio.
Writes benchmarks/results/bench_train_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import write_result

REPO = Path(__file__).resolve().parent.parent


def reader_stub() -> dict:
    """A batch's ``reader`` entry (where its reader slot stands) for a synthetic batch, in the layout of the
    ``train.data.ReaderPosition`` importable here (the layout changes between revisions)."""
    from dataclasses import MISSING, fields

    from train.data import ReaderPosition

    def default(f):
        if f.default_factory is not MISSING:
            return f.default_factory()
        return f.default if f.default is not MISSING else ([] if f.name == "pending" else 0)

    return {"worker": 0, **{f.name: default(f) for f in fields(ReaderPosition)}}


def worker(steps: int, out: str) -> None:
    """Runs in the side's own tree (cwd and PYTHONPATH): only APIs both sides share."""
    import deepspeed
    import torch

    from benchmarks.bench_train import _batch
    from mmdiff.configuration import load_config
    from train.config import TrainConfig
    from train.engine import Trainer, TrainerState
    from train.run import build_model, make_engine

    deepspeed.init_distributed(dist_backend="gloo")
    config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
        "output_dir": out, "data.shards": out, "schedule.max_steps": steps + 1, "schedule.log_every": 10**6,
        "schedule.sample_every": 0, "schedule.checkpoint_every": 0, "optim.lr_warmup_steps": 0})
    model = build_model(config)
    engine = make_engine(config, model)
    batch = {**_batch(model, config.data.resolution, config.data.micro_batch_size),
             "reader": reader_stub(), "rejected": []}
    Trainer.save_checkpoint = lambda self: None  # not what is measured
    torch.manual_seed(0)
    Trainer(config, engine, TrainerState()).run(iter(lambda: batch, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare against (e.g. main~3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.out)
    revision = subprocess.run(["git", "rev-parse", args.before], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    times: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp, "before")
        before_tree.mkdir()
        archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive, check=True)
        for round_ in range(args.rounds):
            for side, tree in (("before", before_tree), ("after", REPO)):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                out = Path(tmp, f"{side}-{round_}")
                out.mkdir()
                env = {**os.environ, "PYTHONPATH": str(tree), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--before", revision, "--worker",
                                "--steps", str(args.steps), "--out", str(out)], cwd=tree, env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
                times[side] += [r["step_time_s"] for r in rows[1:]]
    median = {side: statistics.median(t) for side, t in times.items()}
    ratio = median["after"] / median["before"]
    print(f"bench_train_loop: step before ({revision[:10]}) {median['before']:.3f}s, after {median['after']:.3f}s, "
          f"after/before {ratio:.2f}")
    write_result("bench_train_loop", {"before": revision, "config": "configs/train/tiny_test.yaml", "device": "cpu",
                                      "ranks": 1, "rounds": args.rounds, "steps_per_round": args.steps,
                                      "step_s": median, "after_over_before": ratio, "samples": times})


if __name__ == "__main__":
    main()

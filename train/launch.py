"""Check a training config, then start `deepspeed train/main.py` on it.

    python -m train.launch --config configs/train/demo.yaml --num_gpus 2 [--hostfile H] [KEY=VALUE ...]

Config errors are reported here, before any training process starts. Without a GPU the ranks run on
CPU (DS_ACCELERATOR=cpu, gloo); ``--num_gpus`` is then the number of CPU ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mmdiff.configuration import ConfigError, parse_overrides
from train.config import load_train_config

MAIN = Path(__file__).with_name("main.py")


def command(config: str, num_gpus: int, overrides: list[str], hostfile: str | None = None,
            master_port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + [str(MAIN), "--config", config, *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--num_gpus", type=int, default=1, help="ranks per node (CPU ranks without a GPU)")
    parser.add_argument("--hostfile", help="multi-node: see infra/deepspeed/README.md")
    parser.add_argument("--master_port", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        load_train_config(args.config, parse_overrides(args.overrides))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(MAIN.parent.parent / ".cache" / "torch_extensions"))
    os.execvpe(sys.executable, command(args.config, args.num_gpus, args.overrides, args.hostfile, args.master_port), env)


if __name__ == "__main__":
    sys.exit(main())

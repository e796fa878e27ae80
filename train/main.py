"""Entry point: `deepspeed train/main.py --config configs/train/<name>.yaml [KEY=VALUE ...]`.

Also runs under `torchrun`. Prefer `python -m train.launch`, which checks the config before starting
any process. The logic lives in train/run.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, when run as a script

from mmdiff.configuration import parse_overrides  # noqa: E402
from train.config import load_train_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE, e.g. schedule.max_steps=10")
    args = parser.parse_args()
    config = load_train_config(args.config, parse_overrides(args.overrides))

    from train.run import train

    train(config)


if __name__ == "__main__":
    main()

"""Entry point: `deepspeed --module train.main --config configs/train/<name>.yaml [KEY=VALUE ...]`.

Also runs under `torchrun`. Prefer `python -m train.launch`, which checks the config before starting
any process. The logic lives in train/run.py.
"""

import argparse

from mmdiff.configuration import parse_overrides
from train.config import load_train_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE, e.g. schedule.max_steps=10")
    args = parser.parse_args(argv)
    config = load_train_config(args.config, parse_overrides(args.overrides))

    from train.run import train

    train(config)


if __name__ == "__main__":
    main()

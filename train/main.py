"""One training rank: what `mmdiff-train` (train/launch.py) starts through `deepspeed --module train.main
--config FILE [--set KEY=VALUE ...]`; also runs under `torchrun`. Prefer `mmdiff-train`, which checks the
config before starting any process. The flags are in train/cli.py, the logic in train/run.py.
"""

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Check a training config, then start `deepspeed --module train.main` on it.

    python -m train.launch --config configs/train/demo.yaml --num_gpus 2 [--hostfile H] [KEY=VALUE ...]
    # one command per node, no ssh (Slurm, Kubernetes): every node names its rank and the first node
    python -m train.launch --config C --num_gpus 8 --num_nodes 2 --node_rank 0 --master_addr HOST [--master_port P]

Config errors are reported here, before any training process starts, and so is a tracking server that
does not answer (``mlflow.preflight_wait_s``): the launcher stops with exit status 3, or, with
``mlflow.on_unreachable=spool``, starts the run tracking into its spool (train/tracking.py). Without a GPU
the ranks run on CPU (DS_ACCELERATOR=cpu, gloo); ``--num_gpus`` is then the number of CPU ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmdiff.configuration import ConfigError, parse_overrides
from train.config import TrainConfig, load_train_config

MAIN = Path(__file__).with_name("main.py")


def node_hostfile(num_nodes: int, slots: int) -> str:
    """A hostfile for DeepSpeed's ``--no_ssh`` mode, where it only maps node ranks to slot counts (the
    host names are never contacted); written once per node, outside the run's folders."""
    handle, path = tempfile.mkstemp(prefix="mmdiff-hostfile-", suffix=".txt")
    with os.fdopen(handle, "w") as out:
        out.writelines(f"node-{i} slots={slots}\n" for i in range(num_nodes))
    return path


def command(config: str, num_gpus: int, overrides: list[str], hostfile: str | None = None,
            master_port: int | None = None, node_rank: int | None = None, master_addr: str | None = None) -> list[str]:
    """The DeepSpeed launcher command; ``node_rank`` set means ``--no_ssh``: this node only, with the
    hostfile listing every node and ``master_addr`` the rendezvous host (node 0)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if node_rank is not None:
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    # as a module, so the installed package (or PYTHONPATH) is imported, never a path next to a script
    return cmd + ["--module", "train.main", "--config", config, *overrides]


def tracking_preflight(config: TrainConfig) -> str | None:
    """None when the run can start tracking; else why not. A server that does not answer within
    ``mlflow.preflight_wait_s`` is an error, unless ``mlflow.on_unreachable`` is ``spool``."""
    from train.tracking import server_reachable

    uri, wait = config.tracking_uri, config.mlflow.preflight_wait_s
    deadline = time.monotonic() + wait
    while not server_reachable(uri, timeout_s=min(5.0, max(1.0, wait))):
        if time.monotonic() >= deadline:
            if config.mlflow.on_unreachable == "spool":
                print(f"tracking server {uri} does not answer; training anyway (mlflow.on_unreachable=spool): "
                      f"tracking goes to {Path(config.output_dir) / 'mlflow_spool'} until it answers", file=sys.stderr)
                return None
            return (f"tracking server {uri} does not answer {uri.rstrip('/')}/health (waited {wait:.0f} s). Start it "
                    "(infra/mlflow/), or set mlflow.on_unreachable=spool to train now and send the tracking later")
        time.sleep(1.0)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--num_gpus", type=int, default=1, help="ranks per node (CPU ranks without a GPU)")
    parser.add_argument("--hostfile", help="multi-node: see infra/deepspeed/README.md")
    parser.add_argument("--master_port", type=int)
    parser.add_argument("--num_nodes", type=int, help="without ssh: the number of nodes, each running this command")
    parser.add_argument("--node_rank", type=int, help="without ssh: this node's rank, 0 .. num_nodes-1")
    parser.add_argument("--master_addr", help="without ssh: the address of node 0, reachable from every node")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    no_ssh = args.num_nodes is not None or args.node_rank is not None
    if no_ssh and (args.num_nodes is None or args.node_rank is None or not args.master_addr or args.hostfile):
        parser.error("without ssh give --num_nodes, --node_rank and --master_addr together, and no --hostfile")
    if no_ssh and not 0 <= args.node_rank < args.num_nodes:
        parser.error(f"--node_rank {args.node_rank} is not in 0..{args.num_nodes - 1}")
    try:
        config = load_train_config(args.config, parse_overrides(args.overrides))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if not args.node_rank:  # the node that holds global rank 0, which tracks
        problem = tracking_preflight(config)
        if problem:
            print(f"tracking error: {problem}", file=sys.stderr)
            return 3
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(MAIN.parent.parent / ".cache" / "torch_extensions"))
    hostfile = node_hostfile(args.num_nodes, args.num_gpus) if no_ssh else args.hostfile
    os.execvpe(sys.executable, command(args.config, args.num_gpus, args.overrides, hostfile, args.master_port,
                                       args.node_rank if no_ssh else None, args.master_addr), env)


if __name__ == "__main__":
    sys.exit(main())

"""`mmdiff-train`: check a training config and the tracking server, then start `deepspeed --module
train.main` on it. Its flags, help and examples are in train/cli.py (parsed before torch is imported).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m train.launch`: parse (and answer --help) before the heavy imports below
    import sys

    import train.cli

    sys.exit(train.cli.launch())

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmdiff.configuration import ConfigError, parse_overrides
from train import cli
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
    return cmd + ["--module", "train.main", "--config", config] + (["--set", *overrides] if overrides else [])


def free_port() -> int:
    """A TCP port free on this machine now (the rendezvous of a one-node run binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


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


def run(args: argparse.Namespace) -> int:
    """The launch of ``mmdiff-train``'s parsed arguments: check the config and the tracking server, then
    exec the DeepSpeed launcher (this process becomes it)."""
    try:
        config = load_train_config(args.config, parse_overrides(args.set))
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
    no_ssh = args.node_rank is not None
    hostfile = node_hostfile(args.num_nodes, args.num_gpus) if no_ssh else args.hostfile
    # one node: DeepSpeed's fixed default (29500) would collide with any other run on the machine; across
    # nodes every node must name the same port, so the default stays DeepSpeed's there
    port = args.master_port or (None if no_ssh or hostfile else free_port())
    os.execvpe(sys.executable, command(args.config, args.num_gpus, args.set, hostfile, port, args.node_rank,
                                       args.master_addr), env)


main = cli.launch  # the command itself (parsed in train/cli.py)

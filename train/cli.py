"""The training commands' parsers: ``mmdiff-train`` (train/launch.py), ``mmdiff-generate`` (train/generate.py),
``python -m train.latents``, ``python -m train.tracking`` and ``train.main`` (what DeepSpeed runs).

Light on purpose (see mmdiff/cli.py): each command parses here, then imports the module that does the work.
"""

from __future__ import annotations

import argparse

from mmdiff import cli
from mmdiff.cli import DEMO_TRACKING_URI, CommandParser


def launch_parser() -> CommandParser:
    parser = CommandParser(
        "mmdiff-train",
        "Check a training config, then start `deepspeed --module train.main` on it.\n\n"
        "Config errors are reported here, before any training process starts, and so is a tracking server that\n"
        "does not answer (mlflow.preflight_wait_s): the launcher stops with exit status 3, or, with\n"
        "mlflow.on_unreachable=spool, starts the run tracking into its spool (train/tracking.py). Without a GPU\n"
        "the ranks run on CPU (DS_ACCELERATOR=cpu, gloo); --num-gpus is then the number of CPU ranks. One command\n"
        "per node without ssh (Slurm, Kubernetes): every node gives --num-nodes, its --node-rank and --master-addr.",
        examples=[
            "mmdiff-train --config configs/train/demo.yaml --num-gpus 2",
            ("mmdiff-train --config configs/train/demo.yaml --num-gpus 2 --set run_name=demo-lr1e-4 "
             f"output_dir=outputs/train/demo-lr1e-4 optim.lr=1.0e-4 mlflow.tracking_uri={DEMO_TRACKING_URI}"),
        ])
    parser.add_config("configs/train/<name>.yaml", legacy_overrides=True)
    parser.add_argument("--num-gpus", type=int, default=1, help="ranks per node (CPU ranks without a GPU)")
    parser.add_argument("--hostfile", help="multi-node over ssh: see infra/deepspeed/README.md")
    parser.add_argument("--master-port", type=int,
                        help="the rendezvous port on node 0 (default: a free port when training on this node alone, "
                        "so runs side by side do not collide; DeepSpeed's 29500 across nodes)")
    parser.add_argument("--num-nodes", type=int, help="without ssh: the number of nodes, each running this command")
    parser.add_argument("--node-rank", type=int, help="without ssh: this node's rank, 0 .. num-nodes - 1")
    parser.add_argument("--master-addr", help="without ssh: the address of node 0, reachable from every node")
    return parser


def launch(argv: list[str] | None = None) -> int:
    parser = launch_parser()
    args = parser.parse_args(argv)
    no_ssh = args.num_nodes is not None or args.node_rank is not None
    if no_ssh and (args.num_nodes is None or args.node_rank is None or not args.master_addr or args.hostfile):
        parser.error("without ssh give --num-nodes, --node-rank and --master-addr together, and no --hostfile")
    if no_ssh and not 0 <= args.node_rank < args.num_nodes:
        parser.error(f"--node-rank {args.node_rank} is not in 0..{args.num_nodes - 1}")
    from train.launch import run

    return run(args)


def generate_parser() -> CommandParser:
    parser = CommandParser(
        "mmdiff-generate",
        "Generate an image from a registered (or saved) MM-Diff model.\n\n"
        "--model-uri names the model: models:/<name>/<version>, models:/<name>@<alias>, runs:/<run_id>/<path> or a\n"
        "saved model folder; without it, the newest version of --config's registered model. --subject is an image\n"
        "path or skimage:<name> (a photo shipped with scikit-image), once per [word] marked in --prompt, in order.",
        examples=[
            (f"mmdiff-generate --model-uri models:/mmdiff-demo/1 --tracking-uri {DEMO_TRACKING_URI} "
             '--prompt "a [cat] on a beach" --subject skimage:chelsea --steps 10 --out outputs/demo/generated.png'),
            (f"mmdiff-generate --config configs/train/demo.yaml --set mlflow.tracking_uri={DEMO_TRACKING_URI} "
             '--prompt "a photo of a [cat]" --subject skimage:chelsea --steps 10 --out outputs/demo/latest.png'),
        ], renamed={"--model": "--model-uri"})
    parser.add_argument("--model-uri", help="the model to load (default: models:/<--config's registered model>/latest)")
    parser.add_config("a training config: its tracking URI and registered model (only without --model-uri)",
                      required=False, legacy_overrides=True)
    parser.add_argument("--tracking-uri", help="the MLflow tracking URI for models:/ and runs:/ URIs (default: "
                        "--config's, else MLFLOW_TRACKING_URI)")
    parser.add_argument("--registry-uri", help="the model registry for models:/ URIs (default: --config's "
                        "mlflow.registry_uri, else the tracking store's)")
    parser.add_argument("--prompt", required=True, help='the subjects\' words marked as [word], e.g. "a [cat] on a beach"')
    parser.add_argument("--subject", action="append", required=True, metavar="IMAGE",
                        help="an image path or skimage:<name>; one per [word], in order")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--device", help="default: the model's rule (auto: the GPU when there is one)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        help="default: the model's rule (auto: bfloat16 on a GPU, float32 on the CPU)")
    return parser


def generate(argv: list[str] | None = None) -> int:
    parser = generate_parser()
    args = parser.parse_args(argv)
    if not args.model_uri and not args.config:
        parser.error("give --model-uri, or --config for the newest version of its registered model")
    if args.set and not args.config:
        parser.error("--set overrides keys of --config; give --config too")
    from train.generate import run

    return run(args, parser)


def latents_parser() -> CommandParser:
    parser = CommandParser(
        "python -m train.latents",
        "Cache the VAE latents of a training config's shards (see docs/SHARDS.md): one sidecar tar per shard,\n"
        "beside the pipeline's shards; a rerun skips the shards done. One process per GPU under torchrun:\n"
        "torchrun --nproc_per_node 8 -m train.latents --config ...",
        examples=["python -m train.latents --config configs/train/demo.yaml",
                  "python -m train.latents --config configs/train/demo.yaml --resolutions 64 --batch-size 4  # a rerun: done"])
    parser.add_config("the training config (data.shards, model.base)", legacy_overrides=True)
    parser.add_argument("--resolutions", type=int, nargs="+", help="default: the config's data.resolution")
    parser.add_argument("--batch-size", type=int, default=16, help="crops encoded at once (one bucket per batch)")
    parser.add_argument("--device", default="auto", help="auto: this process's GPU when there is one")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="auto: bfloat16 on a GPU, float32 on the CPU")
    return parser


def latents(argv: list[str] | None = None) -> int:
    return cli.run(latents_parser(), argv, "train.latents:run")


def tracking_parser() -> CommandParser:
    parser = CommandParser(
        "python -m train.tracking",
        "Send a run's spooled MLflow tracking (and its pending registration) to the tracking server: what a\n"
        "run tracked while the server was down, kept under <output_dir>/mlflow_spool/.",
        examples=["python -m train.tracking --config configs/train/demo.yaml --set output_dir=outputs/train/demo"])
    parser.add_config("the run's training config", legacy_overrides=True)
    parser.add_argument("--wait-s", type=float, default=0.0, help="wait this long for the server")
    return parser


def tracking(argv: list[str] | None = None) -> int:
    return cli.run(tracking_parser(), argv, "train.tracking:run")


def main_parser() -> CommandParser:
    parser = CommandParser(
        "python -m train.main",
        "One training rank, as the DeepSpeed launcher (or torchrun) starts it; mmdiff-train checks the config\n"
        "and starts the ranks (deepspeed ... --module train.main --config FILE [--set KEY=VALUE ...]): prefer it.")
    parser.add_config("configs/train/<name>.yaml", legacy_overrides=True)
    # DeepSpeed's own convention (without --no_local_rank); the rank comes from LOCAL_RANK in the environment
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    from mmdiff.configuration import parse_overrides
    from train.config import load_train_config
    from train.run import train

    train(load_train_config(args.config, parse_overrides(args.set)))
    return 0

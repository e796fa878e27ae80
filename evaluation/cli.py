"""The decision commands' parsers: ``mmdiff-evaluate``, ``mmdiff-benchmark``, ``mmdiff-compare`` and
``mmdiff-promote`` (evaluation/<command>.py does the work).

Light on purpose (see mmdiff/cli.py): each command parses here, then imports the module that does the work.
"""

from __future__ import annotations

from mmdiff import cli
from mmdiff.cli import DEMO_TRACKING_URI, CommandParser


def evaluate_parser() -> CommandParser:
    parser = CommandParser(
        "mmdiff-evaluate",
        "The evaluation job: generate every benchmark case with one model, score it, record it in MLflow.\n\n"
        "--model-uri: a registered version (models:/<name>/<version> or models:/<name>@<alias>), a run's adapter\n"
        "(runs:/<run_id>/adapter) or a local adapter folder. A Ray Data job (embedded Ray, or the cluster in\n"
        "ray.address / RAY_ADDRESS); --runner loop runs the same stages in this process. Results go to the run that\n"
        "trained the model (metrics eval.<name>, artifacts eval/<benchmark>/); a case that fails is recorded with\n"
        "its reason and the job goes on.",
        examples=[(f"mmdiff-evaluate --config configs/eval/demo.yaml --model-uri models:/mmdiff-demo/1 "
                  f"--tracking-uri {DEMO_TRACKING_URI} --set output_dir=outputs/eval/demo-v1"),
                  (f"mmdiff-evaluate --config configs/eval/demo.yaml --model-uri models:/mmdiff-demo/2 "
                  f"--tracking-uri {DEMO_TRACKING_URI} --runner loop --set output_dir=outputs/eval/demo-v2")],
        renamed={"--model": "--model-uri"})
    parser.add_config("configs/eval/<name>.yaml")
    parser.add_argument("--model-uri", required=True, help="models:/<name>/<version>, models:/<name>@<alias>, "
                        "runs:/<run_id>/adapter or an adapter folder")
    parser.add_argument("--tracking-uri", help="default: the config's tracking_uri, else MLFLOW_TRACKING_URI")
    parser.add_argument("--registry-uri", help="the model registry for models:/ URIs and the version's tags "
                        "(default: the config's registry_uri, else the tracking store's)")
    parser.add_argument("--runner", choices=("ray", "loop"), default="ray")
    return parser


def evaluate(argv: list[str] | None = None) -> int:
    return cli.run(evaluate_parser(), argv, "evaluation.evaluate:run")


def benchmark_parser() -> CommandParser:
    parser = CommandParser(
        "mmdiff-benchmark",
        "The benchmark an evaluation generates and scores (DreamBench layout, multi-subject pairs, portraits;\n"
        "see evaluation/benchmark.py): `list` prints an evaluation config's cases, one a line, then their count\n"
        "and the benchmark hash; `write-demo` writes the demo set from scikit-image photos.",
        examples=["mmdiff-benchmark write-demo outputs/eval/benchmark",
                  "mmdiff-benchmark list --config configs/eval/demo.yaml",
                  "mmdiff-benchmark list --config configs/eval/demo.yaml --set benchmark.prompts_per_subject=1"])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print the cases of an evaluation config's benchmark",
                                  description="Print the cases of an evaluation config's benchmark, one a line.")
    listing.add_config("configs/eval/<name>.yaml")
    demo = commands.add_parser("write-demo", help="write the demo benchmark from scikit-image photos",
                               description="Write the demo benchmark (DreamBench layout) from scikit-image photos.")
    demo.add_argument("root", help="the folder to write")
    return parser


def benchmark(argv: list[str] | None = None) -> int:
    return cli.run(benchmark_parser(), argv, "evaluation.benchmark:run")


def compare_parser() -> CommandParser:
    parser = CommandParser(
        "mmdiff-compare",
        "Compare runs: one self-contained HTML page (comparison.html: the metrics with the best of each marked,\n"
        "the config that differs, the curves overlaid, same-seed sample grids, attention maps) plus comparison.png,\n"
        "both logged to MLflow on a run tagged mmdiff.kind=comparison in the first run's experiment.",
        examples=[f"mmdiff-compare --experiment mmdiff-demo --tracking-uri {DEMO_TRACKING_URI} --out outputs/compare/demo",
                  (f"mmdiff-compare --experiment mmdiff-demo --filter \"attributes.status = 'FINISHED'\" "
                   f"--tracking-uri {DEMO_TRACKING_URI} --out outputs/compare/demo-only --no-log")])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="compare the runs of this experiment")
    source.add_argument("--runs", nargs="+", help="compare these run ids")
    parser.add_argument("--filter", default="", help="MLflow search filter for --experiment")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    parser.add_argument("--out", default="outputs/compare", help="folder for comparison.html and comparison.png")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    return parser


def compare(argv: list[str] | None = None) -> int:
    return cli.run(compare_parser(), argv, "evaluation.compare:run")


def promote_parser() -> CommandParser:
    parser = CommandParser(
        "mmdiff-promote",
        "Move a registry alias (champion) to the best candidate version (by the gates' rank_by) whose evaluation\n"
        "passes every gate: within the gate's limit, and regressing by no more than its margin against the alias's\n"
        "current holder on the same benchmark. Decisions and reasons are written as model-version tags\n"
        "(promotion.*). Exit status 0: the alias moved; 1: refused; 2: another promotion holds the alias's lease.",
        renamed={"--model": "--model-name"},
        examples=[(f"mmdiff-promote --model-name mmdiff-demo --versions 1 2 --gates configs/eval/gates_demo.yaml "
                   f"--tracking-uri {DEMO_TRACKING_URI}"),
                  (f"mmdiff-promote --model-name mmdiff-demo --versions 1 2 --gates configs/eval/gates_demo.yaml "
                   f"--alias demo-best --set rank_by=clip_i --tracking-uri {DEMO_TRACKING_URI}")])
    parser.add_argument("--model-name", required=True, help="the registered model's name")
    parser.add_argument("--versions", nargs="+", required=True, help="candidate versions")
    parser.add_argument("--gates", required=True, metavar="FILE", help="configs/eval/<gates>.yaml")
    parser.add_overrides()
    parser.add_argument("--alias", help="default: the gates file's alias (champion)")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    parser.add_argument("--registry-uri", help="the model registry holding the versions and the alias "
                        "(default: the tracking store's)")
    parser.add_argument("--lease-wait-s", type=float, default=600.0,
                        help="how long to wait while another promotion of the alias holds its lease")
    return parser


def promote(argv: list[str] | None = None) -> int:
    return cli.run(promote_parser(), argv, "evaluation.promote:run")

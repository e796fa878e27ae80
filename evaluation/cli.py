"""``mmdiff-evaluate``'s parser (evaluation/evaluate.py does the work).

Light on purpose (see mmdiff/cli.py): the command parses here, then imports the evaluation job. The other
evaluation commands (benchmark, compare, promote) import nothing heavy and keep their parsers beside their work.
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
    parser.add_argument("--runner", choices=("ray", "loop"), default="ray")
    return parser


def evaluate(argv: list[str] | None = None) -> int:
    return cli.run(evaluate_parser(), argv, "evaluation.evaluate:run")

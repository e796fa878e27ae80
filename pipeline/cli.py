"""The data commands' parsers: ``mmdiff-preprocess`` (pipeline/preprocess.py), ``python -m
pipeline.contact_sheet``, ``python -m pipeline.report`` and ``python -m pipeline.example_inputs``.

Light on purpose (see mmdiff/cli.py): each command parses here, then imports the module that does the work.
"""

from __future__ import annotations

from mmdiff import cli
from mmdiff.cli import CommandParser


def example_inputs_parser() -> CommandParser:
    parser = CommandParser(
        "python -m pipeline.example_inputs",
        "Write scikit-image's sample photos as demo inputs: JPEG files (photos), the annotation-folder format\n"
        "(annotated) or one caption shard.",
        examples=["python -m pipeline.example_inputs outputs/inputs/photos",
                  "python -m pipeline.example_inputs outputs/inputs/annotated --kind annotated"])
    parser.add_argument("folder", help="the folder to write")
    parser.add_argument("--kind", choices=["photos", "annotated", "shard"], default="photos")
    return parser


def example_inputs(argv: list[str] | None = None) -> int:
    return cli.run(example_inputs_parser(), argv, "pipeline.example_inputs:run")


def preprocess_parser() -> CommandParser:
    parser = CommandParser(
        "mmdiff-preprocess",
        "The preprocessing job: inputs -> validated images -> annotated samples -> WebDataset shards, on an\n"
        "embedded Ray (or on the cluster named by RAY_ADDRESS, as under `ray job submit`). Every input is\n"
        "accounted for exactly once (written, rejected or skipped, with its reason); a rerun resumes. Exit\n"
        "status 2: the output is locked by another job or the input is empty; 3: the output cannot be written.",
        examples=["mmdiff-preprocess --config configs/preprocess/demo.yaml",
                  "mmdiff-preprocess --config configs/preprocess/demo.yaml --set progress=false  # a rerun: nothing left"])
    parser.add_config("configs/preprocess/<name>.yaml")
    return parser


def preprocess(argv: list[str] | None = None) -> int:
    return cli.run(preprocess_parser(), argv, "pipeline.preprocess:run")


def contact_sheet_parser() -> CommandParser:
    parser = CommandParser(
        "python -m pipeline.contact_sheet",
        "QA contact sheet: a PNG grid of samples with masks, boxes and phrases drawn over them.",
        examples=["python -m pipeline.contact_sheet outputs/shards/demo --samples 8 --png outputs/demo/sheet.png"])
    parser.add_argument("output", help="a preprocessing job's output folder (local or s3://)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--png", default=None, help="default: <output>/contact_sheet.png")
    return parser


def contact_sheet(argv: list[str] | None = None) -> int:
    return cli.run(contact_sheet_parser(), argv, "pipeline.contact_sheet:run")


def report_parser() -> CommandParser:
    parser = CommandParser(
        "python -m pipeline.report",
        "The data report of a finished output folder: report.html plus its PNGs (and report.json) in\n"
        "<output>/report/.",
        examples=["python -m pipeline.report outputs/shards/demo --samples 100"])
    parser.add_argument("output", help="a finished preprocessing output folder (local or s3://)")
    parser.add_argument("--samples", type=int, default=5000, help="samples read for the histograms")
    return parser


def report(argv: list[str] | None = None) -> int:
    return cli.run(report_parser(), argv, "pipeline.report:run")

"""One command-line grammar for every mmdiff command (``mmdiff-*`` and their ``python -m`` spellings).

- flags are ``--kebab-case``; an old ``--snake_case`` spelling of a flag still parses, with a warning;
- a command that reads a config takes ``--config FILE`` and ``--set KEY=VALUE`` overrides (dotted keys,
  values read as YAML, repeatable, later ones win);
- ``--model-uri`` names a model (``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/...``
  or a folder), ``--model-name`` a registered model's name;
- ``--version`` prints the installed package's version;
- ``--help`` ends with examples, each a command that runs as written (tests run every one).

This module imports the standard library only: the parsers are built, and ``--help`` answered, before
any command imports torch, Ray or MLflow (each command's heavy work is imported after parsing).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence
from importlib import metadata

DISTRIBUTION = "mmdiff"
# Every command: its `python -m` module -> its console script (pyproject.toml; it runs the same parser). In
# the order `make demo` runs them, so the help examples (the demo's steps) run in this order too.
COMMANDS = {
    "pipeline.example_inputs": None, "pipeline.preprocess": "mmdiff-preprocess", "pipeline.contact_sheet": None,
    "pipeline.report": None, "train.launch": "mmdiff-train", "train.latents": None, "train.tracking": None,
    "train.main": None, "train.generate": "mmdiff-generate", "evaluation.benchmark": "mmdiff-benchmark",
    "evaluation.evaluate": "mmdiff-evaluate", "evaluation.compare": "mmdiff-compare",
    "evaluation.promote": "mmdiff-promote", "infra.k8s.rayservice": None, "infra.k8s.wait": None,
    "infra.serving.cli": "mmdiff-serve",
}
# the help examples' MLflow store: the one `make demo` trains into (a path relative to the repository root)
DEMO_TRACKING_URI = "sqlite:///outputs/train/demo/mlflow.db"


def package_version() -> str:
    """The installed distribution's version (from its metadata, so a wheel answers without the source)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (the mmdiff package is not installed; pip install . or -e .)"


def prose(doc: str) -> str:
    """A module docstring as a command's description: its paragraphs of indented command synopses dropped
    (they hold placeholders; the runnable versions are the parser's examples)."""
    paragraphs = [p for p in doc.strip("\n").split("\n\n")
                  if not all(line.startswith("    ") for line in p.splitlines())]
    return "\n\n".join(paragraphs)


class _Version(argparse.Action):
    """``--version``: the version is looked up only when asked (building a parser reads no metadata)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} (mmdiff) {package_version()}")
        parser.exit()


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` speaking the grammar above.

    ``examples`` are full command lines shown at the end of ``--help`` and kept in ``self.examples`` for
    the tests that run them; ``legacy_overrides=True`` also accepts the old positional ``KEY=VALUE``
    overrides (merged into ``--set``, with a warning); ``renamed`` maps old flag names to current ones
    (accepted with a warning). Abbreviated flags are refused: a new flag must not change what an old
    command line means.
    """

    def __init__(self, prog: str | None = None, description: str | None = None, examples: Sequence[str] = (),
                 renamed: dict[str, str] | None = None, **kwargs):
        self.examples = tuple(examples)
        self.renamed = dict(renamed or {})
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in self.examples) if self.examples else None
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog=prog, description=description, epilog=epilog, **kwargs)
        self.add_argument("--version", action=_Version, help="print the installed mmdiff version and exit")

    def add_config(self, help: str, required: bool = True, legacy_overrides: bool = False) -> None:
        """``--config FILE`` and ``--set KEY=VALUE ...`` (collected in ``args.set``)."""
        self.add_argument("--config", required=required, metavar="FILE", help=help)
        self.add_overrides()
        if legacy_overrides:
            self.add_argument("legacy_overrides", nargs="*", metavar="KEY=VALUE", help=argparse.SUPPRESS)

    def add_overrides(self) -> None:
        self.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                          help="override a config key (dotted, value read as YAML); repeatable, later wins")

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        parsed, rest = super().parse_known_args(self._current_spellings(args), namespace)
        legacy = getattr(parsed, "legacy_overrides", None)
        if legacy is not None:
            del parsed.legacy_overrides
            if legacy:
                self._warn(f"positional KEY=VALUE overrides are deprecated; use --set {shlex.join(legacy)}")
                parsed.set = [*legacy, *parsed.set]
        return parsed, rest

    def _current_spellings(self, args: list[str]) -> list[str]:
        """``--num_gpus 2`` / ``--num_gpus=2`` -> ``--num-gpus`` when this parser knows the kebab-case flag."""
        out = []
        for i, token in enumerate(args):
            if token == "--":
                return out + args[i:]
            flag, eq, value = token.partition("=")
            if flag.startswith("--") and flag not in self._option_string_actions:
                current = self.renamed.get(flag, flag.replace("_", "-"))
                if current != flag and current in self._option_string_actions:
                    self._warn(f"{flag} is deprecated; use {current}")
                    token = current + eq + value
            out.append(token)
        return out

    def _warn(self, message: str) -> None:
        print(f"{self.prog}: warning: {message}", file=sys.stderr)


def run(parser: CommandParser, argv: list[str] | None, target: str) -> int:
    """Parse ``argv`` (answering --help/--version light), then import ``target`` ("module:function", the
    command's work) and call it with the parsed arguments; its return value is the exit status. A config
    that does not load or validate is reported as such (the file and key at fault), exit status 2."""
    args = parser.parse_args(argv)
    from mmdiff.configuration import ConfigError  # after parsing: it imports pydantic and YAML

    module, function = target.split(":")
    try:
        return getattr(importlib.import_module(module), function)(args)
    except ConfigError as exc:
        print(f"{parser.prog}: config error: {exc}", file=sys.stderr)
        return 2

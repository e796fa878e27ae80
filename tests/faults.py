"""Fault injection for the pipeline tests: an importer that fails on chosen inputs, the way real operators
fail. Ray workers import it by name (``stages.annotate.operator: tests.faults:FaultyImporter``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pipeline.config import PreprocessConfig
from pipeline.importer import AnnotationImporter


class FaultyImporter(AnnotationImporter):
    """The importer, except on inputs whose file name contains ``raise`` (a Python exception), ``exit``
    (the worker process ends itself with ``os._exit``) or ``segv`` (it dies of SIGSEGV)."""

    def __init__(self, config: PreprocessConfig) -> None:
        super().__init__(config.annotate.crops)

    def __call__(self, keys, images, annotations, original_sizes):
        for annotation in annotations:
            name = Path(annotation).name
            if "raise" in name:
                raise RuntimeError(f"injected failure on {name}")
            if "exit" in name:
                os._exit(3)
            if "segv" in name:
                os.kill(os.getpid(), signal.SIGSEGV)
        return super().__call__(keys, images, annotations, original_sizes)

"""The model zoo: every model the project uses, built from a :class:`ModelSpec`.

Each family module exposes ``build(spec)`` (real checkpoint, tiny twin or real-size random weights,
picked by ``spec.source``) and ``save_tiny(path, seed)`` (a tiny model written in the family's real
on-disk format, so tests exercise the real loader). ``device: meta`` builds the architecture without
allocating its weights (shapes only, for FLOP counting).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import torch

from mmdiff.extras import require
from mmdiff.zoo.spec import RANDOM, TINY, ModelSpec

__all__ = ["ModelSpec", "TINY", "RANDOM", "build", "save_tiny", "default_dtype", "FAMILY_MODULES"]

FAMILY_MODULES = {
    "sd15": "mmdiff.zoo.diffusion",
    "sdxl": "mmdiff.zoo.diffusion",
    "clip_vision": "mmdiff.zoo.clip_vision",
    "blip2": "mmdiff.zoo.blip2",
    "grounding_dino": "mmdiff.zoo.grounding_dino",
    "sam": "mmdiff.zoo.sam",
    "insightface": "mmdiff.zoo.insightface",
    "clip": "mmdiff.zoo.clip",
    "dino": "mmdiff.zoo.dino",
    "embedding_head": "mmdiff.zoo.embedding_head",
}
# The optional packages (import names) a family, or one of its backends (None: every backend), runs on, and
# the extra that installs them: checked before anything is built.
OPTIONAL_PACKAGES = {
    ("insightface", None): ("face", ("insightface", "onnxruntime")),
    ("grounding_dino", "official"): ("official", ("groundingdino",)),
    ("sam", "official"): ("official", ("segment_anything",)),
}


def _module(family: str):
    return importlib.import_module(FAMILY_MODULES[family])


def build(spec: ModelSpec | dict[str, Any]) -> Any:
    """Build the model a spec names; see the family module for the returned object."""
    if isinstance(spec, dict):
        spec = ModelSpec.model_validate(spec)
    for backend in (None, spec.backend):
        if (spec.family, backend) in OPTIONAL_PACKAGES:
            extra, modules = OPTIONAL_PACKAGES[spec.family, backend]
            require(f"{spec.family} models" + (f" (backend {backend})" if backend else ""), extra, *modules)
    # on "meta", parameters are created there: building on the CPU first would allocate every weight
    with torch.device("meta") if spec.device == "meta" else contextlib.nullcontext():
        return _module(spec.family).build(spec)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside create their floating-point parameters in ``dtype`` (a model built in half
    precision is never first held in float32 on the host); the previous default comes back after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def save_tiny(family: str, path: str | Path, seed: int = 0, **options: Any) -> Path:
    """Write the tiny twin of ``family`` to ``path`` in the family's real checkpoint format."""
    if list(FAMILY_MODULES.values()).count(FAMILY_MODULES[family]) > 1:
        options["family"] = family  # one module serves several families (diffusion: sd15, sdxl)
    return _module(family).save_tiny(Path(path), seed=seed, **options)

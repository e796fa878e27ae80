"""Optional packages: the features that need them say so, with the extra that installs them.

The base install (``pip install mmdiff``) runs preprocessing, training, tracking and evaluation with the
transformers backends. Face identity (insightface), the official Grounding DINO / SAM code, spaCy phrases
and Ray Serve come with extras (pyproject.toml); a feature whose packages are missing fails before it
builds anything, naming the packages and the install command.
"""

from __future__ import annotations

import importlib.util

__all__ = ["require"]


def require(feature: str, extra: str, *modules: str) -> None:
    """Raise ModuleNotFoundError naming ``feature``, the missing ``modules`` (import names) and
    ``pip install 'mmdiff[extra]'`` unless every module is importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ModuleNotFoundError(f"{feature} needs {', '.join(missing)}, which {verb} not installed: "
                                  f"pip install 'mmdiff[{extra}]'", name=missing[0])

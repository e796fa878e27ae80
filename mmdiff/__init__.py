"""MM-Diff: tuning-free personalised image generation with one or several subjects.

The public names are imported lazily: `import mmdiff.configuration` (every config loader, every Ray
worker and job driver) must not pay for torch, diffusers and transformers.
"""

import importlib

_EXPORTS = {
    "MMDiffConfig": "mmdiff.model_config",
    "MMDiffModel": "mmdiff.modeling",
    "MMDiffPipeline": "mmdiff.pipeline",
    "Subject": "mmdiff.pipeline",
    "load_mmdiff_adapter": "mmdiff.pipeline",
    "find_words": "mmdiff.prompting",
    "parse_markers": "mmdiff.prompting",
    "subject_pixel_values": "mmdiff.prompting",
    "tokenize_with_subjects": "mmdiff.prompting",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmdiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

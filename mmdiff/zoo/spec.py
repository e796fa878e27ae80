"""The config entry that names a model: which family, from where, and how to place it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mmdiff.configuration import ConfigModel

Family = Literal["sd15", "sdxl", "clip_vision", "blip2", "grounding_dino", "sam", "insightface", "clip", "dino",
                 "embedding_head"]

# Sources that are not a hub id or a path.
TINY = "tiny"  # tiny random-initialised twin of the real classes, for tests (seconds on CPU)
RANDOM = "random"  # real-size architecture with random weights, for benchmarks


class ModelSpec(ConfigModel):
    """One model of the zoo.

    ``source`` is ``tiny``, ``random``, a local path or a hub id. ``backend`` picks between the
    transformers port and the official package where both exist (Grounding DINO, SAM).
    ``options`` carries family-specific settings documented in each family's module.
    """

    family: Family
    source: str
    backend: Literal["transformers", "official"] = "transformers"
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_tiny(self) -> bool:
        return self.source == TINY

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM

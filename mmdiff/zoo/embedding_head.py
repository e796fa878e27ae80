"""Small heads on CLIP image embeddings (family ``embedding_head``): an aesthetic score, watermark and NSFW
probabilities, as LAION's predictors do (an MLP on the L2-normalised CLIP ViT-L/14 image embedding).

``build(spec)`` returns an :class:`EmbeddingHead`: weights from ``<source>/model.safetensors`` and its
architecture from ``<source>/config.json`` (``{"input_dim": 768, "hidden": [1024, 128, 64, 16],
"output": "score" | "probability"}``); ``tiny`` (input 32, hidden [16]) or ``random`` (input 768,
LAION's aesthetic widths) with random weights. ``score`` heads return the raw output (LAION's aesthetic
scale, about 1 to 10); ``probability`` heads a sigmoid. Convert a released ``.pth`` once with
``torch.load(weights_only=True)`` + :meth:`EmbeddingHead.save_pretrained`; nothing is unpickled here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from mmdiff.configuration import ConfigModel
from mmdiff.zoo.clip_vision import DTYPES
from mmdiff.zoo.spec import ModelSpec

__all__ = ["HeadConfig", "EmbeddingHead", "build", "save_tiny"]

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class HeadConfig(ConfigModel):
    input_dim: int
    hidden: list[int] = [1024, 128, 64, 16]  # LAION's aesthetic predictor
    output: Literal["score", "probability"] = "score"


class EmbeddingHead(torch.nn.Module):
    """``head(embeddings [N, input_dim]) -> [N]`` (scores or probabilities, float32)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.input_dim, *config.hidden, 1]
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(torch.nn.ReLU())
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        out = self.layers(embeddings.to(self.layers[0].weight.dtype)).squeeze(-1).float()
        return torch.sigmoid(out) if self.config.output == "probability" else out

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.config.model_dump_json(indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS_NAME)
        return path


def build(spec: ModelSpec) -> EmbeddingHead:
    dtype = DTYPES[spec.dtype]
    output = spec.options.get("output", "score")
    if spec.is_tiny or spec.is_random:
        torch.manual_seed(spec.seed)
        config = HeadConfig(input_dim=32, hidden=[16], output=output) if spec.is_tiny else HeadConfig(input_dim=768, output=output)
        head = EmbeddingHead(config)
    else:
        folder = Path(spec.source)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise OSError(f"embedding_head: {folder} needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        head = EmbeddingHead(HeadConfig.model_validate_json((folder / CONFIG_NAME).read_text()))
        head.load_state_dict(load_file(folder / WEIGHTS_NAME))
    return head.to(dtype).eval().to(spec.device)


def save_tiny(path: Path, seed: int = 0, output: str = "score") -> Path:
    """Write the tiny head (input 32: the tiny clip_vision's projection) as config.json + safetensors."""
    return build(ModelSpec(family="embedding_head", source="tiny", seed=seed, options={"output": output})).save_pretrained(path)

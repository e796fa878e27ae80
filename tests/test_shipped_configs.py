"""Every YAML shipped under configs/ validates against the schema that reads it, so a config a user
copies for a cluster never fails on a key the code no longer knows."""

from pathlib import Path

import pytest
import yaml

from evaluation.evaluate import load_evaluation_config
from evaluation.promote import GatesConfig
from mmdiff.configuration import load_config
from mmdiff.model_config import MMDiffConfig
from mmdiff.zoo.spec import ModelSpec
from pipeline.config import PreprocessConfig
from preprocess.caption import CaptionConfig
from preprocess.detect import DetectConfig
from preprocess.faces import FaceConfig
from preprocess.segment import SegmentConfig
from train.config import load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/models holds plain model specs, and operator configs (a `model:` spec plus the operator's settings)
OPERATORS = {"blip2": CaptionConfig, "grounding_dino": DetectConfig, "sam": SegmentConfig, "insightface": FaceConfig}


def _load_model_config(path: Path):
    data = yaml.safe_load(path.read_text())
    if "model" in data:
        return load_config(path, OPERATORS[data["model"]["family"]])
    return load_config(path, ModelSpec)


LOADERS = {
    "models": _load_model_config,
    "mmdiff": lambda path: load_config(path, MMDiffConfig),
    "preprocess": lambda path: load_config(path, PreprocessConfig),
    # the training data lives on the cluster; the model config it names must exist and match here
    "train": lambda path: load_train_config(path, check_data=False),
    # promotion gates (gates*.yaml) and evaluation jobs
    "eval": lambda path: load_config(path, GatesConfig) if path.name.startswith("gates") else load_evaluation_config(path),
}


def test_every_config_folder_has_a_loader():
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} == set(LOADERS)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # configs name each other relative to the repository root
    LOADERS[path.parent.name](path)

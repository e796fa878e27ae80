"""The per-image annotation the job's model stage runs, in-process with all four tiny model operators
(BLIP-2 captioner, Grounding DINO, SAM, insightface): real photos in, samples or reasons out."""

import numpy as np
import pytest

from mmdiff.configuration import ConfigError, load_config
from pipeline.config import PreprocessConfig
from pipeline.example_inputs import photo
from preprocess.annotate import Annotator, Rejection
from preprocess.sample import Sample

from tests.test_pipeline_job import CONFIGS


@pytest.fixture(scope="module")
def annotator():
    return Annotator(load_config(CONFIGS / "demo.yaml", PreprocessConfig).annotate)


def test_samples_with_faces_and_captions(annotator):
    images = [photo("astronaut").resize((200, 200)), photo("chelsea").resize((150, 100)), photo("coffee").resize((96, 64))]
    captions = ["a woman in a space suit", "", "two cups and three saucers"]
    results = annotator(["astro", "cat", "cups"], images, captions)
    assert set(annotator.model_ids) == {"caption", "detect", "segment", "faces"}
    first = results[0]
    assert isinstance(first, Sample) and first.caption == captions[0]
    assert [e.word for e in first.entities] == ["woman", "suit"]
    assert first.faces is not None and first.faces.shape == (2, 512) and first.faces.dtype == np.float32
    assert first.meta["models"]["faces"].startswith("insightface:")
    assert first.masks.shape == (2, 200, 200) and first.crops.shape == (2, 64, 64, 3)
    Sample.from_wds(first.to_wds())  # what the shard holds decodes and validates
    # the tiny captioner's text is gibberish: either a sample or a phrase rejection, never a crash
    assert isinstance(results[1], (Sample, Rejection))
    assert results[2] == Rejection("no_phrases", "no single-entity noun phrase in 'two cups and three saucers'")


def test_missing_operator_config_and_bad_keys_are_named():
    base = load_config(CONFIGS / "demo.yaml", PreprocessConfig).annotate
    with pytest.raises(ValueError, match=r"missing operator config\(s\) \['segment'\]"):
        Annotator(base.model_copy(update={"segment": None}))
    with pytest.raises(ConfigError, match="(?s)annotate.detect.*unknown key 'box_treshold'"):
        Annotator(base.model_copy(update={"detect": {**base.detect, "box_treshold": 0.1}}))

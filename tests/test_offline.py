"""With the hub offline, a model that is not on disk fails at once with an error naming it (never a hang
or a silent download)."""

from __future__ import annotations

import os
import signal

import pytest

from mmdiff import zoo

MISSING_HUB_ID = "mmdiff-tests/no-such-model"


@pytest.fixture(autouse=True)
def hang_guard():
    """Turn a hang (e.g. a network retry loop) into a failure instead of a stuck suite."""

    def fail(signum, frame):
        raise TimeoutError("model build did not return within 60 s: something is waiting on the network")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_suite_runs_offline():
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE


@pytest.mark.parametrize("family", ["blip2", "grounding_dino", "sam"])
def test_uncached_hub_id_fails_naming_the_model(family):
    with pytest.raises(OSError, match=f"{family}: cannot load model '{MISSING_HUB_ID}'"):
        zoo.build({"family": family, "source": MISSING_HUB_ID})


def test_official_grounding_dino_never_fetches_bert(tmp_path):
    checkpoint = tmp_path / "groundingdino_swint_ogc.pth"
    checkpoint.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="text_encoder bert-base-uncased is not a local BERT folder"):
        zoo.build({"family": "grounding_dino", "backend": "official", "source": str(checkpoint),
                   "options": {"text_encoder": "bert-base-uncased"}})


@pytest.mark.parametrize("family", ["grounding_dino", "sam"])
def test_official_checkpoint_must_be_a_local_file(family, tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=f"{family}: official checkpoint {missing} not found"):
        zoo.build({"family": family, "backend": "official", "source": str(missing),
                   "options": {"text_encoder": str(tmp_path)}})


def test_insightface_pack_name_is_not_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="insightface: model pack folder buffalo_l not found"):
        zoo.build({"family": "insightface", "source": "buffalo_l"})

"""``python -m benchmarks.reproduce --quick``: every stage of the miniature reproduction runs at toy sizes
(judge, base VAE and UNet, image encoder, real shards, the real Trainer on a DeepSpeed engine, generation,
metrics, bootstrap, JSON and PNG). A smoke test of the machinery: the claims need the full run."""

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import reproduce


def test_scenes_have_exact_masks_and_references_differ_from_targets():
    rng = np.random.default_rng(0)
    train, held_out = reproduce.split_identities()
    assert len(train) == 40 and len(held_out) == 16 and not set(train) & set(held_out)
    image, masks = reproduce.render([("dog", held_out[0]), ("car", held_out[1])], rng)
    assert masks.shape == (2, 32, 32) and not (masks[0] & masks[1]).any()
    background = (image == reproduce.BACKGROUND).all(-1)
    assert (background == ~masks.any(0)).all()  # every painted pixel is inside exactly one mask
    assert reproduce.reference("dog", held_out[0], rng).shape == (reproduce.REF, reproduce.REF, 3)


@pytest.mark.extended
def test_quick_run_writes_json_and_png(tmp_path):
    report = reproduce.main(["--quick", "--out", str(tmp_path / "quick")])
    written = json.loads((tmp_path / "quick.json").read_text())
    assert written["quick"] and set(written["summary"]) == {"none", "both", "no_adapter", "shuffled"}
    for summary in report["summary"].values():
        assert {"identity_ok", "colour_ok", "same_class/leak", "cross_class/collapse"} <= set(summary)
        low, high = summary["identity_ok"]["ci"]
        assert low <= summary["identity_ok"]["mean"] <= high
    assert Image.open(tmp_path / "quick.png").size[0] > 100

"""``python -m benchmarks.reproduce --smoke`` (and ``--quick``, extended): every stage of the miniature
reproduction runs at toy sizes (judge, base VAE and UNet, image encoder, real shards, the real Trainer on
a DeepSpeed engine, generation, metrics, bootstrap, JSON and PNG). A test of the machinery: the claims
need the full run."""

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


def _check_report(report: dict, out, conditions: set[str]) -> None:
    written = json.loads(out.with_suffix(".json").read_text())
    baselines = {f"{b}[{c}]" if c != "both" else b for b in ("no_adapter", "shuffled") for c in conditions}
    assert set(written["summary"]) == conditions | baselines  # every adapter's own baselines
    # the instrument is scored on class as well as identity, and the VAE's ceiling is measured with it
    assert set(written["judge_accuracy_fresh_renders"]) == set(written["vae_reconstruction_ceiling"]) - {"colour"}
    assert all(0 <= v <= 1 for v in written["vae_reconstruction_ceiling"].values())
    gate = written["base_quality_gate"]  # read from the bare base, not an adapter at subject scale 0
    assert gate["passed"] == (gate["class_ok_base_alone"]["mean"] >= 0.6) and gate["class_ok_base_alone"]["n"] > 0
    for summary in report["summary"].values():
        assert {"identity_ok", "colour_ok", "same_class/leak", "cross_class/collapse"} <= set(summary)
        low, high = summary["identity_ok"]["ci"]
        assert low <= summary["identity_ok"]["mean"] <= high
    assert Image.open(out.with_suffix(".png")).size[0] > 100


def test_smoke_run_writes_json_and_png(tmp_path):
    """One step of every stage (CI): judge, base, encoder, shards, Trainer on DeepSpeed, generation, metrics."""
    report = reproduce.main(["--smoke", "--out", str(tmp_path / "smoke")])
    assert report["smoke"] and report["sizes"]["adapter_steps"] == 1 and report["final_training_losses"]["both/0"]
    _check_report(report, tmp_path / "smoke", {"both"})


@pytest.mark.extended
def test_quick_run_writes_json_and_png(tmp_path):
    report = reproduce.main(["--quick", "--out", str(tmp_path / "quick")])
    assert report["quick"]
    _check_report(report, tmp_path / "quick", {"none", "both"})

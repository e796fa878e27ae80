"""Evaluation metrics on known cases, with the metric models loaded through their real loaders
(tiny twins saved as transformers folders / an insightface model pack), and the DreamBench spec reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from evaluation.benchmark import BenchmarkSpec, list_cases, read_dreambench
from evaluation.metrics import ClipScorer, DinoScorer, FaceScorer, crop, region_scores
from mmdiff import zoo
from mmdiff.configuration import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def photo(name: str, size: int | None = None) -> Image.Image:
    image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    return image.resize((size, size)) if size else image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return {family: zoo.save_tiny(family, root / family, seed=3) for family in ("clip", "dino", "insightface")}


@pytest.fixture(scope="module")
def clip(folders):
    return ClipScorer({"family": "clip", "source": str(folders["clip"])})


@pytest.fixture(scope="module")
def dino(folders):
    return DinoScorer({"family": "dino", "source": str(folders["dino"])})


def test_an_image_scores_one_against_itself(clip, dino, folders):
    cat, rocket = photo("chelsea"), photo("rocket")
    for scorer in (clip, dino):
        rows = scorer.image_embeds([cat, cat, rocket])
        assert float(rows[0] @ rows[1]) == pytest.approx(1.0, abs=1e-5)
        assert float(rows[0] @ rows[2]) < 0.9999  # and another photo does not
    face = FaceScorer({"family": "insightface", "source": str(folders["insightface"])})
    astronaut = photo("astronaut")
    assert float(face.embed(astronaut) @ face.embed(astronaut.copy())) == pytest.approx(1.0, abs=1e-5)


def test_clip_t_equals_transformers_clipmodel(clip, folders):
    from transformers import CLIPModel, CLIPProcessor

    image, text = photo("chelsea"), "a cat lying on a rug"
    model = CLIPModel.from_pretrained(folders["clip"]).eval()
    inputs = CLIPProcessor.from_pretrained(folders["clip"])(text=[text], images=[image], return_tensors="pt",
                                                            padding=True)
    with torch.no_grad():
        out = model(**inputs)
        expected = float(out.logits_per_image[0, 0] / model.logit_scale.exp())  # logits = scale * cosine
    ours = float(clip.image_embeds([image])[0] @ clip.text_embeds([text])[0])
    assert ours == pytest.approx(expected, abs=1e-5)


def test_dino_equals_cosine_of_the_cls_tokens(dino, folders):
    from transformers import ViTImageProcessor, ViTModel

    a, b = photo("chelsea"), photo("coffee")
    model = ViTModel.from_pretrained(folders["dino"], add_pooling_layer=False).eval()
    pixels = ViTImageProcessor.from_pretrained(folders["dino"])(images=[a, b], return_tensors="pt").pixel_values
    with torch.no_grad():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    expected = float(torch.nn.functional.cosine_similarity(cls[0], cls[1], dim=0))
    rows = dino.image_embeds([a, b])
    assert float(rows[0] @ rows[1]) == pytest.approx(expected, abs=1e-5)


def test_bf16_scores_follow_fp32(folders):
    image, text = photo("chelsea"), "a cat"
    full = ClipScorer({"family": "clip", "source": str(folders["clip"])})
    half = ClipScorer({"family": "clip", "source": str(folders["clip"]), "dtype": "bfloat16"})
    assert half.clip.model.dtype == torch.bfloat16
    scores = [float(s.image_embeds([image])[0] @ s.text_embeds([text])[0]) for s in (full, half)]
    assert scores[1] == pytest.approx(scores[0], abs=0.03)


def test_subject_pasted_twice_scores_as_collapsed(dino):
    side = 96
    cat, cup = photo("chelsea", side), photo("coffee", side)
    left, right = (0, 0, side, side), (side + 32, 0, 2 * side + 32, side)

    def scene(first: Image.Image, second: Image.Image) -> Image.Image:
        canvas = Image.new("RGB", (2 * side + 32, side), (128, 128, 128))
        canvas.paste(first, left[:2])
        canvas.paste(second, right[:2])
        return canvas

    references = [dino.image_embeds([cat]), dino.image_embeds([cup])]  # subject A = cat, B = cup
    for image, collapsed in ((scene(cat, cat), True), (scene(cat, cup), False)):
        regions = dino.image_embeds([crop(image, left), crop(image, right)])
        scores = region_scores(regions, references)
        assert scores.collapsed is collapsed
    assert scores.identities == [0, 1] and scores.leaked == [False, False]
    assert scores.own[0] == pytest.approx(1.0, abs=1e-5) and scores.other[0] < scores.own[0]
    with pytest.raises(ValueError, match="one region per subject"):
        region_scores(regions[:1], references)


# DreamBench's prompts_and_classes.txt, in its own layout (google/dreambooth dataset/), shortened
DREAMBENCH_FILE = """Classes

subject_name,class
backpack,backpack
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


def test_dreambench_layout_is_read_into_marked_prompts(tmp_path):
    (tmp_path / "prompts_and_classes.txt").write_text(DREAMBENCH_FILE)
    for subject, name in (("backpack", "coffee"), ("dog", "chelsea")):
        (tmp_path / subject).mkdir()
        photo(name, 64).save(tmp_path / subject / "00.jpg")
        photo(name, 48).save(tmp_path / subject / "01.jpg")
    bench = read_dreambench(tmp_path)
    assert bench.classes == {"backpack": "backpack", "dog": "dog"}
    cases = list_cases(BenchmarkSpec(name="t", dreambench=str(tmp_path), seeds=[0, 1],
                                     pairs={"subjects": [["dog", "backpack"]], "prompts": ["a {0} and a {1}"]}))
    prompts = {c.case_id: c.prompt for c in cases}
    assert prompts["single/backpack/p01/s1"] == "a [backpack] in the snow"
    assert prompts["single/dog/p01/s0"] == "a [dog] wearing a red hat"  # live subjects get the live prompts
    assert prompts["multi/dog+backpack/p00/s0"] == "a [dog] and a [backpack]"
    ceiling = [c for c in cases if c.kind == "ceiling"]
    assert len(ceiling) == 4 and all(c.image not in c.references[0] for c in ceiling)
    assert len(cases) == 2 * 2 * 2 + 4 + 2

    (tmp_path / "dog" / "00.jpg").unlink()
    (tmp_path / "dog" / "01.jpg").unlink()
    with pytest.raises(ConfigError, match="subject 'dog' has no photos"):
        read_dreambench(tmp_path)
    with pytest.raises(ConfigError, match="no prompts_and_classes.txt"):
        read_dreambench(tmp_path / "backpack")


def test_region_identity_uses_every_reference():
    refs = [np.eye(4)[[0, 1]], np.eye(4)[[2]]]  # subject 0 has two reference views
    regions = np.eye(4)[[0, 2]]
    scores = region_scores(regions, refs)
    assert scores.own == pytest.approx([0.5, 1.0]) and not scores.collapsed


def test_a_bad_reference_fails_its_cases_only(tmp_path):
    import pandas as pd

    from evaluation.benchmark import Case
    from evaluation.evaluate import ScoreStage

    good, bad, generated = tmp_path / "good.png", tmp_path / "bad.jpg", tmp_path / "generated.png"
    photo("chelsea", 64).save(good)
    bad.write_bytes(b"not an image")
    photo("coffee", 64).save(generated)
    cases = [Case("single/cat/p00/s0", "single", "a [cat]", ["cat"], [str(good)], [[str(good)]], 0),
             Case("single/cup/p00/s0", "single", "a [cup]", ["cup"], [str(bad)], [[str(bad)]], 0)]
    rows = [{**c.row(), "status": "ok", "reason": "", "detail": "", "generate_s": 0.1, "generated": str(generated)}
            for c in cases]
    stage = ScoreStage({"clip": {"family": "clip", "source": "tiny"}, "dino": {"family": "dino", "source": "tiny"}})
    out = stage(pd.DataFrame(rows)).set_index("case_id")
    assert out.loc["single/cat/p00/s0", "status"] == "ok" and np.isfinite(out.loc["single/cat/p00/s0", "dino"])
    failed = out.loc["single/cup/p00/s0"]
    assert failed["status"] == "failed" and failed["reason"] == "unreadable_reference"
    assert str(bad) in failed["detail"]

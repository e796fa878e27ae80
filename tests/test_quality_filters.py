"""Quality filters (preprocess.quality): each rejects its own synthetic case with its reason and keeps a
clean photo; the perceptual hash keeps copies near and distinct photos apart (preprocess.perceptual_hash)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from mmdiff.zoo import ModelSpec, build
from mmdiff.zoo.embedding_head import EmbeddingHead, HeadConfig
from pipeline.config import PreprocessConfig
from pipeline.curation_config import DedupConfig
from pipeline.dedup import hash_distances, variant_hashes
from pipeline.duplicate_corpus import COPIES, DISTINCT
from pipeline.example_inputs import photo
from preprocess.embedding import ImageEmbedder
from preprocess.quality import HeadFilter, QualityConfig, QualityHeads, image_rejection, sharpness, subject_rejection

TINY_CLIP = ModelSpec(family="clip_vision", source="tiny")


@pytest.fixture(scope="module")
def clean() -> Image.Image:
    return photo("chelsea")


def test_blur_rejects_a_blurred_photo_and_keeps_the_photo(clean):
    config = QualityConfig(min_sharpness=50.0)
    blurred = clean.filter(ImageFilter.GaussianBlur(6))
    assert image_rejection(clean, config, "cat.jpg") is None
    reason, detail = image_rejection(blurred, config, "blurred.jpg")
    assert reason == "blurry" and detail.startswith("blurred.jpg: variance of the Laplacian")
    # the measure does not depend on resolution much: the photo at twice its size is still sharp
    assert sharpness(clean.resize((clean.width * 2, clean.height * 2)), 512) > 50.0


def test_aspect_ratio_rejects_a_portrait_strip_and_keeps_the_photo(clean):
    config = QualityConfig(min_aspect=1.0, max_aspect=2.0)
    assert image_rejection(clean, config, "cat.jpg") is None
    assert image_rejection(clean.crop((0, 0, 100, 300)), config, "strip.jpg")[0] == "aspect_ratio"
    assert image_rejection(clean.resize((900, 300)), config, "wide.jpg")[0] == "aspect_ratio"


def test_minimum_subject_area_rejects_a_tiny_subject():
    config = QualityConfig(min_subject_area=0.02)
    masks = np.zeros((2, 100, 100), bool)
    masks[0, 10:60, 10:60] = True  # 25 %
    masks[1, 0:10, 0:10] = True  # 1 %
    reason, detail = subject_rejection(masks, config, "two.jpg", ["dog", "ball"])
    assert reason == "small_subject" and "'ball' covers 0.0100" in detail
    assert subject_rejection(masks[:1], config, "one.jpg", ["dog"]) is None
    assert subject_rejection(masks, QualityConfig(), "off.jpg", ["dog", "ball"]) is None


def _probe(direction: torch.Tensor, midpoint: torch.Tensor, output: str) -> EmbeddingHead:
    """A one-layer head that scores along ``direction``, zero at ``midpoint`` (a closed-form linear probe)."""
    head = EmbeddingHead(HeadConfig(input_dim=len(direction), hidden=[], output=output))
    with torch.no_grad():
        head.layers[0].weight.copy_(50 * direction[None])
        head.layers[0].bias.fill_(float(-50 * direction @ midpoint))
    return head


def test_embedding_heads_load_from_the_zoo_and_reject_their_case(clean, tmp_path):
    embedder = ImageEmbedder(TINY_CLIP, batch_size=2)
    marked = clean.copy()
    draw = ImageDraw.Draw(marked)
    for y in range(0, marked.height, 40):  # a tiled stamp across the photo
        draw.text((10, y), "© STOCK PHOTO " * 6, fill=(255, 255, 255))
        draw.rectangle((0, y + 18, marked.width, y + 24), fill=(255, 255, 255))
    e_clean, e_marked = torch.from_numpy(embedder([clean, marked]))
    direction = torch.nn.functional.normalize(e_marked - e_clean, dim=0)
    midpoint = (e_marked + e_clean) / 2
    for name, output in (("watermark", "probability"), ("nsfw", "probability"), ("aesthetic", "score")):
        sign = -1 if name == "aesthetic" else 1  # aesthetic: the stamped photo is the low-scoring one
        _probe(sign * direction, midpoint, output).save_pretrained(tmp_path / name)
    spec = {"family": "embedding_head", "dtype": "float32"}
    config = QualityConfig(
        watermark=HeadFilter(model={**spec, "source": str(tmp_path / "watermark")}, threshold=0.5),
        aesthetic=HeadFilter(model={**spec, "source": str(tmp_path / "aesthetic")}, threshold=0.0))
    heads = QualityHeads(config)
    verdicts = heads(np.stack([e_clean.numpy(), e_marked.numpy()]), ["cat.jpg", "stamped.jpg"])
    assert verdicts[0] is None
    assert verdicts[1][0] == "low_aesthetic"  # the first configured head that rejects: aesthetic before watermark
    only_watermark = QualityHeads(QualityConfig(watermark=config.watermark))
    assert only_watermark(e_marked.numpy()[None], ["stamped.jpg"])[0][0] == "watermark"
    nsfw = QualityHeads(QualityConfig(nsfw=HeadFilter(model={**spec, "source": str(tmp_path / "nsfw")}, threshold=0.5)))
    assert nsfw(e_marked.numpy()[None], ["x.jpg"])[0][0] == "nsfw" and nsfw(e_clean.numpy()[None], ["c.jpg"])[0] is None
    assert build({**spec, "source": "tiny"}).config.input_dim == e_clean.shape[0]  # the tiny twin fits the tiny CLIP


def test_heads_need_the_dedup_embedding_model():
    base = {"input": {"kind": "folder", "path": "x"}, "output": {"path": "y"}}
    with pytest.raises(ValueError, match="set dedup.embedding"):
        PreprocessConfig.model_validate({**base, "quality": {"nsfw": {"model": {"family": "embedding_head", "source": "tiny"},
                                                                      "threshold": 0.5}}})


def test_perceptual_hash_keeps_copies_near_and_distinct_photos_apart():
    """Measured on the test corpus: every kind of copy within 8 bits of its original, distinct photos 18 or
    more apart (the default threshold, 10, sits between)."""
    crops = DedupConfig().hash_crops
    hashes = {name: variant_hashes(photo(name), crops) for name in DISTINCT}
    for name in ("astronaut", "coffee", "brick"):
        for kind, make in COPIES.items():
            distance = int(hash_distances(hashes[name], variant_hashes(make(photo(name)), crops)[None])[0])
            assert distance <= 8, (name, kind, distance)
    apart = min(int(hash_distances(hashes[a], hashes[b][None])[0]) for a, b in itertools.combinations(DISTINCT, 2))
    assert apart >= 14

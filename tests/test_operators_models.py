"""The model-backed preprocess operators on real photos (skimage), with the tiny twins from configs/models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from mmdiff import zoo
from mmdiff.configuration import ConfigError, load_config
from mmdiff.zoo import blip2
from preprocess.caption import CaptionConfig, Captioner
from preprocess.detect import DetectConfig, Detector, build_prompt
from preprocess.faces import FaceConfig, FaceEmbedder
from preprocess.segment import SegmentConfig, Segmenter

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
# The tiny detector's scores are random: accept every query so the selection logic has work to do.
OPEN_THRESHOLDS = {"box_threshold": 0.0, "text_threshold": 0.0}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]


@pytest.mark.parametrize("name, schema", [
    ("blip2_tiny", CaptionConfig), ("blip2_opt_2.7b", CaptionConfig),
    ("grounding_dino_tiny", DetectConfig), ("grounding_dino_official_tiny", DetectConfig),
    ("grounding_dino_swint", DetectConfig), ("grounding_dino_official_swint", DetectConfig),
    ("sam_tiny", SegmentConfig), ("sam_official_tiny", SegmentConfig), ("sam_vit_base", SegmentConfig),
    ("sam_official_vit_h", SegmentConfig), ("insightface_tiny", FaceConfig), ("insightface_buffalo_l", FaceConfig),
])
def test_model_configs_load(name, schema):
    config = load_config(CONFIGS / f"{name}.yaml", schema)
    assert config.model.family in name


def test_detect_config_defaults_follow_the_method_and_typos_fail():
    config = load_config(CONFIGS / "grounding_dino_tiny.yaml", DetectConfig)
    assert (config.box_threshold, config.text_threshold, config.nms_iou) == (0.3, 0.25, 0.5)
    with pytest.raises(ConfigError, match="box_treshold"):
        load_config(CONFIGS / "grounding_dino_tiny.yaml", DetectConfig, {"box_treshold": 0.5})


def test_captioner_is_deterministic_and_batch_independent(photos, tmp_path):
    captioner = Captioner(load_config(CONFIGS / "blip2_tiny.yaml", CaptionConfig))
    captions = captioner(photos)
    # the tiny twin's generation config keeps it to whole words of its small vocabulary
    words = set((blip2.ASSETS / "caption_words.txt").read_text().split())
    assert len(captions) == 2 and all(c and set(c.split()) <= words for c in captions)
    # the same model saved and loaded through from_pretrained captions identically
    folder = zoo.save_tiny("blip2", tmp_path / "blip2")
    reloaded = Captioner(load_config(CONFIGS / "blip2_tiny.yaml", CaptionConfig, {"model.source": str(folder)}))
    assert reloaded(photos) == captions
    assert captioner(photos) == captions
    assert captioner(photos[1:]) == captions[1:]
    assert captioner([]) == []


def test_build_prompt_spans_locate_each_phrase():
    prompt, spans = build_prompt(["A man", "a flag "])
    assert prompt == "a man . a flag ."
    assert [prompt[a:b] for a, b in spans] == ["a man", "a flag"]


@pytest.mark.parametrize("name", ["grounding_dino_tiny", "grounding_dino_official_tiny"])
def test_detector_returns_well_formed_detections(name, photos):
    detector = Detector(load_config(CONFIGS / f"{name}.yaml", DetectConfig, OPEN_THRESHOLDS))
    phrases = [["a man", "a flag"], ["a cat"]]
    results = detector(photos, phrases)
    assert len(results) == 2
    for image, image_phrases, detections in zip(photos, phrases, results):
        assert detections, "with open thresholds every image gets detections"
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True)
        for d in detections:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
            assert 0 <= d.phrase_index < len(image_phrases) and d.label == image_phrases[d.phrase_index]
    # batching does not change an image's result
    alone = detector(photos[1:], phrases[1:])[0]
    assert [d.phrase_index for d in alone] == [d.phrase_index for d in results[1]]
    np.testing.assert_allclose([d.box for d in alone], [d.box for d in results[1]], atol=0.5)
    # no phrases: nothing to look for; impossible thresholds: nothing found
    assert detector(photos, [[], ["a cat"]])[0] == []


def test_detector_thresholds_filter(photos):
    phrases = [["a man", "a flag"], ["a cat"]]
    config = load_config(CONFIGS / "grounding_dino_tiny.yaml", DetectConfig, OPEN_THRESHOLDS)
    everything = Detector(config)(photos, phrases)
    confident = Detector(config.model_copy(update={"box_threshold": 0.6}))(photos, phrases)
    for loose, strict in zip(everything, confident):
        assert all(d.score > 0.6 for d in strict) and len(strict) <= len(loose)
    assert Detector(config.model_copy(update={"box_threshold": 1.0}))(photos, phrases) == [[], []]


def test_detector_rejects_mismatched_inputs(photos):
    detector = Detector(load_config(CONFIGS / "grounding_dino_tiny.yaml", DetectConfig))
    with pytest.raises(ValueError, match="2 images but 1 phrase lists"):
        detector(photos, [["a cat"]])


@pytest.mark.parametrize("name", ["sam_tiny", "sam_official_tiny"])
def test_segmenter_returns_one_mask_per_box(name, photos):
    segmenter = Segmenter(load_config(CONFIGS / f"{name}.yaml", SegmentConfig))
    boxes = [np.array([[100, 20, 300, 250], [0, 0, 60, 80]], np.float32), np.array([[50, 50, 400, 300]], np.float32)]
    masks = segmenter(photos, boxes)
    assert [m.shape for m in masks] == [(2, 512, 512), (1, 300, 451)]
    assert all(m.dtype == bool for m in masks)
    # the same image and boxes alone give the same masks; an image without boxes gets none
    np.testing.assert_array_equal(segmenter(photos[1:], boxes[1:])[0], masks[1])
    assert segmenter(photos[:1], [np.zeros((0, 4))])[0].shape == (0, 512, 512)


def test_segmenter_names_a_bad_box(photos):
    segmenter = Segmenter(load_config(CONFIGS / "sam_tiny.yaml", SegmentConfig))
    with pytest.raises(ValueError, match="image 1 has a box with x1 <= x0"):
        segmenter(photos, [np.array([[0, 0, 10, 10]]), np.array([[30, 0, 10, 10]])])


def test_face_embedder_fills_faces_inside_boxes_and_nan_elsewhere(photos):
    embedder = FaceEmbedder(load_config(CONFIGS / "insightface_tiny.yaml", FaceConfig))
    whole, corner = [0, 0, 512, 512], [0, 0, 40, 40]  # no face box fits in a 40 px corner
    out = embedder(photos, [np.array([whole, corner], np.float32), np.zeros((0, 4), np.float32)])
    assert [e.shape for e in out] == [(2, 512), (0, 512)] and out[0].dtype == np.float32
    assert np.isfinite(out[0][0]).all() and np.isclose(np.linalg.norm(out[0][0]), 1.0, atol=1e-4)
    assert np.isnan(out[0][1]).all()


# -- GPU readiness: half precision, batched SAM embeddings, one Grounding DINO prompt per image --------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_operators_run_in_half_precision(dtype, photos):
    """bf16/fp16 weights on CPU here, as on GPUs: both backends of each model give well-formed results."""
    half = {"model.dtype": dtype}
    captioner = Captioner(load_config(CONFIGS / "blip2_tiny.yaml", CaptionConfig, half))
    assert next(captioner.model.parameters()).dtype == getattr(torch, dtype)
    assert all(isinstance(c, str) for c in captioner(photos))
    for name in ("grounding_dino_tiny", "grounding_dino_official_tiny"):
        detector = Detector(load_config(CONFIGS / f"{name}.yaml", DetectConfig, {**half, **OPEN_THRESHOLDS}))
        for image, detections in zip(photos, detector(photos, [["a man", "a flag"], ["a cat"]])):
            assert detections and all(0 <= d.box[0] <= d.box[2] <= image.width for d in detections), name
    boxes = [np.array([[100, 20, 300, 250]], np.float32), np.array([[50, 50, 400, 300]], np.float32)]
    for name in ("sam_tiny", "sam_official_tiny"):
        masks = Segmenter(load_config(CONFIGS / f"{name}.yaml", SegmentConfig, half))(photos, boxes)
        assert [m.shape for m in masks] == [(1, 512, 512), (1, 300, 451)] and all(m.any() for m in masks), name


def test_face_embedder_names_the_precision_it_runs_at():
    with pytest.raises(ValueError, match="ONNX graphs at their exported precision"):
        FaceEmbedder(load_config(CONFIGS / "insightface_tiny.yaml", FaceConfig, {"model.dtype": "bfloat16"}))


def _record_calls(module: torch.nn.Module, calls: list) -> None:
    module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)


@pytest.mark.parametrize("name", ["sam_tiny", "sam_official_tiny"])
def test_segmenter_embeds_each_image_once_in_one_batch(name, photos):
    segmenter = Segmenter(load_config(CONFIGS / f"{name}.yaml", SegmentConfig))
    encoder = segmenter.model.image_encoder if name == "sam_official_tiny" else segmenter.model[0].vision_encoder
    calls: list = []
    _record_calls(encoder, calls)
    three_boxes = np.array([[100, 20, 300, 250], [0, 0, 60, 80], [10, 10, 500, 500]], np.float32)
    segmenter(photos, [three_boxes, np.array([[50, 50, 400, 300]], np.float32)])
    ((args, kwargs),) = calls  # one encoder pass for the whole batch, however many boxes
    pixels = args[0] if args else kwargs["pixel_values"]
    assert pixels.shape[0] == 2


@pytest.mark.parametrize("name", ["grounding_dino_tiny", "grounding_dino_official_tiny"])
def test_detector_runs_one_batch_with_a_prompt_per_image(name, photos):
    detector = Detector(load_config(CONFIGS / f"{name}.yaml", DetectConfig, OPEN_THRESHOLDS))
    model = detector.model if name == "grounding_dino_official_tiny" else detector.model.model
    calls: list = []
    _record_calls(model, calls)
    detector(photos, [["a man", "a flag"], ["a cat"]])
    ((args, kwargs),) = calls
    if name == "grounding_dino_official_tiny":
        assert kwargs["captions"] == ["a man . a flag .", "a cat ."] and args[0].tensors.shape[0] == 2
    else:
        assert kwargs["pixel_values"].shape[0] == kwargs["input_ids"].shape[0] == 2
        assert not torch.equal(kwargs["input_ids"][0], kwargs["input_ids"][1])


def test_detector_preprocesses_on_the_model_device_as_the_processor_does_from_pil(photos):
    """The detector hands the processor uint8 tensors and its device (the processor's torch path runs
    there): pixel values, mask and model outputs equal the processor's PIL path."""
    detector = Detector(load_config(CONFIGS / "grounding_dino_tiny.yaml", DetectConfig, OPEN_THRESHOLDS))
    bundle = detector.model
    prompts = ["a man . a flag .", "a cat ."]
    reference = bundle.processor(images=photos, text=prompts, padding="longest", return_tensors="pt")
    seen = {}
    model_call = type(bundle.model).__call__

    def recording(model, **inputs):
        seen.update(inputs)
        return model_call(model, **inputs)

    with torch.inference_mode():
        expected = bundle.model(**reference)  # before recording: seen holds only what the detector passed
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(bundle.model), "__call__", recording)
            logits, boxes = detector._forward_transformers(photos, prompts)
    for key in ("pixel_values", "input_ids", "attention_mask", "token_type_ids"):
        torch.testing.assert_close(seen[key], reference[key], atol=1e-5, rtol=0)
    # the padding mask as bool (the model reads it as float): an eighth of the processor's int64
    assert seen["pixel_mask"].dtype == torch.bool and torch.equal(seen["pixel_mask"].long(), reference["pixel_mask"])
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(boxes, expected.pred_boxes, atol=1e-4, rtol=1e-4)


def test_segmenter_preprocesses_and_upsamples_on_the_model_device_as_the_processor_does_from_pil(photos):
    """The segmenter hands SAM's processor uint8 tensors and its device, and upsamples the masks there:
    the same boolean masks as the processor's PIL path with masks post-processed on the host."""
    segmenter = Segmenter(load_config(CONFIGS / "sam_tiny.yaml", SegmentConfig))
    model, processor = segmenter.model
    boxes = [np.array([[100, 20, 300, 250], [0, 0, 60, 80]], np.float32), np.array([[50, 50, 400, 300]], np.float32)]
    inputs = processor(images=photos, return_tensors="pt")
    expected = []
    with torch.inference_mode():
        embeddings = model.get_image_embeddings(inputs["pixel_values"])
        for i, image_boxes in enumerate(boxes):
            (h, w), (new_h, new_w) = inputs["original_sizes"][i].tolist(), inputs["reshaped_input_sizes"][i].tolist()
            scaled = torch.from_numpy(image_boxes) * torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
            out = model(image_embeddings=embeddings[i : i + 1], input_boxes=scaled[None], multimask_output=False)
            expected.append(processor.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"][i : i + 1],
                                                         inputs["reshaped_input_sizes"][i : i + 1])[0][:, 0].numpy())
    for mask, reference in zip(segmenter(photos, boxes), expected):
        np.testing.assert_array_equal(mask, reference)

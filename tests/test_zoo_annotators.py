"""Annotation-model families of the zoo: tiny twins run, and the real loaders read back the real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from mmdiff import zoo
from mmdiff.zoo import grounding_dino, sam


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def _spec(family: str, source: str = "tiny", **fields) -> zoo.ModelSpec:
    return zoo.ModelSpec(family=family, source=source, **fields)


# -- BLIP-2 ----------------------------------------------------------------------------------------------
def _blip2_logits(bundle, image):
    inputs = bundle.processor(images=[image], text=["a photo of"], return_tensors="pt")
    with torch.no_grad():
        return bundle.model(**inputs).logits


def test_blip2_tiny_generates_and_round_trips_through_from_pretrained(tmp_path, astronaut):
    tiny = zoo.build(_spec("blip2"))
    assert type(tiny.model).__name__ == "Blip2ForConditionalGeneration"
    inputs = tiny.processor(images=[astronaut], text=[""], return_tensors="pt")
    generated = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)

    folder = zoo.save_tiny("blip2", tmp_path / "blip2", seed=0)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = zoo.build(_spec("blip2", str(folder)))
    torch.testing.assert_close(_blip2_logits(loaded, astronaut), _blip2_logits(tiny, astronaut))
    assert loaded.processor.tokenizer("a cat").input_ids == tiny.processor.tokenizer("a cat").input_ids


def test_blip2_tiny_depends_on_seed(astronaut):
    a, b = zoo.build(_spec("blip2", seed=0)), zoo.build(_spec("blip2", seed=1))
    assert not torch.allclose(_blip2_logits(a, astronaut), _blip2_logits(b, astronaut))


# -- Grounding DINO --------------------------------------------------------------------------------------
def test_grounding_dino_transformers_round_trip(tmp_path, astronaut):
    tiny = zoo.build(_spec("grounding_dino"))
    folder = zoo.save_tiny("grounding_dino", tmp_path / "gd", seed=0)
    loaded = zoo.build(_spec("grounding_dino", str(folder)))
    outputs = []
    for bundle in (tiny, loaded):
        inputs = bundle.processor(images=[astronaut], text=["a man . a flag ."], return_tensors="pt")
        with torch.no_grad():
            outputs.append(bundle.model(**inputs))
    assert outputs[0].logits.shape == (1, 30, 256) and outputs[0].pred_boxes.shape == (1, 30, 4)
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits)
    torch.testing.assert_close(outputs[1].pred_boxes, outputs[0].pred_boxes)


def _official_forward(model, image_size: int = 64):
    from groundingdino.util.misc import nested_tensor_from_tensor_list

    torch.manual_seed(0)
    pixels = torch.randn(3, image_size, image_size)
    with torch.no_grad():
        return model(nested_tensor_from_tensor_list([pixels]), captions=["a man . a flag ."])


@pytest.fixture(scope="module")
def official_gd_folder(tmp_path_factory):
    return zoo.save_tiny("grounding_dino", tmp_path_factory.mktemp("gdo"), seed=0, backend="official")


def test_grounding_dino_official_round_trip_through_pth(official_gd_folder):
    tiny = zoo.build(_spec("grounding_dino", backend="official"))
    folder = official_gd_folder
    spec = _spec("grounding_dino", str(folder / grounding_dino.OFFICIAL_CHECKPOINT), backend="official",
                 options={"config_file": str(folder / grounding_dino.OFFICIAL_CONFIG),
                          "text_encoder": str(folder / grounding_dino.OFFICIAL_BERT)})
    loaded = zoo.build(spec)
    expected, got = _official_forward(tiny), _official_forward(loaded)
    assert expected["pred_logits"].shape == (1, 30, 256)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])


def test_grounding_dino_official_rejects_a_mismatched_checkpoint(tmp_path, official_gd_folder):
    folder = official_gd_folder
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"feat_map.weight": torch.zeros(3, 3)}}, bad)
    spec = _spec("grounding_dino", str(bad), backend="official",
                 options={"config_file": str(folder / grounding_dino.OFFICIAL_CONFIG),
                          "text_encoder": str(folder / grounding_dino.OFFICIAL_BERT)})
    with pytest.raises((ValueError, RuntimeError), match="bad.pth|feat_map"):
        zoo.build(spec)


def test_groundingdino_text_masking_keeps_phrases_and_padding_apart():
    """groundingdino-py's sub-sentence masks, run through BERT with the compat layer, isolate each phrase."""
    from groundingdino.models.GroundingDINO.bertwarper import (
        BertModelWarper,
        generate_masks_with_special_tokens_and_transfer_map,
    )
    from transformers import BertModel, BertTokenizer

    from mmdiff.zoo.compat.groundingdino import install

    install()
    tokenizer = BertTokenizer.from_pretrained(grounding_dino.BERT_ASSETS)
    torch.manual_seed(0)
    bert = BertModelWarper(BertModel(grounding_dino._tiny_bert_config(len(tokenizer))).eval())
    special = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"])
    tokenized = tokenizer(["a man . a flag .", "a flag ."], padding="longest", return_tensors="pt")
    masks, positions, phrase_tokens = generate_masks_with_special_tokens_and_transfer_map(tokenized, special, tokenizer)
    # [CLS] a man . a flag . [SEP]: phrase blocks (incl. their '.') are tokens 1-3 and 4-6
    assert masks[0, 2, 1:4].all() and not masks[0, 2, 4:].any() and not masks[0, 2, 0]
    assert torch.equal(positions[0, 1:4], torch.arange(3)) and torch.equal(positions[0, 4:7], torch.arange(3))
    assert [m.nonzero().flatten().tolist() for m in phrase_tokens[0]] == [[1, 2], [4, 5]]
    # the short row's padding sees only itself and nothing real sees the padding
    pad = tokenized["attention_mask"][1] == 0
    assert pad.any() and not masks[1][~pad][:, pad].any()

    inputs = {k: v for k, v in tokenized.items() if k != "attention_mask"}
    with torch.no_grad():
        hidden = bert(**inputs, attention_mask=masks, position_ids=positions)["last_hidden_state"]
        # "a flag ." as a phrase of a longer prompt == as the first phrase of a padded shorter prompt
        torch.testing.assert_close(hidden[0, 4:7], hidden[1, 1:4])
        # and without the sub-sentence mask the same tokens see the other phrase, so they differ
        plain = bert(**inputs, attention_mask=tokenized["attention_mask"])["last_hidden_state"]
    assert not torch.allclose(plain[0, 4:7], plain[1, 1:4], atol=1e-4)


# -- SAM ---------------------------------------------------------------------------------------------------
def test_sam_transformers_round_trip(tmp_path):
    tiny = zoo.build(_spec("sam"))
    folder = zoo.save_tiny("sam", tmp_path / "sam", seed=0)
    loaded = zoo.build(_spec("sam", str(folder)))
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 4.0, 40.0, 50.0], [10.0, 0.0, 60.0, 30.0]]])
    with torch.no_grad():
        expected = tiny.model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks
        got = loaded.model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks
    assert expected.shape == (1, 2, 1, 32, 32)  # 4x the 8 x 8 image embedding
    torch.testing.assert_close(got, expected)


def _official_sam_masks(model):
    torch.manual_seed(0)
    batch = [{"image": torch.rand(3, 64, 48) * 255, "original_size": (64, 48),
              "boxes": torch.tensor([[4.0, 4.0, 40.0, 50.0]])}]
    return model(batch, multimask_output=False)[0]


def test_sam_official_round_trip_through_pth(tmp_path):
    tiny = zoo.build(_spec("sam", backend="official"))
    assert type(tiny).__name__ == "Sam"
    folder = zoo.save_tiny("sam", tmp_path / "samo", seed=0, backend="official")
    loaded = zoo.build(_spec("sam", str(folder / sam.OFFICIAL_CHECKPOINT), backend="official",
                             options={"config": str(folder / sam.OFFICIAL_CONFIG)}))
    expected, got = _official_sam_masks(tiny), _official_sam_masks(loaded)
    assert expected["masks"].shape == (1, 1, 64, 48) and expected["masks"].dtype == torch.bool
    torch.testing.assert_close(got["low_res_logits"], expected["low_res_logits"])


def test_sam_official_checkpoint_of_wrong_architecture_is_named(tmp_path):
    folder = zoo.save_tiny("sam", tmp_path / "samo", seed=0, backend="official")
    with pytest.raises(ValueError, match="sam.pth"):
        zoo.build(_spec("sam", str(folder / sam.OFFICIAL_CHECKPOINT), backend="official", options={"model_type": "vit_b"}))


# -- insightface -------------------------------------------------------------------------------------------
def test_insightface_tiny_folder_loads_through_face_analysis(tmp_path, astronaut):
    folder = zoo.save_tiny("insightface", tmp_path / "pack", seed=0)
    assert sorted(p.name for p in folder.iterdir()) == ["det_tiny.onnx", "rec_tiny.onnx"]
    loaded = zoo.build(_spec("insightface", str(folder)))
    tiny = zoo.build(_spec("insightface"))
    assert type(loaded.models["detection"]).__name__ == "SCRFD"
    assert type(loaded.models["recognition"]).__name__ == "ArcFaceONNX"
    bgr = np.ascontiguousarray(np.asarray(astronaut)[:, :, ::-1])
    faces, twin_faces = loaded.get(bgr), tiny.get(bgr)
    assert faces and len(faces) == len(twin_faces)
    assert faces[0].kps.shape == (5, 2) and faces[0].det_score > 0.5
    for face, twin in zip(faces, twin_faces):
        np.testing.assert_allclose(face.bbox, twin.bbox, atol=1e-3)
        np.testing.assert_allclose(face.normed_embedding, twin.normed_embedding, atol=1e-5)
        assert face.normed_embedding.shape == (512,)


# -- built in the run dtype ------------------------------------------------------------------------------
@pytest.mark.parametrize("family, backend", [("blip2", "transformers"), ("sam", "transformers"), ("sam", "official"),
                                             ("grounding_dino", "transformers")])
def test_models_are_built_in_their_run_dtype_never_first_in_float32(family, backend, tmp_path, monkeypatch):
    """Every floating parameter is created in bfloat16 (BLIP-2 OPT-2.7b in float32 first would take 15.5 GB
    of host memory), from a checkpoint folder as from the tiny twin; the default dtype comes back after."""
    created = []
    register = torch.nn.Module.register_parameter

    def recording(module, name, param):
        if param is not None and param.is_floating_point():
            created.append(param.dtype)
        return register(module, name, param)

    monkeypatch.setattr(torch.nn.Module, "register_parameter", recording)
    sources = ["tiny"]
    if backend == "transformers":
        sources.append(str(zoo.save_tiny(family, tmp_path / family)))
    for source in sources:
        created.clear()
        zoo.build(_spec(family, source, backend=backend, dtype="bfloat16"))
        assert created and set(created) == {torch.bfloat16}, source
    assert torch.get_default_dtype() == torch.float32

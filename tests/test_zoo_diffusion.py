"""Zoo families sd15 / sdxl / clip_vision: tiny twins run, and the real loaders read what save_tiny writes."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from mmdiff import zoo
from mmdiff.configuration import load_config
from mmdiff.zoo.diffusion import tiny_tokenizer
from mmdiff.zoo.spec import ModelSpec

CONFIGS = "configs/models"


def _generate(pipe, seed=0):
    return pipe("a dog sitting on the beach", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("family, cls", [("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)])
def test_tiny_diffusion_round_trip(tmp_path, family, cls):
    spec = load_config(f"{CONFIGS}/{family}_tiny.yaml", ModelSpec)
    pipe = zoo.build(spec)
    assert isinstance(pipe, cls)
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # Cross-attention at two latent resolutions (plus mid block) for attention capture to hook.
    resolutions = {name.split(".")[0] + name.split(".")[1] for name in pipe.unet.attn_processors
                   if "attn2" in name and not name.startswith("mid")}
    assert len(resolutions) >= 2
    folder = zoo.save_tiny(family, tmp_path / family, seed=spec.seed)
    loaded = zoo.build(ModelSpec(family=family, source=str(folder)))
    assert isinstance(loaded, cls)
    np.testing.assert_array_equal(_generate(loaded), images)


def test_tiny_is_deterministic_from_seed():
    a = zoo.build(ModelSpec(family="sd15", source="tiny", seed=1)).unet
    b = zoo.build(ModelSpec(family="sd15", source="tiny", seed=1)).unet
    c = zoo.build(ModelSpec(family="sd15", source="tiny", seed=2)).unet
    wa, wb, wc = (m.conv_in.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_tokenizer_keeps_words_whole():
    tokenizer = tiny_tokenizer()
    for word in ["dog", "cat", "man", "woman", "person", "sitting", "beach"]:
        assert tokenizer.tokenize(f"a {word}") == ["a</w>", f"{word}</w>"]
    # Unknown words fall back to byte pieces instead of failing.
    pieces = tokenizer.tokenize("zyxq")
    assert "".join(pieces).replace("</w>", "") == "zyxq"
    assert tokenizer.unk_token_id not in tokenizer("zyxq").input_ids[1:-1]


def test_clip_vision_round_trip(tmp_path):
    spec = load_config(f"{CONFIGS}/clip_vision_tiny.yaml", ModelSpec)
    encoder = zoo.build(spec)
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    pixels = encoder.processor(images=image, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, encoder.image_size, encoder.image_size)
    out = encoder.model(pixel_values=pixels, output_hidden_states=True)
    folder = zoo.save_tiny("clip_vision", tmp_path / "clip")
    loaded = zoo.build(ModelSpec(family="clip_vision", source=str(folder)))
    pixels2 = loaded.processor(images=image, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels2, pixels, rtol=0, atol=0)
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    out2 = loaded.model(pixel_values=pixels2, output_hidden_states=True)
    # The loaded model may pick another (numerically equivalent) attention kernel.
    torch.testing.assert_close(out2.image_embeds, out.image_embeds, rtol=0, atol=1e-6)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="colour"):
        zoo.build(ModelSpec(family="sd15", source="tiny", options={"colour": 1}))

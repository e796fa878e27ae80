"""MMDiffPipeline call contract: subject binding, marker syntax, batches, seeds, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from mmdiff import (MMDiffConfig, MMDiffModel, MMDiffPipeline, Subject, parse_markers, subject_pixel_values,
                    tokenize_with_subjects)
from mmdiff.configuration import load_config
from mmdiff.zoo.spec import ModelSpec
from preprocess.crops import CropConfig, SubjectCropper

GEN = dict(num_inference_steps=2, height=64, width=64, guidance_scale=5.0, output_type="np", start_step=0)


@pytest.fixture(scope="module")
def pipe() -> MMDiffPipeline:
    config = load_config("configs/mmdiff/tiny_sd15.yaml", MMDiffConfig)
    torch.manual_seed(0)
    model = MMDiffModel.from_specs(ModelSpec(family="sd15", source="tiny"),
                                   ModelSpec(family="clip_vision", source="tiny"), config)
    with torch.no_grad():  # a "trained" model: non-zero LoRA, so subjects matter
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return MMDiffPipeline(model)


def test_marker_syntax_equals_explicit_subjects(pipe):
    explicit = pipe("a dog and a cat", [Subject("dog", data.chelsea()), Subject("cat", data.coffee())],
                    seed=1, **GEN).images
    marked = pipe("a [dog] and a [cat]", [data.chelsea(), data.coffee()], seed=1, **GEN).images
    np.testing.assert_array_equal(explicit, marked)


def test_batches_and_seeds(pipe):
    out = pipe(["a dog on the beach", "a dog in the snow"], [Subject("dog", data.chelsea())],
               num_images_per_prompt=2, seed=0, **GEN).images
    assert out.shape == (4, 64, 64, 3)
    again = pipe(["a dog on the beach", "a dog in the snow"], [Subject("dog", data.chelsea())],
                 num_images_per_prompt=2, seed=0, **GEN).images
    np.testing.assert_array_equal(out, again)
    pil = pipe("a dog", [Subject("dog", data.chelsea())], seed=0, num_inference_steps=2, height=64, width=64).images
    assert isinstance(pil[0], Image.Image)


def test_per_prompt_subjects_batch_equals_separate_calls(pipe):
    """Serving batches different requests into one call: each row must be what its own call gives."""
    prompts, subjects = ["a [dog] on the beach", "a [cat] in the snow"], [[data.chelsea()], [data.coffee()]]
    generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
    batched = pipe(prompts, subjects, generator=generators, **GEN).images
    for row, (prompt, subject, seed) in enumerate(zip(prompts, subjects, (3, 4))):
        alone = pipe(prompt, subject, seed=seed, **GEN).images[0]
        np.testing.assert_allclose(batched[row], alone, atol=1e-5)
    swapped = pipe(prompts, subjects[::-1], generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **GEN).images
    assert np.abs(swapped - batched).max() > 1e-3  # the subjects reach their own rows
    with pytest.raises(ValueError, match="one list per prompt"):
        pipe(prompts, [[data.chelsea()], [data.coffee(), data.coffee()]], **GEN)

def test_delayed_start_differs_from_immediate(pipe):
    kwargs = {**GEN, "num_inference_steps": 3}
    now = pipe("a dog", [Subject("dog", data.chelsea())], seed=0, **kwargs).images
    later = pipe("a dog", [Subject("dog", data.chelsea())], seed=0, **{**kwargs, "start_step": 2}).images
    plain = pipe("a dog", [], seed=0, **kwargs).images
    assert np.abs(now - later).max() > 1e-4 and np.abs(later - plain).max() > 1e-4


@pytest.mark.parametrize("prompt, subjects, message", [
    ("a cat", [Subject("dog", data.chelsea())], "'dog' is not in the prompt"),
    ("a dog", [Subject("dog", data.chelsea())] * 4, "at most 3"),
    ("a dog", [Subject("dog", np.zeros((0, 5, 3), np.uint8))], "subject 0: image is empty"),
    ("a dog", [Subject("dog", "/nonexistent/dog.png")], "cannot read image file"),
    ("a [dog] and a [cat]", [data.chelsea()], "marks 2 subjects but 1"),
    ("a dog", [data.chelsea()], "Subject\\(word, image\\)"),
])
def test_bad_calls_say_what_is_wrong(pipe, prompt, subjects, message):
    with pytest.raises(ValueError, match=message):
        pipe(prompt, subjects, seed=0, **GEN)


def test_start_step_at_or_past_the_step_count_is_an_error(pipe):
    with pytest.raises(ValueError, match="start_step=2 is not below num_inference_steps=2"):
        pipe("a dog", [Subject("dog", data.chelsea())], seed=0, **{**GEN, "start_step": 2})
    assert pipe("a dog", [], seed=0, **{**GEN, "start_step": 2}).images.shape == (1, 64, 64, 3)


def test_default_subject_scale_is_the_official_one():
    assert MMDiffConfig(base_family="sd15").subject_scale == 0.8


def test_the_fused_token_is_the_last_piece_of_the_word(pipe):
    # CLIP's text encoder is causal: only the word's last piece has seen all of it (official, FastComposer)
    tokenizer = pipe.model.tokenizers[0]
    text, spans = parse_markers("a [sunflower] in a vase")
    ids, index = tokenize_with_subjects(tokenizer, text, spans)
    assert tokenizer.convert_ids_to_tokens(ids[: index[0] + 1].tolist())[-2:] == ["sun", "flower</w>"]


def test_subject_images_are_padded_to_square_with_the_training_fill(pipe):
    processor = pipe.model.image_processor
    size = processor.crop_size["height"]
    wide = np.zeros((size, 2 * size, 3), np.uint8)  # black, twice as wide as high
    pixels = subject_pixel_values(processor, [wide])[0]
    white = (1.0 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    black = -torch.tensor(processor.image_mean) / torch.tensor(processor.image_std)
    # top and bottom quarters are fill, the middle rows the image (bicubic blurs the border rows)
    torch.testing.assert_close(pixels[:, 0, 0], white, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, size // 2, size // 2], black, atol=1e-5, rtol=0)


def test_training_crops_and_inference_images_get_the_same_encoder_input(pipe):
    # a training crop of a subject whose mask is the whole image equals that image given at inference
    processor = pipe.model.image_processor
    size = processor.crop_size["height"]
    image = data.chelsea()[:, :450]  # 300 x 450: the square pad is even on both sides
    cropper = SubjectCropper(CropConfig(size=size, margin=0.0))
    mask = np.ones((1, *image.shape[:2]), bool)
    crop = cropper(Image.fromarray(image), np.array([[0, 0, image.shape[1], image.shape[0]]]), mask)[0]
    torch.testing.assert_close(subject_pixel_values(processor, [crop]), subject_pixel_values(processor, [image]),
                               atol=1e-6, rtol=0)


def test_tokenize_with_subjects_finds_word_tokens(pipe):
    tokenizer = pipe.model.tokenizers[0]
    text, spans = parse_markers("A [dog] sitting next to a [woman] on the beach")
    assert text == "A dog sitting next to a woman on the beach"
    ids, index = tokenize_with_subjects(tokenizer, text, spans)
    assert ids.shape == (77,)
    assert tokenizer.convert_ids_to_tokens(ids[index].tolist()) == ["dog</w>", "woman</w>"]
    with pytest.raises(ValueError, match="beyond"):
        long = "a " * 100 + "dog"
        tokenize_with_subjects(tokenizer, long, [(len(long) - 3, len(long))])


def test_portrait_model_generates_with_face_embeddings_and_refuses_without():
    """The portrait variant (the official release's): queries from an ArcFace embedding per subject."""
    config = load_config("configs/mmdiff/tiny_sd15.yaml", MMDiffConfig, {"portrait": True})
    torch.manual_seed(0)
    model = MMDiffModel.from_specs(ModelSpec(family="sd15", source="tiny"),
                                   ModelSpec(family="clip_vision", source="tiny"), config)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    portrait = MMDiffPipeline(model)
    faces = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    woman = [Subject("woman", data.astronaut(), faces[0])]
    out = portrait(["a woman on the beach", "a woman in the snow"], woman, seed=0, **GEN).images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()
    other = portrait("a woman on the beach", [Subject("woman", data.astronaut(), faces[1])], seed=0, **GEN).images
    assert np.abs(other[0] - out[0]).max() > 1e-4  # the face embedding conditions the image
    for subjects in ([Subject("woman", data.astronaut())], [data.astronaut()]):
        prompt = "a woman" if isinstance(subjects[0], Subject) else "a [woman]"
        with pytest.raises(ValueError, match="portrait model: every subject needs .*face_embed"):
            portrait(prompt, subjects, seed=0, **GEN)


def test_subjects_shared_by_every_prompt_are_encoded_once(pipe):
    seen = []
    hook = pipe.model.image_encoder.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    try:
        quick = {**GEN, "num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "latent"}
        pipe(["a dog on the beach", "a dog in the snow", "a dog"], [Subject("dog", data.chelsea())], seed=0, **quick)
        pipe(["a [dog]", "a [cat]"], [[data.chelsea()], [data.coffee()]], seed=0, **quick)
    finally:
        hook.remove()
    assert seen == [1, 2]  # one image for three prompts sharing it; one per prompt otherwise


def test_the_official_inference_defaults():
    """25 steps, guidance 5.0, subjects from the first step, the subjects fused into the negative prompt."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(MMDiffPipeline.__call__).parameters.items()}
    assert (defaults["num_inference_steps"], defaults["guidance_scale"], defaults["fuse_negative_prompt"]) == (25, 5.0, True)
    assert MMDiffConfig(base_family="sd15").start_step == 0
    for name in ("sd15", "sdxl", "portrait_sdxl"):
        assert load_config(f"configs/mmdiff/{name}.yaml", MMDiffConfig).start_step == 0


def test_the_negative_prompt_carries_the_subjects_only_when_asked(pipe):
    args = dict(seed=0, **{**GEN, "num_inference_steps": 1})
    subjects = [Subject("dog", data.chelsea())]
    fused = pipe("a dog", subjects, negative_prompt="blurry", **args).images
    plain = pipe("a dog", subjects, negative_prompt="blurry", fuse_negative_prompt=False, **args).images
    assert np.abs(fused - plain).max() > 1e-4
    # without guidance there is no negative prompt to fuse into
    no_cfg = {**args, "guidance_scale": 1.0}
    np.testing.assert_array_equal(pipe("a dog", subjects, **no_cfg).images,
                                  pipe("a dog", subjects, fuse_negative_prompt=False, **no_cfg).images)


def test_several_reference_images_per_subject(pipe):
    args = dict(seed=0, **{**GEN, "num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "latent"})
    one = pipe("a dog", [Subject("dog", data.chelsea())], **args).images
    np.testing.assert_array_equal(pipe("a dog", [Subject("dog", [data.chelsea()])], **args).images, one)
    two = pipe("a dog", [Subject("dog", [data.chelsea(), data.coffee()])], **args).images
    other = pipe("a dog", [Subject("dog", data.coffee())], **args).images
    assert (two - one).abs().max() > 1e-5 and (two - other).abs().max() > 1e-5  # equal calls are exactly equal
    marked = pipe("a [dog]", [Subject("", [data.chelsea(), data.coffee()])], **args).images
    np.testing.assert_array_equal(marked, two)
    with pytest.raises(ValueError, match="subject 0: no reference image"):
        pipe("a dog", [Subject("dog", [])], **args)


def test_reference_images_are_padded_with_the_adapters_fill(pipe):
    seen = []
    hook = pipe.model.image_encoder.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0, :, 0, 0]))
    wide = np.zeros((20, 60, 3), np.uint8)
    try:
        for fill in ((255, 255, 255), (255, 0, 0)):
            pipe.model.subject_fill = fill
            pipe("a dog", [Subject("dog", wide)], seed=0, **{**GEN, "num_inference_steps": 1, "output_type": "latent"})
    finally:
        pipe.model.subject_fill = (255, 255, 255)
        hook.remove()
    processor = pipe.model.image_processor
    for pixel, fill in zip(seen, ((255, 255, 255), (255, 0, 0))):
        expected = (torch.tensor(fill) / 255 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
        torch.testing.assert_close(pixel.float(), expected.float(), atol=1e-5, rtol=0)


def test_a_prompt_over_the_token_limit_warns_and_a_plural_class_word_gets_a_hint(pipe):
    from mmdiff.prompting import TruncatedPromptWarning, find_words

    tokenizer = pipe.model.tokenizers[0]
    long = "a dog " + "on a sunny beach " * 30 + "at dusk"
    with pytest.warns(TruncatedPromptWarning, match="longer than the 77 tokens.* at dusk' is dropped"):
        tokenize_with_subjects(tokenizer, long, [(2, 5)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_with_subjects(tokenizer, "a dog on the beach ", [(2, 5)])  # fits: no warning
    for prompt, word, plural in (("two dogs on the beach", "dog", "dogs"), ("three puppies", "puppy", "puppies"),
                                 ("some boxes", "box", "boxes")):
        with pytest.raises(ValueError, match=f"the plural '{plural}'.*'a {word} and a {word}'"):
            find_words(prompt, [word])
    with pytest.raises(ValueError, match="'dog' is not in the prompt 'a dog' again"):
        find_words("a dog", ["dog", "dog"])

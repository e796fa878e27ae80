"""How MMDiffModel runs: half precision end to end, concurrent calls, activation checkpointing, the fp32
capture from half-precision inputs, and the equivalence with a plain diffusers pipeline at zero init."""

import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from skimage import data

from mmdiff import MMDiffConfig, MMDiffModel, MMDiffPipeline, Subject
from mmdiff.attention import SubjectConditioning, column_probabilities
from mmdiff.configuration import load_config
from mmdiff.zoo import save_tiny
from mmdiff.zoo.spec import ModelSpec
from tests.test_model_core import _batch

ENCODER = ModelSpec(family="clip_vision", source="tiny")
GEN = dict(num_inference_steps=2, height=64, width=64, guidance_scale=5.0, output_type="np", start_step=0)
pytestmark = pytest.mark.usefixtures("single_thread")


def _model(family: str, dtype: str = "float32", **overrides) -> MMDiffModel:
    config = load_config(f"configs/mmdiff/tiny_{family}.yaml", MMDiffConfig, overrides)
    torch.manual_seed(0)
    return MMDiffModel.from_specs(ModelSpec(family=family, source="tiny", dtype=dtype),
                                  ModelSpec(family="clip_vision", source="tiny", dtype=dtype), config)


def _perturb(model: MMDiffModel, seed: int = 0) -> None:
    """Non-zero LoRA and fusion, as a trained model has them, so subjects change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)


@pytest.mark.parametrize("family, dtype", [("sd15", "bfloat16"), ("sd15", "float16"), ("sdxl", "bfloat16"),
                                           ("sdxl", "float16")])
def test_half_precision_end_to_end(family, dtype, tmp_path):
    model = _model(family, dtype, text_encoder_lora_rank=4)
    half = getattr(torch, dtype)
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("vae.")} == {half}
    # SDXL's VAE overflows in fp16: its force_upcast config keeps it in fp32 under an fp16 base
    assert model.vae.dtype == (torch.float32 if dtype == "float16" else half)
    _perturb(model)
    torch.manual_seed(0)
    losses = model.training_loss(_batch(model, [[True, True], [True, False]]))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["attention_loss"] != 0
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None and g.dtype == half and torch.isfinite(g).all() for g in grads)
    model.base_spec = ModelSpec(family=family, source="tiny", dtype=dtype)
    model.image_encoder_spec = ENCODER.model_copy(update={"dtype": dtype})
    adapter = model.save_pretrained(tmp_path / "adapter")
    loaded = MMDiffPipeline.from_pretrained(model.base_spec, adapter)
    # one step at 32 px: half-precision convolutions are slow on CPU, and one step runs every part
    args = dict(GEN, subject_scale=1.0, seed=0, num_inference_steps=1, height=32, width=32)
    ours = MMDiffPipeline(model.eval())("a dog on the beach", [Subject("dog", data.chelsea())], **args).images
    again = loaded("a dog on the beach", [Subject("dog", data.chelsea())], **args).images
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, again)


def test_capture_is_fp32_from_half_inputs():
    # realistic cross-attention logits (std ~4 over 77 keys): bf16 q, k -> maps within 1e-2 of fp32
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 64, 40, generator=g) * 1.6, torch.randn(2, 4, 77, 40, generator=g) * 1.6
    columns = torch.tensor([[3, 9], [5, 7]])
    exact = torch.softmax(q @ k.transpose(-1, -2) / 40 ** 0.5, -1).gather(-1, columns[:, None, None].expand(-1, 4, 64, -1))
    half = column_probabilities(q.bfloat16(), k.bfloat16(), columns)
    assert half.dtype == torch.float32
    assert (half - exact).abs().max() < 1e-2


def test_capture_gradient_matches_autograd_of_the_softmax():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True, True]])
    columns = torch.tensor([[0, 2, 4]])
    assert torch.autograd.gradcheck(lambda q, k: column_probabilities(q, k, columns, mask), (q, k))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    results = []
    for checkpointing in (False, True):
        model = _model(family, gradient_checkpointing=checkpointing)
        _perturb(model)
        assert model.unet.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)
        losses = model.training_loss(_batch(model, [[True, True], [True, False]]))
        losses["loss"].backward()
        results.append((losses["loss"].detach(), losses["attention_loss"].detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, att_a, grads_a), (loss_b, att_b, grads_b) = results
    assert att_a != 0
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(att_b, att_a, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-5, msg=name)


def test_concurrent_calls_with_different_subjects_equal_sequential_calls():
    model = _model("sd15").eval()
    _perturb(model)
    pipe = MMDiffPipeline(model)
    calls = {"cat": ("a dog and a cat", [Subject("dog", data.chelsea()), Subject("cat", data.coffee())]),
             "astronaut": ("a man on the moon", [Subject("man", data.astronaut())])}
    sequential = {name: pipe(prompt, subjects, seed=0, **{**GEN, "num_inference_steps": 4}).images
                  for name, (prompt, subjects) in calls.items()}
    assert np.abs(sequential["cat"] - sequential["astronaut"]).max() > 1e-3

    def run(barrier, concurrent, errors, name, prompt, subjects):
        try:
            barrier.wait(timeout=60)
            concurrent[name] = pipe(prompt, subjects, seed=0, **{**GEN, "num_inference_steps": 4}).images
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    for _ in range(2):
        concurrent, errors, barrier = {}, [], threading.Barrier(len(calls))
        threads = [threading.Thread(target=run, args=(barrier, concurrent, errors, name, *call))
                   for name, call in calls.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors and concurrent.keys() == sequential.keys()
        for name in calls:
            np.testing.assert_array_equal(concurrent[name], sequential[name])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("text_encoder_lora_rank", [0, 4])
def test_zero_init_equals_plain_diffusers_pipeline_of_the_saved_folder(family, text_encoder_lora_rank, tmp_path):
    folder = save_tiny(family, tmp_path / "base", seed=2)
    config = load_config(f"configs/mmdiff/tiny_{family}.yaml", MMDiffConfig,
                         {"text_encoder_lora_rank": text_encoder_lora_rank})
    model = MMDiffModel.from_specs(ModelSpec(family=family, source=str(folder)), ENCODER, config)
    assert any("lora" in n and "text_encoders" in n for n, _ in model.named_parameters()) == bool(text_encoder_lora_rank)
    plain_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    plain = plain_class.from_pretrained(folder) if family == "sdxl" else plain_class.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    ours = MMDiffPipeline(model)("a dog on the beach", [Subject("dog", data.chelsea())], subject_scale=0.0, seed=3,
                                 **GEN).images
    theirs = plain("a dog on the beach", generator=torch.Generator().manual_seed(3),
                   **{k: v for k, v in GEN.items() if k != "start_step"}).images
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_encoder_attention_mask_masks_the_text_keys():
    # diffusers turns encoder_attention_mask [B, 77] into a bias over the keys; the processor must size it
    # to the key length (it was sized to the query length, and crashed)
    model = _model("sd15").eval()
    _perturb(model)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    tokens = torch.randn(2, 4, 32, generator=g)
    keep = torch.ones(2, 77, dtype=torch.bool)
    keep[:, 10:] = False

    def run(mask=None, text=text):
        """(UNet output, captured class-word maps of every layer), the class word at token 3."""
        subjects = SubjectConditioning(tokens, torch.ones(2, 1, dtype=torch.bool), 1.0, 4, torch.tensor([[3], [3]]),
                                       captured={})
        with torch.no_grad():
            out = model.unet(latents, torch.tensor([500, 500]), text, encoder_attention_mask=mask,
                             cross_attention_kwargs={"subjects": subjects}).sample
        return out, torch.cat([c.text.flatten() for c in subjects.captured.values()])

    unmasked = run()
    for a, b in zip(run(torch.ones(2, 77, dtype=torch.bool)), unmasked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    masked = run(keep)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(masked, unmasked))
    # masked keys matter neither to the output nor to the captured maps
    other = text.clone()
    other[:, 10:] = torch.randn(2, 67, 32, generator=g)
    for a, b in zip(run(keep, other), masked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_single_subject_batches_keep_only_the_constraint_terms_with_signal():
    # Without a null key (the official layout) the subject softmax of a lone subject covers only its own
    # K tokens: their mean map is 1/K everywhere, a constant with zero gradient. That term is left out
    # of the mean instead of diluting the others.
    model = _model("sd15", subject_null_key=False)
    _perturb(model)
    config = model.config
    batch = _batch(model, [[True, False], [True, False]])
    out = {}
    for form in ("text", "subject", "both"):
        model.config = config.model_copy(update={"attention_loss_tokens": form})
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out[form] = model.training_loss(batch)["attention_loss"]
        if form == "text":
            out[form].backward()
            subject_path = [p.grad for n, p in model.named_parameters()
                            if n.split(".")[0] in ("refiner", "query_mlp", "text_fusions") and p.requires_grad]
            assert all(g is not None for g in subject_path) and sum(g.abs().sum() for g in subject_path) > 0
    assert out["subject"] == 0  # no term has signal: nothing to learn, nothing reported
    torch.testing.assert_close(out["both"], out["text"], atol=1e-7, rtol=0)  # not halved by a dead term
    # two subjects in a sample: the subject form has signal and reaches the refiner
    model.config = config.model_copy(update={"attention_loss_tokens": "subject"})
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = model.training_loss(_batch(model, [[True, True]]))["attention_loss"]
    loss.backward()
    assert loss != 0 and model.refiner.proj_out.weight.grad.abs().sum() > 0


def test_null_key_lets_a_lone_subject_map_localise():
    # With the background key a lone subject's map is no longer constant: the term has signal, its
    # gradient reaches the refiner and the null keys; rows without subjects still get exactly zero.
    model = _model("sd15", attention_loss_tokens="subject")
    assert model.config.subject_null_key
    _perturb(model)
    torch.manual_seed(0)
    out = model.training_loss(_batch(model, [[True, False], [True, False]]))
    out["attention_loss"].backward()
    assert out["attention_loss"] != 0 and model.refiner.proj_out.weight.grad.abs().sum() > 0
    null_keys = [p for n, p in model.named_parameters() if n.endswith(".processor.null_key")]
    assert null_keys and all(p.grad is not None and p.grad.abs().sum() > 0 for p in null_keys)
    maps = out["attention_maps"][:, 0]
    assert (maps.flatten(1).std(1) > 0).all()  # not 1/K everywhere
    # no valid subject in a row: the subject path adds exactly nothing to that row
    model.zero_grad(set_to_none=True)
    batch = _batch(model, [[False, False]])
    with torch.no_grad():
        torch.manual_seed(1)
        with_subjects = model.training_loss(batch)["denoise_loss"]
        model.config = model.config.model_copy(update={"subject_scale": 0.0})
        torch.manual_seed(1)
        without = model.training_loss(batch)["denoise_loss"]
    assert torch.equal(with_subjects, without)


def test_partial_clip_fine_tuning_keeps_a_frozen_copy_for_the_patch_tokens(tmp_path):
    model = _model("sd15", image_encoder_trainable_layers=2)  # the tiny CLIP has 2 layers
    encoder = model.image_encoder
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("patch_model.") or "embeddings" in n or "pre_layrnorm" in n
                                 for n in trainable)
    torch.manual_seed(0)
    model.training_loss(_batch(model, [[True, True]]))["loss"].backward()
    assert all(p.grad is not None for n, p in encoder.named_parameters() if n in trainable)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_before, patches_before = encoder(pixels)
        for n, p in encoder.named_parameters():
            if n in trainable:
                p.add_(torch.randn_like(p) * 0.05)
        cls_after, patches_after = encoder(pixels)
    assert (cls_after - cls_before).abs().max() > 1e-3
    torch.testing.assert_close(patches_after, patches_before, atol=0, rtol=0)  # the refiner reads the frozen copy
    model.base_spec, model.image_encoder_spec = ModelSpec(family="sd15", source="tiny"), ENCODER
    loaded = MMDiffModel.from_pretrained(model.base_spec, model.save_pretrained(tmp_path / "adapter"))
    with torch.no_grad():
        cls_loaded, patches_loaded = loaded.image_encoder(pixels)
    torch.testing.assert_close(cls_loaded, cls_after, atol=0, rtol=0)
    torch.testing.assert_close(patches_loaded, patches_before, atol=0, rtol=0)

"""MMDiffModel acceptance on tiny SD1.5 / SDXL twins: identity at init, subject effect, gradients,
attention capture against an eager reference, padded subjects, save/load."""

import numpy as np
import pytest
import torch

from mmdiff import MMDiffConfig, MMDiffModel, MMDiffPipeline, Subject
from mmdiff.subject_image import SUBJECT_FILL
from mmdiff.configuration import load_config
from mmdiff.zoo.spec import ModelSpec
from skimage import data

ENCODER = ModelSpec(family="clip_vision", source="tiny")
GEN = dict(num_inference_steps=2, height=64, width=64, guidance_scale=5.0, output_type="np")


def _model(family: str, **overrides) -> MMDiffModel:
    config = load_config(f"configs/mmdiff/tiny_{family}.yaml", MMDiffConfig, overrides)
    torch.manual_seed(0)
    return MMDiffModel.from_specs(ModelSpec(family=family, source="tiny"), ENCODER, config)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model(request) -> MMDiffModel:
    return _model(request.param)


def _batch(model: MMDiffModel, valid: list[list[bool]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, s = len(valid), len(valid[0])
    valid_t = torch.tensor(valid)
    index = torch.tensor([[2 + 3 * j for j in range(s)]] * b).masked_fill(~valid_t, -1)
    batch = {
        "pixel_values": torch.rand(b, 3, 64, 64, generator=g) * 2 - 1,
        "input_ids": torch.randint(0, 800, (b, 77), generator=g),
        "subject_pixel_values": torch.randn(b, s, 3, 32, 32, generator=g),
        "subject_token_index": index, "subject_valid": valid_t,
        "subject_masks": (torch.rand(b, s, 64, 64, generator=g) > 0.5).float(),
    }
    if len(model.text_encoders) == 2:
        batch.update(input_ids_2=batch["input_ids"], original_size=torch.tensor([[64, 64]] * b),
                     crop_top_left=torch.zeros(b, 2, dtype=torch.long))
    return batch


def test_scale_zero_equals_base_pipeline(model):
    # Acceptance 1: zero LoRA + residual fusion -> the base model exactly (same weights, same seed).
    pipe = MMDiffPipeline(model)
    ours = pipe("a dog on the beach", [Subject("dog", data.chelsea())], subject_scale=0.0, start_step=0,
                seed=3, **GEN).images
    base = model.base_pipe("a dog on the beach", generator=torch.Generator().manual_seed(3), **GEN).images
    np.testing.assert_allclose(ours, base, atol=1e-6, rtol=0)
    ids = [torch.stack([t("a dog", padding="max_length", return_tensors="pt").input_ids[0]]) for t in model.tokenizers]
    cls = torch.randn(1, 1, model.image_encoder.embed_dim)
    plain, _ = model.encode_text(ids)
    fused, _ = model.encode_text(ids, torch.tensor([[2]]), torch.tensor([[True]]), cls)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)


def test_reference_image_changes_output(model):
    # Acceptance 2. LoRA starts at zero, so perturb the image LoRA as a trained model would have it.
    pipe = MMDiffPipeline(model)
    args = dict(subject_scale=1.0, start_step=0, seed=0, **GEN)
    cat_ = pipe("a dog on the beach", [Subject("dog", data.chelsea())], **args).images
    coffee = pipe("a dog on the beach", [Subject("dog", data.coffee())], **args).images
    assert np.abs(cat_ - coffee).max() > 1e-3


def test_gradients_reach_exactly_the_trainable_set(model):
    # Acceptance 3.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora" in n or n.endswith(".processor.null_key")
                              or n.split(".")[0] in {"text_fusions", "query_mlp", "refiner"}) for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    optimizer.zero_grad()
    torch.manual_seed(0)
    batch = _batch(model, [[True, True]])
    batch["pixel_values"] = batch["pixel_values"][..., :48]  # 64x48: SDXL's height and width cannot be swapped unseen
    sdxl = len(model.text_encoders) == 2
    if sdxl:
        batch.update(original_size=torch.tensor([[600, 400]]), crop_top_left=torch.tensor([[0, 8]]))
    seen = {}
    hook = model.unet.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        model.training_loss(batch)["loss"].backward()
    finally:
        hook.remove()
    if sdxl:  # the UNet's time ids: original size and crop from the batch, target size from the latents
        time_ids, expected = seen["added_cond_kwargs"]["time_ids"], [[600, 400, 0, 8, 64, 48]]
        assert time_ids.dtype == seen["added_cond_kwargs"]["text_embeds"].dtype and time_ids.tolist() == expected
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    # LoRA down-projections get no gradient while the up-projection is still zero: check after one step.
    optimizer.step()
    optimizer.zero_grad()
    torch.manual_seed(1)
    model.training_loss(_batch(model, [[True, True]], seed=1))["loss"].backward()
    with_grad |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    optimizer.zero_grad(set_to_none=True)


def test_captured_attention_matches_eager_softmax(model):
    # Acceptance 4: hook every supervised cross-attention layer, recompute eager softmax from its inputs.
    inputs = {}
    handles = []
    for name, module in model.unet.named_modules():
        if name.endswith("attn2") and module.processor.supervised:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: inputs.__setitem__(name, (args[0], kwargs["encoder_hidden_states"])),
                with_kwargs=True))
    batch = _batch(model, [[True, True, False]])
    captured = {}

    def keep(module, args, kwargs, output):
        captured.update(kwargs["cross_attention_kwargs"]["subjects"].captured)

    handles.append(model.unet.register_forward_hook(keep, with_kwargs=True))
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            model.training_loss(batch)
    finally:
        for h in handles:
            h.remove()
    assert set(captured) == set(inputs) and len(captured) >= 3
    with torch.no_grad():
        _, tokens = model.encode_subjects(batch["subject_pixel_values"], batch["subject_valid"])
        for name, (hidden, text) in inputs.items():
            attn = model.unet.get_submodule(name)
            proc = attn.processor
            h = attn.heads
            q = attn.to_q(hidden).unflatten(-1, (h, -1)).transpose(1, 2)
            k = attn.to_k(text).unflatten(-1, (h, -1)).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            expected_text = probs[..., batch["subject_token_index"][0].clamp(min=0)]
            torch.testing.assert_close(captured[name].text, expected_text, atol=1e-5, rtol=0)
            ks, _ = proc._subject_kv(attn, tokens)
            ks = ks.unflatten(-1, (h, -1)).transpose(1, 2)
            logits = q @ ks.transpose(-1, -2) / q.shape[-1] ** 0.5
            keep_cols = batch["subject_valid"].repeat_interleave(model.config.num_tokens, 1)[:, None, None, :]
            columns = keep_cols.shape[-1]
            if proc.null_key is not None:  # the background key joins the softmax, and is not a subject column
                null_logit = (q * proc.null_key.view(1, h, 1, -1)).sum(-1, keepdim=True) / q.shape[-1] ** 0.5
                logits = torch.cat([logits, null_logit], -1)
                keep_cols = torch.cat([keep_cols, keep_cols.new_ones(*keep_cols.shape[:-1], 1)], -1)
            sprobs = torch.softmax(logits.masked_fill(~keep_cols, float("-inf")), -1)[..., :columns]
            expected_subject = sprobs.unflatten(-1, (3, -1)).mean(-1)
            torch.testing.assert_close(captured[name].subject, expected_subject, atol=1e-5, rtol=0)
            # Acceptance 5: the padded slot gets no attention.
            assert captured[name].subject[..., 2].abs().max() == 0


@pytest.mark.parametrize("num_subjects", [1, 2, 3])
def test_any_number_of_subjects(model, num_subjects):
    valid = [[True] * num_subjects + [False] * (3 - num_subjects), [True] + [False] * 2]
    torch.manual_seed(0)
    out = model.training_loss(_batch(model, valid))
    assert torch.isfinite(out["loss"]) and out["attention_maps"].shape[:2] == (2, 3)
    assert out["attention_maps"][1, 1:].abs().max() == 0  # padded slots: nothing attends to them


def test_padded_slots_do_not_change_output(model):
    # A padded subject (whatever its pixels) must not change the prediction of the real ones.
    one = _batch(model, [[True]])
    two = _batch(model, [[True, False]])
    two["subject_pixel_values"][:, 0] = one["subject_pixel_values"][:, 0]
    for key in ("pixel_values", "input_ids", "input_ids_2", "original_size", "crop_top_left"):
        if key in one:
            two[key] = one[key]
    two["subject_token_index"][:, 0] = one["subject_token_index"][:, 0]
    two["subject_masks"][:, 0] = one["subject_masks"][:, 0]
    losses = []
    for batch in (one, two):
        torch.manual_seed(5)
        with torch.no_grad():
            losses.append(model.training_loss(batch)["denoise_loss"])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)


def test_save_load_round_trip(model, tmp_path):
    # Acceptance 7: perturb the trainable weights, save, load through from_pretrained, same images.
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    family = model.config.base_family
    model.base_spec, model.image_encoder_spec = ModelSpec(family=family, source="tiny"), ENCODER
    model.subject_fill = (12, 34, 56)  # the training crops' fill travels with the adapter
    try:
        adapter = model.save_pretrained(tmp_path / "adapter")
    finally:
        model.subject_fill = SUBJECT_FILL
    assert sorted(f.name for f in adapter.iterdir()) == ["checksums.json", "mmdiff_adapter.safetensors",
                                                         "mmdiff_config.json"]
    loaded = MMDiffPipeline.from_pretrained(ModelSpec(family=family, source="tiny"), adapter)
    assert loaded.model.subject_fill == (12, 34, 56)
    loaded.model.subject_fill = SUBJECT_FILL
    args = dict(subject_scale=1.0, start_step=0, seed=0, **GEN)
    a = MMDiffPipeline(model)("a dog on the beach", [Subject("dog", data.chelsea())], **args).images
    b = loaded("a dog on the beach", [Subject("dog", data.chelsea())], **args).images
    np.testing.assert_array_equal(a, b)

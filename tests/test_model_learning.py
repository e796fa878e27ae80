"""Acceptance 6: the attention constraint teaches each subject's attention to stay inside its own mask.

Synthetic two-subject set: a red square ("dog") and a blue disc ("cat") at random places on a grey
background, masks known exactly, subject crops cut from the image. The same tiny SD1.5 model is trained
twice from the same seed, with and without the constraint, and the share of each subject's attention
that falls inside its own mask is measured on held-out scenes.

The base here must do what every real base does: its VAE must encode the scene. A randomly initialised
VAE barely does (with it this check measured with = without = mask area), so no constraint could
localise anything. The test first fits the tiny VAE as an autoencoder on the same kind of scenes (about
25 s), then sets its scaling factor for unit-variance latents, as real bases ship it.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmdiff import MMDiffConfig, MMDiffModel, tokenize_with_subjects
from mmdiff.configuration import load_config
from mmdiff.losses import inside_share
from mmdiff.zoo.spec import ModelSpec

SIZE, CROP, BATCH = 32, 32, 4
VAE_STEPS, TRAIN_STEPS = 200, 200
PROMPT = "a dog and a cat"
SUBJECT_SPANS = [(2, 5), (12, 15)]  # character spans of "dog" and "cat"


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image [H, W, 3] uint8 and masks [2, H, W] (square, disc), one in each half, so never overlapping."""
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    masks = np.zeros((2, SIZE, SIZE), bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    left = rng.integers(0, 2)  # which half holds the square
    for i, (colour, half) in enumerate([((220, 30, 30), left), ((30, 30, 220), 1 - left)]):
        side = int(rng.integers(9, 14))
        x0 = half * SIZE // 2 + int(rng.integers(0, SIZE // 2 - side + 1))
        y0 = int(rng.integers(0, SIZE - side + 1))
        if i == 0:
            shape = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
        else:
            shape = (yy - y0 - side / 2) ** 2 + (xx - x0 - side / 2) ** 2 <= (side / 2) ** 2
        image[shape] = colour
        masks[i] = shape
    return image, masks


def _batch(model: MMDiffModel, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
    ids, index = tokenize_with_subjects(model.tokenizers[0], PROMPT, SUBJECT_SPANS)
    mean = torch.tensor(model.image_processor.image_mean)[:, None, None]
    std = torch.tensor(model.image_processor.image_std)[:, None, None]
    images, masks, crops = [], [], []
    for _ in range(n):
        image, mask = _scene(rng)
        pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        images.append(pixels * 2 - 1)
        masks.append(torch.from_numpy(mask).float())
        subject_crops = []
        for m in mask:
            ys, xs = np.nonzero(m)
            crop = pixels[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1][None]
            crop = F.interpolate(crop, size=(CROP, CROP), mode="bilinear", align_corners=False)[0]
            subject_crops.append((crop - mean) / std)
        crops.append(torch.stack(subject_crops))
    return {
        "pixel_values": torch.stack(images), "input_ids": ids.expand(n, -1),
        "subject_pixel_values": torch.stack(crops), "subject_token_index": index.expand(n, -1),
        "subject_valid": torch.ones(n, 2, dtype=torch.bool), "subject_masks": torch.stack(masks),
    }


def _model(weight: float, tokens: str | None = None) -> MMDiffModel:
    # mask_nll, because its value does not depend on how much a token is attended overall, so weight 1
    # means the same thing at every layer. ``tokens`` None: the default form of MMDiffConfig.
    config = load_config("configs/mmdiff/tiny_sd15.yaml", MMDiffConfig, {
        "attention_loss_weight": weight, "attention_loss_kind": "mask_nll",
        "attention_loss_tokens": tokens or MMDiffConfig.model_fields["attention_loss_tokens"].default})
    torch.manual_seed(0)
    return MMDiffModel.from_specs(ModelSpec(family="sd15", source="tiny"),
                                  ModelSpec(family="clip_vision", source="tiny"), config)


def fit_scene_vae() -> dict:
    """Weights and scaling factor of the tiny VAE fitted as an autoencoder on synthetic scenes."""
    model = _model(0.0)
    vae = model.vae.requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    rng = np.random.default_rng(7)
    for _ in range(VAE_STEPS):
        pixels = _batch(model, rng, 8)["pixel_values"]
        posterior = vae.encode(pixels).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        latent_std = vae.encode(_batch(model, rng, 8)["pixel_values"]).latent_dist.mean.std().item()
    return {"state": {k: v.detach().clone() for k, v in vae.state_dict().items()}, "scaling_factor": 1 / latent_std}


@pytest.fixture(scope="module")
def scene_vae() -> dict:
    return fit_scene_vae()


def train_and_measure(weight: float, scene_vae: dict, tokens: str | None = None) -> dict[str, float]:
    """Trains from the fixed seed; returns the inside-mask share of the subject tokens' maps ("subject"),
    of the class words' maps ("text") and the mask area fraction ("area")."""
    model = _model(weight, tokens)
    model.vae.load_state_dict(scene_vae["state"])
    model.vae.register_to_config(scaling_factor=scene_vae["scaling_factor"])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(TRAIN_STEPS):
        loss = model.training_loss(_batch(model, rng, BATCH))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(123)  # the same held-out noise and timesteps for both runs
    eval_rng, shares = np.random.default_rng(123), {"subject": [], "text": [], "area": []}
    with torch.no_grad():
        for _ in range(4):
            batch = _batch(model, eval_rng, 8)
            out = model.training_loss(batch)
            for form, key in (("subject", "attention_maps"), ("text", "text_attention_maps")):
                maps = out[key]  # [B, S, h, w]
                masks = F.interpolate(batch["subject_masks"], size=maps.shape[-2:], mode="area").flatten(2)
                probs = maps.flatten(2).transpose(1, 2)[:, None]  # [B, heads=1, N, S]
                shares[form].append(inside_share(probs, masks, batch["subject_valid"]))
            shares["area"].append(masks.mean())
    return {name: float(torch.stack(values).mean()) for name, values in shares.items()}


def test_attention_constraint_moves_attention_into_masks(scene_vae):
    # the shipped default form; the maps it supervises are the ones measured
    form = MMDiffConfig.model_fields["attention_loss_tokens"].default
    measured = ["text", "subject"] if form == "both" else [form]
    with_, without = train_and_measure(1.0, scene_vae), train_and_measure(0.0, scene_vae)
    print(f"\ninside-mask attention share after {TRAIN_STEPS} steps ({form} form): with constraint {with_}, "
          f"without {without}")
    for maps in measured:
        assert with_[maps] >= 3 * with_["area"], maps
        assert with_[maps] > without[maps] + 0.1, maps

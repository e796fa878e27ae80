"""The attention constraint's two forms on hand-made maps: what they reward, and who they leave out."""

import pytest
import torch

from mmdiff.losses import attention_constraint, inside_share, masks_at


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    """probs [B=1, heads=2, N=4, S=2] and masks [1, 2, 4]: subject 0 lives at position 0, subject 1 at 3."""
    masks = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 1]]])
    probs = torch.rand(1, 2, 4, 2) * 0.1
    return probs, masks


@pytest.mark.parametrize("kind", ["balanced_l1", "mask_nll"])
def test_attention_inside_the_mask_lowers_the_loss(kind):
    probs, masks = _maps()
    valid = torch.ones(1, 2, dtype=torch.bool)
    inside = probs.clone()
    inside[0, :, 0, 0] += 1.0  # subject 0 looks at its own position
    inside[0, :, 3, 1] += 1.0
    outside = probs.clone()
    outside[0, :, 3, 0] += 1.0  # each subject looks at the other's position
    outside[0, :, 0, 1] += 1.0
    assert attention_constraint(inside, masks, valid, kind) < attention_constraint(outside, masks, valid, kind)


def test_mask_nll_ignores_the_overall_attention_level():
    probs, masks = _maps()
    valid = torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(attention_constraint(probs, masks, valid, "mask_nll"),
                               attention_constraint(probs * 5, masks, valid, "mask_nll"))


@pytest.mark.parametrize("kind", ["balanced_l1", "mask_nll"])
def test_padded_and_vanished_subjects_are_left_out(kind):
    probs, masks = _maps()
    expected = attention_constraint(probs[..., :1], masks[:, :1], torch.ones(1, 1, dtype=torch.bool), kind)
    # padded slot
    torch.testing.assert_close(attention_constraint(probs, masks, torch.tensor([[True, False]]), kind), expected)
    # valid subject whose mask is empty at this resolution (too small for the layer)
    vanished = masks.clone()
    vanished[0, 1] = 0
    torch.testing.assert_close(attention_constraint(probs, vanished, torch.ones(1, 2, dtype=torch.bool), kind),
                               expected)


def test_unknown_kind_is_named():
    probs, masks = _maps()
    with pytest.raises(ValueError, match="'l2'"):
        attention_constraint(probs, masks, torch.ones(1, 2, dtype=torch.bool), "l2")


def test_masks_follow_the_layer_aspect_and_inside_share_measures_mass():
    masks = torch.zeros(1, 1, 16, 32)
    masks[..., :8, :16] = 1  # top-left quarter
    layer = masks_at(masks, 4 * 8, aspect=2.0)  # a 4 x 8 layer
    assert layer.shape == (1, 1, 32) and layer.view(4, 8)[:2, :4].all() and layer.sum() == 8
    probs = layer.transpose(1, 2)[:, None] / 8  # all attention inside: [B, heads=1, N, S]
    assert inside_share(probs, layer, torch.ones(1, 1, dtype=torch.bool)) == pytest.approx(1.0)


def test_losses_have_no_data_dependent_shapes_and_stay_on_the_input_device():
    # Boolean indexing (share[valid]) makes the host wait for the device on every supervised layer; on the
    # meta device it cannot run at all. Masked sums run there, and give the mean over valid subjects.
    probs, masks = _maps()
    valid = torch.tensor([[True, False]])
    expected = probs.mean(1).transpose(1, 2)[0, 0]
    expected = (expected * masks[0, 0]).sum() / expected.sum()
    torch.testing.assert_close(inside_share(probs, masks, valid), expected)
    assert inside_share(probs, masks, torch.zeros(1, 2, dtype=torch.bool)).isnan()  # the mean over none
    meta = [t.to("meta") for t in (probs.bfloat16(), masks, valid)]
    for kind in ("balanced_l1", "mask_nll"):
        loss = attention_constraint(*meta, kind)
        assert loss.device.type == "meta" and loss.dtype == torch.float32
    share = inside_share(*meta)
    assert share.device.type == "meta" and share.dtype == torch.float32

"""The FLOP counting behind benchmarks/bench_flops.py and docs/SIZING.md.

Hand-computed counts for single layers, and the shortcuts the benchmark takes at real size checked on
tiny twins: counting on the meta device gives the real run's count, the hand-written BLIP-2 decode loop
gives what ``generate`` runs, and the ONNX graph counter agrees with FlopCounterMode on the exported model.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_flops import (
    build_training_model,
    caption_flops,
    count,
    onnx_flops,
    segment_flops_official,
    segment_flops_transformers,
    training_batch,
    training_flops,
)
from mmdiff import zoo

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_flop_counter_matches_hand_computed_linear_conv_and_attention(device):
    torch.manual_seed(0)
    with torch.device(device):
        linear, conv = torch.nn.Linear(64, 32), torch.nn.Conv2d(3, 8, 3, padding=1)
        x, image, q = torch.randn(8, 64), torch.randn(1, 3, 16, 16), torch.randn(1, 2, 16, 8)
    assert count(linear, x) == 2 * 8 * 64 * 32
    assert count(conv, image) == 2 * (8 * 16 * 16) * (3 * 3 * 3)  # per output element: C_in * k * k MACs
    # QK^T and PV: two [16 x 8] x [8 x 16]-sized products per head
    assert count(F.scaled_dot_product_attention, q, q, q) == 2 * (2 * 2 * 16 * 16 * 8)


def test_plain_flop_counter_misses_cpu_attention():
    """Why the counter forces math SDPA: the CPU's fused kernel has no FLOP formula."""
    q = torch.randn(1, 2, 16, 8)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q)
    assert plain.get_total_flops() == 0 < count(F.scaled_dot_product_attention, q, q, q)


def test_training_step_flops_on_meta_equal_the_real_run():
    torch.manual_seed(0)
    real_model = build_training_model("tiny_sd15", "tiny", device="cpu")
    torch.manual_seed(0)
    meta_model = build_training_model("tiny_sd15", "tiny", device="meta")
    real = training_flops(real_model, training_batch(real_model, 64, subjects=2, device="cpu"))
    meta = training_flops(meta_model, training_batch(meta_model, 64, subjects=2))
    assert real["total"] > real["forward"] > real["backward"] > 0
    assert meta == real
    assert real["forward_by_module"]["UNet2DConditionModel"] > 0 and real["vae_encode"] > 0


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_flops_count_what_generate_runs(num_beams):
    bundle = zoo.build({"family": "blip2", "source": "tiny"})
    model = bundle.model.requires_grad_(False)
    new_tokens = 6
    config = model.generation_config
    config.update(do_sample=False, num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    size = model.config.vision_config.image_size
    with torch.no_grad():
        generated = count(model.generate, pixel_values=torch.rand(1, 3, size, size), generation_config=config)
    meta_model = zoo.build({"family": "blip2", "source": "tiny", "device": "meta"}).model.requires_grad_(False)
    assert caption_flops(meta_model, new_tokens, num_beams)["total"] == generated


def test_segment_flops_on_meta_equal_the_real_run():
    spec = {"family": "sam", "source": "tiny", "backend": "official"}
    real = segment_flops_official(zoo.build(spec).requires_grad_(False), boxes=2)
    meta = segment_flops_official(zoo.build({**spec, "device": "meta"}).requires_grad_(False), boxes=2)
    assert meta == real and real["image_encoder"] > real["decoder_per_box"] > 0


def test_onnx_graph_counter_matches_flop_counter_on_the_exported_models(tmp_path):
    from mmdiff.zoo.insightface import TINY_DET_SIZE, TinyArcFace, TinySCRFD

    folder = zoo.save_tiny("insightface", tmp_path, seed=0)
    torch.manual_seed(0)
    detector, recogniser = TinySCRFD().eval(), TinyArcFace().eval()
    det_shape = (1, 3, TINY_DET_SIZE, TINY_DET_SIZE)
    assert onnx_flops(folder / "det_tiny.onnx", det_shape) == count(detector, torch.zeros(det_shape)) > 0
    # the recogniser's batch dimension is dynamic in the graph; the counter fixes it to the given shape
    assert onnx_flops(folder / "rec_tiny.onnx", (4, 3, 112, 112)) == count(recogniser, torch.zeros(4, 3, 112, 112)) > 0


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_random_sam_is_the_released_architecture_in_both_backends(model_type):
    """The transformers sizes in the zoo against segment-anything's own registry, built on meta."""
    spec = {"family": "sam", "source": "random", "device": "meta", "options": {"model_type": model_type}}
    official = zoo.build({**spec, "backend": "official"}).requires_grad_(False)
    ported = zoo.build(spec).model.requires_grad_(False)
    assert (sum(p.numel() for p in ported.vision_encoder.parameters())
            == sum(p.numel() for p in official.image_encoder.parameters()))
    assert segment_flops_transformers(ported, boxes=1) == segment_flops_official(official, boxes=1)


def test_cached_latents_count_is_the_step_without_the_vae_encoder():
    """The benchmark's cached-latents figure (total - VAE encode) is what the cached-latents step runs."""
    torch.manual_seed(0)
    model = build_training_model("tiny_sd15", "tiny", device="meta")
    batch = training_batch(model, 64, subjects=2)
    flops = training_flops(model, batch)
    side = 64 // 2 ** (len(model.vae.config.block_out_channels) - 1)  # the VAE's downsampling
    cached = {**batch, "latent_parameters": torch.zeros(1, 2 * model.vae.config.latent_channels, side, side,
                                                        device="meta")}
    assert training_flops(model, cached)["forward"] + flops["vae_encode"] == flops["forward"]
    assert training_flops(model, cached)["total"] == flops["total_cached_latents"]

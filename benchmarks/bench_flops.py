"""FLOPs per image of each preprocessing stage and per training image, at real size with random weights,
and the images/s per H100 they imply at 40 % of its bf16 dense peak.

    flock /tmp/mmdiff-heavy.lock timeout 1200 python -m benchmarks.bench_flops [--new-tokens 30] [--num-beams 3]
        [--boxes 2] [--image 768x1024] [--face-pack ~/.insightface/models/buffalo_l]

What is counted: the FLOPs of matrix multiplications and convolutions (2 per multiply-add), as
``torch.utils.flop_counter.FlopCounterMode`` counts them; elementwise ops, norms, softmax, interpolation
and grid sampling are not. This is the convention of MFU figures. Attention goes through PyTorch's math
SDPA path while counting: the CPU's fused SDPA kernel has no FLOP formula and would count as zero.

Models are built on the meta device (shapes, no weights: BLIP-2 alone would be 15 GB in fp32), except
Grounding DINO, whose text-mask step reads token values, which meta tensors do not have; it runs for real
in fp32 (172 M parameters). The insightface models are ONNX graphs; they are counted from the graphs'
Conv/Gemm/MatMul shapes when ``--face-pack`` names a model-pack folder. Without one, the ArcFace R50
recogniser is counted from its layer shapes (:class:`ArcFaceR50Convs`) and the detector is not counted.

The images/s figures are FLOP-derived upper bounds, not measured GPU throughput: no GPU was used.
Writes benchmarks/results/bench_flops.json and prints one line per figure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.report import write_result

META = torch.device("meta")

# NVIDIA H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet): BF16 Tensor Core 1,979 TFLOPS with 2:4
# sparsity (1978.9 unrounded), half of it dense; HBM3 3.35 TB/s.
H100_SXM = {"gpu": "NVIDIA H100 SXM5 80GB", "bf16_dense_tflops": 989.4, "hbm_tb_per_s": 3.35,
            "source": "NVIDIA H100 Tensor Core GPU datasheet (1,979 TFLOPS BF16 with sparsity; dense is half)"}
MFU = 0.4


@contextlib.contextmanager
def flop_counter(meta_nonzero: bool = False) -> Iterator[FlopCounterMode]:
    """A FlopCounterMode that counts attention on every device (math SDPA).

    ``meta_nonzero``: let ``nonzero`` run on meta tensors by assuming every element is non-zero. Only
    exact when the caller's masks are all true (the training count passes only valid subject slots).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if meta_nonzero:
            stack.enter_context(fx_config.patch(meta_nonzero_assume_all_nonzero=True))
        yield stack.enter_context(FlopCounterMode(display=False))


def count(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (see :func:`flop_counter`)."""
    with flop_counter() as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def onnx_flops(path: str | Path, input_shape: tuple[int, ...]) -> int:
    """Conv, Gemm and MatMul FLOPs of an ONNX graph whose (single) input has ``input_shape``.

    Dynamic input dimensions are fixed to ``input_shape`` before ONNX shape inference; each node's
    FLOPs follow from its weight and output shapes with FlopCounterMode's formulas (2 per multiply-add).
    """
    import onnx

    model = onnx.load(str(path))
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one graph input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"{path}: input {inputs[0].name} has {len(dims)} dims, input_shape has {len(input_shape)}")
    for dim, value in zip(dims, input_shape):
        dim.dim_value = value
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    shapes = dict(weights)
    for info in (*graph.input, *graph.value_info, *graph.output):
        shapes[info.name] = [d.dim_value for d in info.type.tensor_type.shape.dim]

    def shape(name: str, node) -> list[int]:
        if name not in shapes or not all(shapes[name]):
            raise ValueError(f"{path}: node {node.name or node.op_type} has no static shape for {name!r}")
        return shapes[name]

    total = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            # weight [C_out, C_in / groups, *kernel]; every output element takes prod(weight[1:]) MACs
            total += 2 * math.prod(shape(node.output[0], node)) * math.prod(shape(node.input[1], node)[1:])
        elif node.op_type == "Gemm":
            a, b = shape(node.input[0], node), shape(node.input[1], node)
            m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
            n = b[0] if attrs.get("transB", 0) else b[1]
            total += 2 * m * n * k
        elif node.op_type == "MatMul":
            a, out = shape(node.input[0], node), shape(node.output[0], node)
            total += 2 * math.prod(out) * a[-1]
        elif node.op_type in ("ConvTranspose", "QLinearConv", "ConvInteger", "MatMulInteger", "Einsum"):
            raise ValueError(f"{path}: op {node.op_type} is not counted by this counter")
    return total


def per_h100(flops: float, peak: dict = H100_SXM, mfu: float = MFU) -> float:
    """Images/s per GPU if it sustains ``mfu`` of its bf16 dense peak on ``flops`` per image."""
    return mfu * peak["bf16_dense_tflops"] * 1e12 / flops


# -- preprocessing stages -----------------------------------------------------------------------------

def _zeros(*shape: int, dtype=torch.float32, device=META) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=device)


def caption_flops(model, new_tokens: int, num_beams: int, prompt_tokens: int = 0) -> dict[str, int]:
    """BLIP-2 captioning of one image as ``generate`` runs it: the vision encoder and Q-Former once, then
    the language model over ``num_beams`` rows: one prefill of the query tokens + BOS + prompt and
    ``new_tokens - 1`` single-token steps on the KV cache (the last token needs no forward), logits of
    the last position only. No attention masks are passed (all ones in generate): they add no FLOPs,
    and transformers reads their values to skip them, which meta tensors do not have."""
    device, dtype, size = model.device, model.dtype, model.config.vision_config.image_size
    lm = model.language_model
    with flop_counter() as image:
        image_embeds = model.vision_model(_zeros(1, 3, size, size, dtype=dtype, device=device)).last_hidden_state
        queries = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=image_embeds).last_hidden_state
        model.language_projection(queries)
    prefill_len = model.config.num_query_tokens + 1 + prompt_tokens
    embeds = _zeros(num_beams, prefill_len, lm.config.hidden_size, dtype=dtype, device=device)
    with flop_counter() as prefill:
        cache = lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).past_key_values
    with flop_counter() as decode:
        for _ in range(new_tokens - 1):
            ids = torch.zeros(num_beams, 1, dtype=torch.long, device=device)
            cache = lm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
    counts = {"vision_qformer": image.get_total_flops(), "lm_prefill": prefill.get_total_flops(),
              "lm_decode": decode.get_total_flops()}
    counts["total"] = sum(counts.values())
    return counts


def detect_flops(bundle, image_hw: tuple[int, int], phrases: list[str]) -> dict:
    """Grounding DINO (transformers) on one image resized as its processor does, one caption prompt."""
    from preprocess.detect import build_prompt

    model, processor = bundle
    short, long = processor.image_processor.size["shortest_edge"], processor.image_processor.size["longest_edge"]
    h, w = image_hw
    scale = min(short / min(h, w), long / max(h, w))
    pixels_hw = (round(h * scale), round(w * scale))
    prompt, _ = build_prompt(phrases)
    text = processor.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad(), flop_counter() as counter:
        model(pixel_values=torch.zeros(1, 3, *pixels_hw), pixel_mask=torch.ones(1, *pixels_hw, dtype=torch.long),
              **text)
    return {"flops": counter.get_total_flops(), "input_hw": list(pixels_hw), "prompt": prompt,
            "text_tokens": int(text["input_ids"].shape[1])}


def segment_flops_official(model, boxes: int) -> dict[str, int]:
    """segment-anything's ``Sam`` as the Segmenter calls it (one image, ``boxes`` box prompts)."""
    side, device = model.image_encoder.img_size, model.device
    batch = [{"image": _zeros(3, side, side, device=device), "original_size": (side, side),
              "boxes": _zeros(boxes, 4, device=device)}]
    with torch.no_grad():
        encoder = count(model.image_encoder, _zeros(1, 3, side, side, device=device))
        total = count(model, batch, multimask_output=False)
    return {"image_encoder": encoder, "decoder_per_box": (total - encoder) // boxes, "total": total}


def segment_flops_transformers(model, boxes: int) -> dict[str, int]:
    """transformers' ``SamModel`` as the Segmenter calls it: embeddings once, then the boxes as one prompt."""
    side, device = model.config.vision_config.image_size, model.device
    with torch.no_grad():
        with flop_counter() as encoder:
            embeddings = model.get_image_embeddings(_zeros(1, 3, side, side, device=device))
        decoder = count(model, image_embeddings=embeddings, input_boxes=_zeros(1, boxes, 4, device=device),
                        multimask_output=False)
    return {"image_encoder": encoder.get_total_flops(), "decoder_per_box": decoder // boxes,
            "total": encoder.get_total_flops() + decoder}


class ArcFaceR50Convs(torch.nn.Module):
    """The convolutions and fc of ArcFace R50 (buffalo_l's ``w600k_r50.onnx``): IResNet-50 as insightface's
    arcface_torch defines it, 4 stages of [3, 4, 14, 3] basic blocks, widths 64-512, each block a 3x3 conv
    then a 3x3 conv at the stage's stride (2 in the first block), a 1x1 shortcut conv in each stage's first
    block, and a 512*7*7 -> 512 fc on 112 px crops. BatchNorm and PReLU are left out: they carry no counted
    FLOPs. A shape model for counting only, not a usable recogniser."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = conv(3, 64, 3, padding=1, bias=False)
        self.blocks, self.shortcuts, width = torch.nn.ModuleList(), torch.nn.ModuleDict(), 64
        for blocks, planes in zip((3, 4, 14, 3), (64, 128, 256, 512)):
            for block in range(blocks):
                stride = 2 if block == 0 else 1
                self.blocks.append(torch.nn.Sequential(conv(width, planes, 3, padding=1, bias=False),
                                                       conv(planes, planes, 3, stride, padding=1, bias=False)))
                if block == 0:
                    self.shortcuts[str(len(self.blocks) - 1)] = conv(width, planes, 1, stride, bias=False)
                width = planes
        self.fc = torch.nn.Linear(512 * 7 * 7, 512)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.stem(crops)
        for index, block in enumerate(self.blocks):
            shortcut = self.shortcuts[str(index)](x) if str(index) in self.shortcuts else x
            x = block(x) + shortcut
        return self.fc(x.flatten(1))


def face_flops(pack: Path, det_size: int) -> dict:
    """Each ONNX file of an insightface pack: the detector at ``det_size`` square, recognisers per face crop."""
    import onnx

    files = {}
    for path in sorted(pack.expanduser().glob("*.onnx")):
        graph = onnx.load(str(path), load_external_data=False).graph
        names = {w.name for w in graph.initializer}
        dims = [d.dim_value for d in next(i for i in graph.input if i.name not in names).type.tensor_type.shape.dim]
        shape = (1, dims[1] or 3, dims[2] or det_size, dims[3] or det_size)
        files[path.name] = {"input_shape": list(shape), "flops": onnx_flops(path, shape)}
    if not files:
        raise FileNotFoundError(f"no .onnx files in the insightface pack {pack}")
    return files


# -- training -------------------------------------------------------------------------------------------

def training_batch(model, size: int, subjects: int, device=META) -> dict[str, torch.Tensor]:
    """One image in the training contract, every subject slot valid (the meta count needs that)."""
    crop = model.image_encoder.vision_model.config.image_size
    batch = {
        "pixel_values": _zeros(1, 3, size, size, device=device),
        "input_ids": torch.zeros(1, 77, dtype=torch.long, device=device),
        "subject_pixel_values": _zeros(1, subjects, 3, crop, crop, device=device),
        "subject_token_index": torch.arange(2, 2 + 3 * subjects, 3, device=device)[None],
        "subject_valid": torch.ones(1, subjects, dtype=torch.bool, device=device),
        "subject_masks": torch.ones(1, subjects, size, size, device=device),
    }
    if len(model.text_encoders) == 2:
        batch["input_ids_2"] = batch["input_ids"]
        batch["original_size"] = torch.tensor([[size, size]], device=device)
        batch["crop_top_left"] = torch.zeros(1, 2, dtype=torch.long, device=device)
    return batch


def training_flops(model, batch: dict[str, torch.Tensor]) -> dict:
    """Forward (``MMDiffModel.training_loss``) and backward FLOPs of one training step on ``batch``.

    The forward split is by the top-level module each op ran under (class names: ``Encoder`` is the VAE
    encoder, ``SubjectImageEncoder`` the CLIP vision tower, ``UNet2DConditionModel`` the UNet with its
    LoRA and MM-Diff attention). The model's config must have ``denoise_in_mask_prob`` 0 on meta (its
    coin flip reads a value); that choice changes elementwise loss weights only.
    """
    with flop_counter(meta_nonzero=True) as forward:
        loss = model.training_loss(batch)["loss"]
    with flop_counter(meta_nonzero=True) as backward:
        loss.backward()
    with torch.no_grad():
        vae = count(model.vae.encode, batch["pixel_values"].to(model.vae.dtype))
    by_module = {name: sum(ops.values()) for name, ops in forward.get_flop_counts().items()
                 if name != "Global" and "." not in name}
    total = forward.get_total_flops() + backward.get_total_flops()
    return {"forward": forward.get_total_flops(), "backward": backward.get_total_flops(), "total": total,
            "vae_encode": vae, "total_cached_latents": total - vae, "forward_by_module": by_module}


def build_training_model(mmdiff_config: str, source: str = "random", device: str = "meta"):
    """MMDiffModel of ``configs/mmdiff/<mmdiff_config>.yaml`` on a ``source`` (random | tiny) base and CLIP
    encoder, with ``denoise_in_mask_prob`` 0 (see :func:`training_flops`)."""
    from mmdiff import MMDiffConfig, MMDiffModel
    from mmdiff.configuration import load_config
    from mmdiff.zoo.spec import ModelSpec

    config = load_config(f"configs/mmdiff/{mmdiff_config}.yaml", MMDiffConfig)
    config = config.model_copy(update={"denoise_in_mask_prob": 0.0})
    with torch.device(device):
        return MMDiffModel.from_specs(ModelSpec(family=config.base_family, source=source, device=device),
                                      ModelSpec(family="clip_vision", source=source, device=device), config)


# -- the benchmark --------------------------------------------------------------------------------------

def _g(flops: float) -> float:
    return round(flops / 1e9, 3)


def _stage(flops_per_image: int, **extra) -> dict:
    return {"gflops_per_image": _g(flops_per_image), "images_per_s_per_h100": round(per_h100(flops_per_image), 2),
            "h100s_per_100_images_per_s": round(100 / per_h100(flops_per_image), 3), **extra}


def main() -> None:
    from mmdiff import zoo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=30, help="caption length counted (cluster max_new_tokens)")
    parser.add_argument("--num-beams", type=int, default=3, help="beam width (configs/preprocess/cluster.yaml)")
    parser.add_argument("--boxes", type=int, default=2, help="SAM box prompts per image (cluster max_entities)")
    parser.add_argument("--image", default="768x1024", help="source image HxW (the cluster job caps the long side at 1024)")
    parser.add_argument("--phrases", nargs="+", default=["a woman", "a black cat", "a wooden table"])
    parser.add_argument("--subjects", type=int, default=2, help="subject slots per training image (train configs)")
    parser.add_argument("--face-pack", type=Path, help="an insightface model-pack folder (e.g. buffalo_l) to count")
    parser.add_argument("--det-size", type=int, default=640)
    args = parser.parse_args()
    image_hw = tuple(int(v) for v in args.image.split("x"))
    start = time.perf_counter()
    stages: dict[str, dict] = {}

    # inference stages: no parameter requires grad (FlopCounterMode's module tracker would hook outputs)
    blip2 = zoo.build({"family": "blip2", "source": "random", "device": "meta"}).model.requires_grad_(False)
    caption = caption_flops(blip2, args.new_tokens, args.num_beams)
    greedy = caption_flops(blip2, args.new_tokens, 1)["total"]
    lm_params = sum(p.numel() for p in blip2.language_model.parameters())
    decode_row_flops = caption["lm_decode"] / max(args.new_tokens - 1, 1) / args.num_beams
    # one decode step reads every language-model weight once (bf16, 2 bytes) whatever the batch: below this
    # many rows (images x beams) per step the step is bound by memory bandwidth, not by the 40 % FLOP rate
    rows = 2 * lm_params / (H100_SXM["hbm_tb_per_s"] * 1e12) * MFU * H100_SXM["bf16_dense_tflops"] * 1e12 / decode_row_flops
    stages["caption_blip2_opt_2.7b"] = _stage(
        caption["total"], new_tokens=args.new_tokens, num_beams=args.num_beams, prompt_tokens=0, input_hw=[224, 224],
        gflops={k: _g(v) for k, v in caption.items()}, gflops_greedy_total=_g(greedy), language_model_params=lm_params,
        decode_rows_per_step_to_leave_bandwidth_bound=math.ceil(rows),
    )
    del blip2

    for name, model_type, backend in (("segment_sam_vit_h", "vit_h", "official"), ("segment_sam_vit_b", "vit_b", "transformers")):
        built = zoo.build({"family": "sam", "source": "random", "backend": backend, "device": "meta",
                           "options": {"model_type": model_type}})
        model = (built if backend == "official" else built.model).requires_grad_(False)
        sam = segment_flops_official(model, args.boxes) if backend == "official" else segment_flops_transformers(model, args.boxes)
        stages[name] = _stage(sam["total"], boxes=args.boxes, backend=backend, input_hw=[1024, 1024],
                              gflops={k: _g(v) for k, v in sam.items()})

    torch.manual_seed(0)
    gdino = zoo.build({"family": "grounding_dino", "source": "random"})  # real fp32: see the module docstring
    gdino.model.requires_grad_(False)
    detect = detect_flops(gdino, image_hw, args.phrases)
    del gdino
    stages["detect_grounding_dino_swin_t"] = _stage(detect["flops"], source_hw=list(image_hw), input_hw=detect["input_hw"],
                                                    prompt=detect["prompt"], text_tokens=detect["text_tokens"])

    with torch.device(META):
        recogniser = count(ArcFaceR50Convs().requires_grad_(False), _zeros(1, 3, 112, 112))
    stages["faces_insightface"] = {
        "recogniser_arcface_r50_gflops_per_face": _g(recogniser),
        "recogniser_faces_per_s_per_h100": round(per_h100(recogniser), 1),
        "recogniser_counted_from": "ArcFaceR50Convs, the layer shapes of arcface_torch's iresnet50",
        "detector_counted": False,
        "detector_reason": "buffalo_l's detector det_10g.onnx (SCRFD-10G) is not available offline here and its "
                           "architecture was not rebuilt; rerun with --face-pack <buffalo_l folder> to count every "
                           "graph of the pack (onnx_flops)",
    }
    if args.face_pack:
        files = face_flops(args.face_pack, args.det_size)
        stages["faces_insightface"] = {"pack": str(args.face_pack), "det_size": args.det_size,
                                       "files": {k: {**v, "gflops": _g(v.pop("flops"))} for k, v in files.items()}}

    train = {}
    for family, size in (("sd15", 512), ("sdxl", 1024)):
        model = build_training_model(family)
        flops = training_flops(model, training_batch(model, size, args.subjects))
        del model
        train[f"{family}_{size}px"] = {
            "subjects": args.subjects,
            "gflops_per_image": {k: _g(v) for k, v in flops.items() if k != "forward_by_module"},
            "forward_gflops_by_module": {k: _g(v) for k, v in flops["forward_by_module"].items()},
            "images_per_s_per_h100": {"vae_on_the_fly": round(per_h100(flops["total"]), 2),
                                      "cached_latents": round(per_h100(flops["total_cached_latents"]), 2)},
            "h100_hours_per_million_images": {
                "vae_on_the_fly": round(1e6 / per_h100(flops["total"]) / 3600, 2),
                "cached_latents": round(1e6 / per_h100(flops["total_cached_latents"]) / 3600, 2)},
        }

    result = {
        "counted": "matmul + convolution FLOPs (2 per multiply-add), torch.utils.flop_counter.FlopCounterMode; "
                   "attention through math SDPA; models at real size with random weights",
        "peak": {**H100_SXM, "mfu": MFU},
        "note": "images/s are FLOP-derived upper bounds at the stated MFU, not measured GPU throughput",
        "torch": torch.__version__,
        "preprocess": stages,
        "train": train,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_result("bench_flops", result)
    for name, stage in stages.items():
        if "gflops_per_image" in stage:
            print(f"bench_flops: {name}: {stage['gflops_per_image']:.1f} GFLOP/image -> "
                  f"{stage['images_per_s_per_h100']:.1f} images/s per H100 at {MFU:.0%} of bf16 peak")
    print(f"bench_flops: caption decode needs >= {stages['caption_blip2_opt_2.7b']['decode_rows_per_step_to_leave_bandwidth_bound']} "
          "rows (images x beams) per step to be compute-bound on H100")
    for name, entry in train.items():
        g, ips = entry["gflops_per_image"], entry["images_per_s_per_h100"]
        print(f"bench_flops: train {name}: {g['total']:.0f} GFLOP/image fwd+bwd ({g['total_cached_latents']:.0f} with cached "
              f"latents) -> {ips['vae_on_the_fly']:.1f} ({ips['cached_latents']:.1f}) images/s per H100 at {MFU:.0%} MFU")
    faces = stages["faces_insightface"]
    if "files" in faces:
        for name, entry in faces["files"].items():
            print(f"bench_flops: faces_insightface {name}: {entry['gflops']:.1f} GFLOP per call at {entry['input_shape']}")
    else:
        print(f"bench_flops: faces_insightface: ArcFace R50 {faces['recogniser_arcface_r50_gflops_per_face']:.1f} "
              "GFLOP per face; the SCRFD-10G detector is not counted (no insightface pack here; pass --face-pack)")


if __name__ == "__main__":
    main()

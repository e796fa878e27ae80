"""Training step time with cached VAE latents against encoding with the VAE, same model, same run.

    python -m benchmarks.bench_latents [--size tiny|sd15] [--resolution 256] [--steps 3]

One process, one model (tiny twin, or SD1.5 + ViT-L/14 sizes with random weights), one fixed batch of
real photos; each timed step is the training loss forward and backward (the optimizer step is the same
either way and left out). The two variants alternate, so machine load hits both alike; the median of
each is reported with their ratio. Prints one line and writes benchmarks/results/bench_latents_<size>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from benchmarks.report import write_result

SIZES = {"tiny": ("tiny", "tiny", "configs/mmdiff/tiny_sd15.yaml", 64), "sd15": ("random", "random", None, 256)}


def main() -> None:
    from mmdiff import MMDiffConfig, MMDiffModel
    from mmdiff.configuration import load_config
    from mmdiff.zoo.spec import ModelSpec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    base, encoder, mmdiff_yaml, default_resolution = SIZES[args.size]
    resolution = args.resolution or default_resolution
    config = load_config(mmdiff_yaml, MMDiffConfig) if mmdiff_yaml else MMDiffConfig(base_family="sd15")
    torch.manual_seed(0)
    model = MMDiffModel.from_specs(ModelSpec(family="sd15", source=base), ModelSpec(family="clip_vision", source=encoder), config)
    photo = Image.fromarray(skdata.chelsea()).convert("RGB").resize((resolution, resolution))
    pixels = torch.from_numpy(np.asarray(photo, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    size = model.image_processor.crop_size["height"]
    masks = torch.zeros(1, 2, resolution, resolution)
    masks[:, 0, resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    tokenizer = model.tokenizers[0]
    batch = {"pixel_values": pixels,
             "input_ids": tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length,
                                    return_tensors="pt").input_ids,
             "subject_pixel_values": torch.randn(1, 2, 3, size, size), "subject_token_index": torch.tensor([[4, -1]]),
             "subject_valid": torch.tensor([[True, False]]), "subject_masks": masks}
    with torch.no_grad():  # what train/latents.py stores
        cached = {**batch, "latent_parameters": model.vae.encode(pixels).latent_dist.parameters.contiguous()}

    def step(inputs: dict) -> float:
        torch.manual_seed(0)
        started = time.perf_counter()
        model.training_loss(inputs)["loss"].backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step(batch), step(cached)  # warm-up
    times: dict[str, list[float]] = {"vae": [], "cached": []}
    for _ in range(args.steps):
        times["vae"].append(step(batch))
        times["cached"].append(step(cached))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"size": args.size, "resolution": resolution, "device": "cpu", "threads": torch.get_num_threads(),
              "batch": 1, "steps": args.steps, "step_s": median, "vae_over_cached_step_time": median["vae"] / median["cached"]}
    print(f"bench_latents size={args.size} resolution={resolution} vae={median['vae']:.3f}s cached={median['cached']:.3f}s "
          f"vae/cached={result['vae_over_cached_step_time']:.2f}")
    write_result(f"bench_latents_{args.size}", result)


if __name__ == "__main__":
    main()

"""Generate an image from a registered model: the last step of `make demo`.

    python -m train.generate --config configs/train/demo.yaml --prompt "a cat on the beach" \
        --subject skimage:chelsea --out outputs/demo/generated.png

``--model`` defaults to the newest version of the config's registered model; ``--subject`` is an image
path or ``skimage:<name>`` (a photo shipped with scikit-image), once per subject word.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from mmdiff.configuration import load_config, parse_overrides
from train.config import TrainConfig


def load_subject(ref: str) -> Image.Image:
    if ref.startswith("skimage:"):
        from skimage import data

        name = ref.split(":", 1)[1]
        if not hasattr(data, name):
            raise ValueError(f"--subject {ref}: scikit-image has no photo '{name}'")
        return Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"--subject {ref}: no such image file")
    return Image.open(path).convert("RGB")


def generate(model_uri: str, prompt: str, subjects: list[Image.Image], seed: int = 0, steps: int = 25,
             guidance_scale: float = 5.0, device: str | None = None, dtype: str | None = None) -> Image.Image:
    """One image from a registered model, on ``device`` in ``dtype`` (None: the model's rule, auto: the
    GPU in bf16 when there is one, else the CPU in fp32)."""
    from train.pyfunc_model import encode_image

    placement = {k: v for k, v in (("device", device), ("dtype", dtype)) if v}
    model = mlflow.pyfunc.load_model(model_uri, model_config=placement or None)
    frame = pd.DataFrame([{"prompt": prompt, "subjects": [encode_image(s) for s in subjects], "seed": seed,
                           "num_inference_steps": steps, "guidance_scale": guidance_scale}])
    return Image.open(io.BytesIO(base64.b64decode(model.predict(frame)["image"][0])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training config (tracking URI, registered model)")
    parser.add_argument("--model", help="model URI; default models:/<registered_model>/latest")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--subject", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--device", help="default: the model's rule (auto: the GPU when there is one)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        help="default: the model's rule (auto: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = load_config(args.config, TrainConfig, parse_overrides(args.overrides))
    mlflow.set_tracking_uri(config.tracking_uri)
    uri = args.model or f"models:/{config.mlflow.registered_model}/latest"
    image = generate(uri, args.prompt, [load_subject(s) for s in args.subject], args.seed, args.steps, args.guidance_scale,
                     args.device, args.dtype)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"{uri} -> {args.out} ({image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main()

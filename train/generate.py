"""`mmdiff-generate`: an image from a registered (or saved) model, the last step of `make demo`. Its
flags, help and examples are in train/cli.py (parsed before torch or MLflow is imported).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m train.generate`: parse (and answer --help) before the heavy imports below
    import sys

    import train.cli

    sys.exit(train.cli.generate())

import argparse
import base64
import io
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from mmdiff.configuration import ConfigError, load_config, parse_overrides
from train import cli
from train.config import TrainConfig
from train.registry import download_model, registry_client


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
             guidance_scale: float = 5.0, device: str | None = None, dtype: str | None = None,
             tracking_uri: str | None = None, registry_uri: str | None = None) -> Image.Image:
    """One image from a registered model, on ``device`` in ``dtype`` (None: the model's rule, auto: the
    GPU in bf16 when there is one, else the CPU in fp32). ``models:/`` URIs are read from ``registry_uri``
    (else the tracking store's registry), ``runs:/`` URIs from ``tracking_uri`` (None: MLFLOW_TRACKING_URI)."""
    from train.pyfunc_model import encode_image

    placement = {k: v for k, v in (("device", device), ("dtype", dtype)) if v}
    with tempfile.TemporaryDirectory() as tmp:
        local = model_uri
        if model_uri.startswith(("models:/", "runs:/")):
            local = str(download_model(registry_client(tracking_uri, registry_uri), model_uri, tmp))
        model = mlflow.pyfunc.load_model(local, model_config=placement or None)
        frame = pd.DataFrame([{"prompt": prompt, "subjects": [encode_image(s) for s in subjects], "seed": seed,
                               "num_inference_steps": steps, "guidance_scale": guidance_scale}])
        return Image.open(io.BytesIO(base64.b64decode(model.predict(frame)["image"][0])))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``mmdiff-generate``'s parsed arguments -> the image file; a prompt whose [word] marks do not match
    the subjects is refused before the model loads."""
    from mmdiff.prompting import parse_markers

    try:
        _, spans = parse_markers(args.prompt)
    except ValueError as exc:
        parser.error(f"--prompt: {exc}")
    if len(spans) != len(args.subject):
        parser.error(f"--prompt {args.prompt!r} marks {len(spans)} subject word(s) as [word] but {len(args.subject)} "
                     "--subject image(s) were given (mark each subject's word, e.g. \"a [cat] on a beach\")")
    try:
        subjects = [load_subject(s) for s in args.subject]
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    uri, tracking_uri, registry_uri = args.model_uri, args.tracking_uri, args.registry_uri
    if args.config:
        try:
            config = load_config(args.config, TrainConfig, parse_overrides(args.set))
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        uri = uri or f"models:/{config.mlflow.registered_model}/latest"
        tracking_uri = tracking_uri or config.tracking_uri
        registry_uri = registry_uri or config.mlflow.registry_uri
    image = generate(uri, args.prompt, subjects, args.seed, args.steps, args.guidance_scale, args.device, args.dtype,
                     tracking_uri, registry_uri)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"{uri} -> {args.out} ({image.size[0]}x{image.size[1]})")
    return 0


main = cli.generate  # the command itself (parsed in train/cli.py)

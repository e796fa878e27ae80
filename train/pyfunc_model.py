"""The exported adapter as an MLflow pyfunc model that generates images (MLflow "models from code").

Logged by path, so loading it imports this file instead of unpickling an object. Artifacts:
``adapter`` (the safetensors adapter folder) and ``base_model`` (the base ModelSpec as JSON).

Input: a DataFrame (or list of dicts) with ``prompt``, ``subjects`` (list of base64 PNG/JPEG images, one
per subject word) and optional ``seed``, ``num_inference_steps``, ``guidance_scale``. Output: a
DataFrame with ``image``, a base64 PNG per row.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
import mlflow
import pandas as pd
import torch
from PIL import Image


def decode_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def encode_image(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class MMDiffPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from mmdiff import MMDiffPipeline
        from mmdiff.zoo.spec import ModelSpec

        base = ModelSpec.model_validate_json(Path(context.artifacts["base_model"]).read_text())
        self.pipe = MMDiffPipeline.from_pretrained(base, context.artifacts["adapter"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate inputs by them
        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
        images = []
        for index, row in enumerate(rows):
            if "prompt" not in row or "subjects" not in row:
                raise ValueError(f"input row {index}: needs 'prompt' and 'subjects' (got {sorted(row)})")
            generator = torch.Generator().manual_seed(int(row.get("seed", 0)))
            result = self.pipe(
                row["prompt"], subjects=[decode_image(s) for s in row["subjects"]], generator=generator,
                num_inference_steps=int(row.get("num_inference_steps", 30)),
                guidance_scale=float(row.get("guidance_scale", 7.5)),
            )
            images.append(encode_image(result.images[0]))
        return pd.DataFrame({"image": images})


mlflow.models.set_model(MMDiffPyfunc())

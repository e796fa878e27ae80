"""Ray Serve deployment of a registered MM-Diff model.

    serve run infra.serving.app:build_app model_uri=models:/mmdiff-demo/latest num_gpus=1

POST / with JSON {"prompt": "...", "subjects": [<base64 image>, ...], "seed": 0, "num_inference_steps": 30,
"guidance_scale": 7.5} answers {"image": <base64 PNG>}. The model is loaded through MLflow's pyfunc
flavour, so what is served is exactly what the registry holds (the safetensors adapter + base spec).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse


@serve.deployment(max_ongoing_requests=4)
class MMDiffService:
    def __init__(self, model_uri: str) -> None:
        import mlflow

        self.model_uri = model_uri
        self.model = mlflow.pyfunc.load_model(model_uri)

    async def __call__(self, request: Request) -> JSONResponse:
        import pandas as pd

        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "request body is not JSON"}, status_code=400)
        if not isinstance(body, dict) or "prompt" not in body or "subjects" not in body:
            return JSONResponse({"error": "JSON body needs 'prompt' and 'subjects'"}, status_code=400)
        try:
            result = self.model.predict(pd.DataFrame([body]))
        except ValueError as exc:  # bad calls (word not in prompt, unreadable image) are the client's fault
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"image": result["image"][0], "model_uri": self.model_uri})


def build_app(args: dict[str, Any]) -> serve.Application:
    """``serve run`` entry: args model_uri (required), num_gpus, num_cpus, num_replicas."""
    if "model_uri" not in args:
        raise ValueError("serving needs model_uri=models:/<name>/<version or alias>")
    options = {
        "num_replicas": int(args.get("num_replicas", 1)),
        "ray_actor_options": {"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))},
    }
    return MMDiffService.options(**options).bind(args["model_uri"])

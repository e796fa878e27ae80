"""Serving: a registered model answers image requests over HTTP through the Ray Serve deployment."""

import base64
import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mmdiff import MMDiffConfig, MMDiffModel
from mmdiff.configuration import load_config
from train.config import TrainConfig
from train.export import register_model

CONFIG = "configs/train/tiny_test.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def registered_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    config = load_config(CONFIG, TrainConfig, {"output_dir": str(root), "mlflow.registered_model": "mmdiff-serving"})
    model = MMDiffModel.from_specs(config.model.base, config.model.image_encoder, load_config(config.model.mmdiff, MMDiffConfig))
    model.save_pretrained(root / "adapter")
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("serving").experiment_id).info.run_id
    version = register_model(config, root / "adapter", run_id, "no-data")
    return config.tracking_uri, f"models:/mmdiff-serving/{version.version}"


@pytest.mark.slow
def test_served_model_generates_and_rejects_bad_requests(registered_model, monkeypatch):
    import ray
    from ray import serve

    from infra.serving.app import build_app

    tracking_uri, model_uri = registered_model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # the replica resolves models:/ through it
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model_uri": model_uri, "num_cpus": 0.5}), name="mmdiff", route_prefix="/")
        buffer = io.BytesIO()
        Image.fromarray(data.chelsea()).save(buffer, format="JPEG")
        subject = base64.b64encode(buffer.getvalue()).decode()
        url = f"http://127.0.0.1:{port}/"

        status, answer = post(url, {"prompt": "a [cat] on a beach", "subjects": [subject],
                                    "num_inference_steps": 2, "seed": 1})
        assert status == 200 and answer["model_uri"] == model_uri
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"]))))
        assert image.shape == (64, 64, 3) and image.std() > 0

        status, answer = post(url, {"prompt": "a [dog] on a beach", "subjects": []})
        assert status == 400 and "subject" in answer["error"]
        status, answer = post(url, {"subjects": [subject]})
        assert status == 400 and "prompt" in answer["error"]
    finally:
        serve.shutdown()
        ray.shutdown()

"""Serving: the registered model is self-contained, `mlflow models serve` answers, and the Ray Serve
application answers real HTTP on loopback (PNG, named 4xx, batching, alias roll-out without drops)."""

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from packaging.utils import canonicalize_name
from PIL import Image
from skimage import data

from benchmarks.bench_serving import ray_serve, register_tiny_versions, slow_body
from tests.helpers import free_port
from train.export import LOCK

NAME = "mmdiff-serving"
REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "a [cat] on a beach", "num_inference_steps": 2, "seed": 1}
# in-process generations run single-threaded (conftest: two OpenMP threads on a busy 2-core machine are ~20x slower)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def b64(image: np.ndarray | Image.Image, fmt: str = "JPEG") -> str:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def http(url: str, body: bytes | dict | None = None, timeout: float = 120,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, payload, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait_until(check, seconds: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(poll_s)
    raise AssertionError(f"{what} within {seconds} s")


def outside_env(tracking_uri: str, folder: Path) -> dict[str, str]:
    """The environment of a process that cannot import this repository: no PYTHONPATH to it, and a
    sitecustomize that switches off the editable install, so ``mmdiff`` can only come from the model."""
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable__')]\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the venv's scripts (uvicorn), as activated
    return {**env, "PYTHONPATH": str(folder), "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two trained-looking versions of one model (non-zero LoRA, so subjects matter); champion -> 1."""
    return register_tiny_versions(tmp_path_factory.mktemp("serving"), NAME, seeds=(1, 2))


def test_registered_model_ships_code_pins_and_signature(registry, tmp_path):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", tracking_uri=registry,
                                                     dst_path=str(tmp_path / "model")))
    # the lock's pins, read here (not with train.export's parser): `name==version \` lines, names canonical
    pins = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9][\w.-]*)==([^\s;\\]+)", LOCK.read_text(), re.M)}
    required = [r.split("==") for r in (local / "requirements.txt").read_text().split()]
    assert {"torch", "diffusers", "transformers", "mlflow"} <= {canonicalize_name(n) for n, _ in required}
    assert all(pins[canonicalize_name(n)] == v for n, v in required), (required, pins)  # pinned as locked
    signature = yaml.safe_load((local / "MLmodel").read_text())["signature"]
    assert [c["name"] for c in json.loads(signature["inputs"])][:2] == ["prompt", "subjects"]
    assert json.loads(signature["outputs"]) == [{"type": "string", "name": "image", "required": True}]
    assert (local / "code/mmdiff/pipeline.py").is_file() and (local / "code/preprocess/image_io.py").is_file()
    assert json.loads((local / "artifacts/base_model.json").read_text())["family"] == "sd15"


def test_registered_model_loads_in_the_requested_device_and_dtype(registry, tmp_path):
    """The registered model records the inference rule (auto), not how training loaded the base (CPU, fp32);
    load_model overrides it (bf16 runs on the CPU too), and a loader holding GPUs refuses the CPU."""
    import mlflow
    import pandas as pd
    import torch

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "model")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert (flavor["config"]["device"], flavor["config"]["dtype"]) == ("auto", "auto")
    assert not {"device", "dtype"} & set(json.loads((local / "artifacts/base_model.json").read_text()))
    row = {**GOOD, "subjects": [b64(data.chelsea())]}
    for settings, expected in ((None, torch.float32), ({"device": "cpu", "dtype": "bfloat16"}, torch.bfloat16)):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/1", model_config=settings)
        mm = model.unwrap_python_model().pipe.model  # the whole model: base, image encoder and adapter
        assert {p.dtype for p in mm.parameters()} == {expected} and {p.device.type for p in mm.parameters()} == {"cpu"}
        image = Image.open(io.BytesIO(base64.b64decode(model.predict(pd.DataFrame([row]))["image"][0])))
        assert image.size == (64, 64) and np.asarray(image).std() > 0
    with pytest.raises(ValueError, match="reserves 1 GPU.* would compute on the CPU"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/1", model_config={"reserved_gpus": 1})
    # integrity: a flipped byte in the base spec or in the adapter is refused, naming the file
    adapter = flavor["artifacts"]["adapter"]["path"]
    for damaged in (flavor["artifacts"]["base_model"]["path"], f"{adapter}/mmdiff_adapter.safetensors"):
        copy = Path(shutil.copytree(local, tmp_path / damaged.replace("/", "_")))
        content = bytearray((copy / damaged).read_bytes())
        content[len(content) // 2] ^= 0x01
        (copy / damaged).write_bytes(bytes(content))
        with pytest.raises(ValueError, match=f"{Path(damaged).name}: sha256 does not match"):
            mlflow.pyfunc.load_model(str(copy))


def test_mlflow_models_serve_answers_outside_the_repository(registry, tmp_path):
    """`mlflow models serve` from a temporary folder, in a process that cannot see this repository."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{NAME}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        cwd=tmp_path, env={**outside_env(registry, tmp_path), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def pinged():
            if server.poll() is not None:
                raise AssertionError(f"mlflow models serve exited: {server.stderr.read()[-3000:]!r}")
            try:
                return http(f"{url}/ping", timeout=5)[0] == 200
            except OSError:
                return False

        wait_until(pinged, 240, "mlflow models serve did not answer /ping")
        row = {**GOOD, "subjects": [b64(data.chelsea())]}
        status, _, body = http(f"{url}/invocations", {"dataframe_records": [row]})
        assert status == 200, body[:2000]
        image = Image.open(io.BytesIO(base64.b64decode(json.loads(body)["predictions"][0]["image"])))
        assert image.format == "PNG" and image.size == (64, 64)
        status, _, body = http(f"{url}/invocations", {"dataframe_records": [{**row, "prompt": "a [cat] and a [dog]"}]})
        assert status == 400 and b"row 0: prompt" in body, body[:2000]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=60)


# -- the Ray Serve application --------------------------------------------------------------------------
LIMITS = {"max_body_bytes": 2**20, "max_image_bytes": 2**18, "max_steps": 400}
# what one replica takes on: small, so that the abuse below reaches every bound quickly
BOUNDS = {"body_timeout_s": 3.0, "max_uploads": 16, "max_generations": 16}


@pytest.fixture(scope="module")
def service(registry):
    """One Serve instance on loopback for all the HTTP tests below (Serve start costs seconds)."""
    from ray import serve

    from infra.serving.app import ServingConfig, build_app, proxy_options

    with ray_serve(registry, **proxy_options(ServingConfig(**BOUNDS))) as base:
        serve.run(build_app({"model_uri": f"models:/{NAME}@champion", "poll_interval_s": 0.5, "num_cpus": 0.5,
                             "batch_wait_timeout_s": 0.2, "limits": LIMITS, **BOUNDS}), name="mmdiff", route_prefix="/")
        yield base


def pixels(body: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG"
    return np.asarray(image).astype(np.int16)


def test_serving_health_readiness_and_a_png(service):
    assert http(f"{service}/healthz")[0] == 200
    status, _, body = http(f"{service}/readyz")
    assert status == 200 and json.loads(body)["version"] == "1"
    status, headers, body = http(f"{service}/generate", {**GOOD, "subjects": [b64(data.chelsea())]})
    assert status == 200 and headers["content-type"] == "image/png", body[:500]
    assert headers["x-model-version"] == "1"
    image = pixels(body)
    assert image.shape == (64, 64, 3) and image.std() > 0


def bomb() -> str:
    """A real PNG whose header declares 6000x6000 RGB (108 MB decoded, over the budget) in ~100 KB."""
    return b64(Image.new("RGB", (6000, 6000)), "PNG")


BAD = {
    "oversized body": (lambda: {**GOOD, "subjects": ["A" * 2**20]}, 413, "body", ""),
    "bomb image": (lambda: {**GOOD, "subjects": [bomb()]}, 422, "subjects[0]", "over_decode_budget"),
    "non-image": (lambda: {**GOOD, "subjects": [base64.b64encode(b"%PDF-1.4 not an image").decode()]}, 422,
                  "subjects[0]", "not_an_image"),
    "not base64": (lambda: {**GOOD, "subjects": ["***"]}, 422, "subjects[0]", ""),
    "image bytes": (lambda: {**GOOD, "subjects": ["A" * 400_000]}, 413, "subjects[0]", ""),
    "too many subjects": (lambda: {**GOOD, "prompt": "[a] [b] [c] [d]", "subjects": [b64(data.chelsea())] * 4},
                          422, "subjects", ""),
    "prompt too long": (lambda: {**GOOD, "prompt": "a [cat] " + "on a sunny beach " * 30,
                                 "subjects": [b64(data.chelsea())]}, 422, "prompt", "tokens"),
    "marker mismatch": (lambda: {**GOOD, "prompt": "a [cat] and a [dog]", "subjects": [b64(data.chelsea())]},
                        422, "prompt", ""),
    "bad option": (lambda: {**GOOD, "num_inference_steps": 500, "subjects": [b64(data.chelsea())]}, 422,
                   "num_inference_steps", ""),
    "bad type": (lambda: {**GOOD, "guidance_scale": "high", "subjects": [b64(data.chelsea())]}, 422,
                 "guidance_scale", ""),
    "bad size": (lambda: {**GOOD, "height": 100, "subjects": [b64(data.chelsea())]}, 422, "height", ""),
    "unknown option": (lambda: {**GOOD, "strength": 1, "subjects": [b64(data.chelsea())]}, 422, "strength", ""),
    "not JSON": (lambda: b"{prompt: ", 422, "body", ""),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_serving_bad_requests_get_a_4xx_naming_the_field(service, kind):
    make, status, field, reason = BAD[kind]
    got, headers, body = http(f"{service}/generate", make())
    assert got == status, body[:500]
    answer = json.loads(body)
    assert answer["field"] == field and answer["error"] and reason in answer["error"], answer
    assert "Traceback" not in answer["error"]


def raw_post(url: str, head: str, body: bytes) -> tuple[int, dict]:
    """POST /generate with exactly these header lines (urllib would add its own Content-Length and type)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Connection: close\r\n\r\n".encode()
                     + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


# What the headers alone show: answered before an upload slot is taken, so also while every slot is held.
HEADER_FAULTS = {
    "form content type": ("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 2\r\n", b"{}",
                          415, "content-type"),
    "no content type": ("Content-Length: 2\r\n", b"{}", 415, "content-type"),
    "empty body": ("Content-Type: application/json\r\nContent-Length: 0\r\n", b"", 422, "body"),
    "declared oversize": ("Content-Type: application/json\r\nContent-Length: 2000000\r\n", b"", 413, "body"),
    "bad deadline": ("Content-Type: application/json\r\nContent-Length: 2\r\nx-request-timeout-s: soon\r\n", b"{}",
                     422, "x-request-timeout-s"),
}


def test_serving_header_faults_are_named_and_a_chunked_body_is_read(service):
    for kind, (head, body, status, field) in HEADER_FAULTS.items():
        got, answer = raw_post(service, head, body)
        assert (got, answer["field"]) == (status, field), (kind, answer)
    # no Content-Length: the chunked body is read (and here refused for what it holds, not as empty)
    got, answer = raw_post(service, "Content-Type: application/json; charset=utf-8\r\nTransfer-Encoding: chunked\r\n",
                           b"9\r\n{prompt: \r\n0\r\n\r\n")
    assert got == 422 and answer["field"] == "body" and "empty" not in answer["error"], answer


def test_serving_concurrent_requests_match_sequential(service):
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.immunohistochemistry(),
              np.ascontiguousarray(data.coffee()[:, ::-1])]
    requests = [{**GOOD, "subjects": [b64(p)]} for p in photos]  # one seed: only the subjects differ
    sequential = [http(f"{service}/generate", r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(lambda r: http(f"{service}/generate", r), requests))
    assert all(s == 200 for s, _, _ in sequential + concurrent)
    assert max(int(h["x-batch-size"]) for _, h, _ in concurrent) > 1  # they did share pipeline calls
    for (_, _, alone), (_, _, together) in zip(sequential, concurrent):
        assert np.abs(pixels(alone) - pixels(together)).max() <= 1
    assert min(np.abs(pixels(sequential[0][2]) - pixels(other)).max() for _, _, other in sequential[1:]) > 1


def readyz_load(service: str) -> dict[str, int]:
    return json.loads(http(f"{service}/readyz", timeout=30)[2])["load"]


@pytest.mark.extended
def test_serving_holds_under_slow_bodies_oversized_and_concurrent_requests(service):
    """100 clients trickling their bodies, 16 good requests, oversized and bad ones, all at once: the slow
    ones get 408 (body deadline) or 429 (upload slots full), /healthz answers 200 throughout, and
    - what the headers show to be wrong gets its 4xx at once, also while every upload slot is held;
    - what only the body shows needs an upload slot: 429 with Retry-After while none is free, then on a
      retry the body is read and its fault named (422), as a good request is answered 200."""
    good = {**GOOD, "subjects": [b64(data.chelsea())]}
    stop, probes = threading.Event(), []

    def probe():
        while not stop.is_set():
            start = time.monotonic()
            probes.append((http(f"{service}/healthz", timeout=15)[0], time.monotonic() - start))
            time.sleep(0.2)

    def client(body: dict | bytes) -> list[tuple[int, str]]:
        answers = []
        for _ in range(20):  # bounded: retried while the replica says it is busy
            status, headers, text = http(f"{service}/generate", body)
            answers.append((status, headers.get("retry-after", "") if status in (429, 503) else text[:2000]))
            if status not in (429, 503):
                break
            time.sleep(1)
        return answers

    def while_slots_full() -> list[tuple[str, int, dict]]:
        wait_until(lambda: readyz_load(service)["uploads"] >= BOUNDS["max_uploads"], 60,
                   "the slow clients did not hold every upload slot", poll_s=0.05)
        return [(kind, *raw_post(service, head, body)) for kind, (head, body, _, _) in HEADER_FAULTS.items()]

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(100 + 16 + 2 + 2 + 1) as pool:
            slow = [pool.submit(slow_body, f"{service}/generate", 4 * BOUNDS["body_timeout_s"]) for _ in range(100)]
            header_faults = pool.submit(while_slots_full)
            goods = [pool.submit(client, {**good, "seed": seed}) for seed in range(16)]
            oversized = [pool.submit(http, f"{service}/generate", {**good, "subjects": ["A" * 2**20]}) for _ in range(2)]
            bad = [pool.submit(client, BAD[kind][0]()) for kind in ("bad option", "not JSON")]
            slow, goods, bad = [f.result() for f in slow], [f.result() for f in goods], [f.result() for f in bad]
            oversized, header_faults = [f.result()[0] for f in oversized], header_faults.result()
    finally:
        stop.set()
        prober.join(timeout=60)
    assert set(slow) <= {408, 429} and 408 in slow, sorted(slow)
    for kind, status, answer in header_faults:
        assert (status, answer["field"]) == HEADER_FAULTS[kind][2:], (kind, status, answer)
    assert oversized == [413, 413]
    for answers, final in [(a, 200) for a in goods] + [(a, 422) for a in bad]:
        busy, (status, _) = answers[:-1], answers[-1]
        assert status == final and all(s in (429, 503) and int(after) >= 1 for s, after in busy), answers
    assert [json.loads(a[-1][1])["field"] for a in bad] == ["num_inference_steps", "body"]
    assert probes and {status for status, _ in probes} == {200}, probes
    load = readyz_load(service)
    assert load["uploads"] == 0 and load["generations"] == 0, load
    assert load["body_timeouts"] >= slow.count(408) and load["refused_busy"] >= slow.count(429), load


def test_serving_stops_a_generation_past_its_deadline_or_left_by_its_client(service):
    """A long request with a 1 s deadline is answered 504 and its generation stops at the next denoising
    step; so does one whose client hangs up; the replica then answers a small request."""
    large = {**GOOD, "subjects": [b64(data.chelsea())], "num_inference_steps": 400}  # tens of seconds of steps
    before = readyz_load(service)
    request = urllib.request.Request(f"{service}/generate", json.dumps(large).encode(),
                                     {"Content-Type": "application/json", "x-request-timeout-s": "1"})
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(request, timeout=120)
    assert answered.value.code == 504 and b"deadline" in answered.value.read()
    wait_until(lambda: readyz_load(service)["batches_stopped"] > before["batches_stopped"], 120,
               "the generation past its deadline did not stop")
    assert readyz_load(service)["deadlines_passed"] == before["deadlines_passed"] + 1

    host, port = service.removeprefix("http://").split(":")
    body = json.dumps(large).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: readyz_load(service)["generations"] == 1, 60, "the long request was not admitted")
    wait_until(lambda: readyz_load(service)["batches_stopped"] > before["batches_stopped"] + 1, 120,
               "the generation whose client left did not stop")
    load = readyz_load(service)
    assert load["clients_left"] == before["clients_left"] + 1 and load["generations"] == 0, load
    assert http(f"{service}/generate", {**GOOD, "subjects": [b64(data.chelsea())]})[0] == 200


def test_serving_follows_the_alias_without_dropping_requests(service, registry):
    import mlflow

    request = {**GOOD, "subjects": [b64(data.chelsea())]}
    answers: list[tuple[int, str, bytes]] = []
    stop = threading.Event()

    def client():
        for _ in range(400):  # bounded; stops once the new version has answered a few times
            status, headers, body = http(f"{service}/generate", request)
            answers.append((status, headers.get("x-model-version", ""), body))
            if stop.is_set():
                return

    thread = threading.Thread(target=client)
    thread.start()
    wait_until(lambda: len(answers) >= 2, 120, "no answers before the alias move")
    mlflow.MlflowClient(registry).set_registered_model_alias(NAME, "champion", "2")
    try:
        wait_until(lambda: sum(v == "2" for _, v, _ in answers) >= 3, 180, "version 2 did not answer")
    finally:
        stop.set()
        thread.join(timeout=120)
    assert [s for s, _, _ in answers] == [200] * len(answers)  # nothing failed during the switch
    versions = [v for _, v, _ in answers]
    switch = versions.index("2")
    assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}  # the next requests: version 2
    old, new = pixels(answers[0][2]), pixels(answers[-1][2])
    assert np.abs(old - new).max() > 1
    status, _, body = http(f"{service}/readyz")
    assert json.loads(body)["version"] == "2"


def test_serve_config_yaml_is_what_serve_build_writes(tmp_path):
    from click.testing import CliRunner
    from ray.serve.scripts import build  # the `serve build` command itself, run in this process

    out = tmp_path / "built.yaml"
    result = CliRunner().invoke(build, ["infra.serving.app:app", "-d", str(REPO), "-o", str(out)])
    assert result.exit_code == 0, result.output
    built = yaml.safe_load(out.read_text())
    shipped = yaml.safe_load((REPO / "infra/serving/serve_config.yaml").read_text())
    assert shipped["applications"][0]["deployments"] == built["applications"][0]["deployments"]
    assert shipped["applications"][0]["import_path"] == "infra.serving.app:app"


def test_serve_cli_refuses_to_start_without_a_tracking_uri(monkeypatch, capsys):
    from infra.serving.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--model-uri", "models:/mmdiff@champion"])
    assert stopped.value.code == 2 and "--tracking-uri" in capsys.readouterr().err


def test_autoscaling_follows_generations_not_open_connections():
    """The shipped policy, as Serve's controller loads it: replicas for the generations queued or running at
    the replicas; 200 open connections with nothing to generate ask for no replica."""
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from infra.serving.app import AUTOSCALING

    config = AutoscalingConfig(**AUTOSCALING)
    config.policy.serialize_policy()
    policy = config.policy.get_policy()

    def wanted(generations: list[float], ongoing: float) -> float:
        replicas = [f"replica-{i}" for i in range(len(generations))]
        context = AutoscalingContext(
            deployment_id=None, deployment_name="MMDiffServer", app_name="mmdiff",
            current_num_replicas=len(replicas), target_num_replicas=len(replicas), running_replicas=replicas,
            total_num_requests=ongoing, total_queued_requests=0.0,
            aggregated_metrics={"generations": dict(zip(replicas, generations))}, raw_metrics={},
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
            last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config)
        return policy(context)[0]

    assert wanted([0.0, 0.0], ongoing=200) == 0  # slow or idle sockets: Serve's bounds keep min_replicas
    assert wanted([16.0, 16.0], ongoing=40) == 4  # 32 generations at 8 per replica
    assert wanted([8.0], ongoing=8) == 1

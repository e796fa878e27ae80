"""Serving latency and throughput over real HTTP on loopback: batched vs unbatched, bad requests mixed in.

    python -m benchmarks.bench_serving [--clients 8] [--requests 6] [--rounds 3] [--steps 4] [--time-limit 300]

A tiny MM-Diff model is registered in a temporary MLflow registry and served by the Ray Serve application
(infra/serving/app.py) on 127.0.0.1. The same deployment is measured in this one run in alternating rounds,
reconfigured in place between them: ``max_batch_size`` 8 (batched) and 1 (unbatched). In each round each of
``--clients`` threads sends ``--requests`` good requests (its own subject photo and seeds); after every
``--bad-every``-th good request it sends one bad request (the kinds cycle) and then a good request, which
must answer 200. A round stops at its request count or its share of the time limit, whichever comes first.
Latency percentiles are those of the good requests in the batched rounds. Writes benchmarks/results/bench_serving.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from benchmarks.report import write_result

REPO = Path(__file__).resolve().parent.parent
NAME = "mmdiff-bench-serving"


def register_tiny_versions(root: Path, name: str, seeds: tuple[int, ...] = (1,)) -> str:
    """Register one tiny model version per seed (LoRA perturbed, so subjects matter); returns the tracking URI."""
    import mlflow

    from mmdiff import MMDiffConfig, MMDiffModel
    from mmdiff.configuration import load_config
    from train.config import TrainConfig
    from train.export import register_model

    config = load_config(REPO / "configs/train/tiny_test.yaml", TrainConfig,
                         {"output_dir": str(root), "mlflow.registered_model": name})
    client = mlflow.MlflowClient(config.tracking_uri)
    experiment = client.create_experiment(name, artifact_location=str(root / "artifacts"))
    mlflow.set_tracking_uri(config.tracking_uri)
    for seed in seeds:
        model = MMDiffModel.from_specs(config.model.base, config.model.image_encoder,
                                       load_config(REPO / config.model.mmdiff, MMDiffConfig))
        generator = torch.Generator().manual_seed(seed)  # after the build: the zoo seeds the global RNG
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.05)
        model.save_pretrained(root / f"adapter{seed}")
        register_model(config, root / f"adapter{seed}", client.create_run(experiment).info.run_id, "bench")
    client.set_registered_model_alias(name, "champion", "1")
    return config.tracking_uri


def b64_jpeg(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: dict) -> tuple[int, dict[str, str], float]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            return response.status, dict(response.headers), time.perf_counter() - start
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, dict(error.headers), time.perf_counter() - start
    except OSError:  # connection refused/reset: counted as a failure, never retried
        return 0, {}, time.perf_counter() - start


def bad_requests(good: dict) -> list[dict]:
    """One of each kind the service must refuse with a 4xx."""
    bomb = io.BytesIO()
    Image.new("RGB", (6000, 6000)).save(bomb, format="PNG")
    return [
        {**good, "num_inference_steps": 10_000},
        {**good, "subjects": [base64.b64encode(bomb.getvalue()).decode()]},
        {**good, "subjects": [base64.b64encode(b"not an image").decode()]},
        {**good, "prompt": "a [cat] and a [dog]"},
        {**good, "prompt": "a [cat] " + "on a sunny beach " * 30},
        {**good, "subjects": good["subjects"] * 4, "prompt": "[a] [b] [c] [d]"},
    ]


def run_load(url: str, clients: int, requests: int, bad_every: int, steps: int, time_limit: float) -> dict:
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    deadline = time.monotonic() + time_limit
    latencies: list[float] = []
    batch_sizes: list[int] = []
    failures: list[str] = []
    bad_answered = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        good = {"prompt": "a [cat] on a beach", "subjects": [b64_jpeg(photos[index % len(photos)])],
                "num_inference_steps": steps, "seed": index}
        bad = bad_requests(good)
        sent = 0

        def send_good() -> None:
            nonlocal sent
            status, headers, seconds = post(url, {**good, "seed": index * 1000 + sent})
            sent += 1
            with lock:
                if status == 200:
                    latencies.append(seconds)
                    batch_sizes.append(int(headers.get("x-batch-size", 1)))
                else:
                    failures.append(f"good request answered {status}")

        while sent < requests and time.monotonic() < deadline:
            send_good()
            if sent % bad_every == 0:
                status, _, _ = post(url, bad[(index + sent // bad_every) % len(bad)])
                with lock:
                    if 400 <= status < 500:
                        bad_answered[0] += 1
                    else:
                        failures.append(f"bad request answered {status}")
                send_good()  # the service is still fine after refusing it

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "batch_sizes": batch_sizes, "failures": failures,
            "bad_refused": bad_answered[0], "elapsed_s": time.perf_counter() - start}


def summarize(rounds: list[dict]) -> dict:
    """One mode's figures over its rounds: throughput = good answers / time spent in the rounds."""
    latencies = [x for r in rounds for x in r["latencies"]]
    failures = [x for r in rounds for x in r["failures"]]
    elapsed = sum(r["elapsed_s"] for r in rounds)

    def percentile(q: float) -> float | None:
        return round(float(np.percentile(latencies, q)), 4) if latencies else None

    return {"good_requests": len(latencies), "bad_requests_refused": sum(r["bad_refused"] for r in rounds),
            "failed_requests": len(failures), "failures": failures[:10], "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(len(latencies) / elapsed, 3),
            "p50_s": percentile(50), "p95_s": percentile(95), "p99_s": percentile(99),
            "mean_batch_size": round(float(np.mean([x for r in rounds for x in r["batch_sizes"]])), 2)
            if latencies else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="good requests per client, mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="batched/unbatched rounds, alternating")
    parser.add_argument("--bad-every", type=int, default=4, help="a bad request after every N good ones")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per request")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per mode (all its rounds)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from infra.serving.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        tracking_uri = register_tiny_versions(Path(tmp), NAME)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}/generate"
            rounds: dict[str, list[dict]] = {"batched": [], "unbatched": []}
            for index in range(args.rounds):  # alternate the modes, so a change in machine load hits both
                for mode, batch_size in (("batched", 8), ("unbatched", 1)):
                    # the same deployment, reconfigured in place (user_config): only the batch size differs
                    serve.run(build_app({"model_uri": f"models:/{NAME}@champion", "max_batch_size": batch_size,
                                         "poll_interval_s": 3600, "num_cpus": 1}), name="bench", route_prefix="/")
                    if index == 0:
                        run_load(url, 2, 2, 10**6, args.steps, 60)  # warm-up, not counted
                    rounds[mode].append(run_load(url, args.clients, args.requests, args.bad_every, args.steps,
                                                 args.time_limit / args.rounds))
                    print(f"round {index} {mode}: {len(rounds[mode][-1]['latencies'])} answers in "
                          f"{rounds[mode][-1]['elapsed_s']:.1f} s", flush=True)
            modes = {mode: summarize(r) for mode, r in rounds.items()}
        finally:
            serve.shutdown()
            ray.shutdown()
    batched, unbatched = modes["batched"], modes["unbatched"]
    result = {
        "p50_s": batched["p50_s"], "p95_s": batched["p95_s"], "p99_s": batched["p99_s"],
        "requests_per_s": batched["requests_per_s"],
        "batched_vs_unbatched_throughput": round(batched["requests_per_s"] / unbatched["requests_per_s"], 3),
        "failed_requests": batched["failed_requests"] + unbatched["failed_requests"],
        "clients": args.clients, "requests_per_client_and_round": args.requests, "rounds": args.rounds,
        "bad_every": args.bad_every,
        "steps": args.steps, "model": "tiny SD1.5 twin, 64 px, CPU, 1 replica (num_cpus=1)",
        "modes": modes,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "modes"}))
    write_result("bench_serving", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

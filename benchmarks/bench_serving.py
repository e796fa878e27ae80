"""Serving over real HTTP on loopback: batched vs unbatched throughput with bad requests mixed in, or (--abuse)
the service under abusive clients, with peak memory.

    python -m benchmarks.bench_serving [--clients 8] [--requests 6] [--rounds 3] [--steps 4] [--time-limit 300]
    python -m benchmarks.bench_serving --abuse [--clients 64] [--slow-clients 120] [--oversized 16] [--requests 2]

A tiny MM-Diff model is registered in a temporary MLflow registry and served by the Ray Serve application
(infra/serving/app.py) on 127.0.0.1. The same deployment is measured in this one run in alternating rounds,
reconfigured in place between them: ``max_batch_size`` 8 (batched) and 1 (unbatched). In each round each of
``--clients`` threads sends ``--requests`` good requests (its own subject photo and seeds); after every
``--bad-every``-th good request it sends one bad request (the kinds cycle) and then a good request, which
must answer 200. A round stops at its request count or its share of the time limit, whichever comes first.
Latency percentiles are those of the good requests in the batched rounds. Writes benchmarks/results/bench_serving.json.

``--abuse`` serves with the shipped defaults (``ServingConfig``: body deadline, upload and generation bounds,
request deadline) and sends at once: ``--clients`` good clients (``--requests`` each, retried after a
429/503 as ``Retry-After`` says, at most 10 times), ``--slow-clients`` that send their body one byte a
second, ``--oversized`` bodies over ``max_body_bytes`` (half declared: 413 at once; half chunked: retried after
a 429 until read and refused, 413), one bad request of each kind per good client (retried
the same way until its body is read and refused, 413/422) and one with a wrong Content-Type (415 at once), and a
``/healthz`` probe every 0.25 s; then one 100-step request with a 2 s deadline (``x-request-timeout-s``), which
must answer 504 and be stopped. The peak RSS of Serve's processes (replica, proxy, all of Ray's) is sampled
every 0.25 s. Writes benchmarks/results/bench_serving_abuse.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
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
    from mmdiff import MMDiffConfig, MMDiffModel
    from mmdiff.configuration import load_config
    from train.config import TrainConfig
    from train.export import register_model
    from train.registry import registry_client

    config = load_config(REPO / "configs/train/tiny_test.yaml", TrainConfig,
                         {"output_dir": str(root), "mlflow.registered_model": name})
    client = registry_client(config.tracking_uri, config.registry_uri)
    experiment = client.create_experiment(name, artifact_location=str(root / "artifacts"))
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ray_serve(tracking_uri: str, **http_options) -> Iterator[str]:
    """Ray (2 CPUs) and Serve's proxy on a free loopback port, replicas resolving ``models:/`` through
    ``tracking_uri``: yields the base URL; shuts both down after."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, **http_options})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def b64_jpeg(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: dict, content_type: str = "application/json") -> tuple[int, dict[str, str], float]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": content_type})
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


def slow_body(url: str, seconds: float) -> int:
    """A client that declares a 4 KiB body and sends it one byte a second for at most ``seconds``: the
    status it was answered, 0 if none (or the connection failed)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    head = (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4096\r\n\r\n{")
    deadline = time.monotonic() + seconds
    try:
        with socket.create_connection((host, int(port)), timeout=seconds) as sock:
            sock.sendall(head)
            sock.settimeout(1.0)
            while time.monotonic() < deadline:
                try:
                    answer = sock.recv(4096)
                    return int(answer.split(b" ", 2)[1]) if answer else 0
                except TimeoutError:
                    sock.sendall(b" ")
    except OSError:
        return 0
    return 0


def oversized_body(url: str, limit: int, chunked: bool) -> int:
    """A body over ``limit``: declared in Content-Length, or sent chunked (undeclared) in 64 KiB pieces until
    the service answers (at most twice the limit). The status it was answered, 0 if none."""
    import select

    host, port = url.removeprefix("http://").split("/")[0].split(":")
    size = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {2 * limit}"
    head = f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{size}\r\n\r\n"
    piece = b"A" * 65536
    try:
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(head.encode())
            for _ in range(2 * limit // len(piece)):
                if select.select([sock], [], [], 0)[0]:
                    break  # answered before the body was all sent
                sock.sendall(b"10000\r\n" + piece + b"\r\n" if chunked else piece)
            answer = sock.recv(4096)
            return int(answer.split(b" ", 2)[1]) if answer else 0
    except OSError:
        return 0


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


class PeakMemory(threading.Thread):
    """Samples the RSS of Ray's processes every ``period_s``; keeps the peaks (MiB) per role and in all."""

    ROLES = {"replica": "ServeReplica", "proxy": "ProxyActor", "controller": "ServeController"}

    def __init__(self, period_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.period_s, self.stop = period_s, threading.Event()
        self.peaks: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        """This run's Ray only: the processes ray.init started below this one (gcs, raylet, their workers),
        not other Ray sessions on the machine."""
        import psutil

        now: dict[str, float] = {}
        for process in psutil.Process().children(recursive=True):
            try:
                command = " ".join(process.cmdline())
                mib = process.memory_info().rss / 2**20
            except psutil.Error:  # ended between the listing and the read
                continue
            now["ray_total"] = now.get("ray_total", 0.0) + mib
            for role, marker in self.ROLES.items():
                if marker in command:
                    now[role] = now.get(role, 0.0) + mib
        return now

    def run(self) -> None:
        while not self.stop.is_set():
            for key, mib in self.sample().items():
                self.peaks[key] = max(self.peaks.get(key, 0.0), mib)
            self.stop.wait(self.period_s)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def run_abuse(base: str, clients: int, requests: int, slow_clients: int, oversized: int, steps: int,
              body_timeout_s: float, max_body_bytes: int) -> dict:
    """Every class of client at once (see the module doc); returns the answers by class and the failures."""
    url = f"{base}/generate"
    photo = b64_jpeg(data.chelsea())
    good = {"prompt": "a [cat] on a beach", "subjects": [photo], "num_inference_steps": steps, "seed": 0}
    answers: dict[str, Counter] = {k: Counter() for k in ("good", "good_first_try", "slow", "oversized", "bad",
                                                          "bad_first_try", "bad_header")}
    failures: list[str] = []
    probes: list[tuple[int, float]] = []
    lock, stop = threading.Lock(), threading.Event()

    def note(kind: str, status: int, ok: bool) -> None:
        with lock:
            answers[kind][status] += 1
            if not ok:
                failures.append(f"{kind} request answered {status}")

    def until_answered(kind: str, body: dict, expected: set[int]) -> None:
        """Sent again after a 429/503 as Retry-After says, at most 10 times (a body is only read, and so
        judged, once it gets an upload slot); notes the first answer and the last."""
        for attempt in range(10):
            status, headers, _ = post(url, body)
            if attempt == 0:
                note(f"{kind}_first_try", status, status in expected | {429, 503})
            if status not in (429, 503):
                break
            time.sleep(float(headers.get("retry-after", headers.get("Retry-After", 1))))
        note(kind, status, status in expected)

    def good_client(index: int) -> None:
        for number in range(requests):
            until_answered("good", {**good, "seed": index * 1000 + number}, {200, 429, 503})
        for bad in bad_requests(good):
            until_answered("bad", bad, {413, 422})
        status = post(url, good, content_type="text/plain")[0]  # what the headers show: refused at once
        note("bad_header", status, status == 415)

    def slow_client() -> None:
        status = slow_body(url, 2 * body_timeout_s)
        note("slow", status, 400 <= status < 500)

    def oversized_client(index: int) -> None:
        """Declared (Content-Length): 413 at once. Chunked: its size shows only as it is read, which takes an
        upload slot, so it is sent again after a 429 (Retry-After is the body deadline) until it gets 413."""
        chunked = index % 2 == 1
        for _ in range(10):
            status = oversized_body(url, max_body_bytes, chunked)
            if not (chunked and status == 429):
                break
            time.sleep(body_timeout_s)
        note("oversized", status, status == 413)

    def probe() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=30) as response:
                    status = response.status
            except urllib.error.HTTPError as error:
                status = error.code
            except OSError:
                status = 0
            with lock:
                probes.append((status, time.perf_counter() - start))
                if status != 200:
                    failures.append(f"/healthz answered {status}")
            stop.wait(0.25)

    prober = threading.Thread(target=probe)
    prober.start()
    start = time.perf_counter()
    threads = ([threading.Thread(target=slow_client) for _ in range(slow_clients)]
               + [threading.Thread(target=good_client, args=(i,)) for i in range(clients)]
               + [threading.Thread(target=oversized_client, args=(i,)) for i in range(oversized)])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    stop.set()
    prober.join()
    seconds = sorted(s for _, s in probes)
    return {"elapsed_s": round(elapsed, 2), "answers": {k: dict(sorted(v.items())) for k, v in answers.items()},
            "failures": failures[:20], "failed": len(failures),
            "healthz": {"probes": len(probes), "non_200": sum(s != 200 for s, _ in probes),
                        "p50_s": round(float(np.percentile(seconds, 50)), 4) if seconds else None,
                        "max_s": round(seconds[-1], 4) if seconds else None}}


def run_deadline(base: str, before: dict) -> dict:
    """One request far longer than its 2 s deadline: its status, and whether its generation was stopped."""
    large = {"prompt": "a [cat] on a beach", "subjects": [b64_jpeg(data.chelsea())], "num_inference_steps": 100,
             "seed": 0}  # the most steps the shipped limits allow: many short steps, so the stop is prompt
    request = urllib.request.Request(f"{base}/generate", json.dumps(large).encode(),
                                     {"Content-Type": "application/json", "x-request-timeout-s": "2"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    answered = time.perf_counter() - start
    deadline = time.monotonic() + 120
    stopped = False
    while not stopped and time.monotonic() < deadline:
        stopped = get_json(f"{base}/readyz")["load"]["batches_stopped"] > before["batches_stopped"]
        time.sleep(0.5)
    return {"status": status, "answered_after_s": round(answered, 2), "generation_stopped": stopped}


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


def abuse(args: argparse.Namespace) -> int:
    from ray import serve

    from infra.serving.app import ServingConfig, build_app, proxy_options

    clients = args.clients if args.clients != 8 else 64
    requests = args.requests if args.requests != 6 else 2
    config = ServingConfig()  # the shipped bounds and deadlines
    memory = PeakMemory()
    with tempfile.TemporaryDirectory() as tmp, ray_serve(register_tiny_versions(Path(tmp), NAME),
                                                         **proxy_options(config)) as base:
        try:
            serve.run(build_app({"model_uri": f"models:/{NAME}@champion", "poll_interval_s": 3600, "num_cpus": 1,
                                 "max_replicas": 1}), name="bench", route_prefix="/")
            run_load(f"{base}/generate", 2, 2, 10**6, args.steps, 60)  # warm-up, not counted
            idle = memory.sample()
            memory.start()
            load = run_abuse(base, clients, requests, args.slow_clients, args.oversized, args.steps,
                             config.body_timeout_s, config.limits.max_body_bytes)
            deadline = run_deadline(base, get_json(f"{base}/readyz")["load"])
            counters = get_json(f"{base}/readyz")["load"]
        finally:
            memory.stop.set()
    result = {
        "failed": load["failed"] + (deadline["status"] != 504) + (not deadline["generation_stopped"]),
        "clients": clients, "requests_per_client": requests, "slow_clients": args.slow_clients,
        "oversized": args.oversized, "steps": args.steps, **load, "deadline_request": deadline,
        "replica_counters": counters,
        "rss_mib": {"idle": {k: round(v) for k, v in idle.items()},
                    "peak": {k: round(v) for k, v in memory.peaks.items()}},
        "bounds": config.model_dump(include={"request_timeout_s", "body_timeout_s", "max_uploads", "max_generations"}),
        "model": "tiny SD1.5 twin, 64 px, CPU, 1 replica (num_cpus=1), shipped ServingConfig bounds",
    }
    print(json.dumps({k: v for k, v in result.items() if k in ("failed", "answers", "healthz", "deadline_request",
                                                               "rss_mib")}))
    write_result("bench_serving_abuse", result)
    return 0 if result["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="good requests per client, mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="batched/unbatched rounds, alternating")
    parser.add_argument("--bad-every", type=int, default=4, help="a bad request after every N good ones")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per request")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per mode (all its rounds)")
    parser.add_argument("--abuse", action="store_true", help="the abuse run instead (--clients default 64)")
    parser.add_argument("--slow-clients", type=int, default=120, help="--abuse: clients sending 1 byte/s")
    parser.add_argument("--oversized", type=int, default=16, help="--abuse: bodies over max_body_bytes")
    args = parser.parse_args(argv)
    if args.abuse:
        return abuse(args)

    from ray import serve

    from infra.serving.app import build_app

    with tempfile.TemporaryDirectory() as tmp, ray_serve(register_tiny_versions(Path(tmp), NAME)) as base:
        url = f"{base}/generate"
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

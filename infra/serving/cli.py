"""`mmdiff-serve`: run the serving application (infra/serving/app.py) on a local or existing Ray cluster.

    mmdiff-serve --model-uri models:/mmdiff@champion --tracking-uri http://mlflow:5000 --port 8000
    python -m infra.serving.cli --model-uri models:/mmdiff-demo@champion --tracking-uri sqlite:///mlflow.db

Blocks until interrupted (Ctrl-C shuts the application down). For a declarative deployment use
``serve deploy infra/serving/serve_config.yaml`` instead; both build the same application.
"""

from __future__ import annotations

import os

from mmdiff.cli import DEMO_TRACKING_URI, CommandParser, prose


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser("mmdiff-serve", prose(__doc__), examples=[
        f"mmdiff-serve --model-uri models:/mmdiff-demo@champion --tracking-uri {DEMO_TRACKING_URI} --port 8000"])
    parser.add_argument("--model-uri", default="models:/mmdiff@champion",
                        help="models:/<name>@<alias> is followed as the alias moves; a version is fixed")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the MLflow tracking server/store (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--num-cpus", type=float, default=1, help="per replica")
    parser.add_argument("--num-gpus", type=float, default=0, help="per replica")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--poll-interval-s", type=float, default=10.0, help="how often the alias is resolved")
    parser.add_argument("--registry-uri", help="the model registry for --model-uri (default: the tracking server's)")
    parser.add_argument("--device", default=None, help="override the model's device rule (auto: the GPU when "
                        "there is one; replicas holding GPUs refuse the CPU)")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "float16", "bfloat16"),
                        help="override the model's precision rule (auto: bfloat16 on GPUs, float32 on the CPU)")
    parser.add_argument("--request-timeout-s", type=float, default=120.0,
                        help="each request's deadline, queueing included (504 past it; its generation stops)")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("--tracking-uri (or MLFLOW_TRACKING_URI) is needed to resolve models:/ URIs")

    import ray
    from ray import serve

    from infra.serving.app import ServingConfig, build_app, proxy_options

    ray.init(address=args.address, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": args.tracking_uri}})
    serve.start(http_options={"host": args.host, "port": args.port,
                              **proxy_options(ServingConfig(request_timeout_s=args.request_timeout_s))})
    app_args = {"model_uri": args.model_uri, "tracking_uri": args.tracking_uri, "num_cpus": args.num_cpus,
                "num_gpus": args.num_gpus, "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                "max_batch_size": args.max_batch_size, "poll_interval_s": args.poll_interval_s,
                "request_timeout_s": args.request_timeout_s}
    app_args.update({k: v for k, v in (("device", args.device), ("dtype", args.dtype),
                                       ("registry_uri", args.registry_uri)) if v})
    print(f"serving {args.model_uri} on http://{args.host}:{args.port}/generate", flush=True)
    try:
        serve.run(build_app(app_args), name="mmdiff", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

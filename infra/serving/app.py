"""Ray Serve application: a registered MM-Diff model behind a batched, bounded HTTP API that follows an alias.

    serve run infra.serving.app:build_app model_uri=models:/mmdiff@champion tracking_uri=http://mlflow:5000
    serve deploy infra/serving/serve_config.yaml        # the same application, from the checked-in config
    mmdiff-serve --model-uri models:/mmdiff@champion    # infra/serving/cli.py

Routes: ``POST /generate`` with JSON ``{"prompt": "a [cat] on a beach", "subjects": [<base64 image>],
"seed": 0, "num_inference_steps": 25, "guidance_scale": 5.0, "height": 512, "width": 512}`` answers
``image/png`` (headers ``x-model-name``, ``x-model-version``); ``GET /healthz`` (the process answers) and
``GET /readyz`` (a model is loaded: name, version, last alias check).

- Every request is checked before it is queued: body bytes (413), then the schema and limits of
  :class:`train.pyfunc_model.ServingLimits` (subjects, image bytes, the image header's decode budget,
  prompt tokens, marks vs images, steps, size), each refusal a 4xx JSON ``{"field", "error"}``. A 5xx
  says only ``internal error`` and a request id; the traceback goes to the replica's log.
- ``serve.batch`` gathers concurrent requests; requests that agree on steps, guidance, size and number of
  subjects run as one pipeline call (``MMDiffPyfunc.generate``), in a worker thread, one batch at a time.
- ``model_uri`` ``models:/<name>@<alias>`` is followed: every ``poll_interval_s`` the replica resolves the
  alias; a new version is loaded beside the old one and swapped in between batches, so no request is
  dropped. Changing ``user_config`` (``serve deploy``) reconfigures running replicas in place.
"""

import asyncio
import io
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from mmdiff.configuration import ConfigModel
from mmdiff.placement import PlacementError
from train.pyfunc_model import PreparedRequest, RequestError, ServingLimits

logger = logging.getLogger("ray.serve")

api = FastAPI(title="mmdiff", description="MM-Diff personalised generation from a registered model")


class ServingConfig(ConfigModel):
    """The deployment's ``user_config``: what to serve and how; changing it reconfigures replicas in place."""

    model_uri: str = "models:/mmdiff@champion"  # models:/<name>@<alias> is followed; anything else is fixed
    poll_interval_s: float = 10.0  # how often the alias is resolved
    # None: the registered model's rule (mmdiff.placement: the accelerator in bf16 when there is one);
    # a replica that holds GPUs refuses to load onto the CPU
    device: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05  # how long a batch waits to fill once its first request is queued
    limits: ServingLimits = ServingLimits()


@dataclass(frozen=True)
class LoadedModel:
    uri: str  # the concrete models:/<name>/<version> (or other URI) that was loaded
    name: str
    version: str
    model: Any  # train.pyfunc_model.MMDiffPyfunc


def error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"field": field, "error": message}, status_code=status)


def resolve(model_uri: str) -> tuple[str, str, str]:
    """``models:/name@alias`` -> (models:/name/version, name, version); other URIs are returned as they are."""
    import mlflow

    if model_uri.startswith("models:/") and "@" in model_uri:
        name, alias = model_uri.removeprefix("models:/").split("@", 1)
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
        return f"models:/{name}/{version}", name, str(version)
    if model_uri.startswith("models:/") and model_uri.count("/") == 2:
        name, version = model_uri.removeprefix("models:/").split("/")
        return model_uri, name, version
    return model_uri, model_uri, ""


def load(model_uri: str, config: ServingConfig) -> LoadedModel:
    import mlflow

    import ray

    uri, name, version = resolve(model_uri)
    reserved = len(ray.get_gpu_ids()) if ray.is_initialized() else 0
    settings = {"limits": config.limits.model_dump(mode="json"), "reserved_gpus": reserved,
                **{k: v for k, v in (("device", config.device), ("dtype", config.dtype)) if v}}
    pyfunc = mlflow.pyfunc.load_model(uri, model_config=settings)
    logger.info("loaded %s", uri)
    return LoadedModel(uri, name, version, pyfunc.unwrap_python_model())


# (defined before the deployment: serve.ingress freezes the routes, and the globals they see, when applied)
def encode_results(model: Any, requests: list[PreparedRequest]) -> list[bytes | Exception]:
    """Generate and PNG-encode (in a worker thread); a request whose generation failed gets its exception,
    the others their images."""
    out: list[bytes | Exception] = []
    for result in model.generate(requests):
        if isinstance(result, Exception):
            out.append(result)
            continue
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (field ``body``) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError("body", f"{declared} bytes, at most {limit} bytes", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError("body", f"more than {limit} bytes", status=413)
    return bytes(body)


# replicas follow the load: about one full batch in flight per replica
AUTOSCALING = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
               "upscale_delay_s": 10, "downscale_delay_s": 300}


@serve.deployment(
    max_ongoing_requests=16,  # >= max_batch_size, so a batch can fill
    max_queued_requests=64,  # beyond this the proxy answers 503 instead of queueing without bound
    autoscaling_config=AUTOSCALING,
    health_check_period_s=10,
    user_config=ServingConfig().model_dump(mode="json"),
)
@serve.ingress(api)
class MMDiffServer:
    def __init__(self) -> None:
        self.config: ServingConfig | None = None
        self.loaded: LoadedModel | None = None
        self.last_check: dict[str, Any] = {}
        self.reload_lock = asyncio.Lock()
        self.watcher: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after __init__ and on every user_config change; requests go on meanwhile."""
        config = ServingConfig.model_validate(user_config)
        previous, self.config = self.config, config
        self.generate_batch.set_max_batch_size(config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        if previous is None or (previous.model_uri, previous.device, previous.dtype, previous.limits) != (
                config.model_uri, config.device, config.dtype, config.limits):
            async with self.reload_lock:
                self.loaded = await asyncio.to_thread(load, config.model_uri, config)
        if self.watcher is None and "@" in config.model_uri:
            self.watcher = asyncio.get_running_loop().create_task(self.follow_alias())

    async def follow_alias(self) -> None:
        """Resolve the alias periodically; load a new version beside the old one, then swap."""
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            config = self.config
            if "@" not in config.model_uri:
                continue
            try:
                uri, _, version = await asyncio.to_thread(resolve, config.model_uri)
                if uri != self.loaded.uri:
                    async with self.reload_lock:
                        self.loaded = await asyncio.to_thread(load, uri, config)
                self.last_check = {"ok": True, "alias_version": version}
            except Exception as exc:  # noqa: BLE001 - a registry outage must not stop serving the loaded model
                logger.warning("alias check of %s failed: %s", config.model_uri, exc)
                self.last_check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def check_health(self) -> None:
        if self.loaded is None:
            raise RuntimeError("no model loaded")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        if self.loaded is None:
            return JSONResponse({"ready": False}, status_code=503)
        loaded = self.loaded
        return JSONResponse({"ready": True, "model_uri": self.config.model_uri, "loaded_uri": loaded.uri,
                             "name": loaded.name, "version": loaded.version, "alias_check": self.last_check})

    @api.post("/generate", response_class=Response,
              responses={200: {"content": {"image/png": {}}}, 413: {}, 422: {}, 500: {}, 503: {}})
    async def generate(self, request: Request) -> Response:
        loaded, limits = self.loaded, self.config.limits
        if loaded is None:
            return error(503, "model", "no model loaded yet")
        request_id = uuid.uuid4().hex[:12]
        try:
            body = await read_body(request, limits.max_body_bytes)
            prepared = await asyncio.to_thread(lambda: loaded.model.prepare(loaded.model.parse(body)))
            png, served, batch_size = await self.generate_batch(prepared)
            if isinstance(png, Exception):
                raise png
        except (RequestError, loaded.model.RequestError) as exc:  # the model's code is its own module
            return error(exc.status, exc.field, exc.message)
        except Exception:  # noqa: BLE001 - logged with its traceback here, never sent to the client
            logger.exception("request %s failed", request_id)
            return error(500, "", f"internal error (request {request_id})")
        return Response(png, media_type="image/png",
                        headers={"x-model-name": served.name, "x-model-version": served.version,
                                 "x-batch-size": str(batch_size)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, requests: list[PreparedRequest]) -> list[tuple[bytes | Exception, LoadedModel, int]]:
        loaded = self.loaded  # one version per batch; a swap takes effect from the next batch
        results = await asyncio.to_thread(encode_results, loaded.model, requests)
        return [(result, loaded, len(requests)) for result in results]


def build_app(args: dict[str, Any]) -> serve.Application:
    """``serve run`` entry. args: the :class:`ServingConfig` keys (model_uri, poll_interval_s, device, dtype,
    max_batch_size, batch_wait_timeout_s, limits) and tracking_uri, num_cpus, num_gpus, min_replicas,
    max_replicas."""
    config = ServingConfig.model_validate({k: args[k] for k in ServingConfig.model_fields if k in args})
    actor = {"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))}
    if actor["num_gpus"] and config.device and config.device != "auto" and config.device.startswith("cpu"):
        raise PlacementError(f"serving: num_gpus={actor['num_gpus']:g} reserves GPUs for every replica but "
                             f"device is {config.device!r}: replicas would hold the GPUs and compute on the CPU "
                             "(set device to auto or cuda, or num_gpus to 0)")
    if args.get("tracking_uri"):  # the replicas resolve models:/ URIs through it
        actor["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": str(args["tracking_uri"])}}
    autoscaling = {**AUTOSCALING, **{k: int(args[k]) for k in ("min_replicas", "max_replicas") if k in args}}
    autoscaling["initial_replicas"] = autoscaling["min_replicas"]
    return MMDiffServer.options(ray_actor_options=actor, user_config=config.model_dump(mode="json"),
                                max_ongoing_requests=max(16, 2 * config.max_batch_size),
                                autoscaling_config=autoscaling).bind()


app = build_app({})  # the default application, what `serve build infra.serving.app:app` writes out

"""Ray Serve application: a registered MM-Diff model behind a batched, bounded HTTP API that follows an alias.

    serve run infra.serving.app:build_app model_uri=models:/mmdiff@champion tracking_uri=http://mlflow:5000
    serve deploy infra/serving/serve_config.yaml        # the same application, from the checked-in config
    mmdiff-serve --model-uri models:/mmdiff@champion    # infra/serving/cli.py

Routes: ``POST /generate`` with JSON ``{"prompt": "a [cat] on a beach", "subjects": [<base64 image>],
"seed": 0, "num_inference_steps": 25, "guidance_scale": 5.0, "height": 512, "width": 512}`` answers
``image/png`` (headers ``x-model-name``, ``x-model-version``); ``GET /healthz`` (the process answers) and
``GET /readyz`` (a model is loaded: name, version, last alias check, load).

- Every request is checked before it is queued: its headers before it may upload (content type 415,
  declared body bytes 413, an empty body 422), the body's bytes as they arrive (413), then the schema and limits of
  :class:`train.pyfunc_model.ServingLimits` (subjects, image bytes, the image header's decode budget,
  prompt tokens, marks vs images, steps, size), each refusal a 4xx JSON ``{"field", "error"}``. A 5xx
  says only ``internal error`` and a request id; the traceback goes to the replica's log.
- Abuse is bounded per replica: the body must arrive within ``body_timeout_s`` (408), at most
  ``max_uploads`` bodies are read at once (429), at most ``max_generations`` generations are queued or
  running (503, both with ``Retry-After``), and every request has a deadline (``request_timeout_s``, or less
  with the ``x-request-timeout-s`` header; 504). A batch whose every request has left (client gone, or past its
  deadline) is stopped at its next denoising step. ``/healthz`` and ``/readyz`` never wait on any of these.
- ``serve.batch`` gathers concurrent requests; requests that agree on steps, guidance, size and number of
  subjects run as one pipeline call (``MMDiffPyfunc.generate``), in a worker thread, one batch at a time.
- ``model_uri`` ``models:/<name>@<alias>`` is followed: every ``poll_interval_s`` the replica resolves the
  alias; a new version is loaded beside the old one and swapped in between batches, so no request is
  dropped. Changing ``user_config`` (``serve deploy``) reconfigures running replicas in place.
"""

import asyncio
import contextvars
import io
import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import Field
from fastapi.responses import JSONResponse, Response
from ray import serve

from mmdiff.configuration import ConfigModel
from mmdiff.placement import PlacementError
from train.pyfunc_model import PreparedRequest, RequestError, ServingLimits
from train.registry import download_model, model_version, registry_client

logger = logging.getLogger("ray.serve")

api = FastAPI(title="mmdiff", description="MM-Diff personalised generation from a registered model")


class ServingConfig(ConfigModel):
    """The deployment's ``user_config``: what to serve and how; changing it reconfigures replicas in place."""

    model_uri: str = "models:/mmdiff@champion"  # models:/<name>@<alias> is followed; anything else is fixed
    poll_interval_s: float = 10.0  # how often the alias is resolved
    # the registry models:/ URIs are resolved in; None: the tracking server's (the replicas' MLFLOW_TRACKING_URI,
    # build_app's tracking_uri), never $MLFLOW_REGISTRY_URI (train/registry.py)
    registry_uri: str | None = None
    # None: the registered model's rule (mmdiff.placement: the accelerator in bf16 when there is one);
    # a replica that holds GPUs refuses to load onto the CPU
    device: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05  # how long a batch waits to fill once its first request is queued
    limits: ServingLimits = ServingLimits()
    # -- what one replica takes on (the deployment's max_ongoing_requests is sized from these) ---------
    request_timeout_s: float = Field(120.0, gt=0)  # arrival -> answer, queueing included; 504 past it
    body_timeout_s: float = Field(15.0, gt=0)  # the whole body must have arrived by then; 408 past it
    max_uploads: int = Field(32, ge=1)  # bodies being received at once; 429 beyond (bounds their memory)
    max_generations: int = Field(32, ge=1)  # generations queued or running; 503 beyond


@dataclass(frozen=True)
class LoadedModel:
    uri: str  # the concrete models:/<name>/<version> (or other URI) that was loaded
    name: str
    version: str
    model: Any  # train.pyfunc_model.MMDiffPyfunc


def error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"field": field, "error": message}, status_code=status)


def resolve(model_uri: str, registry_uri: str | None = None) -> tuple[str, str, str]:
    """``models:/name@alias`` -> (models:/name/version, name, version), the alias read in ``registry_uri``
    (else the tracking server's registry); other URIs are returned as they are."""
    if model_uri.startswith("models:/") and "@" in model_uri:
        version = model_version(registry_client(None, registry_uri), model_uri)
        return f"models:/{version.name}/{version.version}", version.name, str(version.version)
    if model_uri.startswith("models:/") and model_uri.count("/") == 2:
        name, version = model_uri.removeprefix("models:/").split("/")
        return model_uri, name, version
    return model_uri, model_uri, ""


def load(model_uri: str, config: ServingConfig) -> LoadedModel:
    import mlflow

    import ray

    uri, name, version = resolve(model_uri, config.registry_uri)
    reserved = len(ray.get_gpu_ids()) if ray.is_initialized() else 0
    settings = {"limits": config.limits.model_dump(mode="json"), "reserved_gpus": reserved,
                **{k: v for k, v in (("device", config.device), ("dtype", config.dtype)) if v}}
    local = uri
    if uri.startswith("models:/"):  # through the named registry; kept, as mlflow keeps its own downloads
        local = str(download_model(registry_client(None, config.registry_uri), uri,
                                   tempfile.mkdtemp(prefix="mmdiff-model-")))
    pyfunc = mlflow.pyfunc.load_model(local, model_config=settings)
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


class GenerationStopped(Exception):
    """Raised at a denoising step of a batch that nobody waits for any more."""


@dataclass(eq=False)
class Job:
    """One admitted request on its way through the batch queue."""

    prepared: PreparedRequest
    deadline: float  # time.monotonic()
    abandoned: bool = False  # its client left, or it was answered 504


@dataclass(eq=False)
class RunningBatch:
    jobs: list[Job]
    stopped: bool = False

    def should_stop(self) -> bool:
        now = time.monotonic()
        return all(job.abandoned or now > job.deadline for job in self.jobs)


# The batch the current worker thread generates for (asyncio.to_thread carries the context into the thread).
RUNNING: contextvars.ContextVar[RunningBatch | None] = contextvars.ContextVar("mmdiff_running_batch", default=None)


def stop_abandoned_batches(model: Any) -> None:
    """Check, before every UNet call (each denoising step), whether anyone still waits for the batch, and
    stop it if not: the pipeline runs in a thread, which cannot be cancelled from outside."""
    def check(_module: Any, _args: Any) -> None:
        batch = RUNNING.get()
        if batch is not None and batch.should_stop():
            batch.stopped = True
            raise GenerationStopped("every request of the batch left or passed its deadline")

    model.pipe.model.base_pipe.unet.register_forward_pre_hook(check)


def generate_for(batch: RunningBatch, model: Any) -> list[bytes | Exception]:
    """:func:`encode_results` for ``batch``, which the step check sees (run in a worker thread: its context
    is a copy, so the setting ends with the call)."""
    RUNNING.set(batch)
    return encode_results(model, [job.prepared for job in batch.jobs])


def request_timeout(request: Request, config: ServingConfig) -> float:
    """The server's deadline, or a shorter one the client asks for with ``x-request-timeout-s``."""
    asked = request.headers.get("x-request-timeout-s")
    if asked is None:
        return config.request_timeout_s
    try:
        seconds = float(asked)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise RequestError("x-request-timeout-s", f"{asked!r} is not a positive number of seconds")
    return min(seconds, config.request_timeout_s)


def busy(status: int, field: str, message: str, retry_after_s: float) -> JSONResponse:
    return JSONResponse({"field": field, "error": message}, status_code=status,
                        headers={"retry-after": str(max(1, math.ceil(retry_after_s)))})


def check_headers(request: Request, limit: int) -> None:
    """Refuse what the headers alone show to be wrong, before an upload slot is taken: so these faults are
    named (415 ``content-type``, 413/422 ``body``) even while slow clients hold every slot. What only the
    body shows needs it read, and so a slot (429 while none is free)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise RequestError("content-type", f"{media_type or 'none'}: the body must be sent as application/json",
                           status=415)
    declared = request.headers.get("content-length")
    if declared == "0" or (declared is None and "transfer-encoding" not in request.headers):
        raise RequestError("body", "empty: the request must be a JSON object")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError("body", f"{declared} bytes, at most {limit} bytes", status=413)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (field ``body``) as soon as it passes ``limit`` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError("body", f"more than {limit} bytes", status=413)
    return bytes(body)


# Replicas follow the generations queued or running (infra/serving/autoscaling.py), not open connections:
# about one full batch per replica. target_ongoing_requests is read as generations per replica.
AUTOSCALING = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8,
               "upscale_delay_s": 10, "downscale_delay_s": 300,
               "policy": {"policy_function": "infra.serving.autoscaling:generation_load_policy"}}
PROBE_HEADROOM = 64  # requests a replica admits beyond uploads and generations: probes, fast refusals


def deployment_options(config: ServingConfig) -> dict[str, Any]:
    """What Serve must know of the config: every request the replica may hold (so the proxy hands it the
    probes and the requests it refuses fast), and a drain long enough for every admitted request to end
    (downscaling never kills a request in flight)."""
    return {"max_ongoing_requests": config.max_uploads + config.max_generations + PROBE_HEADROOM,
            "graceful_shutdown_timeout_s": config.body_timeout_s + config.request_timeout_s + 10}


def proxy_options(config: ServingConfig) -> dict[str, Any]:
    """``serve.start(http_options=...)``: the proxy ends a request only after the replica's own deadlines
    (a backstop), and closes idle keep-alive connections soon."""
    return {"request_timeout_s": config.body_timeout_s + config.request_timeout_s + 10, "keep_alive_timeout_s": 15}


@serve.deployment(
    **deployment_options(ServingConfig()),
    max_queued_requests=64,  # beyond this the proxy answers 503 instead of queueing without bound
    autoscaling_config=AUTOSCALING,
    health_check_period_s=10,
    graceful_shutdown_wait_loop_s=1,
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
        self.uploads = 0  # bodies being received
        self.generations = 0  # admitted requests waiting for, or in, a batch
        self.counts = {"refused_busy": 0, "body_timeouts": 0, "deadlines_passed": 0, "clients_left": 0,
                       "batches_stopped": 0}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after __init__ and on every user_config change; requests go on meanwhile."""
        config = ServingConfig.model_validate(user_config)
        previous, self.config = self.config, config
        self.generate_batch.set_max_batch_size(config.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        if previous is None or (previous.model_uri, previous.registry_uri, previous.device, previous.dtype,
                                previous.limits) != (config.model_uri, config.registry_uri, config.device,
                                                     config.dtype, config.limits):
            async with self.reload_lock:
                self.loaded = await asyncio.to_thread(self.load, config.model_uri, config)
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
                uri, _, version = await asyncio.to_thread(resolve, config.model_uri, config.registry_uri)
                if uri != self.loaded.uri:
                    async with self.reload_lock:
                        self.loaded = await asyncio.to_thread(self.load, uri, config)
                self.last_check = {"ok": True, "alias_version": version}
            except Exception as exc:  # noqa: BLE001 - a registry outage must not stop serving the loaded model
                logger.warning("alias check of %s failed: %s", config.model_uri, exc)
                self.last_check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    @staticmethod
    def load(model_uri: str, config: ServingConfig) -> LoadedModel:
        loaded = load(model_uri, config)
        stop_abandoned_batches(loaded.model)
        return loaded

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The load autoscaling follows (infra/serving/autoscaling.py): generations queued or running."""
        return {"generations": float(self.generations)}

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
                             "name": loaded.name, "version": loaded.version, "alias_check": self.last_check,
                             "load": {"uploads": self.uploads, "generations": self.generations, **self.counts}})

    @api.post("/generate", response_class=Response,
              responses={200: {"content": {"image/png": {}}}, 408: {}, 413: {}, 415: {}, 422: {}, 429: {}, 500: {},
                         503: {}, 504: {}})
    async def generate(self, request: Request) -> Response:
        arrived = time.monotonic()
        loaded, config = self.loaded, self.config
        if loaded is None:
            return error(503, "model", "no model loaded yet")
        request_id = uuid.uuid4().hex[:12]
        job = None
        try:
            timeout = request_timeout(request, config)
            check_headers(request, config.limits.max_body_bytes)
            if self.uploads >= config.max_uploads:
                self.counts["refused_busy"] += 1
                return busy(429, "body", f"{self.uploads} uploads in progress, at most {config.max_uploads}; retry",
                            config.body_timeout_s)
            self.uploads += 1
            try:
                body = await asyncio.wait_for(read_body(request, config.limits.max_body_bytes),
                                              min(config.body_timeout_s, timeout))
            except TimeoutError:
                self.counts["body_timeouts"] += 1
                return error(408, "body", f"not received within {min(config.body_timeout_s, timeout):g} s")
            finally:
                self.uploads -= 1
            prepared = await asyncio.to_thread(lambda: loaded.model.prepare(loaded.model.parse(body)))
            if self.generations >= config.max_generations:
                self.counts["refused_busy"] += 1
                return busy(503, "", f"{self.generations} generations queued or running, at most "
                                     f"{config.max_generations}; retry", 1.0)
            job = Job(prepared, arrived + timeout)
            self.generations += 1
            try:
                png, served, batch_size = await asyncio.wait_for(self.generate_batch(job),
                                                                 job.deadline - time.monotonic())
            finally:
                self.generations -= 1
            if isinstance(png, GenerationStopped):  # stopped at its deadline just as the wait ended
                raise TimeoutError
            if isinstance(png, Exception):
                raise png
        except (RequestError, loaded.model.RequestError) as exc:  # the model's code is its own module
            return error(exc.status, exc.field, exc.message)
        except TimeoutError:  # the generation's wait: the body's has its own answer above
            if job is not None:
                job.abandoned = True
            self.counts["deadlines_passed"] += 1
            return error(504, "", f"not generated within the request's deadline ({timeout:g} s); it was stopped "
                                  f"(request {request_id})")
        except asyncio.CancelledError:  # the client left: nobody waits for this generation any more
            if job is not None:
                job.abandoned = True
            self.counts["clients_left"] += 1
            raise
        except Exception:  # noqa: BLE001 - logged with its traceback here, never sent to the client
            logger.exception("request %s failed", request_id)
            return error(500, "", f"internal error (request {request_id})")
        return Response(png, media_type="image/png",
                        headers={"x-model-name": served.name, "x-model-version": served.version,
                                 "x-batch-size": str(batch_size)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, jobs: list[Job]) -> list[tuple[bytes | Exception, LoadedModel, int]]:
        loaded = self.loaded  # one version per batch; a swap takes effect from the next batch
        live = [job for job in jobs if not job.abandoned]
        batch = RunningBatch(live)
        results: dict[int, bytes | Exception] = {}
        if live and not batch.should_stop():
            done = await asyncio.to_thread(generate_for, batch, loaded.model)
            results = {id(job): result for job, result in zip(live, done)}
        if batch.stopped:
            self.counts["batches_stopped"] += 1
        stopped = GenerationStopped("nobody waits for this request any more")
        return [(results.get(id(job), stopped), loaded, len(live)) for job in jobs]


def build_app(args: dict[str, Any]) -> serve.Application:
    """``serve run`` entry. args: the :class:`ServingConfig` keys (model_uri, poll_interval_s, device, dtype,
    max_batch_size, batch_wait_timeout_s, limits, request_timeout_s, body_timeout_s, max_uploads,
    max_generations) and tracking_uri, num_cpus, num_gpus, min_replicas,
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
                                autoscaling_config=autoscaling, **deployment_options(config)).bind()


app = build_app({})  # the default application, what `serve build infra.serving.app:app` writes out

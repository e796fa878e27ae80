"""The exported adapter as an MLflow pyfunc model that generates images (MLflow "models from code").

Logged by path, so loading it imports this file instead of unpickling an object; the packages it imports
(``mmdiff``, ``preprocess.image_io``) travel with the model as ``code_paths``. Artifacts: ``adapter`` (the
safetensors adapter folder) and ``base_model`` (the base ModelSpec as JSON: which model; where and in which
precision it runs is the ``model_config`` rule below, not the training spec's).

Input: one row per request, the fields of :class:`GenerateRequest` (``prompt`` with each subject word
marked as ``[word]``, ``subjects`` as base64 images in the order of the marks, optional ``seed``,
``num_inference_steps``, ``guidance_scale``, ``height``, ``width``). Output: ``image``, a base64 PNG per row.
Every row is checked against :class:`ServingLimits` (bounds, image bytes, the decode budget read from the
image header, prompt tokens) before any generation; an error names the row and the field at fault.
Rows that agree on everything but prompt, subjects and seed run as one pipeline call.

``load_model(uri, model_config={...})`` accepts ``device`` and ``dtype`` (the registered model records
``auto``: :mod:`mmdiff.placement`'s rule, bf16 on an accelerator, the CPU in fp32 without one),
``reserved_gpus`` (the GPUs the loading replica holds: loading refuses to compute on the CPU with them)
and ``limits`` (a :class:`ServingLimits` mapping).
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from mmdiff.configuration import ConfigModel
from preprocess.image_io import ImageConfig, ImageRejected, load_image

__all__ = ["ServingLimits", "GenerateRequest", "RequestError", "PreparedRequest", "MMDiffPyfunc",
           "decode_image", "encode_image", "field_name"]


class ServingLimits(ConfigModel):
    """What one request may ask for. The body limit is enforced by the HTTP service, the rest by the model."""

    max_body_bytes: int = 16 * 2**20  # the whole JSON request
    max_image_bytes: int = 4 * 2**20  # one subject image, after base64 decoding
    max_prompt_chars: int = 2000  # checked before tokenizing; the token limit is the model's own
    max_subjects: int | None = None  # None: the model's max_subjects
    max_steps: int = 100
    min_side: int = 64  # generated height/width bounds, multiples of 8
    max_side: int = 1024
    max_guidance_scale: float = 30.0
    # preprocessing's header check: an image whose declared decoded size (pixels x channels x bytes per
    # channel) is over this budget is refused before decoding; 8-bit RGB 4096x4096 fits
    image: ImageConfig = ImageConfig(max_decoded_bytes=4096 * 4096 * 3)


class RequestError(ValueError):
    """A request the model refuses; ``field`` names the part at fault (``subjects[1]``, ``prompt``, ...);
    ``status`` is the HTTP status that says so (413 too large, 422 otherwise)."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


def field_name(loc: Sequence[Any]) -> str:
    """pydantic's error location ("subjects", 1) -> "subjects[1]"."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _limits(info: ValidationInfo) -> ServingLimits:
    return (info.context or {}).get("limits") or ServingLimits()


class GenerateRequest(BaseModel):
    """One generation request. Bounds come from the ``limits`` (:class:`ServingLimits`) in the context."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, description="the scene; mark each subject word as [word]")
    subjects: list[str] = Field(default_factory=list, description="base64 images, one per [word], in order")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    num_inference_steps: int = 25  # the official inference defaults (docs/MODEL.md)
    guidance_scale: float = Field(5.0, ge=0.0)
    height: int | None = None
    width: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_length(cls, value: str, info: ValidationInfo) -> str:
        if len(value) > _limits(info).max_prompt_chars:
            raise ValueError(f"{len(value)} characters, at most {_limits(info).max_prompt_chars}")
        return value

    @field_validator("subjects")
    @classmethod
    def _subject_count(cls, value: list[str], info: ValidationInfo) -> list[str]:
        limits = _limits(info)
        if limits.max_subjects is not None and len(value) > limits.max_subjects:
            raise ValueError(f"{len(value)} subjects, at most {limits.max_subjects}")
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _steps(cls, value: int, info: ValidationInfo) -> int:
        if not 1 <= value <= _limits(info).max_steps:
            raise ValueError(f"{value} is outside 1..{_limits(info).max_steps}")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, value: float, info: ValidationInfo) -> float:
        if value > _limits(info).max_guidance_scale:
            raise ValueError(f"{value} is above {_limits(info).max_guidance_scale}")
        return value

    @field_validator("height", "width")
    @classmethod
    def _side(cls, value: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        if value is not None and (value % 8 or not limits.min_side <= value <= limits.max_side):
            raise ValueError(f"{value} is not a multiple of 8 in {limits.min_side}..{limits.max_side}")
        return value


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request with its subject images decoded: what one pipeline row needs."""

    prompt: str
    subjects: tuple[Image.Image, ...]
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int | None
    width: int | None

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call."""
        return len(self.subjects), self.num_inference_steps, self.guidance_scale, self.height, self.width


def decode_image(text: str, field: str, limits: ServingLimits) -> Image.Image:
    """A base64 image -> RGB PIL, within the byte limit and through preprocessing's header check (decode
    budget) and validation; errors name ``field``."""
    if len(text) // 4 * 3 > limits.max_image_bytes + 2:  # the base64 length bounds the decoded size
        raise RequestError(field, f"about {len(text) // 4 * 3} bytes, at most {limits.max_image_bytes}", 413)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "not valid base64") from None
    try:
        return load_image(data, field, limits.image).image
    except ImageRejected as rejected:
        raise RequestError(field, f"{rejected.reason}: {rejected.detail}") from None


def encode_image(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def read_base_spec(artifacts: dict[str, str]) -> Any:
    """The registered model's base ModelSpec, its file checked against the model's ``checksums`` artifact
    (the adapter's own files are checked when it loads)."""
    from mmdiff.integrity import read_json, verify_artifacts
    from mmdiff.zoo.spec import ModelSpec

    verify_artifacts({"base_model.json": artifacts["base_model"]}, artifacts.get("checksums"))
    return ModelSpec.model_validate(read_json(artifacts["base_model"]))


class MMDiffPyfunc(mlflow.pyfunc.PythonModel):
    # MLflow loads this file under a generated module name: callers catch the errors of the loaded copy
    RequestError = RequestError

    def load_context(self, context):
        from mmdiff import MMDiffPipeline
        from mmdiff.placement import resolve_placement

        settings = dict(context.model_config or {})
        base = read_base_spec(context.artifacts)
        # the recorded rule (auto: the accelerator in bf16, else the CPU in fp32) or the caller's override;
        # never the training spec's placement (models registered before the rule record "")
        device, dtype = resolve_placement(settings.get("device") or "auto", settings.get("dtype") or "auto",
                                          settings.get("reserved_gpus") or 0, "the registered model's loader")
        base = base.model_copy(update={"device": device, "dtype": dtype})
        self.pipe = MMDiffPipeline.from_pretrained(base, context.artifacts["adapter"])
        limits = ServingLimits.model_validate(settings.get("limits") or {})
        if limits.max_subjects is None or limits.max_subjects > self.pipe.model.config.max_subjects:
            limits = limits.model_copy(update={"max_subjects": self.pipe.model.config.max_subjects})
        self.limits = limits
        # prompt checks run in request threads while a batch generates: they get their own tokenizers
        # (a fast tokenizer's truncation state is not thread-safe) behind their own lock
        self.check_tokenizers = [copy.deepcopy(t) for t in self.pipe.model.tokenizers]
        self.check_lock = threading.Lock()

    # -- checks ---------------------------------------------------------------------------------
    def parse(self, data: dict[str, Any] | str | bytes) -> GenerateRequest:
        """A request (mapping or JSON text) -> GenerateRequest; RequestError names the first bad field."""
        try:
            if isinstance(data, (str, bytes)):
                return GenerateRequest.model_validate_json(data, context={"limits": self.limits})
            return GenerateRequest.model_validate(data, context={"limits": self.limits})
        except ValidationError as exc:
            error = exc.errors()[0]
            message = error["msg"].removeprefix("Value error, ")
            raise RequestError(field_name(error["loc"]), message) from None

    def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Model-aware checks (prompt tokens, marks vs images) and bounded decoding of the subject images."""
        from mmdiff.prompting import parse_markers

        try:
            text, spans = parse_markers(request.prompt)
        except ValueError as exc:
            raise RequestError("prompt", str(exc)) from None
        if len(spans) != len(request.subjects):
            raise RequestError("prompt", f"marks {len(spans)} subject word(s) as [word] but "
                                         f"{len(request.subjects)} subject image(s) were given")
        for tokenizer in self.check_tokenizers:
            with self.check_lock:
                count = len(tokenizer(text, truncation=False)["input_ids"])
            if count > tokenizer.model_max_length:
                raise RequestError("prompt", f"{count} tokens, the model reads at most {tokenizer.model_max_length}")
        images = tuple(decode_image(s, f"subjects[{i}]", self.limits) for i, s in enumerate(request.subjects))
        return PreparedRequest(request.prompt, images, request.seed, request.num_inference_steps,
                               request.guidance_scale, request.height, request.width)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, requests: Sequence[PreparedRequest]) -> list[Image.Image | Exception]:
        """One image per request, in order: compatible requests share a pipeline call. If a shared call
        fails, its requests are retried one at a time, so one bad request only fails itself."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.batch_key, []).append(index)
        results: list[Image.Image | Exception] = [RuntimeError("not generated")] * len(requests)
        for indices in groups.values():
            images = self._call([requests[i] for i in indices])
            if isinstance(images, Exception) and len(indices) > 1:  # find the culprit(s)
                images = [self._call([requests[i]]) for i in indices]
                images = [image if isinstance(image, Exception) else image[0] for image in images]
            elif isinstance(images, Exception):
                images = [images]
            for i, image in zip(indices, images):
                results[i] = image
        return results

    def _call(self, group: Sequence[PreparedRequest]) -> list[Image.Image] | Exception:
        first = group[0]
        try:
            output = self.pipe(
                [r.prompt for r in group], [list(r.subjects) for r in group],
                generator=[torch.Generator().manual_seed(r.seed) for r in group],
                num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                height=first.height, width=first.width,
            )
        except Exception as exc:  # noqa: BLE001 - the error becomes the answer of the requests in the call
            return exc
        return list(output.images)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate inputs by them
        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
        prepared = []
        for index, row in enumerate(rows):
            # optional columns come back as NaN/None from a DataFrame; arrays as numpy arrays
            row = {k: (list(v) if k == "subjects" else v) for k, v in row.items() if v is not None and not _is_nan(v)}
            try:
                prepared.append(self.prepare(self.parse(row)))
            except RequestError as exc:  # MLflow's scoring server answers this one 400 with the message
                raise mlflow.exceptions.MlflowException.invalid_parameter_value(f"row {index}: {exc}") from None
        images = []
        for index, result in enumerate(self.generate(prepared)):
            if isinstance(result, Exception):
                raise ValueError(f"row {index}: {result}") from result
            images.append(encode_image(result))
        return pd.DataFrame({"image": images})


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


mlflow.models.set_model(MMDiffPyfunc())

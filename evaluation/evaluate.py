"""The evaluation job: generate every benchmark case with one model, score it, record it in MLflow.

    mmdiff-evaluate --config configs/eval/demo.yaml --model-uri models:/mmdiff-demo/1 \
        [--tracking-uri URI] [--runner ray|loop] [--set key=value ...]      # flags: evaluation/cli.py

``--model-uri``: a registered version (``models:/<name>/<version>`` or ``models:/<name>@<alias>``), a run's
adapter (``runs:/<run_id>/adapter``) or a local adapter folder. The job is a Ray Data job (embedded Ray,
or the cluster in ``ray.address`` / RAY_ADDRESS): a generation actor pool (the model loaded once per
actor, on a GPU when ``generate.num_gpus`` > 0) feeds a scoring actor pool (CLIP, DINO, ArcFace and the
subject locator loaded once per actor); only small score rows come back to the driver. Generated images
are written under ``output_dir`` (shared storage on a cluster). ``--runner loop`` runs the same two
stages in this process (the benchmark's baseline).

Results go to the run that trained the model (for a folder: a new run in experiment ``mmdiff-eval``):
metrics ``eval.<name>``, tags ``eval.benchmark`` / ``eval.benchmark_hash`` / ``eval.model_uri``, and
artifacts under ``eval/<benchmark>/``: ``table.json`` (one row per case), ``summary.json``, ``images/`` and
``references/`` (each subject's conditioning photo).
A case that fails is recorded with its reason and the job goes on.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m evaluation.evaluate`: parse (and answer --help) before the heavy imports below
    import sys

    import evaluation.cli

    sys.exit(evaluation.cli.evaluate())

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from evaluation import cli
from evaluation.benchmark import BenchmarkSpec, Case, benchmark_hash, list_cases
from evaluation.decontamination import benchmark_files, check_training_data
from mmdiff.configuration import ConfigModel, load_config, parse_overrides
from mmdiff.zoo.spec import ModelSpec
from pipeline.config import RayConfig, StageConfig
from preprocess.detect import DetectConfig
from train.registry import download_model, model_version, registry_client

__all__ = [
    "EvaluationConfig",
    "EvaluationResult",
    "GenerateStage",
    "GenerationSettings",
    "MetricModels",
    "ModelSource",
    "ScoreStage",
    "aggregate",
    "load_evaluation_config",
    "load_pipeline",
    "log_evaluation",
    "main",
    "resolve_source",
    "run_evaluation",
]

SCORE_COLUMNS = ["clip_t", "clip_i", "dino", "face_id", "face_found", "located", "collapsed", "leaked",
                 "own", "other"]
RESULT_COLUMNS = ["case_id", "kind", "prompt", "subjects", "seed", "status", "reason", "detail", "image", "generate_s",
                  "score_s", *SCORE_COLUMNS]
EVAL_EXPERIMENT = "mmdiff-eval"  # for models given as a folder (no training run to attach results to)


class GenerationSettings(ConfigModel):
    steps: int = 25  # the official inference defaults (docs/MODEL.md)
    guidance_scale: float = 5.0
    height: int | None = None  # None: the base model's default size
    width: int | None = None
    # where the model under evaluation computes (mmdiff.placement); None: the model's recorded rule, auto
    # (the GPU in bf16 when there is one); an actor holding GPUs (generate.num_gpus) refuses the CPU
    device: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None


class MetricModels(ConfigModel):
    clip: ModelSpec  # family clip: CLIP-T and CLIP-I
    dino: ModelSpec  # family dino: DINO, and the region identity of multi-subject images
    face: ModelSpec | None = None  # family insightface: portrait identity (needed when the benchmark has portraits)
    locate: DetectConfig | None = None  # grounding_dino: subject regions (needed when the benchmark has pairs)


class EvaluationConfig(ConfigModel):
    benchmark: BenchmarkSpec
    generation: GenerationSettings = GenerationSettings()
    metrics: MetricModels
    generate: StageConfig = StageConfig(batch_size=4)
    score: StageConfig = StageConfig(batch_size=8)
    ray: RayConfig = RayConfig()
    output_dir: str
    tracking_uri: str | None = None  # None: --tracking-uri or MLFLOW_TRACKING_URI
    # where models:/ URIs are looked up and the version's eval.* tags go; None: --registry-uri, else the
    # tracking store's registry (train/registry.py)
    registry_uri: str | None = None
    progress: bool = True
    # the model's training manifest must record a decontamination check covering this benchmark's reference
    # photos (evaluation.decontamination); False: a loud warning instead of a refusal
    require_decontaminated: bool = False


def load_evaluation_config(path: str | Path, overrides: dict[str, Any] | None = None) -> EvaluationConfig:
    from mmdiff.configuration import ConfigError

    config = load_config(path, EvaluationConfig, overrides)
    if config.benchmark.pairs and config.metrics.locate is None:
        raise ConfigError(f"{path}: benchmark.pairs needs metrics.locate (a grounding_dino detector)")
    if config.benchmark.portraits and config.metrics.face is None:
        raise ConfigError(f"{path}: benchmark.portraits needs metrics.face (an insightface model)")
    if config.generate.num_gpus and (config.generation.device or "auto").startswith("cpu"):
        raise ConfigError(f"{path}: generate.num_gpus={config.generate.num_gpus:g} reserves GPUs but "
                          f"generation.device is {config.generation.device!r}: the actors would hold the GPUs and "
                          "compute on the CPU (set generation.device to auto or cuda, or generate.num_gpus to 0)")
    metric_specs = [m for m in (config.metrics.clip, config.metrics.dino, config.metrics.face,
                                config.metrics.locate.model if config.metrics.locate else None) if m is not None]
    if config.score.num_gpus and all(m.device.startswith("cpu") for m in metric_specs):
        raise ConfigError(f"{path}: score.num_gpus={config.score.num_gpus:g} reserves GPUs but every metric "
                          "model's device is cpu (set metrics.*.device to cuda, or score.num_gpus to 0)")
    return config


# -- the model under evaluation -------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    uri: str
    run_id: str | None  # the run that trained it: results are logged there
    name: str | None = None  # registered model name and version, for registry URIs
    version: str | None = None


def resolve_source(uri: str, tracking_uri: str | None, registry_uri: str | None = None) -> ModelSource:
    """Which run and registry version ``uri`` names (no download)."""
    if uri.startswith("models:/"):
        try:
            version = model_version(registry_client(tracking_uri, registry_uri), uri)
        except ValueError as exc:
            raise ValueError(f"--model-uri {exc}") from None
        return ModelSource(uri, version.run_id, version.name, str(version.version))
    if uri.startswith("runs:/"):
        return ModelSource(uri, uri.removeprefix("runs:/").split("/", 1)[0])
    if not Path(uri).is_dir():
        raise ValueError(f"--model-uri {uri}: not a models:/ or runs:/ URI nor an adapter folder")
    return ModelSource(uri, None)


def load_pipeline(uri: str, tracking_uri: str | None, device: str | None = None, dtype: str | None = None,
                  reserved_gpus: float = 0, registry_uri: str | None = None):
    """The MMDiffPipeline of a registered version, a run's adapter or an adapter folder.

    ``device`` / ``dtype`` override the model's recorded placement rule (a registered model's
    ``model_config``; ``auto`` otherwise), resolved by :func:`mmdiff.placement.resolve_placement`, which
    refuses the CPU when ``reserved_gpus`` > 0. The training spec's device and dtype are never used.
    """
    from mmdiff import MMDiffModel, MMDiffPipeline
    from mmdiff.integrity import read_json, verify_artifacts
    from mmdiff.placement import resolve_placement

    with tempfile.TemporaryDirectory() as tmp:
        base, recorded = None, {}
        if uri.startswith(("models:/", "runs:/")):
            local = download_model(registry_client(tracking_uri, registry_uri), uri, tmp)
        else:
            local = Path(uri)
        if (local / "MLmodel").is_file():  # a pyfunc model: its artifacts are the adapter and the base spec
            flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
            artifacts, recorded = flavor["artifacts"], flavor.get("model_config") or {}
            adapter = local / artifacts["adapter"]["path"]
            paths = {name: local / a["path"] for name, a in artifacts.items()}
            verify_artifacts({"base_model.json": paths["base_model"]}, paths.get("checksums"))
            base = ModelSpec.model_validate(read_json(paths["base_model"]))
        else:
            adapter = local
        if base is None:
            base = MMDiffModel.recorded_spec(adapter, "base")
            if base is None:
                raise ValueError(f"--model-uri {uri}: {adapter} records no base model")
        device, dtype = resolve_placement(device or recorded.get("device") or "auto",
                                          dtype or recorded.get("dtype") or "auto", reserved_gpus,
                                          "evaluation's generate stage")
        return MMDiffPipeline.from_pretrained(base.model_copy(update={"device": device, "dtype": dtype}), adapter)


# -- the two stages --------------------------------------------------------------------------------
def image_file(case_id: str) -> str:
    return case_id.replace("/", "__") + ".png"


def _set_threads(threads: int | None) -> None:
    """Intra-op threads to match the stage's CPU share: more threads than cores slow CPU inference down."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _threads(stage: StageConfig) -> int:
    return max(1, math.ceil(stage.num_cpus))


def _failed(row: dict, reason: str, exc: BaseException) -> dict:
    return {**row, "status": "failed", "reason": reason, "detail": f"{type(exc).__name__}: {exc}"[:500]}


class GenerateStage:
    """Actor: loads the model once; generates each case's image into ``image_dir``."""

    def __init__(self, model_uri: str, tracking_uri: str | None, generation: dict, image_dir: str,
                 face: dict | None = None, threads: int | None = None, reserved_gpus: float = 0,
                 registry_uri: str | None = None):
        _set_threads(threads)
        self.settings = GenerationSettings.model_validate(generation)
        self.pipe = load_pipeline(model_uri, tracking_uri, self.settings.device, self.settings.dtype, reserved_gpus,
                                  registry_uri)
        self.image_dir = Path(image_dir)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.face = None
        if self.pipe.model.config.portrait:  # portrait models take each subject's ArcFace embedding
            from evaluation.metrics import FaceScorer

            if face is None:
                raise ValueError("the model is a portrait model: metrics.face (insightface) is needed to condition it")
            self.face = FaceScorer(face)

    def _subjects(self, case: Case) -> list[Any]:
        from mmdiff import Subject
        from mmdiff.prompting import MARKER

        images = [Image.open(path).convert("RGB") for path in case.condition]
        if self.face is None:
            return images
        subjects = []
        for word, image, path in zip(MARKER.findall(case.prompt), images, case.condition):
            embedding = self.face.embed(image)
            if embedding is None:
                raise ValueError(f"no face found in the reference {path}")
            subjects.append(Subject(word, image, embedding))
        return subjects

    def _generate(self, cases: list[Case]) -> list[Image.Image]:
        """One batched call: a prompt, its subjects and its own seeded generator per case."""
        return self.pipe([c.prompt for c in cases], [self._subjects(c) for c in cases],
                         generator=[torch.Generator().manual_seed(c.seed) for c in cases],
                         num_inference_steps=self.settings.steps, guidance_scale=self.settings.guidance_scale,
                         height=self.settings.height, width=self.settings.width).images

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [{**row, "status": "ok", "reason": "", "detail": "", "generate_s": 0.0, "generated": ""}
                for row in batch.to_dict("records")]
        cases = [Case.from_row(row) for row in rows]
        groups: dict[int, list[int]] = {}  # cases with as many subjects run as one batch
        for i, case in enumerate(cases):
            if case.kind == "ceiling":
                rows[i]["generated"] = case.image
            else:
                groups.setdefault(len(case.subjects), []).append(i)
        for members in groups.values():
            start = time.perf_counter()
            try:
                images = self._generate([cases[i] for i in members])
            except Exception:  # noqa: BLE001 - retried one by one below, so the failing case gets its own reason
                images = None
            if images is not None:
                for i, image in zip(members, images):
                    self._save(rows[i], cases[i], image, (time.perf_counter() - start) / len(members))
                continue
            for i in members:
                start = time.perf_counter()
                try:
                    self._save(rows[i], cases[i], self._generate([cases[i]])[0], time.perf_counter() - start)
                except Exception as exc:  # noqa: BLE001 - one case never stops the job; the reason is recorded
                    rows[i] = _failed(rows[i], "generation_failed", exc)
        return pd.DataFrame(rows)

    def _save(self, row: dict, case: Case, image: Image.Image, seconds: float) -> None:
        path = self.image_dir / image_file(case.case_id)
        image.save(path)
        row.update(generated=str(path), generate_s=seconds)


class ScoreStage:
    """Actor: loads the metric models once; scores a batch of generated images (embeddings batched)."""

    def __init__(self, metrics: dict, threads: int | None = None):
        _set_threads(threads)
        from evaluation.metrics import (
            ClipScorer,
            DinoScorer,
            FaceScorer,
            SubjectLocator,
        )

        config = MetricModels.model_validate(metrics)
        self.clip = ClipScorer(config.clip)
        self.dino = DinoScorer(config.dino)
        self.face = FaceScorer(config.face) if config.face else None
        self.locator = SubjectLocator(config.locate) if config.locate else None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from evaluation.metrics import crop
        from mmdiff.prompting import MARKER, parse_markers

        start = time.perf_counter()
        rows = [{**row, **{c: math.nan for c in SCORE_COLUMNS}} for row in batch.to_dict("records")]
        cases = {i: Case.from_row(r) for i, r in enumerate(rows) if r["status"] == "ok"}
        images: dict[int, Image.Image] = {}
        refs: dict[str, Image.Image] = {}
        for i in list(cases):
            path = rows[i]["generated"]
            try:
                images[i] = Image.open(path).convert("RGB")
                for path in (p for group in cases[i].references for p in group if p not in refs):
                    refs[path] = Image.open(path).convert("RGB")
            except OSError as exc:  # the case is recorded as failed, naming the file; the batch goes on
                reason = "unreadable_image" if path == rows[i]["generated"] else "unreadable_reference"
                rows[i] = _failed(rows[i], reason, exc)
                del cases[i]
        regions: dict[int, list[tuple | None]] = {}
        multi = [i for i in cases if cases[i].kind == "multi"]
        if multi:
            words = [MARKER.findall(cases[i].prompt) for i in multi]
            regions = dict(zip(multi, self.locator.locate([images[i] for i in multi], words)))
        ref_paths = sorted({p for c in cases.values() for group in c.references for p in group})
        order = list(cases)
        crops = [(i, s, crop(images[i], box)) for i in multi for s, box in enumerate(regions[i]) if box is not None]
        clip_rows = self.clip.image_embeds([images[i] for i in order] + [refs[p] for p in ref_paths])
        dino_rows = self.dino.image_embeds([images[i] for i in order] + [refs[p] for p in ref_paths] + [c for *_, c in crops])
        n = len(order)
        clip_img = dict(zip(order, clip_rows[:n]))
        clip_ref = dict(zip(ref_paths, clip_rows[n:]))
        dino_img = dict(zip(order, dino_rows[:n]))
        dino_ref = dict(zip(ref_paths, dino_rows[n:n + len(ref_paths)]))
        dino_crop = {(i, s): e for (i, s, _), e in zip(crops, dino_rows[n + len(ref_paths):])}
        texts = [i for i in order if cases[i].kind != "ceiling"]
        text_rows = dict(zip(texts, self.clip.text_embeds([parse_markers(cases[i].prompt)[0] for i in texts])))
        for i in order:
            try:
                region_rows = [dino_crop.get((i, s)) for s in range(len(regions[i]))] if i in regions else None
                rows[i].update(self._score(cases[i], images[i], text_rows.get(i), clip_img[i], dino_img[i],
                                           clip_ref, dino_ref, region_rows))
            except Exception as exc:  # noqa: BLE001 - one case never stops the job; the reason is recorded
                rows[i] = _failed(rows[i], "scoring_failed", exc)
        share = (time.perf_counter() - start) / max(1, len(rows))
        return pd.DataFrame([{**{c: r.get(c) for c in RESULT_COLUMNS}, "image": r["generated"], "score_s": share}
                             for r in rows], columns=RESULT_COLUMNS)

    def _score(self, case: Case, image: Image.Image, text: np.ndarray | None, clip_img: np.ndarray,
               dino_img: np.ndarray, clip_ref: dict, dino_ref: dict, region_rows: list | None) -> dict:
        from evaluation.metrics import mean_cosine, region_scores

        scores: dict[str, Any] = {}
        if text is not None:
            scores["clip_t"] = float(clip_img @ text)
        if case.kind in ("single", "ceiling"):
            refs = case.references[0]
            scores["clip_i"] = mean_cosine(clip_img, np.stack([clip_ref[p] for p in refs]))
            scores["dino"] = mean_cosine(dino_img, np.stack([dino_ref[p] for p in refs]))
        elif case.kind == "portrait":
            reference = self.face.embed(Image.open(case.references[0][0]).convert("RGB"))
            if reference is None:
                raise ValueError(f"no face found in the portrait reference {case.references[0][0]}")
            found = self.face.embed(image)
            scores["face_found"] = float(found is not None)
            scores["face_id"] = float(found @ reference) if found is not None else 0.0  # no face: no identity
        elif case.kind == "multi":
            scores["located"] = float(all(r is not None for r in region_rows))
            if scores["located"]:
                regions = region_scores(np.stack(region_rows),
                                        [np.stack([dino_ref[p] for p in refs]) for refs in case.references])
                scores.update(collapsed=float(regions.collapsed), leaked=float(np.mean(regions.leaked)),
                              own=float(np.mean(regions.own)), other=float(np.mean(regions.other)))
        return scores


# -- the job -----------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    source: ModelSource
    benchmark: str
    benchmark_hash: str
    table: pd.DataFrame  # one row per case (RESULT_COLUMNS)
    summary: dict[str, float]  # the aggregate metrics (eval.<name> in MLflow)
    seconds: float
    output_dir: Path

    def line(self) -> str:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in self.summary.items() if k in HEADLINE)
        return (f"evaluate: {self.source.uri} on {self.benchmark}: {int(self.summary['images_scored'])} images scored, "
                f"{int(self.summary['failed'])} failed in {self.seconds:.1f} s; {shown}")


HEADLINE = ("clip_t", "clip_i", "dino", "multi.dino_own", "collapse_rate", "face_id", "ceiling.dino", "ceiling.clip_i")


def _mean(table: pd.DataFrame, kind: str, column: str) -> float | None:
    values = table.loc[(table["kind"] == kind) & (table["status"] == "ok"), column].dropna()
    return float(values.mean()) if len(values) else None


def aggregate(table: pd.DataFrame) -> dict[str, float]:
    """The benchmark's figures: DreamBench means over single-subject images, the multi-subject region
    scores and collapse rate over images whose subjects were all located, portrait identity, the ceiling."""
    named = {
        "clip_t": ("single", "clip_t"), "clip_i": ("single", "clip_i"), "dino": ("single", "dino"),
        "multi.clip_t": ("multi", "clip_t"), "multi.located_rate": ("multi", "located"),
        "multi.dino_own": ("multi", "own"), "multi.dino_other": ("multi", "other"),
        "multi.leak_rate": ("multi", "leaked"), "collapse_rate": ("multi", "collapsed"),
        "portrait.clip_t": ("portrait", "clip_t"), "face_id": ("portrait", "face_id"),
        "portrait.face_found_rate": ("portrait", "face_found"),
        "ceiling.clip_i": ("ceiling", "clip_i"), "ceiling.dino": ("ceiling", "dino"),
    }
    summary = {name: value for name, (kind, column) in named.items() if (value := _mean(table, kind, column)) is not None}
    ok = table["status"] == "ok"
    generated = table["kind"] != "ceiling"
    summary["images_scored"] = float((ok & generated).sum())
    summary["failed"] = float((~ok).sum())
    summary["generate_seconds"] = float(table["generate_s"].sum())
    summary["score_seconds"] = float(table["score_s"].sum())
    return summary


def _run_ray(config: EvaluationConfig, rows: list[dict], model_uri: str, tracking_uri: str | None, image_dir: Path,
             bar) -> list[dict]:
    import ray

    from pipeline.preprocess import _init_ray

    started = not ray.is_initialized()
    _init_ray(config)
    try:
        return _stream(config, rows, model_uri, tracking_uri, image_dir, bar)
    finally:
        if started:  # an embedded Ray started here ends with the job
            ray.shutdown()


def _stream(config: EvaluationConfig, rows: list[dict], model_uri: str, tracking_uri: str | None, image_dir: Path,
            bar) -> list[dict]:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar: ours, counting images
    gen, score = config.generate, config.score
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // gen.batch_size, 200)))
    ds = ds.map_batches(GenerateStage, fn_constructor_kwargs={
        "model_uri": model_uri, "tracking_uri": tracking_uri, "generation": config.generation.model_dump(),
        "image_dir": str(image_dir), "face": config.metrics.face.model_dump() if config.metrics.face else None,
        "threads": _threads(gen), "reserved_gpus": gen.num_gpus, "registry_uri": config.registry_uri,
    }, batch_format="pandas", batch_size=gen.batch_size, compute=ray.data.ActorPoolStrategy(size=gen.concurrency),
        num_cpus=gen.num_cpus, num_gpus=gen.num_gpus)
    ds = ds.map_batches(ScoreStage, fn_constructor_kwargs={"metrics": config.metrics.model_dump(mode="json"),
                                                              "threads": _threads(score)},
                        batch_format="pandas", batch_size=score.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=score.concurrency), num_cpus=score.num_cpus,
                        num_gpus=score.num_gpus)
    out = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        out += batch.to_dict("records")
        bar.update(len(batch))
    return out


def _run_loop(config: EvaluationConfig, rows: list[dict], model_uri: str, tracking_uri: str | None, image_dir: Path,
              bar) -> list[dict]:
    generate = GenerateStage(model_uri, tracking_uri, config.generation.model_dump(), str(image_dir),
                             config.metrics.face.model_dump() if config.metrics.face else None, _threads(config.generate),
                             config.generate.num_gpus, config.registry_uri)
    score = ScoreStage(config.metrics.model_dump(mode="json"), _threads(config.score))
    out = []
    for start in range(0, len(rows), config.score.batch_size):
        batch = score(generate(pd.DataFrame(rows[start:start + config.score.batch_size])))
        out += batch.to_dict("records")
        bar.update(len(batch))
    return out


def run_evaluation(config: EvaluationConfig, model_uri: str, tracking_uri: str | None = None,
                   runner: str = "ray") -> EvaluationResult:
    """Generate and score every case of ``config.benchmark`` with the model ``model_uri`` (``models:/`` URIs
    from ``config.registry_uri``, else the tracking store's registry)."""
    from tqdm import tqdm

    started = time.perf_counter()
    source = resolve_source(model_uri, tracking_uri, config.registry_uri)
    cases = list_cases(config.benchmark)
    if not cases:
        raise ValueError(f"benchmark {config.benchmark.name}: no cases")
    check_training_data(source.run_id, tracking_uri, benchmark_files(cases), config.require_decontaminated)
    out_dir = Path(config.output_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = [c.row() for c in cases]
    bar = tqdm(total=len(rows), desc="evaluate", unit="img", disable=not config.progress, file=sys.stderr)
    run = {"ray": _run_ray, "loop": _run_loop}[runner]
    results = run(config, rows, model_uri, tracking_uri, image_dir, bar)
    bar.close()
    expected = {c.case_id for c in cases}
    got = {r["case_id"] for r in results}
    if got != expected or len(results) != len(expected):
        raise RuntimeError(f"evaluation lost or repeated cases: missing {sorted(expected - got)[:5]}, "
                           f"{len(results)} rows for {len(expected)} cases")
    table = pd.DataFrame(results, columns=RESULT_COLUMNS).sort_values("case_id").reset_index(drop=True)
    result = EvaluationResult(source, config.benchmark.name, benchmark_hash(cases), table, aggregate(table),
                              time.perf_counter() - started, out_dir)
    _write_references(cases, out_dir / "references")
    table.to_json(out_dir / "table.json", orient="records", indent=1)
    (out_dir / "summary.json").write_text(json.dumps(_summary_document(result), indent=2), encoding="utf-8")
    return result


def _write_references(cases: list[Case], folder: Path, side: int = 256) -> None:
    """Each subject's conditioning photo as a thumbnail ``<subject>.png`` (reports show it beside the results)."""
    folder.mkdir(parents=True, exist_ok=True)
    for subject, path in {s: p for c in cases for s, p in zip(c.subjects, c.condition)}.items():
        with Image.open(path) as image:
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((side, side))
            thumbnail.save(folder / f"{subject}.png")


def _summary_document(result: EvaluationResult) -> dict:
    return {"model_uri": result.source.uri, "run_id": result.source.run_id, "benchmark": result.benchmark,
            "benchmark_hash": result.benchmark_hash, "metrics": result.summary, "seconds": result.seconds,
            "failed": result.table.loc[result.table["status"] != "ok", ["case_id", "reason", "detail"]].to_dict("records")}


def log_evaluation(result: EvaluationResult, tracking_uri: str | None, registry_uri: str | None = None) -> str:
    """Record the evaluation in MLflow (see the module docstring; a registered version's tags in
    ``registry_uri``, else the tracking store's registry); returns the run id it went to."""
    import mlflow

    client = registry_client(tracking_uri, registry_uri)
    run_id = result.source.run_id
    if run_id is None:
        experiment = client.get_experiment_by_name(EVAL_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(EVAL_EXPERIMENT)
        run_id = client.create_run(experiment_id, run_name=f"eval-{Path(result.source.uri).name}").info.run_id
        client.set_terminated(run_id)
    now = mlflow.utils.time.get_current_time_millis()
    metrics = [mlflow.entities.Metric(f"eval.{k}", float(v), now, 0) for k, v in result.summary.items()]
    tags = [mlflow.entities.RunTag(k, v) for k, v in {
        "eval.benchmark": result.benchmark, "eval.benchmark_hash": result.benchmark_hash,
        "eval.model_uri": result.source.uri}.items()]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    prefix = f"eval/{result.benchmark}"
    table = result.table.assign(image=result.table["image"].map(lambda p: Path(p).name if p else ""))
    client.log_table(run_id, table, f"{prefix}/table.json")
    client.log_dict(run_id, _summary_document(result), f"{prefix}/summary.json")
    client.log_artifacts(run_id, str(result.output_dir / "images"), f"{prefix}/images")
    client.log_artifacts(run_id, str(result.output_dir / "references"), f"{prefix}/references")
    if result.source.name:
        for key, value in (("eval.benchmark_hash", result.benchmark_hash), ("eval.run_id", run_id)):
            client.set_model_version_tag(result.source.name, result.source.version, key, value)
    return run_id


def run(args: argparse.Namespace) -> int:
    """``mmdiff-evaluate``'s parsed arguments (evaluation/cli.py) -> the evaluation, logged."""
    config = load_evaluation_config(args.config, parse_overrides(args.set))
    if args.registry_uri:
        config = config.model_copy(update={"registry_uri": args.registry_uri})
    tracking_uri = args.tracking_uri or config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    result = run_evaluation(config, args.model_uri, tracking_uri, args.runner)
    run_id = log_evaluation(result, tracking_uri, config.registry_uri)
    print(result.line(), flush=True)
    print(f"results: {result.output_dir}/table.json, summary.json, images/; MLflow run {run_id} "
          f"(artifacts eval/{result.benchmark}/)", flush=True)
    return 0


main = cli.evaluate  # the command itself (parsed in evaluation/cli.py)

"""Dedup at scale and the near-duplicate detector's precision and recall.

1. Precision and recall of the detector on the test corpus (``pipeline.duplicate_corpus``: scikit-image
   photos and their resized, re-encoded, centre-cropped, mirrored and colour-jittered copies): every pair
   of images, near-duplicate when the job's candidate step pairs them and its rule says so (distance <=
   ``dedup.hash_threshold``), against the truth (same original); recall per kind of copy.
2. The real job (``python -m pipeline.preprocess`` in a subprocess, the cheap operator of
   ``benchmarks.bench_pipeline_scale``) on generated small images, a share of them planted copies
   (resized, re-encoded, mirrored, brightened) of others: with dedup at ``--small`` and ``--large``
   inputs, and without dedup at ``--large``, in one run. The driver's peak RSS (VmHWM) and wall time of
   each; the goal is a flat driver (large / small <= 1.2); the job's ``duplicate_of`` rejects scored
   against the planted truth (precision and recall of the whole pass, band misses included).

    python -m benchmarks.bench_dedup [--small 10000] [--large 100000] [--copies 0.2] [--label X]

Writes benchmarks/results/bench_dedup.json (``--label X``: bench_dedup_X.json); each run's record has the
curation pass's own seconds (the job's ``curation:`` line) beside the job's wall time.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageEnhance

from benchmarks.bench_pipeline_scale import job_config, revision, run_measured
from benchmarks.report import write_result
from pipeline.curation_config import DedupConfig
from pipeline.dedup import candidate_pairs, hash_buckets, pair_distances, variant_hashes
from pipeline.duplicate_corpus import DISTINCT, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def corpus_precision_recall(dedup: DedupConfig) -> dict:
    """Pairwise decisions of the detector on the test corpus against its truth: a pair is near when the
    job's candidate step (``pipeline.dedup.hash_buckets``, ``candidate_pairs``) brings it together and its
    distance (``pipeline.dedup.pair_distances``) is within ``dedup.hash_threshold``, so band misses count."""
    with tempfile.TemporaryDirectory() as tmp:
        truth = write_corpus(tmp, DISTINCT)
        names = sorted(truth)
        table = np.stack([variant_hashes(Image.open(Path(tmp) / name).convert("RGB"), dedup.hash_crops) for name in names])
    left, right, _ = candidate_pairs(*hash_buckets(table, dedup.hash_band_bits))
    near_pairs = {(names[i], names[j]) for i, j, d in zip(left, right, pair_distances(table, left, right))
                  if d <= dedup.hash_threshold}
    origin = {name: original or name for name, original in truth.items()}
    found = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    by_kind: dict[str, list[int]] = {}
    for a, b in itertools.combinations(names, 2):
        near = (a, b) in near_pairs
        same = origin[a] == origin[b]
        found[("tp" if same else "fp") if near else ("fn" if same else "tn")] += 1
        copy = a if truth[a] == b else b if truth[b] == a else None  # a copy against its own original
        if copy:
            by_kind.setdefault(copy.rsplit("_", 1)[1].removesuffix(".jpg"), []).append(int(near))
    precision = found["tp"] / max(1, found["tp"] + found["fp"])
    recall = found["tp"] / max(1, found["tp"] + found["fn"])
    return {"images": len(truth), "candidate_pairs": len(left), "pairs": found, "precision": round(precision, 4), "recall": round(recall, 4),
            "recall_by_copy": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}}


def _copy(image: Image.Image, kind: int) -> Image.Image:
    if kind == 0:
        return image.resize((48, 48), Image.Resampling.BICUBIC)
    if kind == 1:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=40)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == 2:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageEnhance.Brightness(image).enhance(1.2)


def write_planted(folder: Path, count: int, share: float) -> dict[str, str]:
    """``count`` 64 px images, smooth random patterns (photo-like low frequencies), of which ``share`` are
    copies of earlier ones; returns copy's relative path -> original's. 1,000 per subfolder."""
    rng = np.random.default_rng(0)
    truth, originals = {}, []
    for index in range(count):
        sub = folder / f"{index // 1000:04d}"
        if index % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        name = f"{sub.name}/{index:07d}.png"
        if originals and rng.random() < share:
            source = originals[int(rng.integers(len(originals)))]
            image = _copy(Image.open(folder / source).convert("RGB"), int(rng.integers(4)))
            truth[name] = source
        else:
            pattern = rng.integers(0, 256, (8, 8, 3), np.uint8)
            image = Image.fromarray(pattern).resize((64, 64), Image.Resampling.BICUBIC)
            originals.append(name)
        image.save(folder / name)
    return truth


def run_job(images: Path, count: int, out: Path, dedup: bool, time_limit: float) -> tuple[dict, list[dict]]:
    config = job_config(images, out)
    config["report_samples"] = 0
    if dedup:
        config["dedup"] = {"enabled": True}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    run = run_measured([sys.executable, "-m", "pipeline.preprocess", "--config", str(path)],
                       {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}, time_limit)
    output = run.pop("output").splitlines()
    line = next((x for x in output if x.startswith("preprocess: ")), "")
    curation = next((x for x in output if x.startswith("curation: ")), None)
    rejects = [json.loads(line) for part in sorted((out / "rejects").glob("*.jsonl"))
               for line in part.read_text().splitlines()]
    shutil.rmtree(out)
    print(f"  {count} inputs, dedup {'on' if dedup else 'off'}: {run['wall_seconds']:.1f} s, driver peak RSS "
          f"{run['driver_peak_rss_mib']:.0f} MiB, Ray processes {run['ray_processes_peak_rss_mib']:.0f} MiB; {line}",
          flush=True)
    seconds = float(curation.rsplit(" in ", 1)[1].removesuffix(" s")) if curation else None
    return {**run, "job_line": line, "curation_pass_seconds": seconds}, rejects


def job_precision_recall(rejects: list[dict], truth: dict[str, str]) -> dict:
    """The job's ``duplicate_of`` rejects against the planted copies. A reject is right when the input is a
    copy or an original with copies (the rule may keep a mirrored or brightened copy, a larger file, in its
    place); each planted cluster should lose all but one of its images."""
    related = set(truth) | set(truth.values())
    rejected = {r["source"] for r in rejects if r["reason"] == "duplicate_of"}
    right = len(rejected & related)
    expected = len(truth)  # a cluster of an original and its k copies should lose k images
    return {"rejected_duplicate_of": len(rejected), "planted_to_remove": expected,
            "precision": round(right / max(1, len(rejected)), 4), "recall": round(min(right, expected) / max(1, expected), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--copies", type=float, default=0.2, help="share of inputs that are planted copies")
    parser.add_argument("--time-limit", type=float, default=3600.0)
    parser.add_argument("--label", default="", help="write bench_dedup_<label>.json (keeps another run's figures)")
    args = parser.parse_args()
    dedup = DedupConfig()
    corpus = corpus_precision_recall(dedup)
    print(f"bench_dedup: test corpus ({corpus['images']} images): precision {corpus['precision']:.3f}, recall "
          f"{corpus['recall']:.3f}; recall by copy {corpus['recall_by_copy']}", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for count in (args.small, args.large):
            images = Path(tmp) / f"images{count}"
            truth = write_planted(images, count, args.copies)
            runs[f"dedup_{count}"], rejects = run_job(images, count, Path(tmp) / f"out{count}", True, args.time_limit)
            runs[f"dedup_{count}"]["detector"] = job_precision_recall(rejects, truth)
            if count == args.large:
                runs[f"plain_{count}"], _ = run_job(images, count, Path(tmp) / f"plain{count}", False, args.time_limit)
            shutil.rmtree(images)
    small, large, plain = runs[f"dedup_{args.small}"], runs[f"dedup_{args.large}"], runs[f"plain_{args.large}"]
    ratio = large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"]
    result = {"corpus": corpus, "runs": runs, "driver_peak_rss_ratio_large_over_small": round(ratio, 3),
              "dedup_over_plain_wall": round(large["wall_seconds"] / plain["wall_seconds"], 3),
              "dedup_over_plain_driver_rss": round(large["driver_peak_rss_mib"] / plain["driver_peak_rss_mib"], 3),
              "goal": "driver_peak_rss_ratio_large_over_small <= 1.2", "revision": revision(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python -m benchmarks.bench_dedup " + " ".join(sys.argv[1:])}
    write_result(f"bench_dedup_{args.label}" if args.label else "bench_dedup", result)
    print(f"bench_dedup: {args.small} -> {args.large} inputs with dedup: driver peak RSS "
          f"{small['driver_peak_rss_mib']:.0f} -> {large['driver_peak_rss_mib']:.0f} MiB (ratio {ratio:.2f}); at "
          f"{args.large}: wall {large['wall_seconds']:.0f} s with dedup vs {plain['wall_seconds']:.0f} s without "
          f"({result['dedup_over_plain_wall']:.2f}x), driver {large['driver_peak_rss_mib']:.0f} vs "
          f"{plain['driver_peak_rss_mib']:.0f} MiB; planted duplicates: precision {large['detector']['precision']:.3f}, "
          f"recall {large['detector']['recall']:.3f}", flush=True)


if __name__ == "__main__":
    main()

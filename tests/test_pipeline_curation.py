"""The curation pass of the preprocessing job on an embedded Ray (pipeline.dedup): near-duplicates of real
photos rejected as ``duplicate_of`` their original, benchmark references and their copies as
``benchmark_overlap``, the same decisions at concurrency 1 and 2, all before any model stage."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import ImageFilter

from mmdiff.configuration import load_config, parse_overrides
from pipeline.config import PreprocessConfig
from pipeline.curation_config import DedupConfig
from pipeline.dedup import band_rows, candidate_pairs, hash_buckets, resolve_clusters, shard_pairs
from pipeline.duplicate_corpus import COPIES, write_corpus
from pipeline.example_inputs import photo
from pipeline.inputs import make_key
from pipeline.preprocess import content_hash, run_job
from pipeline.shards import ShardLayout
from tests.helpers import screenshot_hsv
from tests.test_pipeline_job import CONFIGS, output_files

WITH_COPIES = ("astronaut", "chelsea", "coffee", "camera", "brick", "hubble_deep_field")
BENCHMARK = {"dog": "horse", "clock": "immunohistochemistry"}  # subject -> the photo that is its reference


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("curation")
    truth = write_corpus(root / "photos", WITH_COPIES)
    for subject, name in BENCHMARK.items():
        (root / "bench" / subject).mkdir(parents=True)
        photo(name).save(root / "bench" / subject / "00.jpg", quality=95)
    shutil.copy(root / "bench" / "dog" / "00.jpg", root / "photos" / "dog_reference.jpg")  # the reference itself
    reference = photo(BENCHMARK["clock"])
    reference.resize((reference.width * 2 // 3, reference.height * 2 // 3)).save(root / "photos" / "clock_small.jpg")
    photo("rocket").filter(ImageFilter.GaussianBlur(4)).save(root / "photos" / "rocket_blurred.jpg")  # sharpness 2
    return root / "photos", root / "bench", truth


def curation_config(inputs: Path, bench: Path, out: Path, concurrency: int) -> PreprocessConfig:
    """The shipped tiny config with dedup (hash + tiny embedding model) and decontamination on, set as the
    command line sets them. The main pass after it runs the cheapest operator the job accepts (each image a
    sample without subjects): what is under test is the curation pass, not the models after it."""
    overrides = parse_overrides([
        "dedup.enabled=true", f"decontamination.benchmarks=[{bench}]",
        "dedup.embedding={family: clip_vision, source: tiny}",
        # the tiny embedding model is random: its cosines say nothing (distinct photos reach 0.998), so the
        # embedding path runs (actors, bands, pairs) with a threshold no pair of these photos reaches
        "dedup.embedding_threshold=0.9999", "decontamination.embedding_threshold=0.9999",
        "quality.min_sharpness=20"])  # the corpus's least sharp photo (moon) measures 67
    return load_config(CONFIGS / "test_tiny.yaml", PreprocessConfig, {
        **overrides, "input.kind": "folder", "input.path": str(inputs), "output.path": str(out), "output.shard_size": 8,
        "stages.annotate.operator": "benchmarks.bench_pipeline_scale:BareSampler", "stages.load.concurrency": concurrency, "stages.embed.concurrency": concurrency,
        "stages.embed.num_cpus": 0.25, "stages.annotate.num_cpus": 0.25, "qa_samples": 0, "progress": False,
        "report_samples": 100})


def rejects_by_source(out: Path) -> dict[str, dict]:
    return {r["source"]: r for r in ShardLayout(out).all_rejects()}


@pytest.fixture(scope="module")
def runs(ray_session, corpus, tmp_path_factory):  # noqa: F811 - a fixture
    inputs, bench, truth = corpus
    outs = {}
    for concurrency in (1, 2):
        outs[concurrency] = tmp_path_factory.mktemp(f"out{concurrency}")
        run_job(curation_config(inputs, bench, outs[concurrency], concurrency))
    return outs


@pytest.mark.slow
@pytest.mark.extended
def test_copies_are_duplicates_of_their_original_and_benchmark_overlap_is_rejected(corpus, runs):
    _, _, truth = corpus
    rejects = rejects_by_source(runs[1])
    for name, original in truth.items():
        if original is None:
            assert name not in rejects, rejects[name]  # no distinct photo is anyone's duplicate: all written
        else:
            row = rejects[name]
            assert row["reason"] == "duplicate_of", (name, row)
            assert f"duplicate of {make_key(original)} ({original};" in row["detail"], (name, row)
    # rejected as blurry before dedup sees it (it is also near rocket.jpg, which stays)
    assert rejects["rocket_blurred.jpg"]["reason"] == "blurry" and "rocket.jpg" not in rejects
    for name, subject in (("dog_reference.jpg", "dog"), ("clock_small.jpg", "clock")):
        assert rejects[name]["reason"] == "benchmark_overlap", rejects[name]
        assert f"bench/{subject}/00.jpg" in rejects[name]["detail"]
    manifest = json.loads((runs[1] / "manifest.json").read_text())
    assert manifest["rejected"]["duplicate_of"] == len(WITH_COPIES) * len(COPIES)
    assert manifest["rejected"]["benchmark_overlap"] == 2
    assert manifest["dedup"]["clusters"] == len(WITH_COPIES) and manifest["dedup"]["duplicates"] == len(WITH_COPIES) * len(COPIES)
    checked = manifest["decontamination"]
    assert [len(b["references"]) for b in checked["benchmarks"]] == [2] and checked["overlaps"] == 2
    assert {r["sha256"] for r in checked["benchmarks"][0]["references"]} == {
        hashlib.sha256((corpus[1] / s / "00.jpg").read_bytes()).hexdigest() for s in BENCHMARK}
    assert manifest["written"] == len(truth) - len(WITH_COPIES) * len(COPIES)  # the originals and the other photos
    assert manifest["written"] + sum(manifest["rejected"].values()) == manifest["inputs"] == len(truth) + 3


@pytest.mark.slow
@pytest.mark.extended
def test_curation_is_the_same_at_concurrency_1_and_2_and_its_settings_are_hashed(corpus, runs):
    def result(root: Path) -> dict[str, bytes]:  # shards, rejects and the pass's decisions
        return {**output_files(root), **{f"curation/{p.name}": p.read_bytes() for p in (root / "curation").glob("part-*")}}

    one, two = (result(runs[c]) for c in (1, 2))
    assert one == two and any(k.startswith("curation/") for k in one)
    inputs, bench, _ = corpus
    base = curation_config(inputs, bench, runs[1], 1)
    hashes = {content_hash(base)}
    for key, value in (("dedup.hash_threshold", 4), ("dedup.enabled", False), ("decontamination.hash_threshold", 3),
                       ("dedup.embedding_threshold", 0.9)):
        data = base.model_dump(mode="json")
        section, name = key.split(".")
        data[section][name] = value
        hashes.add(content_hash(PreprocessConfig.model_validate(data)))
    assert len(hashes) == 5


def test_clusters_keep_the_largest_then_the_smallest_key_whatever_the_edge_order():
    def edge(a, b, pa, pb):
        return {"a": a, "b": b, "a_pixels": pa, "b_pixels": pb, "a_bytes": 1, "b_bytes": 1, "a_partition": 0, "b_partition": 1,
                "a_source": a + ".jpg", "b_source": b + ".jpg", "kind": "hash", "score": 2.0}

    edges = [edge("k1", "k2", 100, 400), edge("k2", "k3", 400, 400), edge("k4", "k5", 9, 9)]
    for order in (edges, edges[::-1]):
        decisions, summary = resolve_clusters(pd.DataFrame(order[:1]), pd.DataFrame(order[1:]))
        assert dict(zip(decisions["key"], decisions["detail"].str.extract(r"duplicate of (\w+)")[0])) == {
            "k1": "k2", "k3": "k2", "k5": "k4"}
        assert summary["clusters"] == 2 and summary["duplicates"] == 3


def _curation_batch(variants: np.ndarray) -> pd.DataFrame:
    """The hash stage's output for images with these variant hashes ([N, V, 2]), one fixed group."""
    states = [{"key": f"k{i:06d}", "partition": i % 3, "source": f"{i}.jpg", "pixels": 64 * 64, "bytes": 100,
               "status": "ok", "reason": "", "detail": ""} for i in range(len(variants))]
    return pd.DataFrame([{"batch": 0, "inputs": json.dumps(states), "hashes": [v.tobytes() for v in variants],
                          "images": [b""] * len(states), "embeddings": [b""] * len(states)}])


def test_candidates_find_every_pair_within_the_guarantee_with_small_buckets_and_exact_copies_once():
    """Multi-index hashing (pipeline.dedup.hash_buckets): every planted copy whose compared hash is within
    7 bits (the guarantee of four 16-bit bands probed at radius 1), whichever variant and orientation it
    matches, is a candidate; unrelated images meet few others; 40 exact copies of one image are 39 edges at
    distance 0 and do not multiply the candidates; the edges do not depend on how buckets are sharded."""
    rng = np.random.default_rng(7)
    dedup = DedupConfig(enabled=True, hash_threshold=7)
    count, copies = 2000, 200
    variants = rng.integers(0, 2**63, (count, 1 + len(dedup.hash_crops), 2), dtype=np.uint64)
    originals = rng.choice(count, copies, replace=False)
    planted = variants[originals].copy()
    for copy, original in zip(planted, originals):
        target = variants[original].reshape(-1)[rng.integers(8)]  # any variant, either orientation
        bits = rng.choice(64, rng.integers(0, 8), replace=False)
        copy[0, 0] = target ^ np.bitwise_or.reduce(np.uint64(1) << bits.astype(np.uint64), initial=np.uint64(0))
    exact = np.repeat(variants[:1], 40, axis=0)
    table = np.concatenate([variants, planted, exact])
    codes, roles, owners = hash_buckets(table, dedup.hash_band_bits)
    a, b, _ = candidate_pairs(codes, roles, owners)
    found = set(zip(a.tolist(), b.tolist()))
    assert all((int(o), count + i) in found for i, o in enumerate(originals))
    index_codes = np.unique(codes[roles == 0], return_counts=True)[1]
    assert index_codes.max() <= 45 and len(a) / len(table) < 40  # random hashes: ~0.8 per code beside the copies

    edges = {}
    for shards in (1, 5):
        rows = band_rows(_curation_batch(table), dedup, shards)
        frames = [shard_pairs(group, dedup) for _, group in rows.groupby("shard")]
        edges[shards] = resolve_clusters(*frames)[0].sort_values("key").to_dict("records")
    assert edges[1] == edges[5]
    rejected = {r["key"]: r["detail"] for r in edges[1]}
    assert all(f"k{count + i:06d}" in rejected or f"k{o:06d}" in rejected for i, o in enumerate(originals))
    copies_of_first = [f"k{i:06d}" for i in range(count + copies, len(table))]
    assert all("duplicate of k000000" in rejected[k] and "hash distance 0" in rejected[k] for k in copies_of_first)
    frame = shard_pairs(band_rows(_curation_batch(table), dedup, 1), dedup)
    assert frame[frame["a"] == "k000000"]["b"].isin(copies_of_first).sum() == 40
    assert not frame["a"].isin(copies_of_first).any()  # the copies stand behind k000000: no pairs of their own
    assert (frame["score"] <= dedup.hash_threshold).all() and not frame.duplicated(["a", "b", "kind"]).any()


@pytest.mark.slow
@pytest.mark.extended
def test_report_renders_in_chromium_and_its_numbers_match_the_manifest(runs, tmp_path):
    """report.html of the curated run: every count the page shows (data-count cells) equals the manifest's,
    the histograms and duplicate thumbnails are inlined, and headless Chromium draws it (its thumbnails are
    photos: vivid pixels, where the page's own colours are greys and pale fills)."""
    import re

    manifest = json.loads((runs[1] / "manifest.json").read_text())
    page = (runs[1] / "report" / "report.html").read_text()  # written by the job
    shown = {k: int(v) for k, v in re.findall(r'data-count="([^"]+)">(\d+)<', page)}
    expected = {**{f"total:{k}": manifest[k] for k in ("seen", "inputs", "written")},
                "total:rejected": sum(manifest["rejected"].values()), "total:skipped": sum(manifest["skipped"].values()),
                **{f"rejected:{k}": v for k, v in manifest["rejected"].items()},
                **{f"skipped:{k}": v for k, v in manifest["skipped"].items()},
                "dedup:clusters": manifest["dedup"]["clusters"], "dedup:duplicates": manifest["dedup"]["duplicates"],
                "decontamination:overlaps": manifest["decontamination"]["overlaps"]}
    assert shown == expected
    assert page.count('<div class="cluster">') == len(WITH_COPIES)
    assert page.count("data:image/png;base64,") == 4 + len(WITH_COPIES) * (1 + len(COPIES))  # histograms + thumbnails
    assert sorted(p.name for p in (runs[1] / "report").glob("*.png")) == [
        "aspect_ratio.png", "caption_words.png", "entities.png", "mask_area.png"]
    hsv = screenshot_hsv(runs[1] / "report" / "report.html", tmp_path, 1000)
    dark_text = (hsv[:400, :, 2] < 80).sum()
    vivid = ((hsv[..., 1] > 100) & (hsv[..., 2] > 80)).sum()
    assert dark_text > 500 and vivid > 4 * 48 * 48, (dark_text, vivid)


@pytest.mark.extended
def test_evaluation_checks_the_training_manifest_against_the_benchmark(corpus, runs, tmp_path):
    from evaluation.decontamination import NotDecontaminated, check_manifest, check_training_data

    _, bench, _ = corpus
    references = sorted(str(p) for p in bench.glob("*/*.jpg"))
    manifest = json.loads((runs[1] / "manifest.json").read_text())
    assert check_manifest(manifest, references, "run").status == "checked"
    other = tmp_path / "other.jpg"
    photo("rocket").save(other)
    status = check_manifest(manifest, [*references, str(other)], "run")
    assert status.status == "not_checked" and "1 of 3 reference photos" in status.message
    assert check_manifest({**manifest, "decontamination": None}, references, "run").status == "not_checked"
    with pytest.raises(NotDecontaminated, match="evaluation refused"):
        check_training_data(None, None, references, required=True)  # a model folder: no training run to ask
    assert check_training_data(None, None, references, required=False).status == "unknown"

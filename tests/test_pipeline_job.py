"""The Ray Data preprocessing job on an embedded Ray (one session for the whole module).

End to end with tiny models on real photos, every kind of bad input, resume after an interruption,
determinism, and a model actor killed mid-job: every input ends in exactly one shard or rejects line.
"""

import io
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmdiff.configuration import load_config
from pipeline.config import PreprocessConfig
from pipeline.example_inputs import photo, write_annotation_folder, write_caption_shard
from pipeline.inputs import assign_partitions, list_inputs
from pipeline.preprocess import content_hash, run_job
from pipeline.shards import ShardLayout, read_samples
from preprocess.sample import Sample

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "preprocess"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def config(name: str, **overrides) -> PreprocessConfig:
    return load_config(CONFIGS / f"{name}.yaml", PreprocessConfig, overrides)


def output_files(root: Path) -> dict[str, bytes]:
    """Everything that defines a job's result: shards, indexes and rejects, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted([*root.glob("shards/*"), *root.glob("rejects/*")])}


# -- end to end with tiny models ------------------------------------------------------------------
def test_tiny_models_on_real_photos(ray_session, tmp_path):
    write_caption_shard(tmp_path / "in" / "shard-0.tar")
    cfg = config("test_tiny", **{"input.path": str(tmp_path / "in"), "output.path": str(tmp_path / "out")})
    summary = run_job(cfg)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary.inputs == manifest["inputs"] == 7
    assert summary.written + sum(summary.rejected.values()) == 7 and summary.written >= 3
    assert set(summary.rejected) <= {"too_many_entities", "no_entities", "ambiguous_words", "empty_mask"}
    assert manifest["config_hash"] == content_hash(cfg) and manifest["models"]["detect"]["family"] == "grounding_dino"
    # read back with plain webdataset: every member decodes, masks and crops line up with the boxes
    raw = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar")), shardshuffle=False))
    assert [r["__key__"] for r in raw] == sorted(r["__key__"] for r in raw) and len(raw) == summary.written
    for record in raw:
        sample = Sample.from_wds(record)  # validates shapes and caption spans
        meta = json.loads(record["json"])
        assert meta["config_hash"] == content_hash(cfg) and meta["source"].startswith("shard-0.tar:")
        assert meta["models"]["detect"].startswith("grounding_dino:transformers:tiny")
        assert 1 <= len(sample.entities) <= 2 and sample.crops.shape[1:] == (32, 32, 3)
        assert max(sample.image.size) <= 256
        for entity, mask in zip(sample.entities, sample.masks):
            assert sample.caption[entity.phrase_start : entity.phrase_end] == entity.phrase
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = entity.box
            assert len(xs) and xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1)
            assert ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
    index = json.loads((tmp_path / "out" / "shards" / "shard-000000.index.json").read_text())
    assert index["sha256"] and set(index["samples"]) <= {r["__key__"] for r in raw}
    sheet = Image.open(tmp_path / "out" / "contact_sheet.png")
    assert sheet.width == 4 * 256 and np.asarray(sheet).std() > 10


# -- bad inputs -----------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def annotate(path: Path, size: tuple[int, int], word: str = "cat") -> None:
    """FastComposer annotation for ``path``: one elliptical-ish (box) segment in the middle."""
    width, height = size
    segmap = np.zeros((height, width), np.int32)
    segmap[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    np.save(path.with_suffix(".npy"), segmap, allow_pickle=False)
    caption = f"a {word} on a table"
    path.with_suffix(".json").write_text(json.dumps({"caption": caption, "segments": [
        {"id": 1, "word": word, "start": 2, "end": 2 + len(word), "bbox": [width // 4, height // 4, 3 * width // 4, 3 * height // 4]}
    ]}))


GOOD_ODD = ("cmyk.jpg", "sixteen.png", "rgba.png", "grey.jpg", "rotated.jpg", "chat noir été 猫.jpg")
BAD = {"empty.jpg": "empty_file", "truncated.jpg": "truncated", "cut_header.jpg": "truncated",
       "text.jpg": "not_an_image", "bomb.png": "too_many_pixels", "tiny.png": "too_small",
       "strip.png": "bad_aspect_ratio", "gone.jpg": "missing_file"}


def write_odd_inputs(folder: Path) -> list[str]:
    """Every kind of awkward input, annotated where it is a usable image; returns the listing order."""
    from tests.test_image_io import png_header_only

    base = photo("chelsea").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF: rotate 90 degrees to display
    good = {
        "cmyk.jpg": (encode(base.convert("CMYK"), "JPEG"), (120, 80)),
        "sixteen.png": (encode(Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257), "PNG"), (120, 80)),
        "rgba.png": (encode(base.convert("RGBA"), "PNG"), (120, 80)),
        "grey.jpg": (encode(base.convert("L"), "JPEG"), (120, 80)),
        "rotated.jpg": (encode(base, "JPEG", exif=exif.tobytes()), (80, 120)),
        "chat noir été 猫.jpg": (encode(base, "JPEG"), (120, 80)),
    }
    bad = {
        "empty.jpg": b"", "truncated.jpg": encode(base, "JPEG")[:1200], "cut_header.jpg": encode(base, "JPEG")[:300],
        "text.jpg": b"not an image\n" * 20, "bomb.png": png_header_only(20000, 20000),
        "tiny.png": encode(Image.new("RGB", (1, 1)), "PNG"), "strip.png": encode(Image.new("RGB", (400, 40)), "PNG"),
    }
    for name, (data, size) in good.items():
        (folder / name).write_bytes(data)
        annotate(folder / name, size)
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return [*good, *bad, "cmyk.jpg", "gone.jpg"]  # cmyk listed twice: a duplicate key; gone.jpg never existed


def test_bad_inputs_are_each_written_or_rejected_once(uninterrupted):
    summary = json.loads((uninterrupted / "manifest.json").read_text())
    assert summary["inputs"] == INPUTS == summary["written"] + sum(summary["rejected"].values())
    layout = ShardLayout(uninterrupted)
    reasons = {r["source"]: r["reason"] for r in layout.all_rejects() if r["reason"] != "duplicate_key"}
    assert reasons == BAD
    assert [d["source"] for d in layout.all_rejects() if d["reason"] == "duplicate_key"] == ["cmyk.jpg"]
    samples = {s.meta["source"]: s for s in read_samples(uninterrupted)}
    assert set(GOOD_ODD) <= set(samples) and len(samples) == summary["written"] == 12 + len(GOOD_ODD)
    assert samples["rotated.jpg"].image.size == (80, 120)  # portrait after EXIF rotation
    for name in GOOD_ODD:
        sample = samples[name]
        assert sample.masks.shape[0] == 1 and sample.caption[sample.entities[0].start : sample.entities[0].end] == "cat"
        assert "." not in sample.key and sample.key.isascii()


# -- resume, determinism, fault -------------------------------------------------------------------
INPUTS = 12 + len(GOOD_ODD) + len(BAD) + 1


@pytest.fixture(scope="module")
def annotated_inputs(tmp_path_factory):
    """A file list: 12 annotated real photos (4 photos under 3 folders), odd and bad inputs, a duplicate."""
    folder = tmp_path_factory.mktemp("annotated")
    listing = []
    for copy in range(3):
        listing += [p.relative_to(folder).as_posix() for p in write_annotation_folder(folder / f"set{copy}")]
    listing += write_odd_inputs(folder)
    (folder / "inputs.txt").write_text("\n".join(listing), encoding="utf-8")
    return folder / "inputs.txt"


def import_config(inputs: Path, out: Path, **overrides) -> PreprocessConfig:
    return config("import_fastcomposer", **{"input.kind": "list", "input.path": str(inputs), "output.path": str(out),
                                            "output.shard_size": 4, "qa_samples": 0, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(ray_session, annotated_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = run_job(import_config(annotated_inputs, out))
    assert summary.inputs == INPUTS and summary.shards == 7
    return out


def test_rerun_of_a_finished_job_is_a_no_op(ray_session, annotated_inputs, uninterrupted):
    before = output_files(uninterrupted)
    again = run_job(import_config(annotated_inputs, uninterrupted))
    assert again.processed_now == 0 and again.written == 12 + len(GOOD_ODD)
    assert output_files(uninterrupted) == before


def test_resume_after_interruption_matches_uninterrupted_run(ray_session, annotated_inputs, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    layout = ShardLayout(out)
    # What a job killed mid-way leaves: a partition with only staged batches (no index yet), one whose
    # shard was being rewritten (bytes no longer match its index), and one never started.
    layout.index(1).unlink()
    layout.shard(1).unlink()
    (layout.staging_dir(1)).mkdir(parents=True)
    (layout.staging_dir(1) / "0123.tar").write_bytes(b"partial garbage")
    layout.shard(2).write_bytes(layout.shard(2).read_bytes()[:1000])
    for path in (layout.shard(5), layout.index(5), layout.rejects_file(5)):
        path.unlink()
    cfg = import_config(annotated_inputs, out)
    summary = run_job(cfg)
    redo = [r for r in assign_partitions(list_inputs(cfg.input), 4) if r.partition in (1, 2, 5) and not r.duplicate]
    assert summary.processed_now == len(redo) and summary.inputs == INPUTS
    assert output_files(out) == output_files(uninterrupted)
    assert not layout.staging.exists()


def test_a_different_job_cannot_reuse_an_output_folder(ray_session, annotated_inputs, uninterrupted):
    with pytest.raises(RuntimeError, match="different job"):
        run_job(import_config(annotated_inputs, uninterrupted, **{"output.shard_size": 5}))


def test_killed_model_actor_still_accounts_every_input_once(ray_session, annotated_inputs, uninterrupted, tmp_path):
    """Also checks determinism: other batch sizes than the uninterrupted run, same bytes."""
    import psutil

    cfg = import_config(annotated_inputs, tmp_path, **{"stages.annotate.batch_size": 1, "stages.load.batch_size": 1})
    killed: list[int] = []

    def kill_once_work_has_started() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if list((tmp_path / "staging").glob("*/*.tar")):
                # Only this test's Ray: its workers descend from this process (embedded Ray).
                for process in psutil.Process().children(recursive=True):
                    try:
                        if "SampleStage" in " ".join(process.cmdline()):
                            process.send_signal(signal.SIGKILL)
                            killed.append(process.pid)
                            break
                    except psutil.Error:
                        continue
            time.sleep(0.02)

    killer = threading.Thread(target=kill_once_work_has_started)
    killer.start()
    summary = run_job(cfg)
    killer.join()
    assert killed, "the job finished before an actor could be killed"
    assert summary.inputs == INPUTS and summary.written == 12 + len(GOOD_ODD)
    assert output_files(tmp_path) == output_files(uninterrupted)

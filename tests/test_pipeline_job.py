"""The Ray Data preprocessing job on an embedded Ray (one session for the whole module).

End to end with tiny models on real photos, every kind of bad input, resume after an interruption,
determinism, and a model actor killed mid-job: every input ends in exactly one shard or rejects line.
"""

import gc
import io
import json
import os
import shutil
import subprocess
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
from tests.faults import fill_leaving, run_killing_a_worker, small_filesystem

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "preprocess"

pytestmark = pytest.mark.slow


def config(name: str, **overrides) -> PreprocessConfig:
    return load_config(CONFIGS / f"{name}.yaml", PreprocessConfig, overrides)


def output_files(root: Path) -> dict[str, bytes]:
    """Everything that defines a job's result: shards, indexes and rejects, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted([*root.glob("shards/*"), *root.glob("rejects/*")])}


# -- end to end with tiny models ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny")
    write_caption_shard(tmp_path / "in" / "shard-0.tar")
    cfg = config("test_tiny", **{"input.path": str(tmp_path / "in"), "output.path": str(tmp_path / "out")})
    return tmp_path, cfg, run_job(cfg)


def test_tiny_models_on_real_photos(tiny_run):
    tmp_path, cfg, summary = tiny_run
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


def test_model_shards_do_not_depend_on_concurrency_and_batch_size_is_part_of_the_job(tiny_run, tmp_path):
    """README: with models, bytes are fixed by the inputs and the content settings, annotate batch size
    included (models see fixed batches), whatever the concurrency; a resume with another batch size is refused."""
    first, cfg, _ = tiny_run
    again = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": str(tmp_path / "out")}),
                                   "stages": cfg.stages.model_copy(update={
                                       "annotate": cfg.stages.annotate.model_copy(update={"concurrency": 2}),
                                       "load": cfg.stages.load.model_copy(update={"concurrency": 2, "batch_size": 1})})})
    run_job(again)
    assert output_files(tmp_path / "out") == output_files(first / "out")
    other_batch = config("test_tiny", **{"input.path": str(first / "in"), "output.path": str(first / "out"),
                                          "stages.annotate.batch_size": 2})
    with pytest.raises(RuntimeError, match="different job"):
        run_job(other_batch)


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
    return [*good, *bad, "./cmyk.jpg", "gone.jpg"]  # cmyk listed twice (one input, one skip); gone.jpg never existed


def test_bad_inputs_are_each_written_or_rejected_once(uninterrupted):
    summary = json.loads((uninterrupted / "manifest.json").read_text())
    assert summary["inputs"] == INPUTS == summary["written"] + sum(summary["rejected"].values())
    assert summary["seen"] == INPUTS + 1 and summary["skipped"] == {"duplicate": 1}
    layout = ShardLayout(uninterrupted)
    reasons = {r["source"]: r["reason"] for r in layout.all_rejects()}
    assert reasons == BAD
    skipped = [json.loads(line) for line in layout.skipped.read_text().splitlines()]
    assert [(s["source"].split(":", 2)[2], s["reason"]) for s in skipped] == [("./cmyk.jpg", "duplicate")]
    samples = {s.meta["source"]: s for s in read_samples(uninterrupted)}
    assert set(GOOD_ODD) <= set(samples) and len(samples) == summary["written"] == 12 + len(GOOD_ODD)
    assert samples["rotated.jpg"].image.size == (80, 120)  # portrait after EXIF rotation
    for name in GOOD_ODD:
        sample = samples[name]
        assert sample.masks.shape[0] == 1 and sample.caption[sample.entities[0].start : sample.entities[0].end] == "cat"
        assert "." not in sample.key and sample.key.isascii()


# -- resume, determinism, fault -------------------------------------------------------------------
INPUTS = 12 + len(GOOD_ODD) + len(BAD)


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


def leave_as_interrupted(layout: ShardLayout, staged: int, rewritten: int, not_started: int) -> None:
    """What a job killed mid-way leaves in a finished output (a local folder or an object store): a
    partition with only staged batches (no index yet), one whose shard was being rewritten (bytes no longer
    match its index), and one never started."""
    layout.index(staged).remove()
    layout.shard(staged).remove()
    (layout.staging_dir(staged) / "0123.tar").write_atomic(b"partial garbage")
    layout.shard(rewritten).write_atomic(layout.shard(rewritten).read_bytes()[:1000])
    for path in (layout.shard(not_started), layout.index(not_started), layout.rejects_file(not_started)):
        path.remove()


def test_resume_after_interruption_matches_uninterrupted_run(ray_session, annotated_inputs, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    layout = ShardLayout(out)
    leave_as_interrupted(layout, staged=1, rewritten=2, not_started=5)
    cfg = import_config(annotated_inputs, out)
    summary = run_job(cfg)
    assert summary.processed_now == processed_inputs(cfg, {1, 2, 5}) and summary.inputs == INPUTS
    assert output_files(out) == output_files(uninterrupted)
    assert not layout.staging.exists()


def processed_inputs(cfg: PreprocessConfig, partitions: set[int]) -> int:
    """Inputs of ``partitions`` that the stages process (the listing rejects the others itself)."""
    return len([r for r in assign_partitions(list_inputs(cfg.input).inputs, cfg.output.shard_size)
                if r.partition in partitions and not r.reason])


def test_resume_trusts_recorded_sizes_and_checks_sha256_on_request(ray_session, annotated_inputs, uninterrupted,
                                                                   tmp_path):
    """output.verify=size (default) trusts a shard whose size matches its index (nothing is read), so a
    same-size corruption stays; verify=sha256 reads every shard and redoes it. A truncated shard or rejects
    file is redone under both."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    layout = ShardLayout(out)
    flipped = bytearray(layout.shard(3).read_bytes())
    flipped[700] ^= 0xFF  # inside the first member's data: same size, other bytes
    layout.shard(3).write_atomic(bytes(flipped))
    layout.shard(4).write_atomic(layout.shard(4).read_bytes()[:-512])
    layout.rejects_file(6).write_atomic(b"")
    cfg = import_config(annotated_inputs, out)
    summary = run_job(cfg)
    assert summary.processed_now == processed_inputs(cfg, {4, 6}) > 0
    assert layout.shard(3).read_bytes() == bytes(flipped)
    summary = run_job(import_config(annotated_inputs, out, **{"output.verify": "sha256"}))
    assert summary.processed_now == processed_inputs(cfg, {3}) > 0
    assert output_files(out) == output_files(uninterrupted)


def test_a_different_job_cannot_reuse_an_output_folder(ray_session, annotated_inputs, uninterrupted):
    with pytest.raises(RuntimeError, match="different job"):
        run_job(import_config(annotated_inputs, uninterrupted, **{"output.shard_size": 5}))


def assert_ray_released(ray, timeout_s: float = 60.0) -> None:
    """Every CPU of the session is free again once run_job has returned: its actors ended, its tasks done
    (actors die and hand their CPUs back asynchronously, hence the bounded wait)."""
    deadline = time.monotonic() + timeout_s
    total = ray.cluster_resources()["CPU"]
    while (free := ray.available_resources().get("CPU", 0.0)) < total:
        assert time.monotonic() < deadline, f"{free:g} of {total:g} CPUs free {timeout_s:g} s after the job"
        time.sleep(0.2)


def test_killed_model_actor_still_accounts_every_input_once(ray_session, annotated_inputs, uninterrupted, tmp_path):
    """Also checks determinism: other batch sizes and concurrency than the uninterrupted run, same bytes; and
    that the job ends every actor it started, the restarted one too."""
    cfg = import_config(annotated_inputs, tmp_path, **{"stages.annotate.batch_size": 1, "stages.load.batch_size": 1,
                                                       "stages.annotate.concurrency": 2, "stages.load.concurrency": 2})
    summary, killed = run_killing_a_worker(lambda: run_job(cfg), tmp_path, "SampleStage", 120)
    assert killed, "the job finished before an actor could be killed"
    assert_ray_released(ray_session)
    assert summary.inputs == INPUTS and summary.written == 12 + len(GOOD_ODD)
    assert output_files(tmp_path) == output_files(uninterrupted)


@pytest.mark.extended
def test_a_failed_job_ends_its_actors_and_finalize_tasks_before_it_returns(ray_session, annotated_inputs, tmp_path,
                                                                            monkeypatch):
    """A job that fails with actors running and finalize tasks in flight (one finalize fails, the others are
    slow): when run_job raises, every CPU of the session is free again (cyclic GC off: run_job's doing) and
    no cut-short task writes into the output afterwards (its lease is released by then); a rerun finishes."""
    from tests import faults

    monkeypatch.setattr("pipeline.preprocess._finalize_task", faults.failing_finalize)
    cfg = import_config(annotated_inputs, tmp_path, **{"output.shard_size": 2, "output.finalize_in_flight": 4})
    gc.disable()
    try:
        with pytest.raises(Exception, match="injected finalize failure"):
            run_job(cfg)
        assert_ray_released(ray_session, timeout_s=faults.SLOW_FINALIZE_S / 2)
    finally:
        gc.enable()
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    time.sleep(faults.SLOW_FINALIZE_S + 5)  # what a slow finalize left running would have written by now
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == written
    monkeypatch.undo()
    assert run_job(cfg).inputs == INPUTS


# -- a full or read-only output disk -------------------------------------------------------------
@pytest.mark.extended
def test_full_or_read_only_output_fails_the_job_and_a_rerun_matches_a_clean_run(
        ray_session, annotated_inputs, uninterrupted, tmp_path, capsys):
    """ENOSPC mid-job and a read-only output: the job stops non-zero naming the file, no input is rejected
    for it, no temporary file is left; once there is room, a rerun gives the clean run's shards."""
    from pipeline.preprocess import main

    with small_filesystem(tmp_path / "disk", "8m") as disk:
        out = disk / "out"
        args = ["--config", str(CONFIGS / "import_fastcomposer.yaml"), "--set", "progress=false", "qa_samples=0",
                "input.kind=list", f"input.path={annotated_inputs}", f"output.path={out}", "output.shard_size=4"]
        ballast = fill_leaving(disk, FREE_FOR_THE_LISTING)
        assert main(args) == 3
        error = capsys.readouterr().err
        assert "No space left on device" in error and f"{out}/staging/" in error
        layout = ShardLayout(out)
        assert not layout.manifest.exists() and not list(out.rglob(".*.tmp-*"))
        assert all(r["reason"] in BAD.values() for r in layout.all_rejects())  # none for the full disk
        clean = output_files(uninterrupted)
        finished = {name: data for name, data in output_files(out).items()
                    if (out / "shards" / f"shard-{name.rsplit('-', 1)[1][:6]}.index.json").exists()}
        assert all(clean[name] == data for name, data in finished.items())

        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert main(args) == 3
        error = capsys.readouterr().err
        assert "Read-only file system" in error and str(out / "lock.json") in error

        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        ballast.unlink()
        assert main(args) == 0
        assert output_files(out) == clean and not list(out.rglob(".*.tmp-*"))


# room for the lease, plan and listing of the annotated inputs (tmpfs counts whole 4 KiB pages), not for
# their samples
FREE_FOR_THE_LISTING = 96 * 1024


# -- dirty data: a corpus of awkward inputs, injected failures, the output lock ---------------------
def build_corpus(root: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Every kind of awkward input in one annotated folder. Returns the expected reject reason per source
    (``ok`` = written), the expected skip reason per source, and the list-file lines for the list job."""
    from tests.annotation_layouts import write_fastcomposer, write_mmdiff
    from tests.test_pipeline_inputs import malform, png_header

    root.mkdir(parents=True)
    expected: dict[str, str] = {}
    for path in write_mmdiff(root / "mmdiff") + write_fastcomposer(root / "fastcomposer", first=100):
        expected[path.relative_to(root).as_posix()] = "ok"
    skipped = {"fastcomposer/image_ids.txt": "unsupported_extension"}
    for path in [*root.rglob("*.json"), *root.rglob("*.npy")]:
        skipped[path.relative_to(root).as_posix()] = "annotation_file"
    odd = {name: "ok" for name in write_odd_inputs(root)[:-2]}  # good odd images and bad images (no 'gone')
    odd.update(BAD)
    odd.pop("gone.jpg")
    expected.update(odd)
    for name in GOOD_ODD:
        for suffix in (".json", ".npy"):
            skipped[name.rsplit(".", 1)[0] + suffix] = "annotation_file"
    latin1 = os.fsdecode(b"caf\xe9")  # a file name that is not UTF-8 (Latin-1 bytes), as old archives have
    for suffix in (".jpg", ".json", ".npy"):
        shutil.copy(root / f"grey{suffix}", root / f"{latin1}{suffix}")
    expected[f"{latin1}.jpg"] = "ok"
    skipped.update({f"{latin1}.json": "annotation_file", f"{latin1}.npy": "annotation_file"})
    (root / "deep16.png").write_bytes(png_header(8000, 8000, 16, 2))
    expected["deep16.png"] = "over_decode_budget"
    malformed = {"caption_null": "bad_annotation", "box_none": "bad_annotation", "box_inverted": "bad_annotation",
                 "box_row_first": "mask_outside_box", "map_pickled": "bad_annotation", "map_missing": "missing_annotation",
                 "id_absent_from_map": "empty_mask"}
    for n, (case, reason) in enumerate(malformed.items()):
        path = write_mmdiff(root / "malformed" / case, first=200 + 10 * n)[1]  # the square astronaut
        for other in path.parent.glob("*"):
            if other.stem != path.stem:
                for sibling in other.parent.glob(f"{other.stem}.*"):
                    sibling.unlink()
        malform(path, case, root)
        expected[path.relative_to(root).as_posix()] = reason
        for sidecar in (".json", ".npy"):
            if path.with_suffix(sidecar).exists():
                skipped[path.with_suffix(sidecar).relative_to(root).as_posix()] = "annotation_file"
    for fault, reason in (("raise", "import_error"), ("exit", "worker_crash"), ("segv", "worker_crash")):
        source = write_mmdiff(root / "faults", first=300)[0]
        for sidecar in (".jpg", ".json", ".npy"):
            source.with_suffix(sidecar).rename(root / "faults" / f"{fault}{sidecar}")
        expected[f"faults/{fault}.jpg"] = reason
        skipped.update({f"faults/{fault}.json": "annotation_file", f"faults/{fault}.npy": "annotation_file"})
    for leftover in (root / "faults").rglob("*"):
        if leftover.is_file() and leftover.parent != root / "faults":
            leftover.unlink()
    (root / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 20)
    (root / "folder.jpg").mkdir()
    os.symlink(root / "nowhere.jpg", root / "dangling.jpg")
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    os.symlink(root, root / "mmdiff" / "up")
    os.symlink(root / "cmyk.jpg", root / "alias.jpg")
    os.symlink(root / "cmyk.json", root / "alias.json")
    os.mkfifo(root / "fifo.jpg")
    skipped.update({"anim.gif": "unsupported_extension", "folder.jpg": "not_a_file", "dangling.jpg": "dangling_symlink",
                    "loop_a.jpg": "symlink_loop", "loop_b.jpg": "symlink_loop", "mmdiff/up": "symlink_loop",
                    "alias.jpg": "duplicate", "alias.json": "duplicate", "fifo.jpg": "not_a_file"})
    lines = [s for s, reason in expected.items() if reason != "worker_crash"]
    lines += ["./cmyk.jpg", str(root / "rgba.png"), "", "# a comment", "never_written.jpg", "folder.jpg", "anim.gif"]
    return expected, skipped, lines


def outcome_by_source(root: Path) -> dict[str, str]:
    written = {s.meta["source"]: "ok" for s in read_samples(root)}
    rejected = {r["source"]: r["reason"] for r in ShardLayout(root).all_rejects()}
    assert not set(written) & set(rejected)
    return {**written, **rejected}


def test_dirty_corpus_as_folder_and_list_jobs_with_injected_failures(ray_session, tmp_path):
    """Over 25 kinds of awkward input, an operator that raises on one input and kills its own worker on two
    others, a second job refused while the first holds the folder, and a dead driver's lease taken over.
    The job whose workers died leaves none of its actors holding CPUs: Python's cyclic GC is off while it
    runs, so it is run_job that ends them, not a collection that happens to run (they would otherwise wait
    for one, starving the session's next job)."""
    import socket

    from pipeline.lock import OutputLocked
    from pipeline.preprocess import main

    expected, skipped, lines = build_corpus(tmp_path / "corpus")
    args = ["--config", str(CONFIGS / "import_fastcomposer.yaml"), "--set", "progress=false", "qa_samples=4",
            "output.shard_size=8", "stages.annotate.batch_size=3", "stages.annotate.crash_retries=0",
            "stages.load.crash_retries=1", "stages.annotate.operator=tests.faults:FaultyImporter"]
    folder_out = tmp_path / "folder_out"
    codes: list[int] = []
    job = threading.Thread(target=lambda: codes.append(main(
        [*args, f"input.path={tmp_path / 'corpus'}", f"output.path={folder_out}"])))
    started = time.monotonic()
    gc.disable()
    try:
        job.start()
        deadline = time.monotonic() + 60
        while not (folder_out / "lock.json").exists() and time.monotonic() < deadline and job.is_alive():
            time.sleep(0.05)
        with pytest.raises(OutputLocked, match="in use by job"):
            run_job(import_config(tmp_path / "corpus", folder_out, **{"input.kind": "folder"}))
        job.join(timeout=900)
        assert not job.is_alive() and codes == [0], "the folder job did not finish in 900 s"
        folder_seconds = time.monotonic() - started
        assert_ray_released(ray_session)
    finally:
        gc.enable()
    manifest = json.loads((folder_out / "manifest.json").read_text())
    assert outcome_by_source(folder_out) == expected
    got_skips = {r["source"]: r["reason"] for r in map(json.loads, (folder_out / "skipped.jsonl").read_text().splitlines())}
    assert got_skips == skipped
    assert manifest["seen"] == len(expected) + len(skipped) == manifest["written"] + sum(manifest["rejected"].values()) + sum(manifest["skipped"].values())
    assert len(set(expected.values()) | set(skipped.values())) >= 20 and len(expected) + len(skipped) >= 60
    details = {r["source"]: r["detail"] for r in ShardLayout(folder_out).all_rejects()}
    assert "faults/raise.jpg" in details["faults/raise.jpg"] and "RuntimeError: injected failure" in details["faults/raise.jpg"]
    assert "stage annotate" in details["faults/raise.jpg"] and "faults/exit.jpg" in details["faults/exit.jpg"]
    assert (folder_out / "contact_sheet.png").is_file() and not (folder_out / "lock.json").exists()
    print(f"folder job: {folder_seconds:.0f} s")

    # the same files as a list (crashers left out), into a folder whose driver died holding the lease
    (tmp_path / "corpus" / "inputs.txt").write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    list_out = tmp_path / "list_out"
    list_out.mkdir()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (list_out / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "job_id": "killed",
                                                    "started": 0, "heartbeat": time.time()}))
    assert main([*args, "input.kind=list", f"input.path={tmp_path / 'corpus' / 'inputs.txt'}",
                 f"output.path={list_out}"]) == 0
    listed = {s: r for s, r in expected.items() if r != "worker_crash"}
    listed["never_written.jpg"] = "missing_file"
    assert outcome_by_source(list_out) == listed
    manifest = json.loads((list_out / "manifest.json").read_text())
    assert manifest["skipped"] == {"duplicate": 2, "not_a_file": 1, "unsupported_extension": 1}
    assert manifest["seen"] == len(listed) + 4 and not (list_out / "lock.json").exists()
    assert not (tmp_path / "corpus" / "UNPICKLED").exists()  # the pickled map was never unpickled

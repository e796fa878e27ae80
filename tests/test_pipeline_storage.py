"""pipeline.storage and the output lease on a local folder and on a real S3 server (moto, on loopback)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.lock import OutputLock, OutputLocked
from pipeline.storage import Location, UnsupportedStorage
from tests.object_store import conditions_ignored, object_store_fixture  # noqa: F401 - registers the fixture

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here talks to a server process (moto), some to Ray


@pytest.fixture(params=["local", "object_store"])
def root(request, tmp_path) -> Location:
    """A fresh folder (named with glob characters: they are names here): a local path, or a prefix in the
    test server's bucket."""
    if request.param == "local":
        return Location(tmp_path / "root [1]")
    store = request.getfixturevalue("object_store")
    return Location(store.url(f"{request.node.name}-{time.monotonic_ns()}"), store.options)


def test_files_write_whole_read_by_range_list_and_remove_local_and_object_store(root):
    data = bytes(range(256)) * 40
    (root / "shards" / "a.tar").write_atomic(data)
    (root / "shards" / "b.tar").write_atomic(b"b")
    (root / "shards" / "a.index.json").write_atomic(b"{}")
    (root / "staging" / "p000001" / "x.tar").write_atomic(b"x")
    (root / "shards" / "a.tar").write_atomic(data[::-1])  # replaced whole
    a = root / "shards" / "a.tar"
    assert a.read_bytes() == data[::-1] and a.size() == len(data) and a.is_file() and not root.is_file()
    assert a.read_bytes(1000, 1010) == data[::-1][1000:1010]  # a tar member: one ranged read
    with a.open() as handle:
        handle.seek(5000)
        assert handle.read(3) == data[::-1][5000:5003]
    assert [p.name for p in (root / "shards").glob("*.tar")] == ["a.tar", "b.tar"]
    assert [p.name for p in root.glob("**/*.tar")] == ["a.tar", "b.tar", "x.tar"]
    assert (root / "shards").glob("*.tar")[0].read_bytes() == data[::-1]  # listed locations are readable
    assert (root / "staging").exists() and (root / "staging").is_dir()
    (root / "staging").remove()
    (root / "staging").remove()  # nothing there: fine
    (root / "shards" / "b.tar").remove()
    assert not (root / "staging").exists() and [p.name for p in root.glob("**/*")] == ["a.index.json", "a.tar"]
    assert not (root / "missing.json").exists() and (root / "missing.json").read_tagged() is None
    with pytest.raises(FileNotFoundError):
        (root / "missing.json").read_bytes()


def test_streamed_files_are_published_whole_and_folders_list_in_name_order_local_and_object_store(root):
    target = root / "skipped.jsonl"
    staging = target.staging_file()
    with staging.open("wb") as lines:  # written a line at a time, where no reader looks
        for number in range(1000):
            lines.write(b'{"line": %d}\n' % number)
    assert not target.exists()
    target.publish(staging)
    assert not staging.exists() and target.read_text().splitlines()[-1] == '{"line": 999}'
    (root / "photos" / "b.jpg").write_atomic(b"b")
    (root / "a.jpg").write_atomic(b"a")
    assert [(child.name, folder) for child, folder in root.entries()] == [
        ("a.jpg", False), ("photos", True), ("skipped.jsonl", False)]
    assert [child.read_bytes() for child, _ in (root / "photos").entries()] == [b"b"]


def test_a_location_travels_to_another_process_and_rebuilds_its_filesystem_object_store(object_store):
    location = Location(object_store.url("travel/x.bin"), object_store.options)
    location.write_atomic(b"written here")
    assert "secret" not in repr(location)
    assert pickle.loads(pickle.dumps(location)) == location  # noqa: S301 - our own object, as Ray ships it
    code = ("import pickle, sys; location = pickle.loads(sys.stdin.buffer.read()); "
            "sys.stdout.write(location.read_bytes().decode()); (location.parent / 'y.bin').write_atomic(b'there')")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(location), capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout == b"written here" and (location.parent / "y.bin").read_bytes() == b"there"


def test_local_paths_and_file_urls_are_the_same_files(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    for location in (Location(tmp_path), Location(str(tmp_path)), Location(f"file://{tmp_path}")):
        assert location.is_local and (location / "a.json").read_text() == "{}"
        (location / "b.json").write_atomic(b"[]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporary left behind


def test_outputs_refuse_protocols_that_cannot_publish_whole_files_or_hold_a_lease(tmp_path):
    for url in ("memory://out/x.json", "ftp://host/out/x.json"):
        with pytest.raises(UnsupportedStorage, match=r"outputs need a local path or s3://"):
            Location(url).write_atomic(b"{}")
        with pytest.raises(UnsupportedStorage):
            OutputLock(Location(url)).acquire()


def test_an_object_store_that_ignores_conditional_writes_is_refused_as_an_output(object_store):
    with conditions_ignored(object_store.endpoint) as endpoint:
        location = Location(object_store.url("careless/lock.json"), {**object_store.options, "endpoint_url": endpoint})
        (location.parent / "probe-first.json").write_atomic(b"{}")  # the proxy forwards plain requests
        with pytest.raises(UnsupportedStorage, match=r"ignores conditional writes \(If-None-Match"):
            OutputLock(location).acquire()
        assert [p.name for p in location.parent.glob("*")] == ["probe-first.json"]  # the probe is gone too


# -- no partial object, ever --------------------------------------------------------------------------
WRITER = """
import sys
from pipeline.storage import Location
import json
location = Location(sys.argv[1], json.loads(sys.argv[2]))
print("writing", flush=True)
location.write_atomic(b"n" * (int(sys.argv[3]) << 20))
print("done", flush=True)
"""


def test_no_partial_object_is_visible_when_a_writer_is_killed_mid_upload_object_store(object_store, tmp_path):
    """A 120 MB write is a multipart upload (s3fs's threshold is 100 MB). The writer is killed once its
    upload has begun: the key keeps its previous bytes and no reader ever sees new ones."""
    import s3fs

    fs = s3fs.S3FileSystem(**object_store.options, skip_instance_cache=True)
    location = Location(object_store.url("killed/shard-000000.tar"), object_store.options)
    location.write_atomic(b"previous shard")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, location.url, json.dumps(object_store.options), "120"],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + 120  # building 120 MB and opening the upload: ~1 s idle, more under load
        while not fs.list_multipart_uploads(object_store.bucket) and writer.poll() is None:
            assert time.monotonic() < deadline, "the writer never began its multipart upload"
            assert location.read_bytes() == b"previous shard"
            time.sleep(0.05)
        assert writer.poll() is None, "the upload finished before it could be interrupted"
        os.killpg(writer.pid, signal.SIGKILL)
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    assert location.read_bytes() == b"previous shard"
    assert [p.name for p in location.parent.glob("*")] == ["shard-000000.tar"]


# -- the output lease -----------------------------------------------------------------------------------
def lease_location(root: Location) -> Location:
    return root / "out" / "lock.json"


def write_lease(location: Location, **fields) -> None:
    import socket

    lease = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": "other", "started": time.time(),
             "heartbeat": time.time(), **fields}
    location.write_atomic(json.dumps(lease).encode())


def test_lease_refuses_a_live_holder_and_takes_over_an_expired_one_local_and_object_store(root):
    location = lease_location(root)
    write_lease(location, pid=os.getppid())  # a live process on this host, fresh heartbeat
    with pytest.raises(OutputLocked, match=r"in use by job other \(host .*, pid"):
        OutputLock(location, lease_seconds=60).acquire()
    write_lease(location, host="elsewhere", heartbeat=time.time() - 120)
    with OutputLock(location, lease_seconds=60) as lock:
        assert "took over the lease of job other (no heartbeat" in lock.taken_over
        assert json.loads(location.read_bytes())["job_id"] == lock.job_id
    assert not location.exists()


def _race(location: Location, lease_seconds: float, barrier, results) -> None:
    lock = OutputLock(location, lease_seconds=lease_seconds)
    barrier.wait(timeout=120)
    try:
        lock.acquire()
    except OutputLocked:
        results.put("refused")
        return
    first, deadline = lock._tag, time.monotonic() + 60
    while lock._tag == first and time.monotonic() < deadline:  # until a heartbeat refreshed the lease
        time.sleep(0.05)
    assert lock._tag != first
    lock.check()
    results.put("ran")
    barrier.wait(timeout=120)  # hold it until the other job has answered
    lock.release()


def race(location: Location, lease_seconds: float) -> list[str]:
    """Two processes (two jobs' drivers) acquire the same lease at once; their outcomes."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    jobs = [context.Process(target=_race, args=(location, lease_seconds, barrier, results)) for _ in range(2)]
    for job in jobs:
        job.start()
    outcomes = sorted(results.get(timeout=180) for _ in jobs)  # spawning imports the pipeline: seconds
    if outcomes == ["ran", "refused"]:
        barrier.wait(timeout=120)  # let the holder release
    for job in jobs:
        job.join(timeout=60)
    return outcomes


def test_one_of_two_jobs_racing_for_an_output_gets_it_local_and_object_store(root):
    for attempt in range(3):
        location = root / f"attempt{attempt}" / "lock.json"
        assert race(location, lease_seconds=8) == ["ran", "refused"], attempt
        assert not location.exists()


def test_of_two_jobs_taking_over_an_expired_lease_one_wins_local_and_object_store(root):
    location = lease_location(root)
    write_lease(location, host="elsewhere", heartbeat=time.time() - 600)
    assert race(location, lease_seconds=8) == ["ran", "refused"]


def test_a_holder_whose_lease_was_taken_stops_local_and_object_store(root):
    location = lease_location(root)
    with OutputLock(location, lease_seconds=0.8) as lock:
        data, tag = location.read_tagged()
        taken = json.loads(data) | {"job_id": "usurper"}
        assert location.replace_if(json.dumps(taken).encode(), tag) is not None
        assert location.replace_if(b"{}", tag) is None  # the old version is gone: a second swap fails
        deadline = time.monotonic() + 30
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(OutputLocked, match="lost its lease: lease taken by job usurper"):
            lock.check()
    assert json.loads(location.read_bytes())["job_id"] == "usurper"  # release leaves the new holder's lease


# -- the preprocessing job on the object store ---------------------------------------------------------
# The cheapest operator the job accepts (each image a sample without subjects): these tests are about
# where bytes go, not about models.
BARE = "benchmarks.bench_pipeline_scale:BareSampler"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Local inputs of every kind: ``photos/`` (PNGs in two folders, a file that is no image, a text file,
    a folder named like an image), ``photos.txt`` (a list of them with a missing and a repeated line) and
    ``tars/`` (two caption shards)."""
    from benchmarks.bench_pipeline_scale import write_images
    from pipeline.example_inputs import write_caption_shard

    root = tmp_path_factory.mktemp("inputs")
    write_images(root / "photos", 9)
    for index, image in enumerate(sorted((root / "photos").rglob("*.png"))):
        if index % 2:  # a second folder, so the walk has a tree to walk
            (root / "photos" / "more").mkdir(exist_ok=True)
            image.rename(root / "photos" / "more" / image.name)
    (root / "photos" / "broken.png").write_bytes(b"not an image")
    (root / "photos" / "notes.txt").write_text("not an input")
    (root / "photos" / "odd.png").mkdir()
    (root / "photos" / "odd.png" / "inner.png").write_bytes((root / "photos" / "more" / "0000001.png").read_bytes())
    listed = sorted(p.relative_to(root).as_posix() for p in (root / "photos").rglob("*.png") if p.is_file())
    (root / "photos.txt").write_text("\n".join([*listed, "photos/gone.png", f"./{listed[0]}", "# a comment"]))
    write_caption_shard(root / "tars" / "a.tar", names=("chelsea", "coffee", "rocket"), size=64)
    write_caption_shard(root / "tars" / "b" / "c.tar", names=("astronaut", "horse"), size=64)
    return root


@pytest.fixture(scope="module")
def uploaded(object_store, inputs) -> str:
    """The same inputs under one prefix of the test server (what ``aws s3 sync`` would make)."""
    import s3fs

    prefix = object_store.url("inputs")
    s3fs.S3FileSystem(**object_store.options).put(f"{inputs}/", prefix, recursive=True)
    return prefix


def input_config(kind: str, path: str, options: dict | None = None):
    from pipeline.config import InputConfig

    return InputConfig(kind=kind, path=path, extensions=(".png", ".jpg"), storage_options=options or {})


@pytest.mark.parametrize("kind, name", [("folder", "photos"), ("list", "photos.txt"), ("shards", "tars")])
def test_inputs_list_and_read_the_same_from_the_object_store_as_locally(object_store, inputs, uploaded, kind, name):
    """Keys, order, partitions, skips and every input's bytes (a tar member by one ranged read) match."""
    from pipeline.inputs import list_inputs, read_bytes

    local = list_inputs(input_config(kind, str(inputs / name)))
    remote = list_inputs(input_config(kind, f"{uploaded}/{name}", object_store.options))

    def row(record):
        return record.key, record.source, record.offset, record.size, record.caption, record.reason

    assert [row(r) for r in remote.inputs] == [row(r) for r in local.inputs] and len(local.inputs) >= 5
    assert [(s.reason, s.source.split(":")[-1]) for s in remote.skipped] == [
        (s.reason, s.source.split(":")[-1]) for s in local.skipped]
    assert all(r.path.startswith(uploaded) for r in remote.inputs)
    for here, there in zip(local.inputs, remote.inputs):
        if not here.reason:
            assert read_bytes(there, object_store.options) == read_bytes(here)
    expected_skips = {"folder": {"unsupported_extension", "not_a_file"}, "list": {"duplicate"}, "shards": set()}
    assert {s.reason for s in remote.skipped} == expected_skips[kind]


def job_config(input_path: str, output_path: str, options: dict | None = None, kind: str = "folder", **overrides):
    from pipeline.config import PreprocessConfig

    config = {
        "input": {"kind": kind, "path": input_path, "extensions": [".png", ".jpg"]},
        "output": {"path": output_path, "shard_size": 3, "lease_seconds": 30},
        "image": {"max_side": 64, "min_side": 16},
        "stages": {"load": {"batch_size": 2, "num_cpus": 0.25}, "annotate": {"batch_size": 2, "operator": BARE}},
        "progress": False,
        "qa_samples": 2,
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        config[section][name] = value
    if options is not None:
        config["input"]["storage_options"] = options if "://" in input_path else {}
        config["output"]["storage_options"] = options if "://" in output_path else {}
    return PreprocessConfig.model_validate(config)


def result_files(root: Location) -> dict[str, bytes]:
    """What defines a job's result: shards, indexes and rejects, by path under the output."""
    return {f"{folder}/{p.name}": p.read_bytes() for folder in ("shards", "rejects") for p in (root / folder).glob("*")}


@pytest.fixture(scope="module")
def local_run(ray_session, inputs, tmp_path_factory) -> Path:
    """The folder job on local paths: what every object-store run must reproduce byte for byte."""
    from pipeline.preprocess import run_job

    out = tmp_path_factory.mktemp("local") / "out"
    summary = run_job(job_config(str(inputs / "photos"), str(out)))
    assert summary.written == 10 and summary.rejected == {"not_an_image": 1} and summary.shards == 4
    return out


@dataclass
class Watched:
    """What was seen of the object store while the folder job wrote to it (:func:`watched_store_run`)."""

    out: Location
    summary: Any = None  # the job's JobSummary, or the exception it raised
    seen: set[str] = field(default_factory=set)  # result files listed while the job ran
    early: list[str] = field(default_factory=list)  # what was listed before it was whole, or out of order
    refusal: str | None = None  # what a second job on the same output raised while the first held it
    finished: bool = False


@pytest.fixture(scope="module")
def watched_store_run(ray_session, object_store, uploaded, local_run) -> Watched:
    """The folder job from the object store to it, watched while it runs: every result file that can be
    listed is compared with its final bytes (the local run's), an index must come after its shard and
    rejects, and a second job on the same output is started once the lease is there. One job serves the
    tests of its result and of what it let be seen."""
    import threading

    import s3fs

    from pipeline.preprocess import run_job

    fs = s3fs.S3FileSystem(**object_store.options, use_listings_cache=False)
    watched = Watched(Location(object_store.url("job/out"), object_store.options))
    out = watched.out
    final = {f"{out.path}/{name}": data for name, data in result_files(Location(local_run)).items()}
    config = job_config(f"{uploaded}/photos", out.url, object_store.options)

    def job() -> None:
        try:
            watched.summary = run_job(config)
        except BaseException as exc:  # noqa: BLE001 - handed to the tests, which fail on it
            watched.summary = exc

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 600  # the job alone takes ~10 s idle; the loaded 2-core machine is slower
    while thread.is_alive() and time.monotonic() < deadline:
        listed = set(fs.find(out.path))
        for path in listed & final.keys():
            if fs.cat_file(path) != final[path]:
                watched.early.append(f"{path} was visible before it was whole")
            if path.endswith(".index.json"):
                shard = path.removesuffix(".index.json")
                rejects = shard.replace("/shards/shard-", "/rejects/part-")
                if not {f"{shard}.tar", f"{rejects}.jsonl"} <= listed:
                    watched.early.append(f"{path} came before its shard or rejects")
        watched.seen |= listed & final.keys()
        if watched.refusal is None and f"{out.path}/lock.json" in listed:
            try:
                run_job(config)
                watched.refusal = "a second job ran on the output the first one held"
            except OutputLocked as exc:
                watched.refusal = f"OutputLocked: {exc}"
        time.sleep(0.02)
    thread.join(timeout=60)
    watched.finished = not thread.is_alive()
    return watched


def test_job_reads_and_writes_the_object_store_exactly_once(ray_session, object_store, uploaded, local_run,
                                                            watched_store_run):
    from pipeline.preprocess import run_job

    assert watched_store_run.finished, "the job did not finish in 600 s"
    out, summary = watched_store_run.out, watched_store_run.summary
    assert not isinstance(summary, BaseException), repr(summary)
    assert (summary.written, summary.rejected, summary.shards) == (10, {"not_an_image": 1}, 4)
    assert result_files(out) == result_files(Location(local_run))
    manifest = json.loads((out / "manifest.json").read_bytes())
    local_manifest = json.loads((local_run / "manifest.json").read_bytes())
    for key in ("seen", "inputs", "written", "rejected", "skipped", "shards", "config_hash"):
        assert manifest[key] == local_manifest[key], key
    assert "storage_options" not in json.dumps(manifest) and "testing" not in json.dumps(manifest)  # no keys
    names = sorted(p.url.removeprefix(out.url + "/") for p in out.glob("**/*"))
    assert names == sorted(["contact_sheet.png", "manifest.json", "plan.json", "skipped.jsonl",
                            *result_files(out)]), names  # no lease, staging, listing or temporary left
    again = run_job(job_config(f"{uploaded}/photos", out.url, object_store.options))
    assert again.processed_now == 0 and result_files(out) == result_files(Location(local_run))


@pytest.mark.parametrize("kind, name", [("list", "photos.txt"), ("shards", "tars")])
def test_list_and_shard_inputs_on_the_object_store_give_the_local_shards(ray_session, object_store, inputs,
                                                                        uploaded, tmp_path, kind, name):
    from pipeline.preprocess import run_job

    local = Location(tmp_path / "out")
    run_job(job_config(str(inputs / name), local.url, kind=kind))
    out = Location(object_store.url(f"{kind}/out"), object_store.options)
    summary = run_job(job_config(f"{uploaded}/{name}", out.url, object_store.options, kind=kind))
    there, here = result_files(out), result_files(local)
    assert summary.written >= 5 and there.keys() == here.keys()
    assert {k: v for k, v in there.items() if k.endswith(".tar")} == {k: v for k, v in here.items() if k.endswith(".tar")}

    def rejects(files: dict[str, bytes]) -> list[tuple]:  # a missing file's detail names its path or URL
        return [(r["key"], r["source"], r["reason"]) for name, data in sorted(files.items())
                if name.startswith("rejects/") for r in map(json.loads, data.splitlines())]

    assert rejects(there) == rejects(here)


def test_interrupted_object_store_job_resumes_to_the_same_shards(ray_session, object_store, uploaded, local_run):
    """A finished output copied to the store, then left as a job killed mid-way leaves it: the rerun redoes
    those three partitions and ends with the same bytes."""
    import s3fs

    from pipeline.preprocess import run_job
    from pipeline.shards import ShardLayout
    from tests.test_pipeline_job import leave_as_interrupted

    fs = s3fs.S3FileSystem(**object_store.options)
    out = Location(object_store.url("resume/out"), object_store.options)
    fs.put(f"{local_run}/", out.path, recursive=True)
    layout = ShardLayout(out)
    leave_as_interrupted(layout, staged=1, rewritten=2, not_started=3)
    summary = run_job(job_config(f"{uploaded}/photos", out.url, object_store.options))
    assert summary.processed_now == 3 + 3 + 2 and summary.written == 10  # partitions 1, 2 and 3 (2 inputs)
    assert result_files(out) == result_files(Location(local_run))
    assert not layout.staging.exists() and not layout.lock.exists()


def test_no_partial_object_is_visible_in_the_object_store(watched_store_run, local_run):
    """While the job runs, every shard, rejects file and index that can be listed already holds its final
    bytes, an index appears only once its shard and rejects are there, and a second job is refused."""
    watched = watched_store_run
    assert watched.finished, "the job did not finish in 600 s"
    assert not watched.early, watched.early
    assert watched.refusal is not None and watched.seen, "nothing was watched while the job ran"
    assert watched.refusal.startswith("OutputLocked: ") and "in use by job" in watched.refusal, watched.refusal
    assert result_files(watched.out) == result_files(Location(local_run))


def test_what_object_storage_cannot_do_is_refused_before_anything_is_written(object_store, uploaded, inputs,
                                                                             capsys):
    from pipeline.inputs import list_inputs
    from pipeline.preprocess import main

    annotated = input_config("folder", f"{uploaded}/photos", object_store.options).model_copy(update={"annotated": True})
    with pytest.raises(UnsupportedStorage, match="annotated inputs are imported from local files"):
        list_inputs(annotated)
    configs = Path(__file__).resolve().parents[1] / "configs" / "preprocess"
    code = main(["--config", str(configs / "import_fastcomposer.yaml"), "--set", f"input.path={inputs / 'photos'}",
                 "output.path=memory://mmdiff/out"])
    assert code == 2 and "outputs need a local path or s3://" in capsys.readouterr().err
    # the command line reaches the store with options set key by key; an empty input is refused there too
    (inputs / "empty").mkdir(exist_ok=True)
    out = Location(object_store.url("cli/out"), object_store.options)
    code = main(["--config", str(configs / "import_fastcomposer.yaml"), "--set", f"input.path={inputs / 'empty'}",
                 f"output.path={out.url}", *(f"output.storage_options.{k}={v}" for k, v in object_store.options.items())])
    assert code == 2 and "holds no input" in capsys.readouterr().err and not out.exists()


def test_a_failed_write_names_the_file_and_leaves_no_temporary_file(tmp_path):
    """A full disk and a read-only one (real tmpfs): every kind of write raises OutputUnwritable naming the
    file, and nothing half-written stays beside it; the lease can still be released."""
    from pipeline.shards import JsonlStream
    from pipeline.storage import OutputUnwritable
    from tests.faults import fill_leaving, small_filesystem

    with small_filesystem(tmp_path / "disk", "1m") as disk:
        fill_leaving(disk, 8192)
        shard = Location(str(disk / "shards" / "shard-000000.tar"))
        with pytest.raises(OutputUnwritable, match=f"{shard.url}: OSError: .*No space left on device"):
            shard.write_atomic(bytes(64 * 1024))
        stream = JsonlStream(Location(str(disk / "skipped.jsonl")))
        with pytest.raises(OutputUnwritable, match="skipped.jsonl"):
            for n in range(10_000):
                stream.write({"source": f"{n:08d}" * 8})
            stream.commit()
        stream.discard()
        lease = Location(str(disk / "lock.json"))
        with pytest.raises(OutputUnwritable, match="lock.json"):
            lease.create_exclusive(bytes(64 * 1024))
        with pytest.raises(OutputUnwritable, match="write-probe"):
            Location(str(disk)).check_writable(1 << 20)
        assert sorted(p.name for p in disk.rglob("*") if p.is_file()) == ["ballast"]
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(OutputUnwritable, match=f"{shard.url}: OSError: .*Read-only file system"):
            shard.write_atomic(b"x")
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)

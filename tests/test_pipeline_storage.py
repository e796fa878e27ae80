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
from pathlib import Path

import pytest

from pipeline.lock import OutputLock, OutputLocked
from pipeline.storage import Location, UnsupportedStorage
from tests.object_store import conditions_ignored, object_store_fixture  # noqa: F401 - registers the fixture

REPO = Path(__file__).resolve().parents[1]


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

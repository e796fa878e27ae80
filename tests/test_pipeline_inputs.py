"""Without Ray: the listing accounts for every entry, keys, damaged tars, the decode budget, the annotation
importer on both published layouts and on malformed annotations, and the output-folder lease."""

import io
import json
import os
import socket
import struct
import tarfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import InputConfig
from pipeline.example_inputs import photo, write_caption_shard
from pipeline.importer import AnnotationImporter, read_segmentation_map
from pipeline.inputs import DigestTable, assign_partitions, iter_listing, list_inputs, make_key
from pipeline.lock import OutputLock, OutputLocked
from pipeline.shards import ShardLayout, finalize_partition, stage_samples
from preprocess.crops import CropConfig, square_box
from preprocess.image_io import ImageConfig, ImageRejected, check_decode_budget, load_image
from preprocess.sample import Sample
from tests.annotation_layouts import subject_boxes, write_fastcomposer, write_mmdiff


# -- listing ---------------------------------------------------------------------------------------
def test_folder_listing_accounts_for_every_entry(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    photo("chelsea").resize((64, 48)).save(root / "a.jpg")
    photo("coffee").resize((64, 48)).save(root / "sub" / "b.png")
    (root / "anim.gif").write_bytes(b"GIF89a")
    (root / "notes.txt").write_text("x")
    (root / "dir.jpg").mkdir()
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    os.symlink("loop2.jpg", root / "loop1.jpg")
    os.symlink("loop1.jpg", root / "loop2.jpg")
    os.symlink(root, root / "sub" / "back")  # a folder loop
    os.symlink(root / "a.jpg", root / "alias.jpg")  # the same file twice
    os.mkfifo(root / "pipe.jpg")
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        listing = list_inputs(InputConfig(kind="folder", path=str(root)))
    finally:
        locked.chmod(0o755)
    skipped = {s.source: s.reason for s in listing.skipped}
    assert sorted(r.source for r in listing.inputs) == ["a.jpg", "sub/b.png"]
    expected = {"anim.gif": "unsupported_extension", "notes.txt": "unsupported_extension", "dir.jpg": "not_a_file",
                "dangling.jpg": "dangling_symlink", "loop1.jpg": "symlink_loop", "loop2.jpg": "symlink_loop",
                "sub/back": "symlink_loop", "alias.jpg": "duplicate", "pipe.jpg": "not_a_file"}
    if os.geteuid() != 0:  # root reads any folder
        expected["locked"] = "unreadable"
    assert {k: v for k, v in skipped.items() if k in expected or k == "locked"} == expected
    assert listing.seen == len(listing.inputs) + len(listing.skipped)


def test_list_file_normalises_paths_and_keeps_every_line(tmp_path):
    (tmp_path / "a").mkdir()
    photo("chelsea").resize((64, 48)).save(tmp_path / "a" / "x.jpg")
    lines = ["a/x.jpg", "./a/x.jpg", str(tmp_path / "a" / "x.jpg"), "a/../a/x.jpg", "", "# comment",
             "gone.jpg", "a", "a/x.gif"]
    (tmp_path / "list.txt").write_text("\n".join(lines))
    listing = list_inputs(InputConfig(kind="list", path=str(tmp_path / "list.txt")))
    inputs = {r.source: r.reason for r in listing.inputs}
    assert inputs == {"a/x.jpg": "", "gone.jpg": "missing_file"}
    assert [s.reason for s in listing.skipped] == ["duplicate"] * 3 + ["unsupported_extension"] * 2
    # the same file keyed the same way from a folder job over the list's folder
    folder = list_inputs(InputConfig(kind="folder", path=str(tmp_path)))
    assert next(r.key for r in folder.inputs if r.source == "a/x.jpg") == next(
        r.key for r in listing.inputs if r.source == "a/x.jpg")


def test_keys_are_long_hashes_of_the_relative_path():
    key = make_key("photos/Été 1.jpg")
    assert key.startswith("photos_ete_1_jpg_") and len(key.rsplit("_", 1)[1]) == 20 and "." not in key
    assert make_key("photos/Été 1.jpg") == key  # stable
    # CJK names slug to nothing: only the hash tells them apart (a 32-bit hash collides ~5 times here)
    keys = {make_key(f"{chr(0x4E00 + i % 20000)}{chr(0x4E00 + i // 20000)}.jpg") for i in range(200_000)}
    assert len(keys) == 200_000


def test_two_datasets_with_the_same_tar_names_do_not_collide(tmp_path):
    for name in ("laion", "coyo"):
        write_caption_shard(tmp_path / name / "00000.tar", ("chelsea", "coffee"), size=64)
    records = assign_partitions(list_inputs(InputConfig(kind="shards", path=str(tmp_path))).inputs, 10)
    assert len(records) == 4 and not any(r.reason for r in records)
    assert {r.source for r in records} == {f"{n}/00000.tar:00000000{i}.jpg" for n in ("laion", "coyo") for i in (0, 1)}


def test_damaged_tars_yield_their_readable_samples_and_a_reject_naming_the_tar(tmp_path):
    good = write_caption_shard(tmp_path / "src.tar", ("chelsea", "coffee", "rocket"), size=64).read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    with tarfile.open(tmp_path / "src.tar") as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("000000002")][0]
    (folder / "cut.tar").write_bytes(good[: third.offset_data + 100])  # inside the third image
    corrupt = bytearray(good)
    corrupt[third.offset : third.offset + 512] = b"\xff" * 512  # a garbage header in the middle
    (folder / "corrupt.tar").write_bytes(bytes(corrupt))
    (folder / "junk.tar").write_bytes(b"not a tar at all" * 100)
    (folder / "ok.tar").write_bytes(good)
    listing = list_inputs(InputConfig(kind="shards", path=str(folder)))
    ok = [r.source for r in listing.inputs if not r.reason]
    damaged = {r.source: r.detail for r in listing.inputs if r.reason == "damaged_tar"}
    assert set(damaged) == {"cut.tar", "corrupt.tar", "junk.tar"}
    assert "cut off" in damaged["cut.tar"] and "2 sample(s) read" in damaged["cut.tar"]
    assert "corrupt member header" in damaged["corrupt.tar"] and "2 sample(s) read" in damaged["corrupt.tar"]
    assert sorted(ok) == sorted([f"{t}:00000000{i}.jpg" for t in ("cut.tar", "corrupt.tar") for i in (0, 1)]
                                + [f"ok.tar:00000000{i}.jpg" for i in range(3)])


def test_partitions_are_runs_of_the_listing_sorted_by_key_inside(tmp_path):
    """Input i of the (deterministic) listing is in partition i // shard_size; inside a partition, key order."""
    for index in range(7):
        (tmp_path / f"{index:02d}.jpg").write_bytes(b"x")
    listed = [r.source for r in list_inputs(InputConfig(kind="folder", path=str(tmp_path))).inputs]
    assert listed == sorted(listed)  # names sorted within a folder
    records = assign_partitions(list_inputs(InputConfig(kind="folder", path=str(tmp_path))).inputs, 3)
    assert [r.partition for r in records] == [0, 0, 0, 1, 1, 1, 2]
    for partition in range(3):
        members = [r for r in records if r.partition == partition]
        assert {r.source for r in members} == set(listed[3 * partition : 3 * partition + 3])
        assert [r.key for r in members] == sorted(r.key for r in members)


def test_a_tar_repeating_a_sample_key_gives_a_duplicate_key_naming_the_first(tmp_path):
    import webdataset as wds

    jpeg = io.BytesIO()
    photo("chelsea").resize((32, 32)).save(jpeg, format="JPEG")
    with wds.TarWriter(str(tmp_path / "a.tar"), encoder=False) as writer:
        for key in ("s1", "s2", "s1"):  # not consecutive: two samples with one key
            writer.write({"__key__": key, "jpg": jpeg.getvalue()})
    records = list_inputs(InputConfig(kind="shards", path=str(tmp_path))).inputs
    assert [r.reason for r in records] == ["", "", "duplicate_key"]
    assert records[2].key == records[0].key and "a.tar:s1.jpg" in records[2].detail


def test_listing_streams_and_its_duplicate_table_is_compact(tmp_path):
    """The listing is a generator (a driver never holds it whole); the duplicate check keeps 64-bit
    digests, at most 46 bytes per input, and finds every repeat."""
    lines = [f"img/{i}.jpg" for i in range(3000)]
    (tmp_path / "list.txt").write_text("\n".join(lines + lines[:10]))
    stream = iter_listing(InputConfig(kind="list", path=str(tmp_path / "list.txt")))
    assert next(stream).source == "img/0.jpg"  # the first input comes before the rest is read
    rest = list(stream)
    assert sum(1 for r in rest if getattr(r, "reason", "") == "duplicate") == 10 and len(rest) == 3009
    table = DigestTable()
    for i in range(100_000):
        assert table.setdefault(f"key {i}", i) is None
    assert [table.setdefault(f"key {i}", -1) for i in (0, 512, 99_999)] == [0, 512, 99_999]
    assert len(table) == 100_000 and (table._digests.nbytes + table._values.nbytes) / len(table) <= 46


def test_finalize_is_idempotent_and_resume_trusts_size_or_checks_sha256(tmp_path):
    """The index records bytes and sha256 when the shard is written; ``size`` trusts a shard of the right
    size (a flipped byte passes), ``sha256`` does not; a truncated shard fails both. A finalize rerun
    after success (a retried task) returns the same index without the staged samples."""
    from pipeline.importer import AnnotationImporter

    layout = ShardLayout(tmp_path / "out")
    paths = write_mmdiff(tmp_path / "in")
    importer = AnnotationImporter(CropConfig(size=32, margin=0.1))
    samples = []
    for path in paths:
        loaded = load_image(path.read_bytes(), path.name, ImageConfig(max_side=128, min_side=16))
        samples += [s.to_wds() for s in importer([path.stem.replace(".", "_")], [loaded.image],
                                                 [str(path.with_suffix(".json"))], [loaded.original_size])]
    stage_samples(layout, 0, samples)
    reject = {"key": "k", "source": "k.jpg", "reason": "too_small", "detail": "1x1"}
    index = finalize_partition(layout, 0, [s["__key__"] for s in samples], [reject])
    assert index["bytes"] == layout.shard(0).size() and index["reasons"] == {"too_small": 1}
    assert not layout.staging_dir(0).exists()
    assert finalize_partition(layout, 0, [s["__key__"] for s in samples], [reject]) == index
    assert layout.is_finished(0, "size") and layout.is_finished(0, "sha256")
    data = bytearray(layout.shard(0).read_bytes())
    data[700] ^= 0xFF
    layout.shard(0).write_atomic(bytes(data))
    assert layout.is_finished(0, "size") and not layout.is_finished(0, "sha256")
    layout.shard(0).write_atomic(bytes(data[:-512]))
    assert not layout.is_finished(0, "size") and not layout.is_finished(0, "sha256")
    layout.rejects_file(0).write_atomic(b"")
    assert not layout.is_finished(0, "size")


# -- decode budget ---------------------------------------------------------------------------------
def png_header(width: int, height: int, depth: int, colour_type: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` at ``depth`` bits but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decode_budget_counts_channels_and_bit_depth_from_the_header(tmp_path):
    bomb = png_header(8000, 8000, 16, 2)  # 16-bit RGB: 384 MB decoded, 8000 x 8000 = under max_pixels
    assert len(bomb) < 1000
    config = ImageConfig()
    assert 8000 * 8000 <= config.max_pixels
    with pytest.raises(ImageRejected) as info:
        load_image(bomb, "big16.png", config)
    assert info.value.reason == "over_decode_budget" and "8000x8000" in info.value.detail and "16 bit" in info.value.detail
    # the public header check serving uses: bytes, a path or a file; nothing is decoded
    (tmp_path / "big.png").write_bytes(bomb)
    header = check_decode_budget(tmp_path / "big.png", 10**9)
    assert (header.width, header.channels, header.bytes_per_channel, header.decoded_bytes) == (8000, 3, 2, 384_000_000)
    with pytest.raises(ImageRejected, match="over_decode_budget"):
        check_decode_budget(io.BytesIO(png_header(8000, 8000, 8, 6)), 200_000_000, "rgba.png")
    assert check_decode_budget(png_header(8000, 8000, 8, 0), 100_000_000).decoded_bytes == 64_000_000
    with pytest.raises(ImageRejected, match="not_an_image"):
        check_decode_budget(b"plain text", 10)


# -- annotation import -----------------------------------------------------------------------------
def import_folder(paths: list[Path], crop_size: int = 64):
    importer = AnnotationImporter(CropConfig(size=crop_size, margin=0.1))
    config = ImageConfig(max_side=256, min_side=16)
    results = []
    for path in paths:
        loaded = load_image(path.read_bytes(), path.name, config)
        results += importer([path.stem], [loaded.image], [str(path.with_suffix(".json"))], [loaded.original_size])
    return results


@pytest.mark.parametrize("writer", [write_mmdiff, write_fastcomposer])
def test_both_layouts_import_with_masks_in_boxes_and_crops_showing_the_subject(tmp_path, writer):
    paths = writer(tmp_path)
    listing = list_inputs(InputConfig(kind="folder", path=str(tmp_path), annotated=True))
    assert sorted(Path(r.path) for r in listing.inputs) == sorted(paths)
    for path, sample in zip(paths, import_folder(paths)):
        assert isinstance(sample, Sample), sample
        sample = Sample.from_wds(sample.to_wds())
        scale = sample.image.width / photo_size(path)[0]
        for entity, mask, crop, truth in zip(sample.entities, sample.masks, sample.crops, subject_boxes(path)):
            x0, y0, x1, y1 = entity.box
            ys, xs = np.nonzero(mask)
            assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1) and ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
            assert np.allclose(entity.box, [v * scale for v in truth], atol=1.5)  # column first, where the subject is
            # the crop shows the subject: its non-fill share is the mask's share of the crop's square
            sx0, sy0, sx1, sy1 = square_box(entity.box, 0.1)
            region = np.zeros((sy1 - sy0, sx1 - sx0), bool)
            inside = mask[max(sy0, 0) : sy1, max(sx0, 0) : sx1]
            region[max(sy0, 0) - sy0 : max(sy0, 0) - sy0 + inside.shape[0], max(sx0, 0) - sx0 : max(sx0, 0) - sx0 + inside.shape[1]] = inside
            shown = 1.0 - (crop == 255).all(axis=-1).mean()
            assert 0.6 * region.mean() <= shown <= region.mean() + 0.05, (entity.word, shown, region.mean())
            assert region.mean() > 0.1
            assert sample.caption[entity.phrase_start : entity.phrase_end].startswith("a ")
            assert sample.caption[entity.start : entity.end] == entity.word and " " not in entity.word


def photo_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


class Marker:
    """Unpickling this writes a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def malform(path: Path, case: str, tmp_path: Path) -> None:
    data = json.loads(path.with_suffix(".json").read_text())
    segment = data["segments"][0]
    box_key = "box" if "box" in segment else "bbox"
    edits = {
        "caption_null": lambda: data.update(caption=None),
        "caption_int": lambda: data.update(caption=7),
        "segments_missing": lambda: data.pop("segments"),
        "box_none": lambda: segment.update({box_key: [None, 1, 2, 3]}),
        "box_three": lambda: segment.update({box_key: [1, 2, 3]}),
        "box_string": lambda: segment.update({box_key: "1,2,3,4"}),
        "box_inverted": lambda: segment.update({box_key: [300, 200, 100, 50]}),
        "box_sliver": lambda: segment.update({box_key: [100, 50, 100, 300]}),
        "box_outside": lambda: segment.update({box_key: [0, 0, 5000, 5000]}),
        "box_row_first": lambda: segment.update({box_key: [segment[box_key][i] for i in (1, 0, 3, 2)]}),
        "span_outside": lambda: segment.update(end=500),
        "span_mismatch": lambda: segment.update(start=segment["start"] + 1, end=segment["end"] + 1),
        "id_string": lambda: segment.update(id="1"),
        "id_absent_from_map": lambda: segment.update(id=9),
    }
    if case in edits:
        edits[case]()
        path.with_suffix(".json").write_text(json.dumps(data))
    elif case == "json_broken":
        path.with_suffix(".json").write_text("{not json")
    elif case == "map_missing":
        path.with_suffix(".npy").unlink()
    elif case == "map_shape":
        np.save(path.with_suffix(".npy"), np.zeros((10, 10), np.int32))
    elif case == "map_pickled":
        np.save(path.with_suffix(".npy"), np.array([Marker(str(tmp_path / "UNPICKLED"))], dtype=object), allow_pickle=True)
    else:
        raise AssertionError(case)


MALFORMED = {
    "caption_null": "bad_annotation", "caption_int": "bad_annotation", "segments_missing": "bad_annotation",
    "box_none": "bad_annotation", "box_three": "bad_annotation", "box_string": "bad_annotation",
    "box_inverted": "bad_annotation", "box_sliver": "bad_annotation", "box_outside": "bad_annotation",
    "box_row_first": "mask_outside_box", "span_outside": "bad_annotation", "span_mismatch": "bad_annotation",
    "id_string": "bad_annotation", "id_absent_from_map": "empty_mask", "json_broken": "bad_annotation",
    "map_missing": "missing_annotation", "map_shape": "bad_annotation", "map_pickled": "bad_annotation",
}


def test_malformed_annotations_are_rejected_one_by_one_with_their_reason(tmp_path):
    paths = []
    for n, case in enumerate(MALFORMED):
        scene = 1 if case == "box_row_first" else 0  # the square astronaut: the swapped box stays in the image
        path = (write_mmdiff if n % 2 else write_fastcomposer)(tmp_path / case, 10 * n)[scene]
        malform(path, case, tmp_path)
        paths.append(path)
    results = import_folder(paths)
    got = {case: getattr(r, "reason", "imported") for case, r in zip(MALFORMED, results)}
    assert got == MALFORMED
    for case, result in zip(MALFORMED, results):
        assert paths[list(MALFORMED).index(case)].stem in result.detail or case == "map_missing", (case, result)
    assert "row first" in results[list(MALFORMED).index("box_row_first")].detail
    assert not (tmp_path / "UNPICKLED").exists()
    with pytest.raises(ValueError, match="allow_pickle"):
        read_segmentation_map(paths[list(MALFORMED).index("map_pickled")])


# -- output-folder lease ---------------------------------------------------------------------------
def write_lease(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": "other", "started": time.time(),
             "heartbeat": time.time(), **fields}
    path.write_text(json.dumps(lease))


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_or_expired_one(tmp_path):
    path = tmp_path / "out" / "lock.json"
    write_lease(path, pid=os.getppid())  # a live process on this host, fresh heartbeat
    with pytest.raises(OutputLocked, match=r"in use by job other \(host .*, pid"):
        OutputLock(path, lease_seconds=60).acquire()
    write_lease(path, host="elsewhere", heartbeat=time.time() - 5)  # another host, within its lease
    with pytest.raises(OutputLocked):
        OutputLock(path, lease_seconds=60).acquire()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    for stale in ({"pid": dead}, {"host": "elsewhere", "heartbeat": time.time() - 120}):
        write_lease(path, **stale)
        with OutputLock(path, lease_seconds=60) as lock:
            assert lock.taken_over and json.loads(path.read_text())["job_id"] == lock.job_id
        assert not path.exists()


def test_only_one_of_two_jobs_started_at_once_gets_the_folder(tmp_path):
    path = tmp_path / "lock.json"
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def start() -> None:
        lock = OutputLock(path, lease_seconds=0.4)
        barrier.wait()
        try:
            lock.acquire()
        except OutputLocked:
            outcomes.append("refused")
            return
        outcomes.append("ran")
        time.sleep(0.5)  # past one heartbeat: the lease is refreshed, not lost
        lock.check()
        lock.release()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["ran", "refused"] and not path.exists()


def test_an_empty_input_is_a_clear_error_and_leaves_the_output_folder_usable(tmp_path):
    from mmdiff.configuration import load_config
    from pipeline.config import PreprocessConfig
    from pipeline.preprocess import EmptyInputError, run_job

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no images here")
    config = load_config(Path(__file__).resolve().parents[1] / "configs/preprocess/import_fastcomposer.yaml",
                         PreprocessConfig, {"input.path": str(tmp_path / "in"), "output.path": str(tmp_path / "out")})
    with pytest.raises(EmptyInputError, match=r"holds no input .*1 entries seen.*unsupported_extension"):
        run_job(config)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no plan.json, no lock.json

"""Training data: shards -> batches in the model's contract, deterministic, resumable, fault-tolerant.

``write_shards`` (real photos from scikit-image, written with Sample.to_wds) is shared by the other
tests/test_train_*.py files.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from preprocess.sample import Entity, Sample
from train.config import DataSection
from mmdiff import zoo
from mmdiff.zoo.diffusion import tiny_tokenizer
from train.data import BatchBuilder, ReaderPosition, ShardStream, make_loader
from train.shards import Dataset

PHOTOS = [  # (skimage photo, caption, subject word)
    ("chelsea", "a photo of a cat on a rug", "cat"),
    ("astronaut", "a woman in a space suit", "woman"),
    ("coffee", "a cup of coffee on a table", "cup"),
    ("rocket", "a rocket on a launch pad", "rocket"),
]


def make_sample(index: int, size: int | tuple[int, int] = 64, crop: int = 32) -> Sample:
    """Photo ``index`` at ``size`` (side, or (height, width)), its subject's box and the box as mask."""
    name, caption, word = PHOTOS[index % len(PHOTOS)]
    h, w = (size, size) if isinstance(size, int) else size
    image = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((w, h))
    start = caption.index(word)
    box = (w * 0.2, h * 0.15, w * 0.8, h * 0.9)
    mask = np.zeros((1, h, w), bool)
    mask[0, int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
    crops = np.asarray(image.crop(tuple(int(v) for v in box)).resize((crop, crop)))[None]
    entity = Entity(word, word, start, start + len(word), start, start + len(word), box, 0.9)
    return Sample(f"{index:06d}", image, caption, [entity], mask, crops, meta={"source": name})


def write_shards(folder: Path, num_samples: int = 8, per_shard: int = 4,
                 sizes: list[tuple[int, int]] | None = None, index: bool = True) -> Path:
    """The preprocessing output layout (shards/*.tar, their index.json unless ``index`` is false, and
    manifest.json) from real photos; ``sizes`` (height, width) are cycled over the samples (default 64 x 64)."""
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    for shard in range(0, num_samples, per_shard):
        path = folder / "shards" / f"shard-{shard // per_shard:06d}.tar"
        keys = []
        with tarfile.open(path, "w") as tar:
            for number in range(shard, min(shard + per_shard, num_samples)):
                members = make_sample(number, sizes[number % len(sizes)] if sizes else 64).to_wds()
                keys.append(members.pop("__key__"))
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{keys[-1]}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        if index:
            write_index(path, keys)
    (folder / "manifest.json").write_text(json.dumps({"written": num_samples, "manifest_hash": "test-manifest"}))
    return folder


def write_index(shard: Path, keys: list[str]) -> None:
    """The index pipeline.shards writes beside a shard: its keys, size and sha256."""
    data = shard.read_bytes()
    shard.with_name(shard.name.replace(".tar", ".index.json")).write_text(json.dumps(
        {"shard": shard.name, "samples": keys, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def builder(data: DataSection) -> BatchBuilder:
    processor = zoo.build({"family": "clip_vision", "source": "tiny"}).processor
    return BatchBuilder(data, [tiny_tokenizer()], processor)


def stream(folder: Path, **overrides) -> tuple[ShardStream, DataSection]:
    settings = dict(resolution=32, max_subjects=2, micro_batch_size=2, shuffle_buffer=3,
                    text_dropout=0.0, subject_dropout=0.0)
    data = DataSection(shards=str(folder), **{**settings, **overrides})
    return ShardStream(folder, data, builder(data), seed=7), data


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batches_follow_the_model_contract(tmp_path):
    source, data = stream(write_shards(tmp_path))
    batch = next(iter(source))
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].min() >= -1.0
    assert batch["input_ids"].shape == (2, 77) and batch["input_ids"].dtype == torch.long
    assert batch["subject_pixel_values"].shape == (2, 2, 3, 32, 32)  # the tiny image encoder's input
    assert batch["subject_masks"].shape == (2, 2, 4, 4) and batch["subject_masks"].dtype == torch.uint8  # latent grid
    assert batch["subject_valid"].tolist() == [[True, False], [True, False]]
    for row, caption in enumerate(batch["caption"]):
        word = next(w for _, c, w in PHOTOS if c == caption)
        index = int(batch["subject_token_index"][row, 0])
        token = tiny_tokenizer().decode([int(batch["input_ids"][row, index])]).strip()
        assert token and word.startswith(token) and batch["subject_token_index"][row, 1] == -1
        assert batch["subject_masks"][row, 0].sum() > 0 and batch["subject_masks"][row, 1].sum() == 0
    assert Dataset.open(str(tmp_path)).manifest_hash() == "test-manifest"


def test_dropout_removes_caption_and_subjects(tmp_path):
    source, _ = stream(write_shards(tmp_path), text_dropout=0.99)
    batch = next(iter(source))
    assert batch["caption"] == ["", ""] and not batch["subject_valid"].any()
    assert (batch["subject_token_index"] == -1).all()


def test_epochs_reshuffle_and_cover_every_sample(tmp_path):
    source, _ = stream(write_shards(tmp_path))
    first, second = keys(itertools.islice(iter(source), 4)), keys(itertools.islice(iter(source), 4, 8))
    assert sorted(first) == sorted(second) == [f"{i:06d}" for i in range(8)]
    assert first != second


def test_ranks_read_disjoint_shards(tmp_path):
    folder = write_shards(tmp_path)
    seen = []
    for rank in (0, 1):
        source, data = stream(folder)
        ranked = ShardStream(folder, data, source.builder, seed=7, rank=rank, world_size=2)
        seen.append(set(keys(itertools.islice(iter(ranked), 2))))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8


def test_fewer_samples_than_ranks_still_feed_every_rank_once_per_epoch(tmp_path):
    """A tiny set (the demo's) with fewer samples than reader slots: each rank gets its turn as the deal
    turns with the epoch, instead of one rank finding nothing; no epoch hands a sample out twice."""
    folder = write_shards(tmp_path, num_samples=3, per_shard=3)
    source, data = stream(folder, micro_batch_size=1, shuffle_buffer=1)
    drawn = []  # (rank, epoch, key) over 4 draws per rank
    for rank in range(4):
        ranked = ShardStream(folder, data, source.builder, seed=7, rank=rank, world_size=4)
        for batch in itertools.islice(iter(ranked), 4):
            (key,) = batch["key"]
            drawn.append((rank, batch["reader"]["sources"][0]["epoch"], key))
    assert {rank for rank, _, _ in drawn} == {0, 1, 2, 3}
    per_epoch = {}
    for _, epoch, key in drawn:
        per_epoch.setdefault(epoch, []).append(key)
    assert all(len(keys) == len(set(keys)) for keys in per_epoch.values())


# aspect buckets: samples wait in unfilled buckets across batches, and the resumed stream refills them
@pytest.mark.parametrize(("num_workers", "buckets"), [(0, False), (2, False), (0, True)], ids=["0w", "2w", "bucket"])
def test_resume_from_a_position_repeats_the_same_batches(tmp_path, num_workers, buckets):
    sizes = [(64, 64), (40, 100), (64, 64), (100, 40), (80, 48)] if buckets else None
    folder = write_shards(tmp_path, num_samples=12, sizes=sizes)
    source, data = stream(folder, aspect_buckets=buckets, bucket_step=8)
    batches = list(itertools.islice(make_loader(source, num_workers), 10))
    positions = {}
    for b in batches[:3]:
        positions[b["reader"]["worker"]] = ReaderPosition.of_batch(b)
    if buckets:
        assert any(b["reader"]["pending"] for b in batches[:3])  # something was waiting at the cut
    resumed = ShardStream(folder, data, source.builder, seed=7, positions=positions,
                          first_worker=3 % max(1, num_workers))
    again = list(itertools.islice(make_loader(resumed, num_workers), 7))
    assert keys(again) == keys(batches[3:])
    for a, b in zip(again, batches[3:]):
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_bucket_batches_never_mix_shapes_and_drop_nothing(tmp_path):
    sizes = [(64, 64), (40, 100), (100, 40), (64, 64), (80, 48), (48, 80), (36, 110)]
    source, _ = stream(write_shards(tmp_path, num_samples=14, per_shard=4, sizes=sizes), aspect_buckets=True,
                       bucket_step=8)
    epoch = list(itertools.takewhile(lambda b: ReaderPosition.of_batch(b).epoch == 0, itertools.islice(iter(source), 30)))
    shapes = set()
    for batch in epoch:
        shape = batch["pixel_values"].shape[-2:]
        assert batch["subject_masks"].shape[-2:] == (shape[0] // 8, shape[1] // 8) and batch["pixel_values"].shape[0] <= 2
        shapes.add(tuple(shape))
    assert len(shapes) >= 3 and all(h * w <= 32 * 32 and h % 8 == 0 and w % 8 == 0 for h, w in shapes)
    assert sorted(keys(epoch)) == [f"{i:06d}" for i in range(14)]  # every sample once, the last buckets short


def test_bucket_crop_moves_mask_box_and_sdxl_conditioning_with_the_image():
    from train.data import aspect_buckets

    data = DataSection(shards="unused", resolution=32, max_subjects=2, text_dropout=0.0, subject_dropout=0.0,
                       aspect_buckets=True, bucket_step=8)
    processor = zoo.build({"family": "clip_vision", "source": "tiny"}).processor
    # masks at the image's own resolution (latent_factor 1) to see them framed by the box
    sdxl = BatchBuilder(data, [tiny_tokenizer(), tiny_tokenizer()], processor, latent_factor=1)  # two tokenizers: SDXL
    assert (24, 40) in aspect_buckets(32, 8, 4.0) and (40, 24) in aspect_buckets(32, 8, 4.0)
    sample = make_sample(1, size=(48, 96))  # 1:2 -> the 24 x 40 bucket (nearest aspect with area <= 32^2)
    example = sdxl.example(sample, random.Random(0))
    assert example["pixel_values"].shape == (3, 24, 40) and example["subject_masks"].shape == (2, 24, 40)
    # at an SD VAE's latent grid (1/8) the uint8 coverage is the area average of the finer one: every
    # supervised size below follows from it as the loss resizes it (mmdiff.losses.masks_at, area mode)
    coarse = BatchBuilder(data, [tiny_tokenizer(), tiny_tokenizer()], processor).example(sample, random.Random(0))
    assert coarse["subject_masks"].dtype == torch.uint8 and coarse["subject_masks"].shape == (2, 3, 5)
    averaged = torch.nn.functional.interpolate(example["subject_masks"][None].float(), size=(3, 5), mode="area")[0]
    assert (averaged - coarse["subject_masks"].float()).abs().max() <= 3
    # resized by 1/2 to 24 x 48 to cover the bucket, 4 px cut on each side
    assert example["original_size"].tolist() == [48, 96] and example["crop_top_left"].tolist() == [0, 4]
    expected = np.asarray(sample.image.resize((48, 24), Image.BICUBIC), np.float32)[:, 4:44]
    assert torch.allclose(example["pixel_values"], torch.from_numpy(expected).permute(2, 0, 1) / 127.5 - 1.0)
    x0, y0, x1, y1 = example["subject_boxes"][0].tolist()  # the box, moved like the image ...
    assert (x0, y0, x1, y1) == pytest.approx((96 * 0.2 / 2 - 4, 48 * 0.15 / 2, 96 * 0.8 / 2 - 4, 48 * 0.9 / 2))
    rows, cols = torch.nonzero(example["subject_masks"][0], as_tuple=True)  # ... frames the mask, moved alike
    assert abs(int(cols.min()) - x0) <= 1 and abs(int(cols.max()) + 1 - x1) <= 1
    assert abs(int(rows.min()) - y0) <= 1 and abs(int(rows.max()) + 1 - y1) <= 1
    assert example["subject_boxes"][1].tolist() == [0, 0, 0, 0] and not example["subject_masks"][1].any()


def test_corrupt_samples_and_shards_are_skipped_and_reported(tmp_path):
    folder = write_shards(tmp_path, num_samples=8, per_shard=4, index=False)  # hand-made: nothing recorded
    shard = folder / "shards" / "shard-000000.tar"
    with tarfile.open(shard) as tar:  # rewrite with one JPEG garbled
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            payload = b"not a jpeg" if info.name == "000001.jpg" else payload
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (folder / "shards" / "shard-000002.tar").write_bytes(b"garbage!" * 100)  # not a tar at all
    source, _ = stream(folder)
    batches = list(itertools.islice(iter(source), 7))
    rejected = [r for b in batches for r in b["rejected"]]
    assert {r["key"] for r in rejected if r["key"]} == {"000001"}
    assert any("000001" in r["reason"] and "cannot decode" in r["reason"] for r in rejected)
    assert {r["source"] for r in rejected if "unreadable shard" in r["reason"]} == {str(folder / "shards" / "shard-000002.tar")}
    assert "000001" not in keys(batches) and len(set(keys(batches))) == 7


def test_sdxl_crop_corner_is_in_resized_pixels():
    # SDXL's crops_coords_top_left is the offset after the short side is scaled to the training size
    from train.data import cover_crop

    square, corner, scale = cover_crop(Image.new("RGB", (400, 200)), (32, 32), Image.BICUBIC)
    assert square.size == (32, 32) and corner == (0, 16) and scale == 32 / 200  # 100 px of 200 -> 16 of 32


# -- reading from object storage, exactly once, checked -------------------------------------------------
from tests.object_store import object_store_fixture  # noqa: E402,F401 - registers the fixture


def epoch_batches(loader, epochs: int = 1, limit: int = 80) -> list[dict]:
    """Batches until every reader of ``loader`` has passed ``epochs`` epochs (a batch's position is its
    reader's after it, so a batch of epoch e says e), bounded by ``limit``."""
    out, done = [], set()
    workers = max(1, loader.num_workers)
    for batch in itertools.islice(loader, limit):
        if ReaderPosition.of_batch(batch).epoch >= epochs:
            done.add(batch["reader"]["worker"])
            if len(done) == workers:
                return out
        else:
            out.append(batch)
    raise AssertionError(f"readers {sorted(done)} of {workers} finished {epochs} epoch(s) within {limit} batches")


@pytest.fixture(scope="module")
def s3_dataset(object_store, tmp_path_factory):
    """14 samples in 5 shards of uneven size (3, 3, 3, 3, 2), written locally and copied to the object store."""
    import s3fs

    local = write_shards(tmp_path_factory.mktemp("local"), num_samples=14, per_shard=3)
    url = object_store.url("train/data")
    s3fs.S3FileSystem(**object_store.options, skip_instance_cache=True).put(f"{local}/", url, recursive=True)
    return local, url, object_store.options


def test_2_ranks_x_2_workers_read_every_sample_once_per_epoch_from_the_object_store_as_locally(s3_dataset):
    local, url, options = s3_dataset
    per_rank = []
    for rank in (0, 1):
        batches = {}
        for where, opts in ((url, options), (str(local), {})):
            source, data = stream(local, micro_batch_size=1, storage_options=opts)
            ranked = ShardStream(where, data, source.builder, seed=7, rank=rank, world_size=2)
            batches[where] = epoch_batches(make_loader(ranked, 2), epochs=2)
        remote, here = batches[url], batches[str(local)]
        assert keys(remote) == keys(here)  # the object store gives the local copy's stream, batch for batch
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(remote, here))
        per_rank.append(remote)
    for epoch in (0, 1):
        seen = [k for batches in per_rank for b in batches if ReaderPosition.of_batch(b).epoch == epoch for k in b["key"]]
        assert sorted(seen) == [f"{i:06d}" for i in range(14)], epoch  # every sample once per epoch
    # each of the 4 reader slots had shards of its own, balanced by their recorded sample counts
    slots = {(rank, b["reader"]["worker"]): set() for rank, batches in enumerate(per_rank) for b in batches}
    for rank, batches in enumerate(per_rank):
        for b in batches:
            if ReaderPosition.of_batch(b).epoch == 0:
                slots[(rank, b["reader"]["worker"])].update(int(k) // 3 for k in b["key"])
    assert len(slots) == 4 and all(slots.values())

    # rank 1 resumed from the object store after its third batch reads on exactly as it did
    source, data = stream(local, micro_batch_size=1, storage_options=options)
    cut = per_rank[1][:3]
    positions = {b["reader"]["worker"]: ReaderPosition.of_batch(b) for b in cut}
    assert any(p.sources[0].buffer for p in positions.values())  # samples were waiting in a shuffle buffer
    resumed = ShardStream(url, data, source.builder, seed=7, rank=1, world_size=2, positions=positions, first_worker=1)
    again = epoch_batches(make_loader(resumed, 2), epochs=2)

    def by_worker(batches: list[dict]) -> dict[int, list[str]]:
        return {w: keys(b for b in batches if b["reader"]["worker"] == w) for w in (0, 1)}

    assert by_worker(again) == by_worker(per_rank[1][3:])


def test_a_truncated_shard_on_the_object_store_is_skipped_counted_and_named(s3_dataset):
    import s3fs

    local, url, options = s3_dataset
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    damaged = url.replace("train/data", "train/truncated")
    fs.put(f"{local}/", damaged, recursive=True)
    shard = f"{damaged}/shards/shard-000001.tar"
    fs.pipe_file(shard, (local / "shards" / "shard-000001.tar").read_bytes()[:3000])  # cut mid-sample
    source, data = stream(local, micro_batch_size=1, storage_options=options)
    batches = epoch_batches(make_loader(ShardStream(damaged, data, source.builder, seed=7), 0))
    assert sorted(keys(batches)) == [f"{i:06d}" for i in range(14) if i // 3 != 1]  # the rest, once
    rejected = [r for b in batches for r in b["rejected"]]
    assert len(rejected) == 1 and rejected[0]["source"] == shard and "index recorded" in rejected[0]["reason"]


# held by a thread of the training process while its loader starts: a forked worker would get it held
HELD_IN_THE_TRAINER = threading.Lock()


class GuardedStream(ShardStream):
    """Reads only under ``HELD_IN_THE_TRAINER``, as the object-store client reads under its own locks."""

    def __iter__(self):
        with HELD_IN_THE_TRAINER:
            pass
        yield from super().__iter__()


def test_workers_start_clean_of_locks_the_trainers_threads_hold(tmp_path):
    source, data = stream(write_shards(tmp_path))
    guarded = GuardedStream(tmp_path, data, source.builder, seed=7)
    held, released, batches = threading.Event(), threading.Event(), []

    def hold() -> None:
        with HELD_IN_THE_TRAINER:
            held.set()
            released.wait(180)

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)
    try:
        reader = threading.Thread(target=lambda: batches.extend(epoch_batches(make_loader(guarded, 2))), daemon=True)
        reader.start()
        reader.join(timeout=120)  # a worker forked with the lock held waits for it forever
    finally:
        released.set()
    assert not reader.is_alive(), "a loader worker waited on a lock a thread of the training process held"
    assert sorted(keys(batches)) == [f"{i:06d}" for i in range(8)]


def test_resume_refuses_positions_of_another_world_size(tmp_path):
    folder = write_shards(tmp_path)
    source, data = stream(folder)
    saved = ReaderPosition.of_batch(next(iter(ShardStream(folder, data, source.builder, seed=7, rank=0, world_size=2))))
    assert saved.slots == 2
    resumed = ShardStream(folder, data, source.builder, seed=7, positions={0: saved})  # 1 rank now
    with pytest.raises(ValueError, match="saved by 2 reader slots .* this run has 1"):
        make_loader(resumed, 0)


def test_a_checkpoint_with_the_old_epoch_offset_positions_stops_the_resume_naming_it(tmp_path):
    """A checkpoint written before per-slot shard/byte positions (each worker's epoch, offset and pending
    samples, as the trainer wrote them then) is not damage: the resume stops with the checkpoint's file and
    what to do, instead of skipping it (and every older step of the run, all in that layout) as corrupt."""
    from train.checkpoint import CheckpointFormatError, Checkpoints, sha256_file

    folder = tmp_path / "checkpoints"
    (folder / "step-4").mkdir(parents=True)
    state = folder / "step-4" / "trainer_state_rank0.json"
    state.write_text(json.dumps({"step": 4, "micro_batches": 4, "nonfinite_total": 0, "nonfinite_in_row": 0,
                                 "rejected_total": 0, "checkpoint_scores": {},
                                 "positions": {"0": {"epoch": 1, "offset": 6, "pending": [5]}}}))
    (folder / "step-4" / "manifest.json").write_text(json.dumps({"format": 1, "step": 4, "world_size": 1, "files": {
        state.name: {"size": state.stat().st_size, "sha256": sha256_file(state)}}}))
    with pytest.raises(CheckpointFormatError) as error:
        Checkpoints(folder, rank=0, world=1).check("step-4")
    message = str(error.value)
    assert str(state) in message and "['epoch', 'offset', 'pending']" in message
    assert "start a new run in another output_dir" in message and str(folder) in message


def test_a_transient_read_error_is_retried_from_where_it_stopped(tmp_path, caplog):
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class FlakyFileSystem(LocalFileSystem):
        """Local files whose every first read past byte 4096 of a file fails, as a dropped connection does."""

        protocol = "flaky"
        failed: set[str] = set()

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("flaky://"))

        def _open(self, path, mode="rb", **kwargs):
            handle = super()._open(path, mode, **kwargs)
            read, failed = handle.read, FlakyFileSystem.failed

            def flaky_read(size=-1):
                if path.endswith(".tar") and path not in failed and handle.tell() > 4096:
                    failed.add(path)
                    raise ConnectionResetError(f"{path}: connection reset by peer")
                return read(size)

            handle.read = flaky_read
            return handle

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    folder = write_shards(tmp_path)
    source, data = stream(folder, micro_batch_size=1, read_retries=2)
    stream_ = ShardStream(f"flaky://{folder}", data, source.builder, seed=7)
    with caplog.at_level("WARNING", logger="train.data"):
        batches = epoch_batches(make_loader(stream_, 0))
    assert sorted(keys(batches)) == [f"{i:06d}" for i in range(8)] and not any(b["rejected"] for b in batches)
    assert len(FlakyFileSystem.failed) == 2 and "retry 1/2" in caplog.text


@pytest.mark.parametrize("verify", ["size", "sha256"])
def test_a_flipped_bit_in_a_jpeg_is_never_trained_on_silently(tmp_path, verify):
    folder = write_shards(tmp_path)
    shard = folder / "shards" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        jpeg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data[jpeg.offset_data + jpeg.size // 2] ^= 0x10  # one bit, size unchanged
    shard.write_bytes(bytes(data))
    source, data_section = stream(folder, micro_batch_size=1, verify=verify)
    batches = epoch_batches(make_loader(ShardStream(folder, data_section, source.builder, seed=7), 0))
    rejected = [r for b in batches for r in b["rejected"]]
    assert [r["source"] for r in rejected] == [str(shard)] and "sha256" in rejected[0]["reason"]
    if verify == "sha256":  # checked before use: none of its samples is trained on
        assert sorted(keys(batches)) == [f"{i:06d}" for i in range(4)] and "none of its samples" in rejected[0]["reason"]
    else:  # streamed, then reported at its end, naming what happened
        assert len(keys(batches)) == 8 and "were read before" in rejected[0]["reason"]



def test_the_default_num_workers_follows_the_measured_loader_cost_within_the_cores():
    from train.data import default_num_workers

    def workers(resolution: int, cached: bool, ranks: int = 1, cores: int = 64) -> int:
        data = DataSection(shards="unused", resolution=resolution, cached_latents=cached)
        return default_num_workers(data, ranks, cores)

    # docs/SIZING.md: 12.0 ms x 182.5 images/s = 2.2 cores with cached latents, 30.0 x 120.5 = 3.6 without
    assert (workers(512, True), workers(512, False), workers(1024, True), workers(1024, False)) == (3, 5, 1, 3)
    assert workers(512, False, ranks=8, cores=32) == 3  # 32 cores for 8 ranks: 4 each, one for the rank
    assert DataSection(shards="unused").num_workers is None  # the default is derived, not a fixed number

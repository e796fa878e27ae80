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
    assert batch["subject_masks"].shape == (2, 2, 32, 32)
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
        assert batch["subject_masks"].shape[-2:] == shape and batch["pixel_values"].shape[0] <= 2
        shapes.add(tuple(shape))
    assert len(shapes) >= 3 and all(h * w <= 32 * 32 and h % 8 == 0 and w % 8 == 0 for h, w in shapes)
    assert sorted(keys(epoch)) == [f"{i:06d}" for i in range(14)]  # every sample once, the last buckets short


def test_bucket_crop_moves_mask_box_and_sdxl_conditioning_with_the_image():
    from train.data import aspect_buckets

    data = DataSection(shards="unused", resolution=32, max_subjects=2, text_dropout=0.0, subject_dropout=0.0,
                       aspect_buckets=True, bucket_step=8)
    processor = zoo.build({"family": "clip_vision", "source": "tiny"}).processor
    sdxl = BatchBuilder(data, [tiny_tokenizer(), tiny_tokenizer()], processor)  # two tokenizers: SDXL
    assert (24, 40) in aspect_buckets(32, 8, 4.0) and (40, 24) in aspect_buckets(32, 8, 4.0)
    sample = make_sample(1, size=(48, 96))  # 1:2 -> the 24 x 40 bucket (nearest aspect with area <= 32^2)
    example = sdxl.example(sample, random.Random(0))
    assert example["pixel_values"].shape == (3, 24, 40) and example["subject_masks"].shape == (2, 24, 40)
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

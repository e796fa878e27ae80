"""Shard write and read speed (samples/s, MB/s): our shard writer/reader vs a plain tar of the same bytes.

Write: encode nothing twice: the same encoded samples (Sample.to_wds of real photos with masks and
crops) are written once through pipeline.shards (webdataset TarWriter, sorted, sha256 index) and once
with tarfile. Read: webdataset + Sample.from_wds (full decode) and webdataset raw bytes, vs tarfile.

    python -m benchmarks.bench_shards [--samples 256]
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from benchmarks.report import write_result
from pipeline.example_inputs import PHOTOS, photo
from pipeline.shards import ShardLayout, finalize_partition, read_samples, stage_samples
from preprocess.sample import Entity, Sample


def make_samples(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    images = [photo(name).resize((256, 256)) for name in PHOTOS]
    samples = []
    for index in range(count):
        masks = np.zeros((2, 256, 256), bool)
        masks[0, 20:140, 30:150] = True
        masks[1, 100:240, 120:250] = rng.random((140, 130)) > 0.3
        caption = "a cat next to a dog"
        entities = [Entity("a cat", "cat", 2, 5, 0, 5, (30, 20, 150, 140), 0.9),
                    Entity("a dog", "dog", 16, 19, 14, 19, (120, 100, 250, 240), 0.8)]
        crops = rng.integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
        samples.append(Sample(f"sample_{index:06d}", images[index % len(images)], caption, entities, masks, crops,
                              meta={"source": f"{index}.jpg"}).to_wds())
    return samples


def plain_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for member, data in sample.items():
                if member.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    samples = make_samples(args.samples)
    megabytes = sum(len(v) for s in samples for k, v in s.items() if not k.startswith("__")) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        layout = ShardLayout(tmp / "ours")
        start = time.perf_counter()
        stage_samples(layout, 0, samples)
        finalize_partition(layout, 0, [s["__key__"] for s in samples], [])
        ours_write = time.perf_counter() - start
        start = time.perf_counter()
        plain_tar(tmp / "plain.tar", samples)
        plain_write = time.perf_counter() - start

        start = time.perf_counter()
        decoded = sum(1 for _ in read_samples(tmp / "ours"))
        ours_read_decoded = time.perf_counter() - start
        start = time.perf_counter()
        raw = sum(1 for _ in wds.WebDataset(str(layout.shard(0)), shardshuffle=False))
        ours_read_raw = time.perf_counter() - start
        start = time.perf_counter()
        with tarfile.open(tmp / "plain.tar") as tar:
            plain = sum(len(tar.extractfile(m).read()) > 0 for m in tar)
        plain_read = time.perf_counter() - start
    assert decoded == raw == args.samples and plain == sum(len(s) - 1 for s in samples)
    n = args.samples
    result = {
        "samples": n, "megabytes": megabytes,
        "write_shards_samples_per_s": n / ours_write, "write_shards_mb_per_s": megabytes / ours_write,
        "write_plain_tar_samples_per_s": n / plain_write, "write_plain_tar_mb_per_s": megabytes / plain_write,
        "write_shards_vs_plain": plain_write / ours_write,
        "read_raw_webdataset_samples_per_s": n / ours_read_raw, "read_raw_webdataset_mb_per_s": megabytes / ours_read_raw,
        "read_decoded_samples_per_s": n / ours_read_decoded, "read_decoded_mb_per_s": megabytes / ours_read_decoded,
        "read_plain_tar_samples_per_s": n / plain_read, "read_plain_tar_mb_per_s": megabytes / plain_read,
        "read_raw_vs_plain": plain_read / ours_read_raw,
    }
    print(f"bench_shards: {n} samples {megabytes:.1f} MB; write shards {result['write_shards_mb_per_s']:.0f} MB/s vs "
          f"plain tar {result['write_plain_tar_mb_per_s']:.0f} MB/s ({result['write_shards_vs_plain']:.2f}x); read raw "
          f"{result['read_raw_webdataset_mb_per_s']:.0f} MB/s vs plain {result['read_plain_tar_mb_per_s']:.0f} MB/s "
          f"({result['read_raw_vs_plain']:.2f}x); decoded {result['read_decoded_samples_per_s']:.0f} samples/s")
    write_result("bench_shards", result)


if __name__ == "__main__":
    main()

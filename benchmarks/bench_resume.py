"""Time to the first batch after a resume at 10 % and at 90 % of an epoch: constant-time resume.

    python -m benchmarks.bench_resume [--samples 20000] [--per-shard 500] [--repeats 3]

Writes a dataset of ``--samples`` small samples (one real photo's members under distinct keys, in shards of
``--per-shard``, with their index files), takes the reader position of one slot after 10 % and after 90 %
of its epoch (by running the reader's draws, as training does, without decoding), and times a resumed
stream from each position to its first batch (decoded, tiny tokenizer and image processor). The two
resumes alternate, the median of each is reported with their ratio (90 % / 10 %; the acceptance bound is
1.2), along with the samples the resumed reader had to read. Prints one line and writes
benchmarks/results/bench_resume.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.report import write_result


def write_dataset(folder: Path, samples: int, per_shard: int) -> None:
    """``samples`` copies of one real photo's sample (64 px), under distinct keys, with index files."""
    from test_train_data import make_sample  # the tests' real-photo sample

    members = make_sample(0).to_wds()
    members.pop("__key__")
    (folder / "shards").mkdir(parents=True)
    for shard in range(0, samples, per_shard):
        path = folder / "shards" / f"shard-{shard // per_shard:06d}.tar"
        keys = [f"{i:09d}" for i in range(shard, min(shard + per_shard, samples))]
        with tarfile.open(path, "w") as tar:
            for key in keys:
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        data = path.read_bytes()
        path.with_name(path.name.replace(".tar", ".index.json")).write_text(json.dumps(
            {"shard": path.name, "samples": keys, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    (folder / "manifest.json").write_text(json.dumps({"written": samples, "manifest_hash": "bench-resume"}))


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from mmdiff import zoo
    from mmdiff.zoo.diffusion import tiny_tokenizer
    from train.config import DataSection
    from train.data import BatchBuilder, ReaderPosition, ShardStream, SourcePosition, _SourceReader

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        folder = Path(tmp)
        write_dataset(folder, args.samples, args.per_shard)
        data = DataSection(shards=str(folder), resolution=64, max_subjects=2, micro_batch_size=1, shuffle_buffer=64,
                           text_dropout=0.0, subject_dropout=0.0)
        builder = BatchBuilder(data, [tiny_tokenizer()], zoo.build({"family": "clip_vision", "source": "tiny"}).processor)
        stream = ShardStream(folder, data, builder, seed=0)

        def position_after(draws: int) -> ReaderPosition:
            """The slot's position after ``draws`` samples, from the reader's own draws (no decoding)."""
            reader = _SourceReader(stream, 0, SourcePosition(), 0, 1, [])
            for _ in range(draws):
                reader.next()
            return ReaderPosition([asdict(reader.position)], draws, [], 1, stream.seed)

        positions = {share: position_after(int(args.samples * share)) for share in (0.1, 0.9)}
        times: dict[float, list[float]] = {0.1: [], 0.9: []}
        for _ in range(args.repeats):
            for share, position in positions.items():
                started = time.perf_counter()
                next(iter(ShardStream(folder, data, builder, seed=0, positions={0: position})))
                times[share].append(time.perf_counter() - started)
    medians = {share: statistics.median(t) for share, t in times.items()}
    result = {
        "samples": args.samples, "per_shard": args.per_shard, "repeats": args.repeats,
        "first_batch_s_at_10pct": medians[0.1], "first_batch_s_at_90pct": medians[0.9],
        "ratio_90_over_10": medians[0.9] / medians[0.1],
        "position_at_90pct": {"shard": positions[0.9].sources[0].shard, "byte": positions[0.9].sources[0].byte,
                              "buffered": len(positions[0.9].sources[0].buffer)},
        "times_s": {str(k): v for k, v in times.items()},
    }
    print(f"bench_resume: first batch after resume at 10% {medians[0.1] * 1e3:.1f} ms, at 90% "
          f"{medians[0.9] * 1e3:.1f} ms of a {args.samples}-sample epoch: ratio {result['ratio_90_over_10']:.2f}")
    write_result("bench_resume", result)


if __name__ == "__main__":
    main()

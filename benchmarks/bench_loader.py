"""Loader CPU time per training image, against the loader before the object-storage and speed changes.

    python -m benchmarks.bench_loader [--images 48] [--resolution 512] [--repeats 3] [--s3]

One dataset of real photos (scikit-image, resized to about 1.5x the training resolution, one subject each)
with cached latents for the training bucket, read by one reader slot in this process (no workers), as a
rank's DataLoader worker does: the loader of commit ``BEFORE`` (its train/data.py and train/latents.py,
taken from git into a temporary package) and the current one, alternating, ``--repeats`` times each.
The subject crops go through a 224 px CLIP image processor, as for the real
image encoder (the tokenizer is the tiny twin's: the real one's files are on the model hub). Reported: CPU seconds (process time) per training image, median per loader, and their ratio; the CPU cores
per GPU they imply at a given training speed are in docs/SIZING.md. ``--s3`` adds the current loader's
wall time per image reading the same shards from a moto S3 server on loopback, against the local copy.
Prints one line and writes benchmarks/results/bench_loader[_pixels][_<resolution>][_s3].json.
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEFORE = "a8b5767"  # main before the object-storage and speed changes of train/data.py


def loader_before(folder: Path) -> types.ModuleType:
    """train/data.py and train/latents.py of BEFORE as the package ``loader_before`` (under ``folder``)."""
    package = folder / "loader_before"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("data", "latents"):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:train/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
        (package / f"{name}.py").write_text(source.replace("from train.latents import", "from loader_before.latents import"))
    sys.path.insert(0, str(folder))
    return importlib.import_module("loader_before.data")


def write_dataset(folder: Path, images: int, resolution: int, per_shard: int, base) -> None:
    """Real photos at about 1.5x ``resolution``, one subject each, with index files and cached latents of
    their square training crop (random values of the right shape: the loader's work does not depend on them)."""
    import numpy as np
    from skimage import data as skdata

    from PIL import Image

    from preprocess.sample import Entity, Sample
    from train.latents import latent_dir, member_name

    sys.path.insert(0, str(REPO / "tests"))
    from test_train_data import PHOTOS  # the tests' photos, captions and subject words

    side = resolution * 3 // 2
    samples = []
    for i in range(images):
        name, caption, word = PHOTOS[i % len(PHOTOS)]
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((side, side))
        box = (0.15 * side, 0.1 * side, 0.75 * side, 0.9 * side)
        masks = np.zeros((1, side, side), bool)
        masks[0, int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
        start = caption.index(word)
        entity = Entity(word, word, start, start + len(word), start, start + len(word), box, 0.9)
        crops = np.asarray(image.crop(tuple(int(v) for v in box)).resize((224, 224)))[None]
        samples.append(Sample(f"{i:06d}", image, caption, [entity], masks, crops, meta={"source": name}))
    shards = folder / "shards"
    shards.mkdir(parents=True)
    import hashlib
    import tarfile

    latents = Path(latent_dir(folder, base).path)
    latents.mkdir(parents=True)
    factor = 8
    for start in range(0, images, per_shard):
        path = shards / f"shard-{start // per_shard:06d}.tar"
        keys = []
        with tarfile.open(path, "w") as tar, tarfile.open(latents / path.name, "w") as sidecar:
            for sample in samples[start:start + per_shard]:
                members = sample.to_wds()
                keys.append(members.pop("__key__"))
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{keys[-1]}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                buffer = io.BytesIO()
                np.save(buffer, np.random.default_rng(0).standard_normal(
                    (8, resolution // factor, resolution // factor)).astype(np.float16), allow_pickle=False)
                info = tarfile.TarInfo(f"{keys[-1]}.{member_name((resolution, resolution))}")
                info.size = buffer.tell()
                buffer.seek(0)
                sidecar.addfile(info, buffer)
        data = path.read_bytes()
        path.with_name(path.name.replace(".tar", ".index.json")).write_text(json.dumps(
            {"shard": path.name, "samples": keys, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    (folder / "manifest.json").write_text(json.dumps({"written": images, "manifest_hash": "bench-loader"}))


def main() -> None:
    from mmdiff import zoo
    from mmdiff.zoo.spec import ModelSpec
    from train.config import DataSection
    from train import data as loader_now

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action="store_true")
    parser.add_argument("--no-latents", action="store_true", help="no cached latents: the images are decoded")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # a DataLoader worker's share
    base = ModelSpec(family="sd15", source="tiny", seed=0)
    tokenizer = zoo.build(base).tokenizer
    from mmdiff.zoo.clip_vision import _processor

    processor = _processor(224)  # the real image encoder's input (ViT-L/14, 224 px), not the tiny twin's
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        before = loader_before(tmp / "code")
        folder = tmp / "data"
        write_dataset(folder, args.images, args.resolution, 16, base)
        data = DataSection(shards=str(folder), resolution=args.resolution, max_subjects=2, micro_batch_size=4,
                           shuffle_buffer=16, text_dropout=0.0, subject_dropout=0.0, cached_latents=not args.no_latents)

        def run(module: types.ModuleType, shards: str, options: dict | None = None) -> tuple[float, float]:
            settings = data.model_copy(update={"shards": shards, "storage_options": options or {}})
            stream = module.ShardStream(shards, settings, module.BatchBuilder(settings, [tokenizer], processor), seed=0,
                                        base=base)
            cpu, wall = time.process_time(), time.perf_counter()
            batches = list(itertools.islice(iter(stream), args.images // settings.micro_batch_size))
            assert sum(len(b["key"]) for b in batches) == args.images
            assert all(("latent_parameters" in b) == settings.cached_latents for b in batches)
            return (time.process_time() - cpu) / args.images, (time.perf_counter() - wall) / args.images

        cpu: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(args.repeats):
            cpu["before"].append(run(before, str(folder))[0])
            cpu["now"].append(run(loader_now, str(folder))[0])
        result = {"images": args.images, "resolution": args.resolution, "repeats": args.repeats, "before": BEFORE,
                  "cached_latents": not args.no_latents,
                  "cpu_ms_per_image_before": 1e3 * statistics.median(cpu["before"]),
                  "cpu_ms_per_image_now": 1e3 * statistics.median(cpu["now"]),
                  "samples_ms": {k: [1e3 * v for v in values] for k, values in cpu.items()}}
        result["ratio_now_over_before"] = result["cpu_ms_per_image_now"] / result["cpu_ms_per_image_before"]
        line = (f"bench_loader: CPU per training image at {args.resolution} px "
                f"{'without' if args.no_latents else 'with'} cached latents: "
                f"{result['cpu_ms_per_image_before']:.1f} ms before, {result['cpu_ms_per_image_now']:.1f} ms now "
                f"(ratio {result['ratio_now_over_before']:.2f})")
        if args.s3:
            sys.path.insert(0, str(REPO))
            import s3fs

            from tests.object_store import start_moto, stop

            process, endpoint = start_moto(tmp / "moto.log")
            try:
                options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
                fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
                fs.mkdir("bench")
                fs.put(f"{folder}/", "s3://bench/data", recursive=True)
                wall: dict[str, list[float]] = {"local": [], "s3": []}
                for _ in range(args.repeats):
                    wall["local"].append(run(loader_now, str(folder))[1])
                    wall["s3"].append(run(loader_now, "s3://bench/data", options)[1])
            finally:
                stop(process)
            result.update({"wall_ms_per_image_local": 1e3 * statistics.median(wall["local"]),
                           "wall_ms_per_image_s3_loopback": 1e3 * statistics.median(wall["s3"])})
            result["s3_over_local"] = result["wall_ms_per_image_s3_loopback"] / result["wall_ms_per_image_local"]
            line += (f"; wall per image local {result['wall_ms_per_image_local']:.1f} ms, S3 on loopback "
                     f"{result['wall_ms_per_image_s3_loopback']:.1f} ms (ratio {result['s3_over_local']:.2f})")
    print(line)
    from benchmarks.report import write_result

    name = ("bench_loader" + ("_pixels" if args.no_latents else "") + ("" if args.resolution == 512 else f"_{args.resolution}")
            + ("_s3" if args.s3 else ""))
    write_result(name, result)


if __name__ == "__main__":
    main()

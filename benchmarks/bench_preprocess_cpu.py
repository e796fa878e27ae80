"""Preprocessing CPU per image, stage by stage: this tree against another revision, side by side.

    python -m benchmarks.bench_preprocess_cpu [--against REVISION] [--images 6] [--rounds 2]

Both trees run the per-model stages exactly as the job chains them (``load_batch`` -> one ``ModelStage``
per model -> ``write_batch``: the group travelling between them as the same rows), in one process each,
on the same inputs: scikit-image photos upscaled to 2 MP (1632 x 1224) and 12 MP (4000 x 3000) JPEGs with
captions (an img2dataset shard), with the production image and crop settings (long side 1024, 224 px
crops) and the tiny Grounding DINO and SAM twins (their processors at the real sizes: Grounding DINO's
800 / 1333). One thread per process; CPU time is the process's (``time.process_time``) per stage call,
minus the time spent inside model forwards (a module-level forward hook: that is accelerator work in
production, and tiny random models would only blur the comparison). What is left is what the CPUs of a
production job pay per image: decoding, validation, resizing, processors, crops, encoding, staging.
Counted in both trees alike, though on a GPU it is a caching-allocator step: freeing a forward's outputs
after it returns (here, unmapping the tiny Grounding DINO's encoder class logits, 67 MB per image: about
12 ms per image in ``detect``). SAM's processor runs at the tiny twin's 64 px input; its masks are
upsampled to the image at the real size. The "detect processor" row times
Grounding DINO's image inputs apart: the processor's call (text included) in a tree without the
detector's own ``_image_inputs``, that method where it exists.

``--against`` (default: where this branch left main, ``git merge-base HEAD main``): the other tree is exported with ``git archive``; rounds alternate which
tree runs first. Writes results/bench_preprocess_cpu.json (per stage and size: ms per image, before/after,
and the samples each run wrote: the tiny random models react to pixel-level changes, so counts may differ).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import export_tree, write_result

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"2MP": (1632, 1224), "12MP": (4000, 3000)}

# Runs inside either tree (only APIs both have), one size per run; prints per-stage CPU seconds as JSON.
_CHILD = r"""
import json, sys, tempfile, time
import torch
torch.set_num_threads(1)
import pandas as pd
from mmdiff.configuration import load_config
from pipeline.config import PreprocessConfig
from pipeline.inputs import assign_partitions, list_inputs
from pipeline.preprocess import fixed_batches
from pipeline.stages import ModelStage, load_batch, model_steps, write_batch

inputs, out = sys.argv[1], sys.argv[2]
config = load_config("configs/preprocess/test_tiny.yaml", PreprocessConfig, {
    "input.path": inputs, "output.path": out, "output.shard_size": 1000, "image.max_side": 1024,
    "image.min_side": 256, "annotate.crops.size": 224, "stages.annotate.batch_size": 4,
    "stages.detect.batch_size": 4, "stages.segment.batch_size": 4})
stages = {name: ModelStage(config, name) for name in model_steps(config)}
from transformers.image_utils import SizeDict
stages["detect"].step.operator.model.processor.image_processor.size = SizeDict(shortest_edge=800, longest_edge=1333)

inside = {"depth": 0, "start": 0.0, "total": 0.0}
def pre(module, args):
    if inside["depth"] == 0:
        inside["start"] = time.process_time()
    inside["depth"] += 1
def post(module, args, output):
    inside["depth"] -= 1
    if inside["depth"] == 0:
        inside["total"] += time.process_time() - inside["start"]
torch.nn.modules.module.register_module_forward_pre_hook(pre)
torch.nn.modules.module.register_module_forward_hook(post)

# Grounding DINO's image inputs (resize, normalise, pad): its processor's call before (text included, on the
# host in production); after, the detector's own ``_image_inputs`` on the model's device (here the CPU, so
# counted in detect, and reported apart: in production that part runs on the accelerator).
from preprocess.detect import Detector
owner = Detector if hasattr(Detector, "_image_inputs") else type(stages["detect"].step.operator.model.processor)
method = "_image_inputs" if owner is Detector else "__call__"
processor_call, processor_s = getattr(owner, method), [0.0]
def timed_processor(self, *args, **kwargs):
    start = time.process_time()
    try:
        return processor_call(self, *args, **kwargs)
    finally:
        processor_s[0] += time.process_time() - start
setattr(owner, method, timed_processor)

records = [r for r in assign_partitions(list_inputs(config.input).inputs, config.output.shard_size) if not r.reason]
rows = fixed_batches(records, config.stages.annotate.batch_size)
cpu = {name: 0.0 for name in ["load", *stages, "write"]}
forward = dict.fromkeys(cpu, 0.0)
written = 0

def timed(name, call, batch):
    before, inner = time.process_time(), inside["total"]
    result = call(batch)
    forward[name] += inside["total"] - inner
    cpu[name] += time.process_time() - before - (inside["total"] - inner)
    return result

for row in rows:
    batch = timed("load", lambda b: load_batch(b, config.image, None), pd.DataFrame([row]))
    for name, stage in stages.items():
        batch = timed(name, stage, batch)
    result = timed("write", lambda b: write_batch(b, config, "bench"), batch)
    written += int((result["status"] == "ok").sum())
print("RESULT " + json.dumps({"images": len(records), "written": written, "cpu_s": cpu, "forward_s": forward,
                              "detect_processor_s": processor_s[0]}))
"""


def write_inputs(folder: Path, size: tuple[int, int], images: int) -> Path:
    """An img2dataset shard of ``images`` photos (cycling through the sample photos) at ``size``."""
    import io

    import webdataset as wds
    from PIL import Image

    from pipeline.example_inputs import CAPTIONS, PHOTOS, photo

    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "shard.tar"), encoder=False, mtime=0) as writer:
        for index in range(images):
            name = PHOTOS[index % len(PHOTOS)]
            image = photo(name).convert("RGB").resize(size, Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=92)
            writer.write({"__key__": f"{index:09d}", "jpg": buffer.getvalue(), "txt": CAPTIONS[name].encode(),
                          "json": json.dumps({"name": name}).encode()})
    return folder


def run_tree(tree: Path, inputs: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _CHILD, str(inputs), str(out)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=3600)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{tree} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return json.loads(line[7:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=None, metavar="REVISION",
                        help="the tree to compare with (default: where this branch left main, git merge-base HEAD main)")
    parser.add_argument("--images", type=int, default=6, help="images per size")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (median taken)")
    args = parser.parse_args(argv)
    against = args.against or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True,
                                             capture_output=True, text=True).stdout.strip()
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", against], check=True,
                              capture_output=True, text=True).stdout.strip()
    current = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
    per_image: dict[str, dict[str, dict[str, list[float]]]] = {}
    samples: dict[str, dict[str, list[int]]] = {}  # written per run: the random tiny models react to pixels
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = export_tree(ROOT, revision, tmp / "baseline")
        trees = [("before", baseline), ("after", ROOT)]
        for label, size in SIZES.items():
            inputs = write_inputs(tmp / f"in-{label}", size, args.images)
            written = {}
            for round_index in range(args.rounds):
                for name, tree in trees if round_index % 2 == 0 else trees[::-1]:
                    result = run_tree(tree, inputs, tmp / f"out-{label}-{name}-{round_index}")
                    written.setdefault(name, []).append(result["written"])
                    for stage, seconds in {**result["cpu_s"], "detect processor": result["detect_processor_s"]}.items():
                        per_image.setdefault(label, {}).setdefault(stage, {"before": [], "after": []})[name].append(
                            1000 * seconds / result["images"])
                    print(f"  {label} {name} round {round_index}: " + ", ".join(
                        f"{s} {1000 * v / result['images']:.1f}" for s, v in result["cpu_s"].items()) + " ms/img",
                          flush=True)
            samples[label] = written
    table = {label: {stage: {k: statistics.median(v) for k, v in runs.items()} for stage, runs in stages.items()}
             for label, stages in per_image.items()}
    for stages in table.values():
        processor = stages.pop("detect processor")
        stages["total"] = {k: sum(s[k] for s in stages.values()) for k in ("before", "after")}
        stages["detect processor"] = processor
        # before, the processor ran on the host in production too; after, on the model's device
        stages["total on host"] = {"before": stages["total"]["before"],
                                   "after": stages["total"]["after"] - processor["after"]}
        for row in stages.values():
            row["ratio"] = row["after"] / row["before"] if row["before"] else float("nan")
    print(f"bench_preprocess_cpu: CPU ms per image outside model forwards, {args.images} images per size, median "
          f"of {args.rounds} rounds; before = {revision}, after = {current} (+ working tree changes)")
    print(f"{'size':6} {'stage':16} {'before':>8} {'after':>8} {'ratio':>6}")
    for label, stages in table.items():
        for stage, row in stages.items():
            print(f"{label:6} {stage:16} {row['before']:8.1f} {row['after']:8.1f} {row['ratio']:6.2f}")
    print(f"samples written per run (tiny random models): {samples}")
    write_result("bench_preprocess_cpu", {"before_revision": revision, "after_revision": current,
                                          "images_per_size": args.images, "rounds": args.rounds, "threads": 1,
                                          "device": "cpu", "ms_per_image": table,
                                          "samples_written": samples})


if __name__ == "__main__":
    main()

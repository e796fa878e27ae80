"""The job's stages in process (no Ray): per-model stages and the fused actor stage the same bytes, what
travels between stages, and an exception in one model step rejecting only its input, naming the step.
The same chain as a Ray job: tests/test_pipeline_stages_job.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmdiff.configuration import load_config
from pipeline.config import PreprocessConfig
from pipeline.example_inputs import PHOTOS, write_photos
from pipeline.stages import (GROUP_COLUMNS, RECORD_FIELDS, RESULT_COLUMNS, ModelStage, SampleStage, content_batching,
                             load_batch, model_steps, write_batch)
from preprocess.annotate import Annotation, Rejection, SegmentStep, run_step
from preprocess.image_io import load_image
from preprocess.sample import encode_jpeg

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "preprocess"

pytestmark = pytest.mark.usefixtures("single_thread")


def demo_config(out: Path, **overrides) -> PreprocessConfig:
    """All four tiny models; micro-batches of 2 inside groups of 4, so a group runs in two batches."""
    return load_config(CONFIGS / "demo.yaml", PreprocessConfig, {
        "output.path": str(out), "stages.caption.batch_size": 2, "stages.detect.batch_size": 3,
        "stages.segment.batch_size": 2, "stages.faces.batch_size": 2, **overrides})


def group_rows(folder: Path, group: int = 4) -> pd.DataFrame:
    """Source rows as the driver builds them (contract 1): fixed groups of one partition, key order."""
    paths = write_photos(folder)
    (folder / "broken.jpg").write_bytes(b"not an image")  # a load reject inside a group
    paths = sorted([*paths, folder / "broken.jpg"])
    records = [{"key": p.stem, "source": p.name, "path": str(p), "offset": -1, "size": -1,
                "caption": "a woman in a space suit" if p.stem == "astronaut" else "", "annotation": "", "partition": 0}
               for p in paths]
    assert set(records[0]) == set(RECORD_FIELDS)
    return pd.DataFrame([{"batch": f"0:{chunk[0]['key']}", "partition": 0, "inputs": json.dumps(chunk)}
                         for chunk in (records[i : i + group] for i in range(0, len(records), group))])


def output_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def per_model(config: PreprocessConfig, rows: pd.DataFrame) -> pd.DataFrame:
    groups = load_batch(rows, config.image)
    for name in model_steps(config):
        stage = ModelStage(config, name)
        groups = pd.concat([stage(groups.iloc[[i]]) for i in range(len(groups))])  # one group per call, as in Ray
    return pd.concat([write_batch(groups.iloc[[i]], config, "hash") for i in range(len(groups))])


def fused(config: PreprocessConfig, rows: pd.DataFrame) -> pd.DataFrame:
    stage, groups = SampleStage(config, "hash"), load_batch(rows, config.image)
    return pd.concat([stage(groups.iloc[[i]]) for i in range(len(groups))])


@pytest.fixture(scope="module")
def photos_rows(tmp_path_factory):
    return group_rows(tmp_path_factory.mktemp("photos"))


def test_groups_carry_the_jpeg_the_shard_stores(photos_rows, tmp_path):
    config = demo_config(tmp_path / "out")
    groups = load_batch(photos_rows, config.image)
    assert list(groups.columns) == GROUP_COLUMNS and len(groups) == 2
    inputs = [fields for row in groups["inputs"] for fields in json.loads(row)]
    images = [bytes(b) for row in groups["images"] for b in row]
    pixels = [bytes(b) for row in groups["pixels"] for b in row]
    assert [f["key"] for f in inputs] == sorted([*PHOTOS, "broken"])
    for fields, jpeg, rgb in zip(inputs, images, pixels):
        if fields["key"] == "broken":
            assert fields["status"] == "rejected" and fields["reason"] == "not_an_image" and jpeg == rgb == b""
            continue
        loaded = load_image(Path(fields["path"]).read_bytes(), fields["source"], config.image).image
        # exactly the bytes Sample.to_wds stores for the loaded image
        assert jpeg == encode_jpeg(loaded) and len(jpeg) < 3 * loaded.width * loaded.height / 4
        # and that JPEG decoded once, for every later stage: the pixels the shard stores
        decoded = Image.open(io.BytesIO(jpeg))
        assert decoded.size == (fields["width"], fields["height"]) and rgb == decoded.convert("RGB").tobytes()
    results = per_model(config, photos_rows)
    shard_jpgs = {}
    for path in (tmp_path / "out").rglob("*.tar"):
        with tarfile.open(path) as tar:
            shard_jpgs.update({m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")})
    assert shard_jpgs and all(shard_jpgs[f["key"]] == jpeg for f, jpeg in zip(inputs, images) if f["key"] in shard_jpgs)
    assert list(results.columns) == RESULT_COLUMNS and sorted(results["key"]) == sorted([*PHOTOS, "broken"])


def test_per_model_stages_and_fused_actor_stage_the_same_bytes(photos_rows, tmp_path):
    config = demo_config(tmp_path / "per_model")
    assert model_steps(config) == ["caption", "detect", "segment", "faces"]
    separate = per_model(config, photos_rows)
    together = fused(demo_config(tmp_path / "fused"), photos_rows)
    assert separate.sort_values("key").to_dict("records") == together.sort_values("key").to_dict("records")
    staged = output_files(tmp_path / "per_model")
    assert staged and staged == output_files(tmp_path / "fused")
    statuses = dict(zip(separate["key"], separate["status"]))
    assert statuses["broken"] == "rejected" and "ok" in statuses.values()
    # the micro-batch sizes decide bytes (batched inference is not bit-exact), so they are in the job hash
    assert content_batching(config) == {"annotate": 4, "caption": 2, "detect": 3, "segment": 2, "faces": 2}
    assert content_batching(demo_config(tmp_path, **{"stages.segment.batch_size": 16}))["segment"] == 4  # capped


class FaultySegmentStep(SegmentStep):
    """SAM, except that it raises on any batch holding the input keyed ``bad``."""

    def __call__(self, items: list[Annotation]) -> None:
        if any(item.key == "bad" for item in items):
            raise RuntimeError("injected failure")
        super().__call__(items)


def test_an_exception_in_one_step_rejects_only_its_input_naming_the_step(tmp_path):
    config = demo_config(tmp_path)
    step = FaultySegmentStep(config.annotate)
    image = Image.open(io.BytesIO(encode_jpeg(Image.new("RGB", (64, 48), (90, 120, 200)))))

    def items() -> list[Annotation]:
        from preprocess.filters import Kept
        from preprocess.phrases import extract_phrases

        (phrase,) = extract_phrases("a cat")
        return [Annotation(key, image.copy(), "a cat", [Kept(phrase, (4.0, 4.0, 40.0, 30.0), 0.9)])
                for key in ("a", "bad", "c")]

    clean = items()
    run_step(SegmentStep(config.annotate), [clean[0], clean[2]], 1)
    faulty = items()
    run_step(step, faulty, 2, lambda item, name, exc: Rejection("annotate_error", f"{item.key}: stage {name}: {exc}"))
    assert faulty[1].rejection == Rejection("annotate_error", "bad: stage segment: injected failure")
    for good, expected in zip((faulty[0], faulty[2]), (clean[0], clean[2])):
        assert good.rejection is None or good.rejection == expected.rejection
        if expected.masks is not None:
            np.testing.assert_array_equal(good.masks, expected.masks)
    with pytest.raises(RuntimeError, match="injected failure"):  # without on_error (in process) it propagates
        run_step(step, items(), 2)

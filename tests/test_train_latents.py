"""Cached VAE latents (train/latents.py): written beside the shards for the base model's VAE and a set of
resolutions, used by training when present, the VAE otherwise; the same loss either way."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from mmdiff.configuration import load_config
from test_train_data import write_shards
from train.config import TrainConfig
from train.data import BatchBuilder, ShardStream
from train.latents import cache_latents, latent_dir, main
from train.run import build_model

SIZES = [(64, 64), (40, 100), (100, 40)]


def test_cached_latents_give_the_same_loss_as_the_vae(tmp_path, single_thread):
    shards = write_shards(tmp_path / "data", num_samples=6, per_shard=3, sizes=SIZES)
    overrides = {"data.shards": str(shards), "data.aspect_buckets": True, "data.bucket_step": 16,
                 "data.text_dropout": 0.0, "data.subject_dropout": 0.0}
    config = load_config("configs/train/tiny_test.yaml", TrainConfig, overrides)
    summary = cache_latents(config, resolutions=[64, 32])
    assert (summary["samples"], summary["latents"]) == (6, 12)  # every sample at both resolutions
    folder = latent_dir(shards, config.model.base)
    assert [p.name for p in folder.glob("*.tar")] == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads((folder / "latents.json").read_text())["resolutions"] == [64, 32]

    model = build_model(config)

    def batches(cached: bool, count: int = 3) -> list[dict]:
        data = config.data.model_copy(update={"cached_latents": cached})
        builder = BatchBuilder(data, model.tokenizers, model.image_processor)
        return list(itertools.islice(iter(ShardStream(shards, data, builder, seed=3, base=config.model.base)), count))

    with_cache, without = batches(True), batches(False)
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)  # the VAE's downsampling
    shapes = set()
    for cached, plain in zip(with_cache, without):
        assert cached["key"] == plain["key"] and "latent_parameters" not in plain
        params = cached["latent_parameters"]
        assert "pixel_values" not in cached  # the images were never decoded
        h, w = plain["pixel_values"].shape[-2:]
        assert params.shape == (len(cached["key"]), 8, h // factor, w // factor)  # mean and log-variance, 4 channels each
        shapes.add((h, w))
        losses = []
        for batch in (cached, plain):
            torch.manual_seed(11)  # the same noise, timesteps and posterior sample
            with torch.no_grad():
                losses.append(model.training_loss({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}))
        for name in ("loss", "denoise_loss", "attention_loss"):  # float16 storage: close, not bitwise
            assert float(losses[0][name]) == pytest.approx(float(losses[1][name]), rel=2e-3, abs=1e-5), name
    assert len(shapes) >= 2  # non-square buckets were cached and found

    # a sample without cached latents (another VAE, or added later) is encoded by the VAE instead
    other = config.model.base.model_copy(update={"seed": 1})
    data = config.data.model_copy(update={"cached_latents": True})
    batch = next(iter(ShardStream(shards, data, BatchBuilder(data, model.tokenizers, model.image_processor),
                                  seed=3, base=other)))
    assert "latent_parameters" not in batch


def test_cached_latents_job_reports_config_errors(tmp_path, capsys):
    assert main(["--config", "configs/train/tiny_test.yaml", "--set", f"data.shards={tmp_path}"]) == 2
    assert "no shards/*.tar" in capsys.readouterr().err


def test_batched_latents_equal_per_image_encoding_resume_and_account_for_every_sample(tmp_path, single_thread):
    import io
    import tarfile

    import numpy as np

    from mmdiff import zoo
    from preprocess.sample import Sample
    from test_train_data import write_index
    from train.latents import LatentSidecar, _crops
    from train.shards import Dataset, read_samples

    shards = write_shards(tmp_path / "data", num_samples=7, per_shard=4, sizes=SIZES)
    shard = shards / "shards" / "shard-000001.tar"  # one sample that cannot be decoded: counted, not cached
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            payload = b"not a jpeg" if info.name == "000005.jpg" else payload
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    write_index(shard, ["000004", "000005", "000006"])
    config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
        "data.shards": str(shards), "data.aspect_buckets": True, "data.bucket_step": 16})
    summary = cache_latents(config, resolutions=[64], batch_size=3)
    assert (summary["samples"], summary["unreadable"], summary["skipped_shards"]) == (6, 1, {})
    folder = latent_dir(shards, config.model.base)

    vae = zoo.build(config.model.base).vae.eval()
    layouts = [BatchBuilder(config.data, [], None)]

    def compare(tolerance: float) -> None:
        for info in Dataset.open(str(shards)).shards:
            sidecar = LatentSidecar(folder / info.name)
            for raw in read_samples(info):
                try:
                    sample = Sample.from_wds(raw.wds(""))
                except ValueError:
                    assert not sidecar.find(raw.key)  # the unreadable sample has none
                    continue
                [(bucket, pixels)] = _crops(layouts, sample.image)
                with torch.no_grad():  # one image at a time, float32: the reference
                    expected = vae.encode(pixels[None]).latent_dist.parameters[0].numpy()
                cached = np.load(io.BytesIO(sidecar.find(raw.key)[f"latent:{bucket[0]}x{bucket[1]}.npy"]))
                assert cached.dtype == np.float16 and cached.shape == expected.shape
                scale = float(np.abs(expected).max())
                assert np.abs(cached.astype(np.float32) - expected).max() <= tolerance * scale, (raw.key, tolerance)

    compare(2e-3)  # float32 batches of 3 against single images: float16 storage only
    here = Path(folder.path)
    stamps = {p.name: p.stat().st_mtime_ns for p in here.glob("*.tar*")}
    assert cache_latents(config, resolutions=[64], batch_size=3)["samples"] == 6  # resumed: nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in here.glob("*.tar*")} == stamps and len(stamps) == 4
    for counts in here.glob("*.counts.json"):  # again in bfloat16, the accelerator default
        counts.unlink()
    assert cache_latents(config, resolutions=[64], batch_size=3, dtype="bfloat16")["compute_dtype"] == "bfloat16"
    compare(3e-2)

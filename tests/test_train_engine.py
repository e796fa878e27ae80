"""The training step in-process (1 CPU rank, real DeepSpeed engine, tiny model): non-finite losses,
gradient checkpointing."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

from mmdiff.configuration import load_config  # noqa: E402
from test_train_data import write_shards  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import BatchBuilder, ShardStream  # noqa: E402
from train.engine import NonFiniteLossError, Trainer, TrainerState  # noqa: E402
from train.run import build_model, make_engine  # noqa: E402


@pytest.fixture(scope="module")
def single_rank():
    """One gloo process group for the module (DeepSpeed keeps its groups for the process's lifetime)."""
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}.items():
            patch.setenv(name, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        dist.destroy_process_group()


def test_nonfinite_losses_skip_the_step_and_stop_the_run_after_too_many(tmp_path, single_rank):
    shards = write_shards(tmp_path / "data", num_samples=4, per_shard=4)
    config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
        "output_dir": str(tmp_path / "run"), "data.shards": str(shards), "schedule.max_nonfinite_in_row": 2,
        "schedule.max_steps": 10})
    (tmp_path / "run").mkdir()
    model = build_model(config)
    engine = make_engine(config, model)
    stream = ShardStream(shards, config.data, BatchBuilder(config.data, model.tokenizers, model.image_processor), 0)
    good = list(itertools.islice(iter(stream), 3))
    poisoned = {**good[1], "pixel_values": torch.full_like(good[1]["pixel_values"], float("nan"))}
    trainer = Trainer(config, engine, TrainerState())
    weights = lambda: [p.detach().clone() for p in model.trainable_parameters()]  # noqa: E731

    assert trainer.micro_step(good[0]) is not None
    before = weights()
    assert trainer.micro_step(poisoned) is None  # skipped: no update, counted
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))
    assert (trainer.state.nonfinite_total, trainer.state.nonfinite_in_row) == (1, 1)
    metrics = trainer.micro_step(good[2])  # a finite loss resets the run of non-finite ones
    assert metrics is not None and torch.isfinite(torch.tensor(metrics["loss"]))
    assert trainer.state.nonfinite_in_row == 0 and not all(torch.equal(a, b) for a, b in zip(before, weights()))
    assert trainer.micro_step(poisoned) is None
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        trainer.micro_step(poisoned)
    assert trainer.state.nonfinite_total == 3 and trainer.state.micro_batches == 5


def test_gradient_checkpointing_from_config_recomputes_and_gives_the_same_steps(tmp_path, single_rank):
    shards = write_shards(tmp_path / "data", num_samples=4, per_shard=4)
    results = {}
    for checkpointing in (False, True):
        config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
            "output_dir": str(tmp_path / "run"), "data.shards": str(shards), "optim.lr_warmup_steps": 0,
            "model.gradient_checkpointing": checkpointing})
        model = build_model(config)
        assert model.unet.is_gradient_checkpointing == checkpointing
        engine = make_engine(config, model)
        stream = ShardStream(shards, config.data, BatchBuilder(config.data, model.tokenizers, model.image_processor), 0)
        block = model.unet.down_blocks[0].attentions[0].transformer_blocks[0]
        calls = []
        hook = block.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))  # recompute may stop early
        trainer = Trainer(config, engine, TrainerState())
        losses = [trainer.micro_step(batch)["loss"] for batch in itertools.islice(iter(stream), 2)]
        hook.remove()
        results[checkpointing] = (losses, [p.detach().clone() for p in model.trainable_parameters()], len(calls))
    (plain_losses, plain_weights, plain_calls), (losses, weights, calls) = results[False], results[True]
    assert calls == 2 * plain_calls  # the block ran again in backward: activations were recomputed
    assert losses == pytest.approx(plain_losses, rel=1e-5)  # the second loss already follows an update
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(weights, plain_weights))

"""The training step in-process (1 CPU rank, real DeepSpeed engine, tiny model): non-finite losses skipped
on the device, the step's device placement and its one device-to-host read per step, gradient checkpointing."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

from mmdiff.configuration import load_config  # noqa: E402
from test_train_data import write_shards  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import BatchBuilder, ShardStream  # noqa: E402
from train.engine import NonFiniteLossError, SkippableAdamW, Trainer, TrainerState  # noqa: E402
from train.run import build_model, make_engine  # noqa: E402


@pytest.fixture(scope="module")
def single_rank():
    """One gloo process group for the module, torn down through DeepSpeed so that it forgets its cached
    groups too (a later engine in the same process would otherwise use the destroyed ones)."""
    from benchmarks.reproduce import single_rank as one_rank_group

    with one_rank_group():
        yield


@pytest.fixture(scope="module")
def zero0_engine(tmp_path_factory, single_rank):
    """Shards, model and engine shared by the tests of the loop: ZeRO-0 without clipping, so DeepSpeed's
    own gradient checks are off and only the trainer's skip stands between a NaN and the weights."""
    shards = write_shards(tmp_path_factory.mktemp("data"), num_samples=4, per_shard=4)
    config = _config(tmp_path_factory.mktemp("run"), shards)
    model = build_model(config)
    return shards, model, make_engine(config, model)


def _config(output_dir, shards, **overrides) -> TrainConfig:
    return load_config("configs/train/tiny_test.yaml", TrainConfig, {
        "output_dir": str(output_dir), "data.shards": str(shards), "deepspeed.zero_stage": 0,
        "optim.max_grad_norm": 0.0, **overrides})


def _stream(config, model):
    return iter(ShardStream(config.data.shards, config.data, BatchBuilder(config.data, model.tokenizers, model.image_processor), 0))


def test_nonfinite_losses_skip_the_step_on_device_and_stop_the_run_after_too_many(tmp_path, zero0_engine):
    shards, model, engine = zero0_engine
    config = _config(tmp_path, shards, **{"schedule.max_nonfinite_in_row": 2, "schedule.max_steps": 10})
    good = list(itertools.islice(_stream(config, model), 3))
    poisoned = {**good[1], "pixel_values": torch.full_like(good[1]["pixel_values"], float("nan"))}
    trainer = Trainer(config, engine, TrainerState())
    optimizer = engine.client_optimizer
    weights = lambda: [p.detach().clone() for p in model.trainable_parameters()]  # noqa: E731
    moments = lambda: [v.clone() for st in optimizer.state.values() for v in st.values()]  # noqa: E731

    assert trainer.advance(good[0], 0.0) and trainer.state.step == 1
    before, moments_before = weights(), moments()
    assert not trainer.advance(poisoned, 0.0)  # skipped on the device: no update, no step, counted
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))
    assert all(torch.equal(a, b) for a, b in zip(moments_before, moments()))  # moments and step counts too
    assert (trainer.state.step, trainer.state.nonfinite_total, trainer.state.nonfinite_in_row) == (1, 1, 1)
    assert trainer.advance(good[2], 0.0)  # a finite loss resets the run of non-finite ones
    assert trainer.state.nonfinite_in_row == 0 and not all(torch.equal(a, b) for a, b in zip(before, weights()))
    assert not trainer.advance(poisoned, 0.0)
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        trainer.advance(poisoned, 0.0)
    assert trainer.state.nonfinite_total == 3 and trainer.state.micro_batches == 5
    rows = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


def test_skippable_adamw_leaves_weights_and_state_alone_when_told_to_skip():
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = SkippableAdamW([weight], lr=0.1, weight_decay=0.1)
    weight.grad = torch.ones(4)
    optimizer.skip_step_if(torch.zeros(()))
    optimizer.step()
    applied, state = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    assert not torch.equal(applied, torch.ones(4)) and state["step"].item() == 1
    weight.grad = torch.full((4,), float("nan"))
    optimizer.skip_step_if(torch.ones(()))
    optimizer.step()
    assert torch.equal(weight.detach(), applied)
    assert all(torch.equal(v, state[k]) for k, v in optimizer.state[weight].items())


class _ShapeOnlyEngine:
    """A DeepSpeed engine stand-in whose device is "meta": any tensor the trainer makes anywhere else
    (a CPU tensor where a GPU run needs a CUDA one) shows up as a device mismatch."""

    device = torch.device("meta")

    def __init__(self):
        self.module = torch.nn.Linear(2, 2, device="meta")
        self.client_optimizer = SkippableAdamW([torch.nn.Parameter(torch.zeros(1))])
        self.micro_steps, self.calls = 0, []

    def __call__(self, batch, return_attention_maps=True):
        assert all(v.device == self.device for v in batch.values() if isinstance(v, torch.Tensor))
        self.calls.append(return_attention_maps)
        loss = torch.zeros((), device=self.device)
        losses = {"loss": loss, "denoise_loss": loss, "inside_share/down": loss}
        return losses | ({"attention_maps": torch.zeros(2, 2, 8, 8, device=self.device)} if return_attention_maps else {})

    def backward(self, loss):
        assert loss.device == self.device

    def is_gradient_accumulation_boundary(self):
        return self.micro_steps % 2 == 1

    def get_lr(self):
        return [0.0]

    def step(self):
        if self.is_gradient_accumulation_boundary():
            assert self.client_optimizer.found_inf.device == self.device
        self.micro_steps += 1


def test_every_collective_and_device_value_of_the_step_is_on_the_engine_device(tmp_path, single_rank, monkeypatch):
    """The step's flags and metrics are made, reduced and handed to the optimizer on ``engine.device``
    and read back once per step through ``host_values``; attention maps are asked for on sample steps only."""
    import torch.distributed as dist

    import train.engine

    config = load_config("configs/train/tiny_test.yaml", TrainConfig, {
        "output_dir": str(tmp_path), "data.shards": str(tmp_path), "schedule.sample_every": 2})
    engine = _ShapeOnlyEngine()
    collectives, reads = [], []
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter_tensor"):
        def check(tensor, *args, _name=name, **kwargs):
            tensors = tensor if isinstance(tensor, list) else [tensor]
            assert all(t.device == engine.device for t in tensors), f"{_name} on {[t.device for t in tensors]}"
            collectives.append(_name)  # (gloo cannot reduce shape-only tensors: checked, not run)
        monkeypatch.setattr(dist, name, check)

    def read(values):
        assert values.device == engine.device
        reads.append(values.shape)
        return [0.0] * values.numel()

    monkeypatch.setattr(train.engine, "host_values", read)
    samples = []
    trainer = Trainer(config, engine, TrainerState(), on_sample=lambda step, batch, maps: samples.append(step))
    batch = {"pixel_values": torch.zeros(2, 3, 8, 8), "input_ids": torch.zeros(2, 4, dtype=torch.long),
             "reader": {"worker": 0}, "rejected": []}
    closed = [trainer.advance(batch, 0.0) for _ in range(8)]
    assert closed == [False, True] * 4 and trainer.state.step == 4
    assert collectives == ["all_reduce"] * 4 and len(reads) == 4  # one collective and one read per step
    assert engine.calls == [False, False, False, True] * 2  # maps only for the last micro-batch of steps 2, 4


def test_the_loop_reads_the_device_once_per_step(tmp_path, zero0_engine, monkeypatch):
    """Trainer.run over real micro-batches: the only device-to-host reads train/engine.py makes are the
    ones through ``host_values``, one per step; attention maps are made on sample steps only."""
    import train.engine

    shards, model, engine = zero0_engine
    config = _config(tmp_path, shards, **{"schedule.max_steps": 3, "schedule.sample_every": 2})
    reads, elsewhere, asked = [], [], []
    real_read = train.engine.host_values
    monkeypatch.setattr(train.engine, "host_values", lambda values: reads.append(1) or real_read(values))
    loss = model.training_loss
    monkeypatch.setattr(model, "training_loss", lambda batch, **kw: asked.append(kw["return_attention_maps"]) or loss(batch, **kw))
    def counted(name, real):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename == train.engine.__file__ and caller.co_name != "host_values":
                elsewhere.append((name, caller.co_name))
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))

    samples = []
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: None)  # not what this test is about
    trainer = Trainer(config, engine, TrainerState(), on_sample=lambda step, batch, maps: samples.append((step, maps.shape)))
    trainer.run(_stream(config, model))
    assert trainer.state.step == 3 and len(reads) == 3 and elsewhere == []
    assert asked == [False, True, True]  # steps 2 (sample_every) and 3 (the last)
    assert [s for s, _ in samples] == [2, 3] and samples[0][1][:2] == (2, 2)


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
        losses = [trainer.micro_step(batch)["loss"].item() for batch in itertools.islice(iter(stream), 2)]
        hook.remove()
        results[checkpointing] = (losses, [p.detach().clone() for p in model.trainable_parameters()], len(calls))
    (plain_losses, plain_weights, plain_calls), (losses, weights, calls) = results[False], results[True]
    assert calls == 2 * plain_calls  # the block ran again in backward: activations were recomputed
    assert losses == pytest.approx(plain_losses, rel=1e-5)  # the second loss already follows an update
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(weights, plain_weights))

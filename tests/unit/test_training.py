"""The one training loop (``train.loop``): resume, the NaN guard, TensorBoard; and that the VAE, the
memory and the benchmarks all train through it (the guard holds in each)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from frmdn_worldmodels.benchmarks.common import train_or_resume
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.io import load_checkpoint, read_jsonl
from frmdn_worldmodels.stages import train_vae
from frmdn_worldmodels.stages.train_memory import run as train_memory_run
from frmdn_worldmodels.train import loop as training
from frmdn_worldmodels.train.loop import LoopSettings, TrainingStopped, TrainTask


def _finite(payload) -> bool:
    if torch.is_tensor(payload):
        return not payload.is_floating_point() or bool(torch.isfinite(payload).all())
    if isinstance(payload, dict):
        return all(_finite(value) for value in payload.values())
    if isinstance(payload, list | tuple):
        return all(_finite(value) for value in payload)
    return True


class InfiniteGradient(torch.autograd.Function):
    """The identity whose gradient is infinite: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


class Toy:
    """y = 3x - 1 by a linear model; batches are a function of (epoch, index), and tests can poison steps."""

    def __init__(self, poison: dict[int, str] | None = None):
        self.poison = poison or {}
        self.calls = 0
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 1, generator=generator)
        self.y = 3 * self.x - 1

    def batches(self, epoch: int, start: int):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        for index in list(order.split(8))[start:]:
            yield self.x[index], self.y[index]

    def losses(self, model: nn.Module, batch):
        self.calls += 1
        x, y = batch
        loss = (model(x) - y).square().mean()
        kind = self.poison.get(self.calls)
        if kind == "loss":
            loss = loss * math.nan
        elif kind == "gradient":
            loss = InfiniteGradient.apply(loss)
        return {"loss": loss}, len(x)

    def task(self, out) -> TrainTask:
        def save_best(epoch, score):
            torch.save({"epoch": epoch}, out / "best.pt")

        return TrainTask(
            self.batches,
            8,
            self.losses,
            lambda model: {"loss": self.losses(model, (self.x, self.y))[0]["loss"].item()},
            "loss",
            save_best,
        )


class ExplodingSGD(torch.optim.SGD):
    """SGD that writes inf into the weights at its ``at``-th step (as an overflowing update would)."""

    def __init__(self, params, lr, at):
        super().__init__(params, lr=lr)
        self.at, self.steps = at, 0

    def step(self, closure=None):
        self.steps += 1
        super().step(closure)
        if self.steps == self.at:
            for group in self.param_groups:
                for param in group["params"]:
                    param.data.fill_(math.inf)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(1, 1)


def test_the_guard_skips_bad_losses_and_gradients_and_undoes_a_step_that_poisons_the_weights(tmp_path):
    toy = Toy(poison={3: "loss", 5: "gradient"})
    model = _model()
    optimizer = ExplodingSGD(model.parameters(), lr=0.1, at=5)  # its 5th step is the loop's 7th
    seen = {}
    original = training.guarded_step

    def watched(model, optimizer, losses, grad_clip, snapshot):
        before = [p.detach().clone() for p in model.parameters()]
        reason = original(model, optimizer, losses, grad_clip, snapshot)
        seen[toy.calls] = (reason, before, [p.detach().clone() for p in model.parameters()])
        return reason

    training.guarded_step, saved = watched, training.guarded_step
    try:
        result = training.train(
            model,
            optimizer,
            toy.task(tmp_path),
            LoopSettings(epochs=2, log_every=1, progress=False),
            tmp_path,
            {"toy": 1},
        )
    finally:
        training.guarded_step = saved
    skipped = [row for row in read_jsonl(tmp_path / "metrics.jsonl") if row["kind"] == "skipped"]
    assert [row["reason"] for row in skipped] == [
        "non-finite loss",
        "non-finite gradient",
        "non-finite parameters after the step",
    ]
    assert result.state["skipped_steps"] == 3
    for call, (reason, before, after) in seen.items():
        if reason is not None:  # a skipped or undone step leaves the weights exactly as they were
            for a, b in zip(before, after, strict=True):
                assert torch.equal(a, b), (call, reason)
    assert _finite(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert abs(model.weight.item() - 3) < 0.5  # and training went on


def test_a_kill_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    settings = LoopSettings(epochs=3, checkpoint_every=3, log_every=1, progress=False)

    def run(folder, stop=None):
        model = _model()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        toy = Toy()
        result = training.train(
            model, optimizer, toy.task(folder), settings, folder, {"toy": 1}, stop_after_steps=stop
        )
        return model, result, toy.calls

    reference, _, _ = run(tmp_path / "whole")
    with pytest.raises(TrainingStopped):
        run(tmp_path / "killed", stop=13)
    model, result, calls = run(tmp_path / "killed")
    assert result.resumed and result.state["global_step"] == 24
    assert (
        calls == 24 - 12 + 2
    )  # the 12 steps after the checkpoint at 12, and the validations of epochs 2 and 3
    steps = [
        row["step"] for row in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if row["kind"] == "train"
    ]
    assert steps == list(range(1, 25))  # the rows after the checkpoint were dropped, then written again
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # another fingerprint is not resumed
    other = training.train(
        _model(),
        torch.optim.Adam(_model().parameters()),
        Toy().task(tmp_path / "killed"),
        settings,
        tmp_path / "killed",
        {"toy": 2},
    )
    assert not other.resumed


def test_tensorboard_gets_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _model()
    training.train(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        Toy().task(tmp_path),
        LoopSettings(epochs=2, log_every=2, tensorboard=True, progress=False),
        tmp_path,
        {"toy": 1},
    )
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "epoch/train_loss", "epoch/val_loss"} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12, 14, 16]


# ------------------------------------------------------------------ the guard in each of the three loops


def _poison_every_other(function):
    """Wrap a loss function (returning the losses, or the losses and more) so that every second call with
    gradients enabled returns a NaN loss."""
    calls = []

    def poisoned(*args, **kwargs):
        result = function(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) % 2 == 0:
                losses, *rest = result if isinstance(result, tuple) else (result,)
                losses = {**losses, "loss": losses["loss"] * math.nan}
                result = (losses, *rest) if rest else losses
        return result

    return poisoned


def _check_guarded(folder, checkpoint_names):
    skipped = [row for row in read_jsonl(folder / "metrics.jsonl") if row["kind"] == "skipped"]
    assert skipped and all(row["reason"] == "non-finite loss" for row in skipped)
    for name in checkpoint_names:
        assert _finite(load_checkpoint(folder / name)), name


def test_the_vae_trains_through_the_guard(tmp_path, monkeypatch):
    from frmdn_worldmodels.runtime.paths import run_paths
    from tests.unit.test_vae import tiny_config, write_episodes

    cfg = tiny_config(tmp_path, "v", "vae.epochs=1")
    write_episodes(run_paths(cfg).episodes)
    monkeypatch.setattr(train_vae, "vae_loss", _poison_every_other(train_vae.vae_loss))
    summary = train_vae.run(cfg)
    assert summary["skipped_steps"] == summary["steps"] // 2
    _check_guarded(run_paths(cfg).vae, ["checkpoint.pt", "vae.pt"])


def test_the_memory_trains_through_the_guard(tiny_memory_run, monkeypatch):
    cfg = tiny_memory_run("m", "memory_train.epochs=1")
    poisoned = _poison_every_other(MemoryModel.sequence_loss_and_state)
    monkeypatch.setattr(MemoryModel, "sequence_loss_and_state", poisoned)
    summary = train_memory_run(cfg)
    assert summary["skipped_steps"] == summary["steps"] // 2 and np.isfinite(summary["test_nll_per_dim"])
    _check_guarded(cfg.run_dir / "memory", ["checkpoint.pt", "memory.pt"])


def test_the_benchmarks_train_through_the_guard(tmp_path):
    from frmdn_worldmodels.runtime.config import MemoryConfig

    torch.manual_seed(0)
    model = MemoryModel(
        3,
        0,
        MemoryConfig(hidden=8, components=2, rank=1, flow_hidden=8, predict_reward=False, predict_done=False),
    )
    sequences = torch.randn(16, 6, 3, generator=torch.Generator().manual_seed(0))
    loss = _poison_every_other(lambda m, b: {"loss": m.sequence_loss(b)["loss"]})
    result = train_or_resume(
        model,
        "m",
        tmp_path / "m",
        LoopSettings(epochs=2, grad_clip=1.0),
        1e-2,
        {"data": "toy"},
        lambda epoch: list(sequences.split(4)),
        4,
        lambda m, b: (loss(m, b)["loss"], len(b)),
        lambda m: -m.sequence_log_prob(sequences)[0].sum(1).mean().item(),
    )
    assert math.isfinite(result.best_val)
    _check_guarded(tmp_path / "m", ["checkpoint.pt", "best.pt"])

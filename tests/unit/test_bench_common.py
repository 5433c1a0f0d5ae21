"""The benchmarks' resumable training loop: an interrupted run, resumed, ends with the same weights as an
uninterrupted one; a finished run is not trained again."""

from __future__ import annotations

import pytest
import torch

from frmdn_worldmodels.benchmarks.common import benchmark_memory_config, model_label, train_or_resume
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.io import read_jsonl
from frmdn_worldmodels.train.loop import LoopSettings


class Interrupt(Exception):
    pass


def record_models(monkeypatch, module) -> list[MemoryModel]:
    """Every ``MemoryModel`` that ``module`` builds from now on, in order."""
    built = []

    class Recording(MemoryModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(module, "MemoryModel", Recording)
    return built


def fresh_model() -> MemoryModel:
    torch.manual_seed(0)
    return MemoryModel(4, 0, benchmark_memory_config("frmdn", 8, 2, 1, 1, 8))


def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(24, 6, 4, generator=generator).cumsum(1)


def train(tmp_path, name, epochs=4, interrupt_at=None):
    sequences = data()
    calls = {"batches": 0}

    def epoch_batches(epoch):
        order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(epoch))
        for index in order.split(8):
            if interrupt_at is not None and epoch == interrupt_at:
                raise Interrupt
            yield sequences[index]

    def batch_loss(model, batch):
        calls["batches"] += 1
        return model.sequence_loss(batch)["loss"], len(batch)

    def validate(model):
        return -model.sequence_log_prob(sequences)[0].sum(1).mean().item()

    model = fresh_model()
    result = train_or_resume(
        model,
        name,
        tmp_path / name,
        LoopSettings(epochs=epochs, grad_clip=1.0),
        1e-2,
        {"data": "toy"},
        epoch_batches,
        3,
        batch_loss,
        validate,
    )
    return model, result, calls["batches"]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    reference, reference_result, _ = train(tmp_path, "straight")
    with pytest.raises(Interrupt):
        train(tmp_path, "resumed", interrupt_at=2)
    model, result, batches = train(tmp_path, "resumed")
    assert result.resumed and batches == 2 * 3  # only epochs 3 and 4 were trained after the restart
    epochs = [
        row["epoch"] for row in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if row["kind"] == "epoch"
    ]
    assert epochs == [0, 1, 2, 3, 4]
    assert result.best_val == pytest.approx(reference_result.best_val, rel=1e-6)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    _, again, batches = train(tmp_path, "resumed")
    assert batches == 0 and again.best_epoch == result.best_epoch


def test_other_settings_train_again(tmp_path):
    train(tmp_path, "m", epochs=1)
    sequences = data()
    model = fresh_model()
    result = train_or_resume(
        model,
        "m",
        tmp_path / "m",
        LoopSettings(epochs=1, grad_clip=1.0),
        1e-2,
        {"data": "other"},
        lambda epoch: [sequences],
        1,
        lambda m, b: (m.sequence_loss(b)["loss"], len(b)),
        lambda m: 0.0,
    )
    assert not result.resumed


def test_labels():
    assert model_label("frmdn", 0) == "FRMDN (diagonal)" and model_label("rmdn", 2) == "RMDN (d'=2)"

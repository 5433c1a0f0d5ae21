"""The benchmarks' shared run on a toy task: every model of the grid trained from the same seed, scored once
per finished training (a rerun reads the scores back), and its result row in the tables' shape."""

from __future__ import annotations

import json

import pytest
import torch

from frmdn_worldmodels.benchmarks.common import model_label
from frmdn_worldmodels.benchmarks.runner import Task, train_grid
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_task(built: list[int], scored: list[str]) -> Task:
    sequences = torch.randn(12, 5, 4, generator=torch.Generator().manual_seed(1)).cumsum(1)

    def build(memory):
        built.append(torch.initial_seed())  # the seed the run set just before building this model
        return MemoryModel(4, 0, memory)

    def test_metrics(model):
        scored.append(model.config.kind)
        assert not model.training, "a model is scored in eval mode"
        return {"nll": -model.sequence_log_prob(sequences)[0].sum(1).mean().item()}

    return Task(
        build=build,
        epoch_batches=lambda epoch: iter(sequences.split(6)),
        batches_per_epoch=2,
        batch_loss=lambda model, batch: (model.sequence_loss(batch)["loss"], len(batch)),
        validate=lambda model: -model.sequence_log_prob(sequences)[0].sum(1).mean().item(),
        test_metrics=test_metrics,
        label=lambda memory: model_label(memory.kind, memory.rank),
        val_key="val_nll",
        curve_label="validation NLL",
    )


def test_every_model_is_trained_scored_once_and_read_back(tmp_path):
    cfg = load_config(
        None,
        [
            f"runs_dir={json.dumps(str(tmp_path / 'runs'))}",
            "speech.memory.hidden=8",
            "speech.memory.components=2",
            "speech.memory.flow_hidden=8",
            "speech.ranks=[0, 1]",
            "speech.epochs=2",
            "seed=3",
        ],
    )
    built, scored = [], []
    runs = train_grid(cfg, cfg.speech, tmp_path / "out", {"data": "toy"}, toy_task(built, scored), flip=False)
    assert [run.tag for run in runs] == ["rmdn_r0", "rmdn_r1", "frmdn_r0", "frmdn_r1"]
    assert scored == ["rmdn", "rmdn", "frmdn", "frmdn"]
    first = runs[2].result
    assert list(first) == [
        *("model", "tag", "kind", "rank", "nll", "val_nll"),
        *("best_epoch", "epochs_run", "train_seconds", "parameters"),
    ]
    assert (first["model"], first["kind"], first["rank"], first["epochs_run"]) == (
        "FRMDN (diagonal)",
        "frmdn",
        0,
        2,
    )
    assert first["val_nll"] == runs[2].trained.best_val and first["parameters"] > 0
    assert (tmp_path / "out" / "nll_curves.png").exists()
    again = train_grid(cfg, cfg.speech, tmp_path / "out", {"data": "toy"}, toy_task([], scored), flip=False)
    assert len(scored) == 4, "a finished model's scores are read back, not computed again"
    assert [run.result for run in again] == [run.result for run in runs]
    assert all(run.trained.resumed for run in again)
    assert built == [cfg.seed] * 4, "every model is built right after seeding torch with cfg.seed"

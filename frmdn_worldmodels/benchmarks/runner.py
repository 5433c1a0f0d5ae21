r"""The run the speech and image benchmarks share: every (kind, rank) model of a section's grid is trained,
or resumed, on the data set's batches, scored on its test set, and its validation curve plotted.

Each model minimises the mean NLL of its training batches, :math:`-\frac1N \sum_i \log p(x_i)`, with early
stopping on the validation NLL (``train_or_resume``: a checkpoint and a metrics row every epoch, a resumed run
starts after its last finished epoch). The test figures of a model are computed once per finished training
and kept in ``models/<tag>.json``; a rerun that trains nothing reads them back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from frmdn_worldmodels.benchmarks.common import (
    TrainResult,
    cached_result,
    model_variants,
    plot_curves,
    store_result,
    train_or_resume,
)
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.runtime.config import Config, MemoryConfig
from frmdn_worldmodels.train.loop import LoopSettings


@dataclass
class Task:
    """What a data set supplies to :func:`train_grid`: its model, its batches, and its metrics."""

    build: Callable[[MemoryConfig], MemoryModel]
    """A fresh model (on the run's device) of one grid cell's memory config."""
    epoch_batches: Callable[[int], Iterable[Any]]
    """The training batches of an epoch, seeded by the epoch (a resumed run sees the same order)."""
    batches_per_epoch: int
    batch_loss: Callable[[MemoryModel, Any], tuple[Tensor, int]]
    """(mean NLL of the batch to minimise, number of items it averages over)."""
    validate: Callable[[MemoryModel], float]
    """Mean validation NLL: lower is better (early stopping and the best checkpoint)."""
    test_metrics: Callable[[MemoryModel], dict]
    """The test-set figures of a trained model, in eval mode."""
    label: Callable[[MemoryConfig], str]
    """The model's row name in the results table."""
    val_key: str
    """The result's key of the best validation NLL."""
    curve_label: str
    """The y axis of ``nll_curves.png``."""


@dataclass
class ModelRun:
    """One trained model of the grid."""

    tag: str
    kind: str
    model: MemoryModel
    """Holding the weights of its best validation epoch."""
    trained: TrainResult
    result: dict
    """Its row of the results: label, tag, kind, rank, test metrics, best validation NLL, training cost."""


def score(model: MemoryModel, tag: str, memory: MemoryConfig, trained: TrainResult, task: Task) -> dict:
    """The result row of a trained model: the task's test metrics, then the training's figures."""
    model.eval()
    return {
        "model": task.label(memory),
        "tag": tag,
        "kind": memory.kind,
        "rank": memory.rank,
        **task.test_metrics(model),
        task.val_key: trained.best_val,
        "best_epoch": trained.best_epoch,
        "epochs_run": len(trained.history),
        "train_seconds": round(sum(row["seconds"] for row in trained.history), 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def train_grid(
    cfg: Config, config: Any, out_dir: Path, data_fingerprint: dict, task: Task, **extra: Any
) -> list[ModelRun]:
    """Train (or resume) and score every model of the section ``config`` (``cfg.speech``, ``cfg.image``) in
    ``out_dir/models/<tag>``, in the grid's order, each from the seed ``cfg.seed``; plot their validation NLL
    per epoch. ``data_fingerprint`` and ``extra`` join each model's fingerprint (what a resumed model and a
    stored result must match)."""
    models_dir = out_dir / "models"
    settings = LoopSettings.of(config, tensorboard=cfg.tensorboard)  # epochs, patience, grad_clip
    runs = []
    for tag, kind, _, memory, fingerprint in model_variants(config, data_fingerprint, **extra):
        torch.manual_seed(cfg.seed)
        model = task.build(memory)
        trained = train_or_resume(
            model,
            tag,
            models_dir / tag,
            settings,
            config.lr,
            fingerprint,
            task.epoch_batches,
            task.batches_per_epoch,
            task.batch_loss,
            task.validate,
        )
        key = {**fingerprint, "epochs_trained": len(trained.history), "best_epoch": trained.best_epoch}
        result = cached_result(models_dir / f"{tag}.json", key)
        if result is None:
            result = score(model, tag, memory, trained, task)
            store_result(models_dir / f"{tag}.json", key, result)
        runs.append(ModelRun(tag, kind, model, trained, result))
    plot_curves(out_dir / "nll_curves.png", {run.tag: run.trained.history for run in runs}, task.curve_label)
    return runs

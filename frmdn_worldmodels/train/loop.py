r"""One resumable training loop for every model of the project: the VAE, the memory and the benchmarks'
models.

Each caller keeps only what is its own (the model, the batches, the loss, the validation score) in a
``TrainTask``; this loop owns everything else, the same for all:

- **resume mid-epoch**: epoch e's batches are a function of (seed, e), so a killed run replays the epoch from
  the checkpointed step (``TrainTask.epoch_batches(epoch, start)``) and loses at most ``checkpoint_every``
  steps. ``checkpoint.pt`` holds the model, the optimiser, torch's CPU RNG state, the loop's counters and the
  ``fingerprint`` it was made with; a checkpoint of other settings is never resumed.
- **metrics**: ``metrics.jsonl`` gets a ``train`` row every ``log_every`` steps, an ``epoch`` row per epoch
  (epoch 0 scores the untrained model) and a ``skipped`` row per rejected step; on resume the rows written
  after the checkpoint are dropped, since the rerun writes them again. With ``tensorboard`` the same scalars
  go to ``<out>/tensorboard/`` (``torch.utils.tensorboard``; events after the checkpoint are purged).
- **NaN/inf guard**: a step is skipped when its loss or its gradient is not finite, and undone when it leaves
  a non-finite parameter or optimiser state; a non-finite state is never checkpointed.
- **early stopping** after ``patience`` epochs without a better validation score; the best model is handed
  to ``TrainTask.save_best`` whenever the score improves (every epoch when there is no validation data).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from frmdn_worldmodels.runtime.io import (
    append_jsonl,
    atomic_write_text,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
)
from frmdn_worldmodels.runtime.progress import note, progress


class TrainingStopped(RuntimeError):
    """Raised when ``stop_after_steps`` is reached: the run stops as if killed (nothing saved at that
    moment)."""


@dataclass
class LoopSettings:
    """How the loop runs; the fields every stage's config section maps onto."""

    epochs: int
    """Passes over the training data."""
    patience: int = 0
    """Epochs without a better validation score before stopping (0 = never stop early)."""
    grad_clip: float = 0.0
    """Max gradient norm (0 = no clipping; gradients are checked for finiteness either way)."""
    checkpoint_every: int = 0
    """Optimiser steps between mid-epoch checkpoints (0 = only at the end of each epoch)."""
    log_every: int = 10
    """Optimiser steps between ``train`` rows of metrics.jsonl."""
    max_steps_per_epoch: int = 0
    """Cap on optimiser steps per epoch (0 = every batch)."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars to ``<out>/tensorboard/``."""
    progress: bool = True
    """Show progress bars and a line per epoch."""
    name: str = "train"
    """What the progress bars and lines call this training."""

    @classmethod
    def of(cls, section: Any, **fields: Any) -> LoopSettings:
        """The settings a config section holds (``vae``, ``memory_train``: any of this class's fields it has),
        and ``fields``."""
        names = {f.name for f in dataclasses.fields(cls)} - set(fields)
        return cls(**{name: getattr(section, name) for name in names if hasattr(section, name)}, **fields)


@dataclass
class TrainTask:
    """What a stage brings to the loop."""

    epoch_batches: Callable[[int, int], Iterable[Any]]
    """``(epoch, start)`` -> that epoch's batches from the ``start``-th on (a function of the seed and
    epoch)."""
    batches_per_epoch: int
    """How many batches ``epoch_batches`` yields for a whole epoch."""
    losses: Callable[[nn.Module, Any], tuple[dict[str, Tensor], int]]
    """``(model, batch)`` -> (named losses with the one to minimise under ``"loss"``, items they average
    over)."""
    validate: Callable[[nn.Module], dict[str, float] | None]
    """The held-out means of the same named losses (the model is in eval mode, no grad), or None without
    data."""
    score: str
    """Which of ``validate``'s values decides the best model and early stopping (lower is better)."""
    save_best: Callable[[int, float | None], None]
    """``(epoch, score)``: write the current model as the best so far."""
    after_epoch: Callable[[list[dict]], None] | None = None
    """Called with all metrics rows after every epoch (plots)."""
    shown: tuple[str, ...] = ("loss",)
    """Loss parts shown on the progress bar."""
    checkpoint_extra: dict = field(default_factory=dict)
    """Plain data stored with every checkpoint (e.g. the episode split), for the caller's own checks."""
    carried: tuple[Callable[[], Any], Callable[[Any], None]] | None = None
    """(get, set) of what the batches carry from one step to the next (truncated backpropagation's LSTM
    states): saved with every checkpoint and restored on resume, so a resumed epoch goes on exactly."""


@dataclass
class LoopResult:
    state: dict
    """epoch, global_step, best_val, best_epoch, bad_epochs, skipped_steps, seconds, ..."""
    rows: list[dict]
    """Every metrics row of the run."""
    resumed: bool
    """Whether the run went on from a checkpoint."""
    stopped_early: bool
    """Whether ``patience`` ended it before ``epochs``."""

    def epoch_row(self, epoch: int) -> dict:
        """The ``epoch`` row of ``epoch`` (``{}`` if there is none)."""
        return next((row for row in self.rows if row["kind"] == "epoch" and row["epoch"] == epoch), {})


def all_finite(tensors: Iterable[Any]) -> bool:
    """Whether every floating-point tensor among ``tensors`` is finite (others are ignored)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterable[Any]:
    for state in optimizer.state.values():
        yield from state.values()


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class _Snapshot:
    """A copy of the parameters and the optimiser state kept in preallocated buffers, to undo a bad step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.saved: list[tuple[Tensor, Tensor]] = []

    def take(self) -> None:
        live = [p.data for p in self.model.parameters()] + [
            t for t in _optimizer_tensors(self.optimizer) if torch.is_tensor(t)
        ]
        if len(live) != len(self.saved) or any(a.shape != b.shape for a, (b, _) in zip(live, self.saved)):
            self.saved = [
                (tensor, tensor.detach().clone()) for tensor in live
            ]  # the optimiser made new state
            return
        torch._foreach_copy_([copy for _, copy in self.saved], live)

    def restore(self) -> None:
        torch._foreach_copy_([tensor for tensor, _ in self.saved], [copy for _, copy in self.saved])


def guarded_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    losses: dict[str, Tensor],
    grad_clip: float,
    snapshot: _Snapshot,
) -> str | None:
    """Backpropagate ``losses["loss"]`` and step, unless that would poison the model; returns why it did
    not."""
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(losses["loss"]):
        return "non-finite loss"
    losses["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if not math.isfinite(norm.item()):
        optimizer.zero_grad(set_to_none=True)
        return "non-finite gradient"
    # finite gradients can still overflow the update or Adam's second moment (a huge lr, no clipping)
    snapshot.take()
    optimizer.step()
    if not (all_finite(model.parameters()) and all_finite(_optimizer_tensors(optimizer))):
        snapshot.restore()
        return "non-finite parameters after the step"
    return None


class _Metrics:
    """metrics.jsonl (and TensorBoard scalars) of one training run."""

    def __init__(self, path: Path, tensorboard_dir: Path | None, resume_step: int | None):
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # the package is an optional dependency of torch
                from frmdn_worldmodels.runtime.config import ConfigError

                raise ConfigError(
                    f"tensorboard: true needs the tensorboard package ({error}); "
                    "pip install tensorboard, or set tensorboard=false"
                ) from None
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)

    def write(self, row: dict) -> None:
        append_jsonl(self.path, row)
        if self.writer is not None:
            for key, value in row.items():
                if (
                    key not in ("kind", "step", "epoch")
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fresh_state() -> dict:
    return {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_val": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "skipped_steps": 0,
        "seconds": 0.0,
        "epoch_sums": {},
        "epoch_items": 0,
    }


def _resumed_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: TrainTask,
    settings: LoopSettings,
    checkpoint_path: Path,
    fingerprint: dict,
) -> dict | None:
    """Load ``checkpoint_path`` into the model, the optimiser, torch's RNG and the task's carried state, and
    return the loop's counters, if it was made with ``fingerprint``; None (a fresh start) otherwise."""
    if not checkpoint_path.exists():
        return None
    saved = load_checkpoint(checkpoint_path)
    if saved.get("fingerprint") != fingerprint:
        if settings.progress:
            note(f"{checkpoint_path}: made with other settings; training {settings.name} from the start")
        return None
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if task.carried is not None:
        task.carried[1](saved.get("carried"))
    return saved["state"]


def _drop_rows_after(metrics_path: Path, state: dict) -> None:
    """Keep the metrics rows up to the checkpoint's ``state``: the rerun logs the later ones again."""
    rows = [
        row
        for row in read_jsonl(metrics_path)
        if row["step"] <= state["global_step"] and (row["kind"] != "epoch" or row["epoch"] <= state["epoch"])
    ]
    atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in rows))


@dataclass
class _Training:
    """What one call of ``train`` works with, shared by its steps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    task: TrainTask
    settings: LoopSettings
    state: dict
    """The loop's counters (``_fresh_state``), saved with every checkpoint."""
    metrics: _Metrics
    checkpoint_path: Path
    fingerprint: dict
    """Stored with every checkpoint: only a checkpoint of the same fingerprint is resumed."""
    on_checkpoint: Callable[[], None] | None
    snapshot: _Snapshot
    """Undoes a step that leaves a non-finite state."""


def _out_of_patience(state: dict, settings: LoopSettings) -> bool:
    """Whether ``patience`` epochs went by without a better validation score (early stopping)."""
    return bool(settings.patience and state["bad_epochs"] >= settings.patience)


def _save_state(run: _Training) -> None:
    """Write ``checkpoint.pt``, unless the state is not finite (then a ``skipped`` row says so)."""
    model, optimizer, state = run.model, run.optimizer, run.state
    if not (all_finite(model.state_dict().values()) and all_finite(_optimizer_tensors(optimizer))):
        run.metrics.write(
            {
                "kind": "skipped",
                "step": state["global_step"],
                "epoch": state["epoch"],
                "reason": "checkpoint not written: non-finite state",
            }
        )
        return
    carried = run.task.carried
    save_checkpoint(
        run.checkpoint_path,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        rng=torch.get_rng_state(),
        state=state,
        fingerprint=run.fingerprint,
        **run.task.checkpoint_extra,
        **({"carried": carried[0]()} if carried is not None else {}),
    )
    if run.on_checkpoint is not None:
        run.on_checkpoint()


def _validate(model: nn.Module, task: TrainTask) -> dict[str, float] | None:
    """``task.validate`` in eval mode without gradients, the model's mode restored after."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        values = task.validate(model)
    model.train(was_training)
    return values


def _keep_if_best(run: _Training, epoch: int, val: dict[str, float] | None, score: float) -> bool:
    """Hand the model to ``save_best`` if ``score`` beats the best so far (always without validation data:
    the latest model is the one kept), else count a bad epoch; return whether it did."""
    state = run.state
    improved = val is None or (math.isfinite(score) and score < state["best_val"])
    if improved:
        state["best_val"], state["best_epoch"], state["bad_epochs"] = score, epoch, 0
        run.task.save_best(epoch, finite_or_none(score) if val is not None else None)
    elif epoch > 0:
        state["bad_epochs"] += 1
    return improved


def _close_epoch(run: _Training, epoch: int, train_means: dict[str, float | None]) -> None:
    """Score the model after ``epoch`` epochs, keep it if it is the best, log the epoch row and line."""
    state, task, settings = run.state, run.task, run.settings
    val = _validate(run.model, task)
    score = val[task.score] if val is not None else -math.inf
    improved = _keep_if_best(run, epoch, val, score)
    run.metrics.write(
        {
            "kind": "epoch",
            "step": state["global_step"],
            "epoch": epoch,
            **{f"train_{part}": finite_or_none(value) for part, value in train_means.items()},
            **{f"val_{part}": finite_or_none(value) for part, value in (val or {}).items()},
            "best": improved,
            "skipped_steps": state["skipped_steps"],
            "seconds": round(state["seconds"], 3),
        }
    )
    if settings.progress and epoch > 0:
        train_score = train_means.get(task.score)
        note(
            f"{settings.name} epoch {epoch}/{settings.epochs}: train {task.score} "
            f"{train_score if train_score is not None else math.nan:.4f}"
            + (f", validation {score:.4f}" if val is not None else "")
            + (f", {state['skipped_steps']} skipped steps" if state["skipped_steps"] else "")
        )


def _step(run: _Training, batch: Any, per_epoch: int) -> dict[str, float]:
    """One optimiser step on ``batch`` (or one skipped by ``guarded_step``), counted, summed into the epoch's
    means and logged; returns the loss parts' values."""
    state, epoch = run.state, run.state["epoch"]
    losses, items = run.task.losses(run.model, batch)
    skipped = guarded_step(run.model, run.optimizer, losses, run.settings.grad_clip, run.snapshot)
    values = {part: value.item() for part, value in losses.items()}
    state["step_in_epoch"] += 1
    state["global_step"] += 1
    step = state["global_step"]
    if skipped:
        state["skipped_steps"] += 1
        run.metrics.write(
            {
                "kind": "skipped",
                "step": step,
                "epoch": epoch,
                "reason": skipped,
                "loss": finite_or_none(values["loss"]),
            }
        )
        return values
    for part, value in values.items():
        state["epoch_sums"][part] = state["epoch_sums"].get(part, 0.0) + value * items
    state["epoch_items"] += items
    if step % run.settings.log_every == 0:
        run.metrics.write(
            {"kind": "train", "step": step, "epoch": epoch + state["step_in_epoch"] / per_epoch, **values}
        )
    return values


def _train_epoch(run: _Training, per_epoch: int, stop_after_steps: int | None) -> dict[str, float | None]:
    """Train epoch ``state["epoch"]`` from its step ``step_in_epoch`` on (a checkpoint every
    ``checkpoint_every`` steps) and move the counters to the next epoch; return the epoch's mean of each loss
    part over its steps not skipped (None without any)."""
    state, settings = run.state, run.settings
    epoch = state["epoch"]
    bar = progress(
        total=per_epoch,
        initial=state["step_in_epoch"],
        unit="batch",
        desc=f"{settings.name} epoch {epoch + 1}/{settings.epochs}",
        disable=not settings.progress,
    )
    started = time.perf_counter()
    for batch in run.task.epoch_batches(epoch, state["step_in_epoch"]):
        if state["step_in_epoch"] >= per_epoch:
            break
        values = _step(run, batch, per_epoch)
        step = state["global_step"]
        bar.update()
        bar.set_postfix(
            {part: f"{values[part]:.4g}" for part in run.task.shown if part in values}, refresh=False
        )
        if settings.checkpoint_every and step % settings.checkpoint_every == 0:
            state["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            _save_state(run)
        if stop_after_steps is not None and step >= stop_after_steps:
            bar.close()
            raise TrainingStopped(f"stopped after {step} steps (test hook)")
    bar.close()
    state["seconds"] += time.perf_counter() - started
    items = state["epoch_items"]
    train_means = {part: (total / items if items else None) for part, total in state["epoch_sums"].items()}
    state["epoch"], state["step_in_epoch"] = epoch + 1, 0
    state["epoch_sums"], state["epoch_items"] = {}, 0
    return train_means


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: TrainTask,
    settings: LoopSettings,
    out_dir: Path,
    fingerprint: dict,
    *,
    stop_after_steps: int | None = None,
    on_checkpoint: Callable[[], None] | None = None,
) -> LoopResult:
    """Train ``model`` on ``task`` into ``out_dir`` (``checkpoint.pt``, ``metrics.jsonl``), resuming a
    checkpoint made with the same ``fingerprint``; see the module docstring. ``on_checkpoint`` is called
    after every checkpoint written (a stage records its work time there: ``Stage.record_progress``).

    ``stop_after_steps`` (for tests of resuming) raises ``TrainingStopped`` once that many optimiser steps
    have been taken in total, without saving anything at that moment, as a kill would.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, metrics_path = out_dir / "checkpoint.pt", out_dir / "metrics.jsonl"
    state = _resumed_state(model, optimizer, task, settings, checkpoint_path, fingerprint)
    resumed = state is not None
    if resumed:
        _drop_rows_after(metrics_path, state)
        if settings.progress:
            note(f"resuming {settings.name} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")
    else:
        state = _fresh_state()
        metrics_path.unlink(missing_ok=True)  # a fresh start: old metrics describe another run
    tensorboard_dir = out_dir / "tensorboard" if settings.tensorboard else None
    metrics = _Metrics(metrics_path, tensorboard_dir, state["global_step"] if resumed else 0)
    run = _Training(
        model,
        optimizer,
        task,
        settings,
        state,
        metrics,
        checkpoint_path,
        fingerprint,
        on_checkpoint,
        _Snapshot(model, optimizer),
    )
    try:
        if not resumed:
            # the curve starts at epoch 0, and a best model exists (finite) even if every later step diverges
            _close_epoch(run, 0, {})
            _save_state(run)
        per_epoch = task.batches_per_epoch
        if settings.max_steps_per_epoch:
            per_epoch = min(per_epoch, settings.max_steps_per_epoch)
        model.train()
        while state["epoch"] < settings.epochs and not _out_of_patience(state, settings):
            train_means = _train_epoch(run, per_epoch, stop_after_steps)
            _close_epoch(run, state["epoch"], train_means)
            _save_state(run)
            if task.after_epoch is not None:
                task.after_epoch(read_jsonl(metrics_path))
    finally:
        metrics.close()
    stopped_early = _out_of_patience(state, settings) and state["epoch"] < settings.epochs
    return LoopResult(state, read_jsonl(metrics_path), resumed, stopped_early)

"""What the speech and image benchmarks share: the memory config of a benchmark model, a resumable training
loop with early stopping on the validation NLL, and the tables and plots of the results."""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frmdn_worldmodels.models.memory import MemoryModel, check_memory_config
from frmdn_worldmodels.runtime.config import ConfigError, MemoryConfig
from frmdn_worldmodels.runtime.io import (
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
)
from frmdn_worldmodels.train.loop import LoopSettings, TrainTask
from frmdn_worldmodels.train.loop import train as train_loop


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (0 = leave as is), then restore the previous
    number."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


GRID_KIND = "grid"
"""``<section>.memory.kind`` when each model takes its kind from ``<section>.kinds`` (the default)."""
GRID_RANK = -1
"""``<section>.memory.rank`` when each model takes its rank from ``<section>.ranks`` (the default)."""


def benchmark_memory_config(
    kind: str, hidden: int, components: int, rank: int, flow_blocks: int, flow_hidden: int, **fields: Any
) -> MemoryConfig:
    """A memory with no reward or done head (the benchmarks model one sequence, with no actions); ``fields``
    sets any other ``MemoryConfig`` field (``flow_context``, ``diag_clamp``, ...)."""
    if kind not in ("rmdn", "frmdn"):
        raise ValueError(f"benchmark model kinds are 'rmdn' and 'frmdn', got {kind!r}")
    return dataclasses.replace(
        MemoryConfig(),
        kind=kind,
        hidden=hidden,
        components=components,
        rank=rank,
        flow_blocks=flow_blocks,
        flow_hidden=flow_hidden,
        predict_reward=False,
        predict_done=False,
        **fields,
    )


def model_memory_config(memory: MemoryConfig, kind: str, rank: int) -> MemoryConfig:
    """The memory config of one model of the grid: the section's ``memory`` with that model's kind and rank,
    as a plain ``MemoryConfig``."""
    if kind not in ("rmdn", "frmdn"):
        raise ValueError(f"benchmark model kinds are 'rmdn' and 'frmdn', got {kind!r}")
    return MemoryConfig(**{**dataclasses.asdict(memory), "kind": kind, "rank": rank})


def model_tag(kind: str, rank: int) -> str:
    """File-name tag of one model, e.g. ``frmdn_r2``."""
    return f"{kind}_r{rank}"


def _check_list(values: list, name: str, allowed: str, valid: Callable[[Any], bool]) -> None:
    if not values or not all(valid(value) for value in values):
        raise ConfigError(f"{name} must list {allowed}, got {values}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} lists a model twice: {values}")


def check_memory_section(config, section: str) -> None:
    """The checks of ``<section>.memory`` (``ConfigError`` naming ``<section>.memory.<field>``): sizes >= 1, a
    known diagonal activation, a valid clamp, no reward or done head, and no ``kind``/``rank`` that the grid
    (``<section>.kinds``, ``<section>.ranks``) would override."""
    memory, name = config.memory, f"{section}.memory"
    for field_name, grid_name, sentinel in (("kind", "kinds", GRID_KIND), ("rank", "ranks", GRID_RANK)):
        value, grid = getattr(memory, field_name), getattr(config, grid_name)
        if value != sentinel and grid != [value]:
            raise ConfigError(
                f"{name}.{field_name}={value!r} would be ignored: each model takes its {field_name} from "
                f"{section}.{grid_name}={grid}; to train {field_name} {value!r} alone, set "
                f"{section}.{grid_name}=[{value}] instead"
            )
    check_memory_config(
        dataclasses.replace(memory, kind="frmdn", rank=0), name
    )  # the grid sets kind and rank
    for field_name in ("predict_reward", "predict_done"):
        if getattr(memory, field_name):
            raise ConfigError(
                f"{name}.{field_name} must be false: the {section} benchmark has no rewards or episode "
                "ends to predict (its models have no reward or done head)"
            )
    if memory.flow_context and "frmdn" not in config.kinds:
        raise ConfigError(
            f"{name}.flow_context=true would be ignored: {section}.kinds={config.kinds} has no frmdn, "
            "the only model with a flow"
        )


def check_model_grid(config, section: str) -> None:
    """The checks every benchmark section shares beyond its field types: its model kinds, its ranks and its
    ``memory`` sub-section (``ConfigError`` naming ``<section>.<field>``)."""
    _check_list(
        config.kinds, f"{section}.kinds", "'rmdn' and/or 'frmdn'", lambda kind: kind in ("rmdn", "frmdn")
    )
    _check_list(
        config.ranks, f"{section}.ranks", "ranks >= 0", lambda rank: isinstance(rank, int) and rank >= 0
    )
    check_memory_section(config, section)


def model_variants(
    config, data_fingerprint: dict, **extra: Any
) -> Iterator[tuple[str, str, int, MemoryConfig, dict]]:
    """Every (kind, rank) of a benchmark section (``ImageConfig`` or ``SpeechConfig``), as
    ``(tag, kind, rank, memory_config, fingerprint)``; the fingerprint is what a resumed model must match: the
    data, the model's whole memory config (so a changed ``diag_clamp`` or ``flow_context`` trains again) and
    the optimiser's settings."""
    for kind in config.kinds:
        for rank in config.ranks:
            memory_config = model_memory_config(config.memory, kind, rank)
            fingerprint = {
                **data_fingerprint,
                "memory": dataclasses.asdict(memory_config),
                "lr": config.lr,
                "batch_size": config.batch_size,
                "grad_clip": config.grad_clip,
                **extra,
            }
            yield model_tag(kind, rank), kind, rank, memory_config, fingerprint


def model_label(kind: str, rank: int) -> str:
    """Row name in the paper's style, e.g. ``FRMDN (d'=2)`` or ``RMDN (diagonal)``."""
    shape = "diagonal" if rank == 0 else f"d'={rank}"
    return f"{kind.upper()} ({shape})"


@dataclass
class TrainResult:
    history: list[dict]
    """One dict per epoch: epoch, train_loss, val_nll, seconds."""
    best_val: float
    best_epoch: int
    resumed: bool


def train_or_resume(
    model: MemoryModel,
    tag: str,
    folder: Path,
    settings: LoopSettings,
    lr: float,
    fingerprint: dict,
    epoch_batches: Callable[[int], Iterable[Any]],
    batches_per_epoch: int,
    batch_loss: Callable[[MemoryModel, Any], tuple[torch.Tensor, int]],
    validate: Callable[[MemoryModel], float],
) -> TrainResult:
    """Train with Adam (learning rate ``lr``) and early stopping on ``validate`` (a mean NLL: lower is better)
    in the project's training loop (``train.loop``: a checkpoint every epoch, the NaN guard, metrics
    in ``folder``); a rerun with the same ``fingerprint`` resumes after the last finished epoch, or returns at
    once when training had finished (the epoch budget and patience are not part of the fingerprint, so raising
    them continues a finished model). On return ``model`` holds the weights of the best validation epoch.

    ``epoch_batches(epoch)`` yields that epoch's ``batches_per_epoch`` batches (seeded by the epoch, so a
    resumed run sees the same data order); ``batch_loss(model, batch)`` returns (loss to minimise, number of
    items it averages over).
    """
    best_path = folder / "best.pt"

    def save_best(epoch: int, score: float | None) -> None:
        save_checkpoint(best_path, state_dict=model.state_dict(), epoch=epoch, val_nll=score)

    def losses(model: MemoryModel, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        loss, items = batch_loss(model, batch)
        return {"loss": loss}, items

    task = TrainTask(
        epoch_batches=lambda epoch, start: itertools.islice(epoch_batches(epoch), start, None),
        batches_per_epoch=batches_per_epoch,
        losses=losses,
        validate=lambda model: {"loss": validate(model)},
        score="loss",
        save_best=save_best,
        shown=("loss",),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    result = train_loop(model, optimizer, task, dataclasses.replace(settings, name=tag), folder, fingerprint)
    epochs = [row for row in result.rows if row["kind"] == "epoch" and row["epoch"] > 0]
    seconds = [row["seconds"] for row in epochs]
    history = [
        {
            "model": tag,
            "epoch": row["epoch"],
            "train_loss": row.get("train_loss"),
            "val_nll": row["val_loss"],
            "skipped_batches": row["skipped_steps"],
            "seconds": round(now - before, 3),
        }
        for row, before, now in zip(epochs, [0.0, *seconds[:-1]], seconds, strict=True)
    ]
    best = load_checkpoint(best_path) if best_path.exists() else None
    if best is None or best["val_nll"] is None:
        raise ValueError(f"{tag}: the validation NLL was never finite; lower the learning rate")
    model.load_state_dict(best["state_dict"])
    return TrainResult(history, best["val_nll"], best["epoch"], result.resumed)


def cached_result(path: Path, key: dict) -> dict | None:
    """The result stored at ``path`` (JSON) if it was computed for exactly ``key``, else None."""
    if path.exists():
        stored = read_json(path)
        if stored.get("key") == key:
            return stored["result"]
    return None


def store_result(path: Path, key: dict, result: dict) -> None:
    write_json(path, {"key": key, "result": result})


def format_number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, headers: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def plot_curves(path: Path, histories: dict[str, list[dict]], ylabel: str) -> None:
    """Validation NLL per epoch of every model, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for tag, history in histories.items():
        axes.plot(
            [row["epoch"] for row in history], [row["val_nll"] for row in history], label=tag, marker="."
        )
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())

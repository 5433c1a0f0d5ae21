"""What the speech and image benchmarks share: the memory config of a benchmark model, a resumable training loop
with early stopping on the validation NLL, and the tables and plots of the results."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from worldmodel.config import ConfigError, MemoryConfig
from worldmodel.io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
)
from worldmodel.memory import MemoryModel


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (0 = leave as is), then restore the previous number."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def benchmark_memory_config(
    kind: str, hidden: int, components: int, rank: int, flow_blocks: int, flow_hidden: int
) -> MemoryConfig:
    """A memory with no reward or done head (the benchmarks model one sequence, with no actions)."""
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
    )


def model_tag(kind: str, rank: int) -> str:
    """File-name tag of one model, e.g. ``frmdn_r2``."""
    return f"{kind}_r{rank}"


def check_model_grid(config, section: str, positive: tuple[str, ...]) -> None:
    """The checks every benchmark section shares: its model kinds, its ranks, and the fields that must be >= 1
    (``ConfigError`` naming ``<section>.<field>``)."""
    if not config.kinds or any(kind not in ("rmdn", "frmdn") for kind in config.kinds):
        raise ConfigError(f"{section}.kinds must list 'rmdn' and/or 'frmdn', got {config.kinds}")
    if not config.ranks or any(rank < 0 for rank in config.ranks):
        raise ConfigError(f"{section}.ranks must be a non-empty list of ranks >= 0, got {config.ranks}")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{section}.{name} must be >= 1, got {getattr(config, name)}")


def model_variants(config, data_fingerprint: dict, **extra: Any) -> Iterator[tuple[str, str, int, MemoryConfig, dict]]:
    """Every (kind, rank) of a benchmark section (``ImageConfig`` or ``SpeechConfig``), as
    ``(tag, kind, rank, memory_config, fingerprint)``; the fingerprint is what a resumed model must match."""
    for kind in config.kinds:
        for rank in config.ranks:
            memory_config = benchmark_memory_config(
                kind, config.hidden, config.components, rank, config.flow_blocks, config.flow_hidden
            )
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
class TrainSettings:
    epochs: int
    lr: float
    grad_clip: float
    patience: int


@dataclass
class TrainResult:
    history: list[dict]
    """One dict per epoch: epoch, train_nll, val_nll, seconds."""
    best_val: float
    best_epoch: int
    resumed: bool


def finished(epoch: int, best_epoch: int, settings: TrainSettings) -> bool:
    """Whether training stops after ``epoch`` epochs: the budget is spent, or ``patience`` epochs have passed
    without a better validation NLL."""
    return epoch >= settings.epochs or (settings.patience > 0 and epoch - max(best_epoch, 0) >= settings.patience)


def train_or_resume(
    model: MemoryModel,
    tag: str,
    checkpoint: Path,
    settings: TrainSettings,
    fingerprint: dict,
    epoch_batches: Callable[[int], Iterable[Any]],
    batch_loss: Callable[[MemoryModel, Any], tuple[torch.Tensor, int]],
    validate: Callable[[MemoryModel], float],
    metrics_path: Path,
) -> TrainResult:
    """Train with Adam and early stopping on ``validate`` (a mean NLL: lower is better), checkpointing every
    epoch; a rerun with the same ``fingerprint`` resumes after the last finished epoch, or returns at once
    when training had finished (the epoch budget and patience are not part of the fingerprint, so raising
    them continues a finished model). On return ``model`` holds the weights of the best validation epoch.

    ``epoch_batches(epoch)`` yields that epoch's batches (seeded by the epoch, so a resumed run sees the same
    data order); ``batch_loss(model, batch)`` returns (loss to minimise, number of items it averages over).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    start, history, best_val, best_epoch, best_state, resumed = 0, [], math.inf, -1, None, False
    if checkpoint.exists():
        payload = load_checkpoint(checkpoint)
        if payload.get("fingerprint") == fingerprint:
            model.load_state_dict(payload["model"]["state_dict"])
            optimizer.load_state_dict(payload["optimizer"])
            start, history = payload["epoch"], payload["history"]
            best_val, best_epoch, best_state = payload["best_val"], payload["best_epoch"], payload["best_state"]
            resumed = True
            if finished(start, best_epoch, settings):
                model.load_state_dict(best_state)
                return TrainResult(history, best_val, best_epoch, resumed)
        else:
            tqdm.write(f"{checkpoint}: trained with other settings; training {tag} again")

    def save(epoch: int, done: bool) -> None:
        save_checkpoint(
            checkpoint,
            model=model.to_checkpoint(),
            optimizer=optimizer.state_dict(),
            epoch=epoch,
            history=history,
            best_val=best_val,
            best_epoch=best_epoch,
            best_state=best_state,
            done=done,
            fingerprint=fingerprint,
        )

    done = False
    bar = tqdm(range(start, settings.epochs), desc=tag, initial=start, total=settings.epochs, unit="epoch")
    for epoch in bar:
        began, total, count, skipped = time.perf_counter(), 0.0, 0, 0
        model.train()
        for batch in tqdm(epoch_batches(epoch), desc=f"{tag} epoch {epoch + 1}", leave=False, unit="batch"):
            loss, items = batch_loss(model, batch)
            if not torch.isfinite(loss):
                skipped += 1  # one bad batch should not poison the weights; it is counted in the metrics
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            total, count = total + loss.item() * items, count + items
        model.eval()
        with torch.no_grad():
            val = validate(model)
        row = {
            "model": tag,
            "epoch": epoch + 1,
            "train_loss": total / max(count, 1),
            "val_nll": val,
            "skipped_batches": skipped,
            "seconds": round(time.perf_counter() - began, 3),
        }
        history.append(row)
        append_jsonl(metrics_path, row)
        if math.isfinite(val) and val < best_val:
            best_val, best_epoch = val, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(val_nll=f"{val:.2f}", best=f"{best_val:.2f}")
        done = finished(epoch + 1, best_epoch, settings)
        save(epoch + 1, done)
        if done:
            break
    bar.close()
    if best_state is None:
        raise ValueError(f"{tag}: the validation NLL was never finite; lower the learning rate")
    model.load_state_dict(best_state)
    return TrainResult(history, best_val, best_epoch, resumed)


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
        axes.plot([row["epoch"] for row in history], [row["val_nll"] for row in history], label=tag, marker=".")
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())

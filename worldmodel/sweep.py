"""``python run.py train-memory --sweep table1``: the paper's Table 1 on this run's latents.

Every cell (kind, K, d') of ``memory_train.sweep_kinds x sweep_components x sweep_ranks`` is trained by
``worldmodel.train_memory.train_memory`` as its own run in ``<run>/table1/<kind>_K<K>_r<d'>/``, on the same
latents, the same episode split and the same fixed validation/test posterior sample, so the test NLLs are
comparable. Cells are resumable and finished cells are skipped; ``map_fn`` runs the cells in parallel (Ray,
from ``rollouts.parallel.ray_map``; this module never imports Ray).

Outputs in ``<run>/table1/``: ``table1.md`` and ``table1.csv`` (rows as in the paper: RMDN (diagonal),
FRMDN (diagonal), RMDN (d'=1..), FRMDN (d'=1..); columns K; test NLL per latent dimension in nats, the best of
each column in bold), ``table1.png`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from worldmodel.config import Config, ConfigError
from worldmodel.io import atomic_write_text, write_json
from worldmodel.plots import plot_curves
from worldmodel.progress import progress
from worldmodel.runs import prepare_stage, run_paths
from worldmodel.sequences import split_latent_files
from worldmodel.stages import Stage
from worldmodel.train_memory import check_memory_train_config, train_memory

Cell = tuple[str, int, int]
MapFn = Callable[[Callable, Sequence], list]
KIND_NAMES = {"rmdn": "RMDN", "frmdn": "FRMDN"}
METRIC = "test NLL per latent dimension (nats)"


def table1_dir(cfg: Config) -> Path:
    return run_paths(cfg).table1


def cell_name(cell: Cell) -> str:
    kind, components, rank = cell
    return f"{kind}_K{components}_r{rank}"


def cell_config(cfg: Config, cell: Cell) -> Config:
    """The run's config with the memory model of one cell."""
    kind, components, rank = cell
    return dataclasses.replace(
        cfg, memory=dataclasses.replace(cfg.memory, kind=kind, components=components, rank=rank)
    )


def train_cell(task: tuple[Config, Cell]) -> dict:
    """Train (or resume, or skip) one cell; a top-level function so Ray can ship it to a worker."""
    cfg, cell = task
    threads = torch.get_num_threads()
    # one core per cell: cells run side by side, and these small LSTMs gain nothing from more threads
    torch.set_num_threads(1)
    try:
        return train_memory(cell_config(cfg, cell), cell_stage(cfg, cell), progress=False)
    finally:
        torch.set_num_threads(threads)


def cell_stage(cfg: Config, cell: Cell) -> Stage:
    """The memory stage of one cell, in its own folder of ``<run>/table1/``."""
    return Stage(cell_config(cfg, cell), "train-memory", table1_dir(cfg) / cell_name(cell))


def sweep_cells(cfg: Config) -> list[Cell]:
    tc = cfg.memory_train
    unknown = [kind for kind in tc.sweep_kinds if kind not in KIND_NAMES]
    if unknown or not tc.sweep_kinds:
        raise ConfigError(f"memory_train.sweep_kinds must list rmdn and/or frmdn, got {tc.sweep_kinds}")
    if not tc.sweep_components or min(tc.sweep_components) < 1:
        raise ConfigError(f"memory_train.sweep_components must list K >= 1, got {tc.sweep_components}")
    if not tc.sweep_ranks or min(tc.sweep_ranks) < 0:
        raise ConfigError(f"memory_train.sweep_ranks must list d' >= 0, got {tc.sweep_ranks}")
    kinds = list(dict.fromkeys(tc.sweep_kinds))
    components = sorted(set(tc.sweep_components))
    ranks = sorted(set(tc.sweep_ranks))
    return [(kind, k, rank) for rank in ranks for kind in kinds for k in components]


def table_rows(cfg: Config) -> list[tuple[str, int]]:
    """(kind, rank) rows in the paper's order: the diagonal rows first, then each kind's low-rank rows."""
    kinds = list(dict.fromkeys(cfg.memory_train.sweep_kinds))
    ranks = sorted(set(cfg.memory_train.sweep_ranks))
    rows = [(kind, 0) for kind in kinds if 0 in ranks]
    rows += [(kind, rank) for kind in kinds for rank in ranks if rank > 0]
    return rows


def row_label(kind: str, rank: int) -> str:
    return f"{KIND_NAMES[kind]} ({'diagonal' if rank == 0 else f"d'={rank}"})"


def _watch_progress(folders: list[Path], started: float, bar: Any, stop: threading.Event) -> None:
    """Advance ``bar`` as cells write their summary (map_fn only returns when every cell is done)."""
    seen: set[Path] = set()
    while not stop.wait(2.0):
        for folder in folders:
            summary = folder / "summary.json"
            if folder not in seen and summary.exists() and summary.stat().st_mtime >= started:
                seen.add(folder)
                bar.update()


def format_markdown(cfg: Config, results: dict[Cell, dict]) -> str:
    components = sorted(set(cfg.memory_train.sweep_components))
    rows = table_rows(cfg)

    def value(kind: str, k: int, rank: int) -> float | None:
        return results[(kind, k, rank)].get("test_nll_per_dim")

    best = {}
    for k in components:
        values = [v for kind, rank in rows if (v := value(kind, k, rank)) is not None]
        best[k] = min(values) if values else None
    header = "| Model | " + " | ".join(f"K={k}" for k in components) + " |"
    lines = [
        (
            f"Test NLL per latent dimension (nats; lower is better) of the memory on `{cfg.name}` "
            f"({cfg.env.name} latents, Z={_first(results, 'latent_dim')}): "
            "the layout of the paper's Table 1. Best of each column in bold."
        ),
        "",
        header,
        "|" + "---|" * (len(components) + 1),
    ]
    for kind, rank in rows:
        cells = []
        for k in components:
            v = value(kind, k, rank)
            text = "n/a" if v is None else f"{v:.4f}"
            cells.append(f"**{text}**" if v is not None and v == best[k] else text)
        lines.append(f"| {row_label(kind, rank)} | " + " | ".join(cells) + " |")

    kinds = set(cfg.memory_train.sweep_kinds)
    if {"rmdn", "frmdn"} <= kinds:
        ranks = sorted(set(cfg.memory_train.sweep_ranks))
        wins = total = 0
        lines += [
            "",
            "FRMDN minus RMDN, same K and d' (negative: FRMDN better):",
            "",
            "| d' | " + " | ".join(f"K={k}" for k in components) + " |",
            "|" + "---|" * (len(components) + 1),
        ]
        for rank in ranks:
            cells = []
            for k in components:
                f, r = value("frmdn", k, rank), value("rmdn", k, rank)
                if f is None or r is None:
                    cells.append("n/a")
                    continue
                total += 1
                wins += f < r
                cells.append(f"{f - r:+.4f}")
            lines.append(f"| {'diagonal' if rank == 0 else rank} | " + " | ".join(cells) + " |")
        lines += ["", f"FRMDN has the lower test NLL in {wins} of {total} cells."]
    first = next(iter(results.values()))
    lines += [
        "",
        (
            f"Data: {first['episodes']['train']}/{first['episodes']['val']}/{first['episodes']['test']} "
            f"train/val/test episodes ({first['transitions']['test']} test transitions); "
            f"z {
                '= the VAE mean'
                if first['use_mu']
                else 'sampled from the VAE posterior (fixed sample for val/test)'
            }; "
            f"up to {cfg.memory_train.epochs} epochs, early stopping on validation NLL, "
            "the best-validation model scored."
        ),
    ]
    return "\n".join(lines) + "\n"


def _first(results: dict[Cell, dict], key: str):
    return next(iter(results.values())).get(key)


def format_csv(cells: list[Cell], results: dict[Cell, dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [
        "test_nll_per_dim",
        "test_nll_per_step",
        "val_nll_per_dim",
        "test_reward_mse",
        "test_done_loss",
        "best_epoch",
        "epochs_trained",
        "skipped_steps",
        "train_seconds",
    ]
    writer.writerow(["model", "kind", "components", "rank", *columns, "parameters"])
    for cell in cells:
        kind, k, rank = cell
        summary = results[cell]
        writer.writerow(
            [
                row_label(kind, rank),
                kind,
                k,
                rank,
                *(summary.get(c) for c in columns),
                summary["parameters"]["total"],
            ]
        )
    return buffer.getvalue()


def save_plot(path: Path, cfg: Config, results: dict[Cell, dict]) -> None:
    components = sorted(set(cfg.memory_train.sweep_components))
    series = {}
    for kind, rank in table_rows(cfg):
        points = [(k, results[(kind, k, rank)].get("test_nll_per_dim")) for k in components]
        points = [(k, v) for k, v in points if v is not None]
        if points:
            series[row_label(kind, rank)] = ([k for k, _ in points], [v for _, v in points])
    plot_curves(
        path,
        series,
        xlabel="mixture components K",
        ylabel="test NLL per latent dimension (nats)",
        title=f"Table 1 on {cfg.name} ({cfg.env.name})",
    )


def run_table1(cfg: Config, map_fn: MapFn) -> dict:
    """Train every cell of the grid (``map_fn(train_cell, tasks)``, skipping finished cells); write the
    table."""
    check_memory_train_config(cfg)
    # workers may start in another folder: give them the run's absolute path
    cfg = dataclasses.replace(cfg, runs_dir=str(Path(cfg.runs_dir).resolve()))
    tc = cfg.memory_train
    cells = sweep_cells(cfg)
    # fail here with a clear DataError, not inside every remote task
    split_latent_files(run_paths(cfg).latents, tc.val_fraction, tc.test_fraction, cfg.seed)
    out = prepare_stage(cfg, table1_dir(cfg))
    results: dict[Cell, dict] = {}
    for cell in cells:
        summary = cell_stage(cfg, cell).done()
        if summary is not None:
            results[cell] = summary
    pending = [cell for cell in cells if cell not in results]

    started = time.time()
    bar = progress(total=len(cells), initial=len(results), desc="table1 cells", unit="cell")
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_progress,
        args=([out / cell_name(c) for c in pending], started - 1, bar, stop),
        daemon=True,
    )
    watcher.start()
    try:
        trained = map_fn(train_cell, [(cfg, cell) for cell in pending]) if pending else []
    finally:
        stop.set()
        watcher.join()
    bar.update(len(cells) - bar.n)
    bar.close()
    for cell, summary in zip(pending, trained):
        results[cell] = summary
        # on a cluster the cell ran on another machine: keep its summary here, so a rerun skips it
        stage = cell_stage(cfg, cell)
        if stage.done() is None:
            stage.folder.mkdir(parents=True, exist_ok=True)
            stage.finish(summary)

    splits = {str(summary["split"]) for summary in results.values()}
    if len(splits) > 1:  # cannot happen with finished_summary's check, but the table would silently mislead
        raise RuntimeError("the cells of table1 were trained on different episode splits")
    markdown = format_markdown(cfg, results)
    atomic_write_text(out / "table1.md", markdown)
    atomic_write_text(out / "table1.csv", format_csv(cells, results))
    save_plot(out / "table1.png", cfg, results)
    summary = {
        "metric": METRIC,
        "table": str(out / "table1.md"),
        "csv": str(out / "table1.csv"),
        "plot": str(out / "table1.png"),
        "cells_trained": len(pending),
        "cells_skipped": len(cells) - len(pending),
        "test_nll_per_dim": {cell_name(cell): results[cell].get("test_nll_per_dim") for cell in cells},
        "test_nll_per_step": {cell_name(cell): results[cell].get("test_nll_per_step") for cell in cells},
    }
    if {"rmdn", "frmdn"} <= set(tc.sweep_kinds):
        pairs = [
            (
                results[("frmdn", k, r)].get("test_nll_per_dim"),
                results[("rmdn", k, r)].get("test_nll_per_dim"),
            )
            for kind, k, r in cells
            if kind == "frmdn"
        ]
        pairs = [(f, r) for f, r in pairs if f is not None and r is not None]
        summary["frmdn_wins"] = f"{sum(f < r for f, r in pairs)} of {len(pairs)}"
    write_json(out / "summary.json", summary)
    print(markdown)
    return summary

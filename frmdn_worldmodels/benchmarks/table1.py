"""``python run.py train-memory --sweep table1``: the paper's Table 1 on this run's latents, over seeds.

The grid is ``memory_train.sweep_kinds x sweep_components x sweep_ranks``; every cell is trained with
``sweep_seeds`` training seeds (``memory_train.seed`` + i: the model's initialisation, posterior samples and
batch order) by ``frmdn_worldmodels.stages.train_memory.train_memory``, each run in its own folder
``<run>/table1/<kind>_K<K>_r<d'>[_<extra>]_s<i>/``. Every run reads the same latents, the same episode split
and the same fixed validation/test posterior sample (they follow the run's ``seed``), so the test NLLs are
comparable and FRMDN - RMDN is paired by training seed. Once the grid is done, ``sweep_extra`` adds rows at
the d' of the grid's best FRMDN cell (``flow_context``, ``heads``). Runs resume and finished runs are skipped,
so the sweep goes on after a kill or in a later session; ``map_fn`` runs them in parallel (Ray, from
``frmdn_worldmodels.runtime.cluster.ray_map``; this module never imports Ray).

Outputs in ``<run>/table1/``: ``table1.md`` (mean +- std over seeds in the paper's layout, the paired
differences, the extra rows, the cost), ``table1.csv`` (a line per run), ``table1.png`` (test NLL against d'
for each K and kind, error bars of one std), ``summary.json``, and ``invocations.jsonl`` (the wall time of
every invocation that trained runs, so the cost of a table made over several sessions adds up).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frmdn_worldmodels.data.episodes import load_latents
from frmdn_worldmodels.data.sequences import split_latent_files
from frmdn_worldmodels.runtime.config import Config
from frmdn_worldmodels.runtime.io import append_jsonl, atomic_write_text, read_jsonl, write_json
from frmdn_worldmodels.runtime.paths import prepare_stage, run_paths
from frmdn_worldmodels.runtime.plots import plot_curves
from frmdn_worldmodels.runtime.progress import note
from frmdn_worldmodels.runtime.records import Stage
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.stages.train_memory import train_memory

MapFn = Callable[[Callable, Sequence], list]
KIND_NAMES = {"rmdn": "RMDN", "frmdn": "FRMDN"}
EXTRA_KINDS = {"flow_context": ("frmdn",), "heads": ("rmdn", "frmdn")}
"""The extra rows and the kinds each has."""
EXTRA_LABELS = {"flow_context": "flow conditioned on h", "heads": "+ reward and done heads"}
METRIC = "test NLL per latent dimension (nats)"
SIGNIFICANT = 2.0
"""A difference is clear when its mean is more than this many standard deviations (over seeds) from 0."""


@dataclass(frozen=True)
class Row:
    """A row of the table: a kind of memory at a rank d', in the grid or in an extra row."""

    kind: str
    rank: int
    extra: str = ""

    @property
    def label(self) -> str:
        text = f"{KIND_NAMES[self.kind]} ({'diagonal' if self.rank == 0 else f"d'={self.rank}"})"
        return f"{text}, {EXTRA_LABELS[self.extra]}" if self.extra else text


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: the model of a row with K components, trained with seed index ``replica``."""

    kind: str
    components: int
    rank: int
    extra: str = ""
    replica: int = 0

    @property
    def row(self) -> Row:
        return Row(self.kind, self.rank, self.extra)

    @property
    def name(self) -> str:
        extra = f"_{self.extra}" if self.extra else ""
        return f"{self.kind}_K{self.components}_r{self.rank}{extra}_s{self.replica}"


Results = dict[Cell, dict]


def table1_dir(cfg: Config) -> Path:
    return run_paths(cfg).table1


def _kinds(cfg: Config) -> list[str]:
    return list(dict.fromkeys(cfg.memory_train.sweep_kinds))


def _components(cfg: Config) -> list[int]:
    return sorted(set(cfg.memory_train.sweep_components))


def _ranks(cfg: Config) -> list[int]:
    return sorted(set(cfg.memory_train.sweep_ranks))


def grid_rows(cfg: Config) -> list[Row]:
    """The grid's rows in the paper's order: the diagonal rows first, then each kind's low-rank rows."""
    kinds, ranks = _kinds(cfg), _ranks(cfg)
    rows = [Row(kind, 0) for kind in kinds if 0 in ranks]
    return rows + [Row(kind, rank) for kind in kinds for rank in ranks if rank > 0]


def extra_rows(cfg: Config, rank: int) -> list[Row]:
    kinds = _kinds(cfg)
    return [
        Row(kind, rank, extra)
        for extra in dict.fromkeys(cfg.memory_train.sweep_extra)
        for kind in EXTRA_KINDS[extra]
        if kind in kinds
    ]


def row_cells(cfg: Config, rows: Iterable[Row]) -> list[Cell]:
    """Every run of ``rows``, seed by seed: the first seed of every cell comes first, so an interrupted sweep
    already holds a whole table."""
    rows = list(rows)
    return [
        Cell(row.kind, k, row.rank, row.extra, replica)
        for replica in range(cfg.memory_train.sweep_seeds)
        for row in rows
        for k in _components(cfg)
    ]


def cell_config(cfg: Config, cell: Cell) -> Config:
    """The run's config with the memory model and the training seed of one cell."""
    memory = dataclasses.replace(cfg.memory, kind=cell.kind, components=cell.components, rank=cell.rank)
    if cell.extra == "flow_context":
        memory = dataclasses.replace(memory, flow_context=True)
    elif cell.extra == "heads":
        memory = dataclasses.replace(memory, predict_reward=True, predict_done=True)
    tc = cfg.memory_train
    if cell.replica:
        base = cfg.seed if tc.seed is None else tc.seed
        tc = dataclasses.replace(tc, seed=base + cell.replica)
    return dataclasses.replace(cfg, memory=memory, memory_train=tc)


def cell_stage(cfg: Config, cell: Cell) -> Stage:
    """The memory stage of one cell, in its own folder of ``<run>/table1/``."""
    return Stage(cell_config(cfg, cell), "train-memory", table1_dir(cfg) / cell.name)


def train_cell(task: tuple[Config, Cell]) -> dict:
    """Train (or resume, or skip) one cell; a top-level function so Ray can ship it to a worker."""
    cfg, cell = task
    threads = torch.get_num_threads()
    # one core per run: runs go side by side, and these LSTMs gain little from a second thread
    torch.set_num_threads(1)
    try:
        return train_memory(cell_config(cfg, cell), cell_stage(cfg, cell), progress=False)
    finally:
        torch.set_num_threads(threads)


def finished_runs(cfg: Config, cells: Iterable[Cell]) -> Results:
    return {cell: summary for cell in cells if (summary := cell_stage(cfg, cell).done()) is not None}


def nll_values(results: Results, row: Row, k: int) -> dict[int, float]:
    """Test NLL per dimension of each finished seed of (row, K), by seed index."""
    return {
        cell.replica: value
        for cell, summary in results.items()
        if cell.row == row and cell.components == k and (value := summary.get("test_nll_per_dim")) is not None
    }


def mean_std(values: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for no values; the std is None for one value)."""
    values = list(values)
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_differences(results: Results, first: Row, second: Row, k: int) -> list[float]:
    """first - second, seed by seed, over the seeds both have."""
    a, b = nll_values(results, first, k), nll_values(results, second, k)
    return [a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())]


def is_clear(values: Sequence[float]) -> int:
    """-1 / +1 when the mean is below / above 0 by more than ``SIGNIFICANT`` stds over seeds, else 0."""
    mean, std = mean_std(values)
    if mean is None or std is None or abs(mean) <= SIGNIFICANT * std:
        return 0
    return -1 if mean < 0 else 1


def best_cell(cfg: Config, results: Results) -> tuple[int, int] | None:
    """(K, d') of the grid's FRMDN cell (any cell without FRMDN) with the lowest mean test NLL."""
    kind = "frmdn" if "frmdn" in _kinds(cfg) else None
    scored = [
        (mean, k, row.rank)
        for row in grid_rows(cfg)
        if kind is None or row.kind == kind
        for k in _components(cfg)
        if (mean := mean_std(nll_values(results, row, k).values())[0]) is not None
    ]
    return None if not scored else min(scored)[1:]


UNUSED_KL = 0.1
"""A latent dimension whose mean KL to the prior is below this (nats) is counted as unused by the VAE."""


def posterior_floor(paths: Sequence[Path]) -> dict:
    r"""What the VAE's posterior width alone costs every memory on the latent files ``paths``.

    A target :math:`z_{t+1} = \mu_{t+1} + \sigma_{t+1} \odot \epsilon` carries noise :math:`\epsilon`
    independent of all the memory reads, so no model's expected NLL per dimension is below
    :math:`\mathbb{E}\,\tfrac{1}{d} \sum_i \tfrac12 \log(2 \pi e\, \sigma_{t+1,i}^2)` (the mean over the
    predicted steps t >= 1). Also: how many dimensions the VAE leaves unused (mean KL to N(0, 1) below
    ``UNUSED_KL``; their sigma is near 1 and their floor near 1.42), and the expected NLL per dimension of a
    memory that ignores everything and predicts N(0, I), :math:`\tfrac12 \log 2\pi + \tfrac12
    \mathbb{E}(\mu^2 + \sigma^2)`: any useful memory scores between the two."""
    logvars, mus = [], []
    for path in paths:
        arrays = load_latents(path)
        logvars.append(arrays["logvar"][1:])
        mus.append(arrays["mu"][1:])
    logvar, mu = np.concatenate(logvars), np.concatenate(mus)
    kl = 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar).mean(axis=0)
    return {
        "nll_floor_per_dim": float(0.5 * (np.log(2 * np.pi * np.e) + logvar).mean()),
        "unused_dims": int((kl < UNUSED_KL).sum()),
        "latent_dim": int(logvar.shape[1]),
        "mean_kl_per_dim": float(kl.mean()),
        "standard_normal_nll_per_dim": float(0.5 * np.log(2 * np.pi) + 0.5 * (mu**2 + np.exp(logvar)).mean()),
    }


def _text(values: Iterable[float], digits: int = 4, sign: str = "") -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean:{sign}.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def value_table(cfg: Config, results: Results, rows: list[Row], bold: bool) -> list[str]:
    components = _components(cfg)
    means = {(row, k): mean_std(nll_values(results, row, k).values())[0] for row in rows for k in components}
    best = {
        k: min((m for (_, kk), m in means.items() if kk == k and m is not None), default=None)
        for k in components
    }
    lines = [
        "| Model | " + " | ".join(f"K={k}" for k in components) + " |",
        "|" + "---|" * (len(components) + 1),
    ]
    for row in rows:
        cells = []
        for k in components:
            text = _text(nll_values(results, row, k).values())
            cells.append(
                f"**{text}**" if bold and means[(row, k)] is not None and means[(row, k)] == best[k] else text
            )
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines


def difference_table(
    cfg: Config, results: Results, pairs: list[tuple[str, Row, Row]]
) -> tuple[list[str], dict[str, int]]:
    """A table of paired differences (one line per (label, first, second)), and the counts of cells where
    first is lower, clearly lower and clearly higher."""
    components = _components(cfg)
    counts = {"cells": 0, "lower": 0, "clearly_lower": 0, "clearly_higher": 0}
    lines = ["| | " + " | ".join(f"K={k}" for k in components) + " |", "|" + "---|" * (len(components) + 1)]
    for label, first, second in pairs:
        cells = []
        for k in components:
            diffs = paired_differences(results, first, second, k)
            if not diffs:
                cells.append("n/a")
                continue
            clear = is_clear(diffs)
            counts["cells"] += 1
            counts["lower"] += statistics.fmean(diffs) < 0
            counts["clearly_lower"] += clear < 0
            counts["clearly_higher"] += clear > 0
            cells.append(_text(diffs, sign="+") + (" *" if clear else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines, counts


def cost(cfg: Config, results: Results) -> dict:
    """Seconds of training per run (one thread each), and the wall time of the invocations that trained
    them."""
    per_kind = {
        kind: [s["train_seconds"] for c, s in results.items() if c.kind == kind and s.get("train_seconds")]
        for kind in _kinds(cfg)
    }
    invocations = read_jsonl(table1_dir(cfg) / "invocations.jsonl")
    return {
        "median_run_seconds": {kind: round(statistics.median(v), 1) for kind, v in per_kind.items() if v},
        "training_core_hours": round(sum(sum(v) for v in per_kind.values()) / 3600, 3),
        "wall_hours": round(sum(row["seconds"] for row in invocations) / 3600, 3),
        "invocations": len(invocations),
    }


def _counts_sentence(subject: str, counts: dict[str, int]) -> str:
    """``<subject> in L of N cells, lower by more than 2 std in A, higher by more than 2 std in B.``"""
    return (
        f"{subject} in {counts['lower']} of {counts['cells']} cells, lower by more than {SIGNIFICANT:g} "
        f"std in {counts['clearly_lower']}, higher by more than {SIGNIFICANT:g} std in "
        f"{counts['clearly_higher']}."
    )


def difference_sections(cfg: Config, results: Results, summary: dict) -> list[str]:
    """FRMDN minus RMDN at each d', and each d' minus the diagonal model, when the grid has them; their counts
    go to ``summary``."""
    kinds, ranks = _kinds(cfg), _ranks(cfg)
    lines = []
    if {"rmdn", "frmdn"} <= set(kinds):
        pairs = [("diagonal" if r == 0 else f"d'={r}", Row("frmdn", r), Row("rmdn", r)) for r in ranks]
        table, counts = difference_table(cfg, results, pairs)
        summary["frmdn_minus_rmdn"] = counts
        lines += [
            "",
            "FRMDN minus RMDN at the same K and d', paired by training seed (mean ± std over seeds; "
            f"negative: FRMDN better; * more than {SIGNIFICANT:g} std from 0):",
            "",
            *table,
            "",
            _counts_sentence("FRMDN has the lower mean test NLL", counts),
        ]
    if 0 in ranks and len(ranks) > 1:
        pairs = [
            (f"{KIND_NAMES[kind]} d'={r}", Row(kind, r), Row(kind, 0))
            for kind in kinds
            for r in ranks
            if r > 0
        ]
        table, counts = difference_table(cfg, results, pairs)
        summary["rank_minus_diagonal"] = counts
        lines += [
            "",
            "Does d' help? Each rank minus the diagonal model of the same kind and K, paired by seed:",
            "",
            *table,
            "",
            _counts_sentence("A low-rank model has the lower mean", counts),
        ]
    return lines


def extra_sections(cfg: Config, results: Results) -> list[str]:
    """The extra rows at the d' of the grid's best FRMDN cell beside the grid's rows of that d', and FRMDN
    minus RMDN without and with the reward and done heads, when they were trained."""
    best = best_cell(cfg, results)
    extras = extra_rows(cfg, best[1]) if best else []
    if not (extras and any(cell.row in extras for cell in results)):
        return []
    without = [Row(kind, best[1]) for kind in _kinds(cfg) if any(row.kind == kind for row in extras)]
    lines = [
        "",
        f"Extra rows at d'={best[1]}, the d' of the grid's best FRMDN cell (K={best[0]}):",
        "",
        *value_table(cfg, results, [*without, *extras], bold=False),
    ]
    if Row("rmdn", best[1], "heads") in extras and Row("frmdn", best[1], "heads") in extras:
        table, _ = difference_table(
            cfg,
            results,
            [
                ("without heads", Row("frmdn", best[1]), Row("rmdn", best[1])),
                ("with the heads", Row("frmdn", best[1], "heads"), Row("rmdn", best[1], "heads")),
            ],
        )
        lines += [
            "",
            f"FRMDN minus RMDN at d'={best[1]}, without and with the reward and done heads:",
            "",
            *table,
        ]
    return lines


def closing_notes(cfg: Config, results: Results, floor: dict, still_improving: int) -> list[str]:
    """The paragraphs under the tables: the data and training, the posterior's floor, the cost."""
    tc = cfg.memory_train
    first = next(iter(results.values()))
    spent = cost(cfg, results)
    medians = ", ".join(f"{KIND_NAMES[k]} {v:.0f} s" for k, v in spent["median_run_seconds"].items())
    z = (
        "= the VAE mean"
        if first["use_mu"]
        else "sampled from the VAE posterior (one fixed sample for val/test)"
    )
    return [
        "",
        (
            f"Data: {first['episodes']['train']}/{first['episodes']['val']}/{first['episodes']['test']} "
            f"train/val/test episodes ({first['transitions']['train']}/{first['transitions']['val']}/"
            f"{first['transitions']['test']} transitions); z {z}; "
            f"up to {tc.epochs} epochs of windows of {tc.seq_len} steps, {tc.batch_size} per step "
            f"({tc.optimizer}, lr {tc.lr:g}), early stopping on validation NLL "
            f"(patience {tc.patience}), the best-validation model scored. {still_improving} of "
            f"{len(results)} runs had their best validation NLL in their last epoch: they were still "
            "improving, and more epochs would lower their figures."
        ),
        "",
        (
            f"The posterior's width sets a floor: the VAE's noise in each target z is independent of all M "
            f"reads, so no model's expected test NLL is below E[1/2 log(2 pi e sigma^2)] = "
            f"{floor['nll_floor_per_dim']:.4f} nats per dimension on these test latents; "
            f"{floor['unused_dims']} of {floor['latent_dim']} dimensions are unused by the VAE (mean KL to "
            f"the prior below {UNUSED_KL:g} nats: sigma near 1, a floor near 1.42 each); the mean KL is "
            f"{floor['mean_kl_per_dim']:.3f} nats per dimension. A memory that predicts N(0, I) whatever it "
            f"reads would score {floor['standard_normal_nll_per_dim']:.4f}."
        ),
        "",
        (
            f"Cost: {len(results)} runs; median training time per run {medians} (one thread each); "
            f"{spent['training_core_hours']:.2f} core-hours of training in all, "
            f"{spent['wall_hours']:.2f} h of wall time over {spent['invocations']} invocation(s)."
        ),
    ]


def format_markdown(cfg: Config, results: Results, floor: dict) -> tuple[str, dict]:
    """The tables as Markdown, and the counts of the difference tables."""
    tc = cfg.memory_train
    seeds = tc.sweep_seeds
    base = cfg.seed if tc.seed is None else tc.seed
    first = next(iter(results.values()))
    lines = [
        (
            f"Test NLL per latent dimension (nats; lower is better) of the memory on `{cfg.name}` "
            f"({cfg.env.name} latents, Z={first.get('latent_dim')}), mean ± std over {seeds} training "
            f"seed{'s' * (seeds > 1)} "
            f"(memory_train.seed {base}..{base + seeds - 1}; the split and the test sample are the same for "
            "all): the layout of the paper's Table 1. Best mean of each column in bold."
        ),
        "",
        *value_table(cfg, results, grid_rows(cfg), bold=True),
    ]
    summary: dict = {}
    lines += difference_sections(cfg, results, summary)
    lines += extra_sections(cfg, results)
    still_improving = sum(
        s["best_epoch"] == s["epochs_trained"] and not s["stopped_early"] for s in results.values()
    )
    summary["still_improving"] = still_improving
    lines += closing_notes(cfg, results, floor, still_improving)
    return "\n".join(lines) + "\n", summary


CSV_COLUMNS = (
    "test_nll_per_dim",
    "test_nll_per_step",
    "val_nll_per_dim",
    "test_reward_mse",
    "test_done_loss",
    "best_epoch",
    "epochs_trained",
    "skipped_steps",
    "train_seconds",
)


def format_csv(results: Results) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "model",
            "kind",
            "components",
            "rank",
            "extra",
            "seed_index",
            "model_seed",
            *CSV_COLUMNS,
            "parameters",
        ]
    )
    for cell, summary in results.items():
        writer.writerow(
            [
                cell.row.label,
                cell.kind,
                cell.components,
                cell.rank,
                cell.extra,
                cell.replica,
                summary.get("model_seed"),
                *(summary.get(c) for c in CSV_COLUMNS),
                summary["parameters"]["total"],
            ]
        )
    return buffer.getvalue()


def save_plot(path: Path, cfg: Config, results: Results) -> None:
    """Test NLL against d' for each K and kind (a colour per K, dashed for the RMDN), error bars of one std
    over seeds."""
    series, styles = {}, {}
    for kind in _kinds(cfg):
        for index, k in enumerate(_components(cfg)):
            points = [
                (rank, mean, std or 0.0)
                for rank in _ranks(cfg)
                if (stats := mean_std(nll_values(results, Row(kind, rank), k).values()))[0] is not None
                for mean, std in [stats]
            ]
            if points:
                name = f"{KIND_NAMES[kind]} K={k}"
                series[name] = tuple(list(column) for column in zip(*points))
                styles[name] = {"color": f"C{index}", "linestyle": "--" if kind == "rmdn" else "-"}
    plot_curves(
        path,
        series,
        xlabel="rank d' of the precision's low-rank part (0 = diagonal)",
        ylabel="test NLL per latent dimension (nats)",
        title=f"Table 1 on {cfg.name} ({cfg.env.name}), mean ± std over seeds",
        styles=styles,
        integer_x=True,
    )


def describe(cells: list[Cell]) -> str:
    """What is left, row by row: ``RMDN (diagonal) 6 runs, ...``."""
    counts = Counter(cell.row.label for cell in cells)
    return "; ".join(f"{label} {n} run{'s' * (n > 1)}" for label, n in counts.items())


def _watch(folders: dict[Path, Cell], state: dict, stop: threading.Event) -> None:
    """Print a line as each run writes its summary (``map_fn`` only returns when every run is done)."""
    while True:
        stopped = stop.wait(2.0)
        for folder, cell in list(folders.items()):
            summary = folder / "summary.json"
            if summary.exists() and summary.stat().st_mtime >= state["started"] - 1:
                del folders[folder]
                state["done"] += 1
                state["trained"] += 1  # in this invocation: the pace
                elapsed = time.time() - state["started"]
                left = elapsed / state["trained"] * (state["total"] - state["done"])
                note(
                    f"table1: {cell.name} done; {state['done']}/{state['total']} runs, "
                    f"about {left / 60:.0f} min left at this pace"
                )
        if stopped:
            return


def train_runs(cfg: Config, cells: list[Cell], map_fn: MapFn, state: dict) -> Results:
    """Train ``cells`` with ``map_fn``, printing each as it ends; record the invocation's wall time."""
    out = table1_dir(cfg)
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=({out / cell.name: cell for cell in cells}, state, stop), daemon=True
    )
    started = time.time()
    watcher.start()
    try:
        trained = map_fn(train_cell, [(cfg, cell) for cell in cells])
    finally:
        stop.set()
        watcher.join()
        append_jsonl(
            out / "invocations.jsonl",
            {"started": round(started, 1), "seconds": round(time.time() - started, 1), "runs": len(cells)},
        )
    results = {}
    for cell, summary in zip(cells, trained):
        results[cell] = summary
        # on a cluster the run was trained on another machine: keep its summary here, so a rerun skips it
        stage = cell_stage(cfg, cell)
        if stage.done() is None:
            stage.folder.mkdir(parents=True, exist_ok=True)
            stage.finish(summary)
    return results


def run_table1(cfg: Config, map_fn: MapFn) -> dict:
    """Train every run of the grid, then of the extra rows (``map_fn(train_cell, tasks)``, skipping finished
    runs); write the tables."""
    check_rules(cfg, "memory_train", "sweep")
    # workers may start in another folder: give them the run's absolute path
    cfg = dataclasses.replace(cfg, runs_dir=str(Path(cfg.runs_dir).resolve()))
    tc = cfg.memory_train
    # fail here with a clear DataError, not inside every remote task
    split = split_latent_files(run_paths(cfg).latents, tc.val_fraction, tc.test_fraction, cfg.seed)
    out = prepare_stage(cfg, table1_dir(cfg))
    grid = row_cells(cfg, grid_rows(cfg))
    results = finished_runs(cfg, grid)
    state = {"started": time.time(), "done": len(results), "trained": 0, "total": len(grid)}
    pending = [cell for cell in grid if cell not in results]
    note(
        f"table1 ({out}): {len(results)} of {len(grid)} runs of the grid done"
        + (f"; left: {describe(pending)}" if pending else "")
        + ("; then the extra rows" if tc.sweep_extra else "")
    )
    trained = len(pending)
    if pending:
        results |= train_runs(cfg, pending, map_fn, state)
        state.update(done=len(results), trained=trained)
    best = best_cell(cfg, results)
    if best is not None and tc.sweep_extra:
        extras = row_cells(cfg, extra_rows(cfg, best[1]))
        results |= finished_runs(cfg, extras)
        pending = [cell for cell in extras if cell not in results]
        state.update(total=len(grid) + len(extras), done=len(results))
        note(
            f"table1: the grid's best FRMDN cell is K={best[0]}, d'={best[1]}; "
            f"{len(extras) - len(pending)} of {len(extras)} runs of the extra rows done"
            + (f"; left: {describe(pending)}" if pending else "")
        )
        trained += len(pending)
        if pending:
            results |= train_runs(cfg, pending, map_fn, state)

    splits = {str(summary["split"]) for summary in results.values()}
    if len(splits) > 1:  # cannot happen with Stage's fingerprint check, but the table would silently mislead
        raise RuntimeError("the runs of table1 were trained on different episode splits")
    floor = posterior_floor(split["test"] or split["train"])
    markdown, counts = format_markdown(cfg, results, floor)
    atomic_write_text(out / "table1.md", markdown)
    atomic_write_text(out / "table1.csv", format_csv(results))
    save_plot(out / "table1.png", cfg, results)
    summary = {
        "metric": METRIC,
        "table": str(out / "table1.md"),
        "csv": str(out / "table1.csv"),
        "plot": str(out / "table1.png"),
        "runs_trained": trained,
        "runs_skipped": len(results) - trained,
        "best_frmdn_cell": None if best is None else {"components": best[0], "rank": best[1]},
        "test_nll_per_dim": {cell.name: summary.get("test_nll_per_dim") for cell, summary in results.items()},
        **counts,
        "posterior": floor,
        "cost": cost(cfg, results),
    }
    write_json(out / "summary.json", summary)
    print(markdown)
    return summary

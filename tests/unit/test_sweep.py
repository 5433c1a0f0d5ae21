"""train-memory --sweep table1: every run on the same split and test sample, seeds paired, the paper's layout
with mean +- std, the extra rows at the best d', resumable, on Ray too."""

from __future__ import annotations

import csv
import math
import re
import statistics

import numpy as np
import pytest
import torch

from frmdn_worldmodels.benchmarks.table1 import run_table1, table1_dir
from frmdn_worldmodels.data.episodes import load_latents
from frmdn_worldmodels.data.sequences import split_latent_files
from frmdn_worldmodels.runtime.io import read_json, read_jsonl

GRID = (
    "memory_train.sweep_components=[1,2]",
    "memory_train.sweep_ranks=[0,1]",
    "memory_train.epochs=2",
    "memory.hidden=8",
)
NO_HEADS = ("memory.predict_reward=false", "memory.predict_done=false")


def sequential(fn, items):
    return [fn(item) for item in items]


pytestmark = pytest.mark.usefixtures("one_thread")


def table_lines(markdown: str, header: str) -> list[list[str]]:
    """The body rows (cells split, stripped) of the Markdown table right after the paragraph ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    body = []
    for line in lines[start + 4 :]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return body


def test_the_grid_over_seeds_with_the_extra_rows_and_a_rerun_that_skips_every_run(tiny_memory_run):
    cfg = tiny_memory_run(
        "grid",
        *GRID,
        *NO_HEADS,
        "memory_train.sweep_seeds=2",
        "memory_train.sweep_extra=[flow_context,heads]",
    )
    summary = run_table1(cfg, map_fn=sequential)
    out = table1_dir(cfg)
    grid = {
        f"{kind}_K{k}_r{r}_s{s}" for kind in ("rmdn", "frmdn") for k in (1, 2) for r in (0, 1) for s in (0, 1)
    }
    assert grid <= set(summary["test_nll_per_dim"])
    best = summary["best_frmdn_cell"]
    rank = best["rank"]
    extras = {f"frmdn_K{k}_r{rank}_flow_context_s{s}" for k in (1, 2) for s in (0, 1)}
    extras |= {
        f"{kind}_K{k}_r{rank}_heads_s{s}" for kind in ("rmdn", "frmdn") for k in (1, 2) for s in (0, 1)
    }
    assert set(summary["test_nll_per_dim"]) == grid | extras
    assert summary["runs_trained"] == len(grid | extras)

    runs = {name: read_json(out / name / "summary.json") for name in grid | extras}
    # the second seed is another model on the same data: same split and test transitions, other weights
    assert len({str(run["split"]) for run in runs.values()}) == 1
    assert {run["model_seed"] for run in runs.values()} == {cfg.seed, cfg.seed + 1}
    for name, run in runs.items():
        assert (out / name / "memory.pt").exists()
        assert run["memory_config"]["flow_context"] == ("flow_context" in name)
        assert run["memory_config"]["predict_reward"] == ("heads" in name)
        assert (run["test_reward_mse"] is not None) == ("heads" in name)
    assert runs["frmdn_K2_r1_s0"]["test_nll_per_dim"] != runs["frmdn_K2_r1_s1"]["test_nll_per_dim"]

    with open(out / "table1.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(grid | extras)
    nll = {
        (r["kind"], int(r["components"]), int(r["rank"]), r["extra"], int(r["seed_index"])): float(
            r["test_nll_per_dim"]
        )
        for r in rows
    }
    # the best FRMDN cell is the lowest mean over seeds
    means = {
        (k, r): statistics.fmean(nll[("frmdn", k, r, "", s)] for s in (0, 1)) for k in (1, 2) for r in (0, 1)
    }
    assert min(means, key=means.get) == (best["components"], rank)

    markdown = (out / "table1.md").read_text()
    table = table_lines(markdown, "Test NLL per latent dimension")
    assert [row[0] for row in table] == ["RMDN (diagonal)", "FRMDN (diagonal)", "RMDN (d'=1)", "FRMDN (d'=1)"]
    for row in table:
        kind, rank_ = ("rmdn" if row[0].startswith("RMDN") else "frmdn"), 0 if "diagonal" in row[0] else 1
        for column, k in enumerate((1, 2), start=1):
            values = [nll[(kind, k, rank_, "", s)] for s in (0, 1)]
            mean, std = (float(x) for x in row[column].strip("*").split(" ± "))
            assert mean == pytest.approx(statistics.fmean(values), abs=1e-4)
            assert std == pytest.approx(statistics.stdev(values), abs=1e-4)
    for column, k in enumerate((1, 2), start=1):
        bold = [row for row in table if row[column].startswith("**")]
        assert len(bold) == 1

    differences = table_lines(markdown, "FRMDN minus RMDN at the same K")
    assert [row[0] for row in differences] == ["diagonal", "d'=1"]
    lower = 0
    for row in differences:
        rank_ = 0 if row[0] == "diagonal" else 1
        for column, k in enumerate((1, 2), start=1):
            diffs = [nll[("frmdn", k, rank_, "", s)] - nll[("rmdn", k, rank_, "", s)] for s in (0, 1)]
            mean, std = (float(x) for x in row[column].rstrip(" *").split(" ± "))
            assert mean == pytest.approx(statistics.fmean(diffs), abs=1e-4)
            assert std == pytest.approx(statistics.stdev(diffs), abs=1e-4)
            assert row[column].endswith("*") == (abs(statistics.fmean(diffs)) > 2 * statistics.stdev(diffs))
            lower += statistics.fmean(diffs) < 0
    assert re.search(rf"FRMDN has the lower mean test NLL in {lower} of 4 cells", markdown)
    assert summary["frmdn_minus_rmdn"]["lower"] == lower

    extra_table = table_lines(markdown, f"Extra rows at d'={rank}")
    at = "diagonal" if rank == 0 else f"d'={rank}"
    assert [row[0] for row in extra_table] == [
        f"RMDN ({at})",
        f"FRMDN ({at})",
        f"FRMDN ({at}), flow conditioned on h",
        f"RMDN ({at}), + reward and done heads",
        f"FRMDN ({at}), + reward and done heads",
    ]
    assert "FRMDN minus RMDN at d'" in markdown and "with the heads" in markdown
    # the synthetic latents have log sigma^2 = -4 everywhere and |mu| of order 1: a floor of
    # (log(2 pi e) - 4) / 2, no unused dimension
    floor = summary["posterior"]
    assert floor["nll_floor_per_dim"] == pytest.approx(0.5 * (math.log(2 * math.pi * math.e) - 4.0), abs=1e-6)
    assert floor["unused_dims"] == 0 and floor["latent_dim"] == 4
    # N(0, I) against a Monte Carlo estimate on posterior samples of the test split's targets
    test = split_latent_files(cfg.run_dir / "latents", 0.2, 0.2, cfg.seed)["test"]
    mu = np.concatenate([load_latents(path)["mu"][1:] for path in test])
    sigma = np.exp(0.5 * np.concatenate([load_latents(path)["logvar"][1:] for path in test]))
    z = mu + sigma * np.random.default_rng(0).standard_normal((2000, *mu.shape))
    estimate = -torch.distributions.Normal(0.0, 1.0).log_prob(torch.as_tensor(z)).mean().item()
    assert floor["standard_normal_nll_per_dim"] == pytest.approx(estimate, abs=0.01)
    assert floor["standard_normal_nll_per_dim"] > max(nll.values())
    assert all(value > floor["nll_floor_per_dim"] for value in nll.values())
    assert f"= {floor['nll_floor_per_dim']:.4f} nats per dimension" in markdown
    last = sum(run["best_epoch"] == run["epochs_trained"] for run in runs.values())
    assert f"{last} of 28 runs had their best validation NLL in their last epoch" in markdown
    assert summary["still_improving"] == last
    assert re.search(r"Cost: 28 runs; median training time per run RMDN \d+ s, FRMDN \d+ s", markdown)
    assert (out / "table1.png").stat().st_size > 0
    assert [row["runs"] for row in read_jsonl(out / "invocations.jsonl")] == [16, 12]

    def refuse(fn, items):
        raise AssertionError(f"finished runs were sent to train again: {items}")

    again = run_table1(cfg, map_fn=refuse)
    assert again["runs_trained"] == 0 and again["test_nll_per_dim"] == summary["test_nll_per_dim"]
    assert (out / "table1.md").read_text().split("Cost:")[0] == markdown.split("Cost:")[0]


def test_a_partly_done_sweep_trains_only_the_missing_runs_and_says_what_is_left(tiny_memory_run, capsys):
    cfg = tiny_memory_run(
        "partial", *GRID[:-2], "memory_train.sweep_components=[1]", "memory_train.epochs=1", "memory.hidden=8"
    )
    run_table1(cfg, map_fn=sequential)
    (table1_dir(cfg) / "frmdn_K1_r1_s0" / "summary.json").unlink()
    capsys.readouterr()
    sent = []
    summary = run_table1(cfg, map_fn=lambda fn, items: sent.extend(items) or sequential(fn, items))
    assert [cell.name for _, cell in sent] == ["frmdn_K1_r1_s0"] and summary["runs_trained"] == 1
    assert "3 of 4 runs of the grid done; left: FRMDN (d'=1) 1 run" in capsys.readouterr().err

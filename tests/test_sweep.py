"""train-memory --sweep table1: every cell trained on the same split, the paper's layout, resumable, on Ray
too."""

from __future__ import annotations

import csv
import re

import pytest

from worldmodel.io import read_json
from worldmodel.sweep import run_table1, table1_dir

GRID = (
    "memory_train.sweep_components=[1,2]",
    "memory_train.sweep_ranks=[0,1]",
    "memory_train.epochs=2",
    "memory.hidden=8",
)


def sequential(fn, items):
    return [fn(item) for item in items]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_table1_has_every_cell_in_the_papers_layout_and_a_rerun_skips_them(tiny_memory_run):
    cfg = tiny_memory_run("grid", *GRID)
    summary = run_table1(cfg, map_fn=sequential)
    out = table1_dir(cfg)
    assert summary["cells_trained"] == 8 and summary["cells_skipped"] == 0
    names = {f"{kind}_K{k}_r{r}" for kind in ("rmdn", "frmdn") for k in (1, 2) for r in (0, 1)}
    assert set(summary["test_nll_per_dim"]) == names
    for name in names:
        cell = read_json(out / name / "summary.json")
        assert (out / name / "memory.pt").exists()
        assert f"{cell['kind']}_K{cell['components']}_r{cell['rank']}" == name
        assert cell["memory_config"]["hidden"] == 8
    # the same data and split for every cell
    splits = {str(read_json(out / name / "summary.json")["split"]) for name in names}
    assert len(splits) == 1

    with open(out / "table1.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    values = {(r["kind"], int(r["components"]), int(r["rank"])): float(r["test_nll_per_dim"]) for r in rows}

    markdown = (out / "table1.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "(" in line]
    labels = [line.split("|")[1].strip() for line in table]
    assert labels == ["RMDN (diagonal)", "FRMDN (diagonal)", "RMDN (d'=1)", "FRMDN (d'=1)"]
    for column, k in enumerate((1, 2), start=2):
        cells = [line.split("|")[column].strip() for line in table]
        bold = [cell for cell in cells if cell.startswith("**")]
        assert len(bold) == 1
        assert float(bold[0].strip("*")) == pytest.approx(
            min(v for (_, kk, _), v in values.items() if kk == k), abs=1e-4
        )
    wins = sum(values[("frmdn", k, r)] < values[("rmdn", k, r)] for k in (1, 2) for r in (0, 1))
    assert re.search(rf"FRMDN has the lower test NLL in {wins} of 4 cells", markdown)
    assert (out / "table1.png").stat().st_size > 0

    def refuse(fn, items):
        raise AssertionError(f"finished cells were sent to train again: {items}")

    again = run_table1(cfg, map_fn=refuse)
    assert again["cells_trained"] == 0 and again["test_nll_per_dim"] == summary["test_nll_per_dim"]


def test_a_partly_done_sweep_trains_only_the_missing_cells(tiny_memory_run):
    cfg = tiny_memory_run(
        "partial", *GRID[:-2], "memory_train.sweep_components=[1]", "memory_train.epochs=1", "memory.hidden=8"
    )
    run_table1(cfg, map_fn=sequential)
    (table1_dir(cfg) / "frmdn_K1_r1" / "summary.json").unlink()
    sent = []
    summary = run_table1(cfg, map_fn=lambda fn, items: sent.extend(items) or sequential(fn, items))
    assert [cell for _, cell in sent] == [("frmdn", 1, 1)] and summary["cells_trained"] == 1


def test_cells_run_as_ray_tasks(tiny_memory_run, ray_session):
    from rollouts.parallel import ray_map

    cfg = tiny_memory_run(
        "ray", *GRID[2:], "memory_train.sweep_components=[2]", "memory_train.sweep_ranks=[1]"
    )
    summary = run_table1(cfg, map_fn=ray_map(cfg.ray))
    assert summary["cells_trained"] == 2
    assert all(value is not None for value in summary["test_nll_per_dim"].values())
    assert (table1_dir(cfg) / "frmdn_K2_r1" / "memory.pt").exists()

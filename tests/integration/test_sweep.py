"""The tests of ``tests/unit/test_sweep.py``'s subject that start Ray or a subprocess."""

from __future__ import annotations

from frmdn_worldmodels.benchmarks.table1 import run_table1, table1_dir
from tests.unit.test_sweep import GRID


def test_runs_go_as_ray_tasks(tiny_memory_run, ray_session):
    from frmdn_worldmodels.runtime.cluster import ray_map

    cfg = tiny_memory_run(
        "ray", *GRID[2:], "memory_train.sweep_components=[2]", "memory_train.sweep_ranks=[1]"
    )
    summary = run_table1(cfg, map_fn=ray_map(cfg.ray))
    assert summary["runs_trained"] == 2
    assert all(value is not None for value in summary["test_nll_per_dim"].values())
    assert (table1_dir(cfg) / "frmdn_K2_r1_s0" / "memory.pt").exists()

"""The tests of ``tests/unit/test_train_memory.py``'s subject that start Ray or a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from frmdn_worldmodels.runtime.io import read_json
from tests.unit.test_train_memory import ROOT


def test_command_line_smoke(tiny_memory_run, run_main):
    cfg = tiny_memory_run("cli")
    args = [
        sys.executable,
        str(ROOT / "run.py"),
        "train-memory",
        "--set",
        f"runs_dir={cfg.runs_dir}",
        "--set",
        "memory.hidden=8",
        "--set",
        "memory_train.epochs=1",
        "--set",
        "memory_train.seq_len=8",
    ]
    result = subprocess.run(
        [*args, "--set", "name=cli"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert np.isfinite(summary["test_nll_per_dim"])
    assert read_json(Path(cfg.runs_dir) / "cli" / "memory" / "summary.json") == summary

    missing = run_main(*args[2:], "--set", "name=nothing")
    assert missing.returncode == 2 and "run.py encode" in missing.stderr

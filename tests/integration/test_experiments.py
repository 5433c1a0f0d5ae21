"""The tests of ``tests/unit/test_experiments.py``'s subject that start Ray or a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.test_pipeline import REPO

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # the scripts import their neighbours by name
import done_head  # noqa: E402 (the scripts' folder on the path)


def test_an_unknown_switch_is_refused():
    result = subprocess.run(
        [sys.executable, "experiments/dream_switches.py", "--only", "magic"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "unknown switch 'magic'" in result.stderr


def test_the_done_head_command(tmp_path, tiny_run, run_main):
    from frmdn_worldmodels.data.episodes import load_latents
    from frmdn_worldmodels.runtime.io import read_json
    from tests.conftest import copy_tiny_run

    copy_tiny_run(tiny_run, tmp_path)
    result = run_main(f"--set=runs_dir={tmp_path}", main=done_head.main)
    assert result.returncode == 0, result.stderr
    summary = read_json(tmp_path / "tiny" / "done_head.json")
    split = read_json(tmp_path / "tiny" / "memory" / "summary.json")["split"]
    for name in ("train", "test"):
        ended = [
            episode
            for episode in split[name]
            if load_latents(tmp_path / "tiny" / "latents" / episode)["terminals"][-1]
        ]
        assert summary[name]["episodes"] == len(ended)
        assert "by_end" not in summary[name]  # CarRacing: no player to fall
    missing = run_main(f"--set=runs_dir={tmp_path / 'none'}", main=done_head.main)
    assert missing.returncode == 2 and "no trained memory" in missing.stderr

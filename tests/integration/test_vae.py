"""The tests of ``tests/unit/test_vae.py``'s subject that start Ray or a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.unit.test_vae import ROOT, write_episodes


def test_run_py_train_vae_and_encode(tmp_path, run_main):
    sets = [
        "--set",
        f"runs_dir={tmp_path / 'runs'}",
        "--set",
        "name=smoke",
        "--set",
        "vae.epochs=1",
        "--set",
        "vae.batch_size=16",
    ]
    write_episodes(tmp_path / "runs" / "smoke" / "episodes", count=3, steps=10)
    for command in ("train-vae", "encode"):
        result = subprocess.run(
            [sys.executable, "run.py", command, *sets],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert isinstance(summary, dict)
    assert summary["encoded"] == 3
    assert len(list((tmp_path / "runs" / "smoke" / "latents").glob("*.npz"))) == 3

    result = run_main("train-vae", "--set", f"runs_dir={tmp_path / 'empty'}")
    assert result.returncode == 2 and "run.py collect" in result.stderr

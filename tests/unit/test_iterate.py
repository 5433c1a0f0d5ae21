"""Iterative training (``run.py iterate``, and ``pipeline`` with ``iterate.iterations`` > 0) on a tiny run."""

from __future__ import annotations

from pathlib import Path

from frmdn_worldmodels.runtime.config import load_config
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.stages.iterate import iteration_config
from tests.unit.test_pipeline import TINY

ITERATE = [
    "iterate.iterations=2",
    "iterate.episodes=2",
    "iterate.memory_epochs=1",
    "iterate.generations=2",
    "iterate.eval_episodes=2",
    "iterate.noise_scale=0.2",
]


def config(tmp_path: Path, *extra: str):
    return load_config(None, [f"runs_dir={tmp_path}", *TINY, *ITERATE, *extra])


def test_evaluate_and_dream_read_the_last_iterations_controller(tmp_path, capsys):
    from frmdn_worldmodels import cli

    overrides = [f"runs_dir={tmp_path}", "iterate.iterations=2"]
    config = load_config(None, overrides)
    assert cli.stage_config(config, "train-controller") is config
    # before the iterations, the command names what to run instead of scoring the wrong controller
    assert cli.main(["evaluate", *(f"--set={item}" for item in overrides)]) == 2
    assert "iterate.iterations=0" in capsys.readouterr().err
    final = iteration_config(config, 2)
    (run_paths(final).controller).mkdir(parents=True)
    (run_paths(final).controller / "best.pt").write_bytes(b"")
    for stage in ("evaluate", "dream"):
        assert run_paths(cli.stage_config(config, stage)).root == run_paths(final).root
    no_iterations = load_config(None, [f"runs_dir={tmp_path}"])
    assert cli.stage_config(no_iterations, "evaluate") is no_iterations

"""Episode collection on Ray: valid files for both games, resume, corrupt files, failing workers, bad
config."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import ray

from frmdn_worldmodels.data.episodes import save_episode
from frmdn_worldmodels.runtime.config import ConfigError, load_config
from frmdn_worldmodels.runtime.io import DataError
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.stages.collect import (
    collect_episodes,
    run,
)

ROOT = Path(__file__).resolve().parents[2]

# The workers cannot import this test file, so the functions they run travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def make_cfg(tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            f"runs_dir={tmp_path}",
            "collect.episodes=3",
            "collect.max_steps=12",
            "collect.workers=2",
            *overrides,
        ],
    )


class BrokenEnv(gymnasium.Wrapper):
    """An env that raises three steps into the episode."""

    def __init__(self, env):
        super().__init__(env)
        self.steps = 0

    def step(self, action):
        self.steps += 1
        if self.steps > 3:
            raise RuntimeError("injected env failure")
        return self.env.step(action)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("env.name=pong", "env.name"),
        ("collect.episodes=-1", "collect.episodes"),
        ("collect.retries=-2", "collect.retries"),
        ("collect.max_steps=-1", "collect.max_steps"),  # 0 is valid: the game's horizon
        ("collect.episode_timeout=-1", "collect.episode_timeout"),
        ("collect.policy=brownian", "collect.policy"),
    ],
)
def test_bad_config_is_refused_before_any_work(tmp_path, override, field):
    # a value outside its field's bounds is refused as the config is read, the others by the stage's check
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run(make_cfg(tmp_path, override, *(["env.name=mario"] if "policy" in override else [])))
    assert not any(tmp_path.iterdir())  # nothing written, not even the run folder


def test_unwritable_folder_is_refused_with_the_field(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the runs folder should be")
    with pytest.raises(ConfigError, match="runs_dir"):
        run(make_cfg(blocker))


def test_episodes_of_another_game_are_not_mixed_in(tmp_path):
    cfg = make_cfg(tmp_path)
    folder = run_paths(cfg).episodes
    steps = 4
    save_episode(
        folder / "ep_00000.npz",
        np.zeros((steps + 1, 64, 64, 3), np.uint8),
        np.eye(7, dtype=np.float32)[np.zeros(steps, int)],
        np.zeros(steps),
        np.zeros(steps, bool),
    )
    with pytest.raises(DataError, match="ep_00000.npz"):
        collect_episodes(cfg, folder, progress=False)


def test_command_line_refuses_a_bad_value(tmp_path, run_main):
    result = run_main("collect", "--set", "env.name=pong", "--set", f"runs_dir={tmp_path}")
    assert result.returncode == 2
    assert "env.name" in result.stderr and "pong" in result.stderr
    assert not any(tmp_path.iterdir())

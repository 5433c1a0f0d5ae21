"""The tests of ``tests/unit/test_collect.py``'s subject that start Ray or a subprocess."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from frmdn_worldmodels.data.episodes import list_npz, load_episode, save_episode
from frmdn_worldmodels.games.envs import make_env
from frmdn_worldmodels.games.policies import make_exploration_policy
from frmdn_worldmodels.runtime.io import DataError, read_json
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.stages.collect import (
    collect_env_config,
    collect_episodes,
    episode_name,
    episode_seeds,
    rollout_episode,
    run,
)
from tests.unit.test_collect import ROOT, BrokenEnv, make_cfg

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run in Ray's workers


def reference_episode(cfg, index: int) -> dict[str, np.ndarray]:
    """Episode ``index`` played in this process, from the documented seeding contract."""
    env_seed, policy_rng = episode_seeds(cfg.seed, index)
    env_cfg = collect_env_config(cfg)
    env = make_env(env_cfg)
    policy = make_exploration_policy(env_cfg, cfg.collect, policy_rng, env)
    return rollout_episode(env, env_cfg, policy, env_seed)


def flaky_episode(env, env_cfg, policy, seed, log_dir: str, plan: dict[int, str]):
    """``rollout_episode``, except for the seeds in ``plan``: ``broken`` (the env always raises),
    ``raise_once`` (raises on the first attempt), ``crash_once`` (the worker process dies on the first
    attempt) or ``hang_once`` (the first attempt never returns).
    """
    mode = plan.get(seed)
    if mode is None:
        return rollout_episode(env, env_cfg, policy, seed)
    log = Path(log_dir) / f"{seed}.attempts"
    with open(log, "a") as handle:
        handle.write("attempt\n")
    attempt = len(log.read_text().splitlines())
    if mode == "broken":
        return rollout_episode(BrokenEnv(env), env_cfg, policy, seed)
    if mode == "raise_once" and attempt == 1:
        raise OSError("injected transient failure")
    if mode == "crash_once" and attempt == 1:
        os._exit(1)
    if mode == "hang_once" and attempt == 1:
        time.sleep(3600)
    return rollout_episode(env, env_cfg, policy, seed)


def run_cli(*args: str, ray_address: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address} if ray_address else None
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "collect", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(
    ("game", "policy"), [("carracing", "auto"), ("mario", "auto"), ("mario", "ram_expert")]
)
def test_both_games_give_valid_reproducible_episodes(ray_session, tmp_path, game, policy):
    cfg = make_cfg(tmp_path, f"env.name={game}", f"collect.policy={policy}")
    summary = run(cfg)
    folder = run_paths(cfg).episodes
    assert [p.name for p in list_npz(folder)] == [episode_name(i) for i in range(3)]
    assert summary["written"] == 3 and summary["failed"] == {} and summary["skipped"] == 0
    assert read_json(folder / "summary.json") == summary
    assert (folder / "config.yaml").is_file()
    width = 3 if game == "carracing" else 7
    frames = 0
    for index, path in enumerate(list_npz(folder)):
        episode = load_episode(path)
        steps = len(episode["rewards"])
        frames += steps
        assert 1 <= steps <= 12
        assert episode["obs"].shape == (steps + 1, 64, 64, 3)
        assert episode["actions"].shape == (steps, width)
        assert ("player" in episode) == ("enemies" in episode) == (game == "mario")
        if game == "mario":
            np.testing.assert_array_equal(episode["actions"].sum(axis=1), 1.0)  # one-hot
            assert episode["player"].shape == (steps + 1, 2)
            assert np.all((episode["player"] >= 0) & (episode["player"] < 64))  # on the screen so early
            assert episode["enemies"].shape == (steps + 1, 5, 2)
        # the same episode whichever worker played it, after however many earlier episodes on its env
        expected = reference_episode(cfg, index)
        for key in expected:
            np.testing.assert_array_equal(episode[key], expected[key], err_msg=f"{path.name} {key}")
    assert summary["frames"] == frames
    # different episodes really differ
    assert not np.array_equal(
        load_episode(folder / "ep_00000.npz")["actions"], load_episode(folder / "ep_00001.npz")["actions"]
    )


def test_resume_after_a_partial_run_gives_exactly_n_valid_files(ray_session, tmp_path):
    cfg = make_cfg(tmp_path, "collect.episodes=4", "collect.max_steps=10")
    folder = run_paths(cfg).episodes
    expected = {episode_name(i): reference_episode(cfg, i) for i in range(4)}
    # What a killed run leaves: episode 0 complete, episode 1 never started, episode 2 truncated (e.g. a copy
    # cut short), episode 3 a temporary file of an unfinished write.
    save_episode(folder / "ep_00000.npz", **expected["ep_00000.npz"])
    save_episode(folder / "ep_00002.npz", **expected["ep_00002.npz"])
    truncated = folder / "ep_00002.npz"
    truncated.write_bytes(truncated.read_bytes()[:500])
    (folder / ".ep_00003.npz.abc123.tmp").write_bytes(b"half a file")
    with pytest.raises(DataError, match="ep_00002.npz"):
        load_episode(truncated)

    summary = collect_episodes(cfg, folder, progress=False)

    assert summary["skipped"] == 1 and summary["written"] == 3 and summary["failed"] == {}
    assert list(summary["replaced"]) == ["ep_00002.npz"]
    assert "ep_00002.npz" in summary["replaced"]["ep_00002.npz"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)  # exactly N files, no leftovers
    for name, arrays in expected.items():
        episode = load_episode(folder / name)
        for key, array in arrays.items():
            np.testing.assert_array_equal(episode[key], array)

    again = collect_episodes(cfg, folder, progress=False)  # nothing left to do: no Ray work at all
    assert again["skipped"] == 4 and again["written"] == 0 and again["workers"] == 0


def test_failing_env_or_dying_worker_loses_no_other_episode(ray_session, tmp_path):
    cfg = make_cfg(
        tmp_path,
        "collect.episodes=5",
        "collect.max_steps=8",
        "collect.retries=2",
        "collect.episode_timeout=15",  # room for a worker to start on a loaded machine
    )
    folder = run_paths(cfg).episodes
    seed_of = {index: episode_seeds(cfg.seed, index)[0] for index in range(5)}
    plan = {seed_of[1]: "raise_once", seed_of[2]: "broken", seed_of[3]: "crash_once", seed_of[4]: "hang_once"}
    episode_fn = functools.partial(flaky_episode, log_dir=str(tmp_path), plan=plan)

    summary = collect_episodes(cfg, folder, episode_fn=episode_fn, progress=False)

    assert summary["written"] == 4
    assert list(summary["failed"]) == ["ep_00002.npz"]
    assert "RuntimeError: injected env failure" in summary["failed"]["ep_00002.npz"]
    assert len((tmp_path / f"{seed_of[2]}.attempts").read_text().splitlines()) == 3  # 1 try + 2 retries
    assert len((tmp_path / f"{seed_of[1]}.attempts").read_text().splitlines()) == 2
    assert len((tmp_path / f"{seed_of[3]}.attempts").read_text().splitlines()) == 2
    assert (
        len((tmp_path / f"{seed_of[4]}.attempts").read_text().splitlines()) == 2
    )  # killed after 8 s, retried
    assert [p.name for p in list_npz(folder)] == [
        "ep_00000.npz",
        "ep_00001.npz",
        "ep_00003.npz",
        "ep_00004.npz",
    ]
    for index in (0, 1, 3, 4):
        episode = load_episode(folder / episode_name(index))
        np.testing.assert_array_equal(episode["obs"], reference_episode(cfg, index)["obs"])


def test_command_line_collects_valid_files(ray_session, tmp_path):
    # The command joins the test session's Ray through RAY_ADDRESS, as it would join a cluster.
    result = run_cli(
        "--set",
        "collect.episodes=2",
        "--set",
        "collect.max_steps=10",
        "--set",
        f"runs_dir={tmp_path}",
        ray_address=ray_session.get_runtime_context().gcs_address,
    )
    assert result.returncode == 0, result.stderr
    files = list_npz(tmp_path / "tiny" / "episodes")
    assert [p.name for p in files] == ["ep_00000.npz", "ep_00001.npz"]
    for path in files:
        assert len(load_episode(path)["rewards"]) == 10


def test_ctrl_c_stops_collection_within_seconds_and_the_same_command_resumes(tmp_path):
    """SIGINT (Ctrl-C) while episodes are being played on Ray: exit code 130 and a line saying how to resume,
    within seconds; rerun, the same command keeps what was saved and collects the rest."""
    args = ["--set", "collect.episodes=16", "--set", "collect.max_steps=24", "--set", f"runs_dir={tmp_path}"]
    folder = tmp_path / "tiny" / "episodes"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "collect", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's foreground job
    )
    deadline = time.monotonic() + 240
    while not list_npz(folder) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "rerun the same command" in stderr and "Traceback" not in stderr
    assert time.monotonic() - sent < 20
    kept = {path.name for path in list_npz(folder)}
    assert 0 < len(kept) < 16
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert kept < {path.name for path in list_npz(folder)} and len(list_npz(folder)) == 16

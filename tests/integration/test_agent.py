"""The tests of ``tests/unit/test_agent.py``'s subject that start Ray or a subprocess."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from frmdn_worldmodels.agent.workers import rollout_pool
from frmdn_worldmodels.runtime.config import EnvConfig, load_config
from frmdn_worldmodels.runtime.io import load_checkpoint, read_json, save_checkpoint
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.pool import PoolKeeper
from frmdn_worldmodels.stages import evaluate
from tests.unit.test_agent import H, Z, models


def test_rollout_pools_share_actors_only_for_the_same_models_and_settings(ray_session):
    """With a ``PoolKeeper``, a rollout pool asked for again with a copy of the same weights and settings
    is the kept one (``max_steps`` None is the env's own limit); another weight, a shorter limit or another
    setting gets new actors."""
    import copy

    env_cfg = EnvConfig(name="carracing", max_steps=6)
    vae, memory = models()
    controller = load_config(None, ["controller.workers=1"]).controller

    def pool(memory_payload, max_steps=None, settings=controller):
        return rollout_pool(env_cfg, vae.state_dict(), memory_payload, False, max_steps, settings, keeper)

    payload = memory.to_checkpoint()
    with PoolKeeper() as keeper:
        first = pool(payload)
        first.close()
        again = pool(copy.deepcopy(payload), max_steps=6)
        assert again is first
        again.close()
        with torch.no_grad():
            next(memory.parameters())[0].add_(1e-3)
        other = pool(memory.to_checkpoint())
        assert other is not first
        other.close()
        shorter = pool(memory.to_checkpoint(), max_steps=5)
        assert shorter is not other
        shorter.close()
        more_envs = pool(
            memory.to_checkpoint(), 5, load_config(None, ["controller.envs_per_worker=3"]).controller
        )
        assert more_envs is not shorter
        more_envs.close()


def test_evaluate_scores_real_episodes_against_random_actions_with_videos(ray_session, agent_run):
    summary = evaluate.run(agent_run)
    out = run_paths(agent_run).evaluate
    assert summary["episodes"] == 3 and len(summary["returns"]) == 3 and summary["steps"] == [6, 6, 6]
    assert summary["mean"] == pytest.approx(np.mean(summary["returns"]), abs=1e-3)
    assert summary["std"] == pytest.approx(np.std(summary["returns"]), abs=1e-3)
    assert len(summary["random_policy"]["returns"]) == 3
    assert summary["controller"]["generation"] == 3
    for name in ("best", "worst"):
        video = iio.imread(out / f"{name}.gif")
        assert video.shape == (7, 64, 64, 3)  # the first frame and one per step
    assert summary["best_video"]["return"] >= summary["worst_video"]["return"]
    assert read_json(out / "summary.json")["seeds"] == summary["seeds"]
    assert evaluate.run(agent_run)["skipped"] is True


def test_evaluate_scores_the_teacher_on_the_same_seeds_paired(ray_session, agent_run):
    """``evaluate.teacher`` plays the game's teacher on the evaluation seeds: each return is that of the
    collector playing the same driver on the same seed with the same draws, and the paired difference is the
    agent's return less the teacher's, seed by seed."""
    from dataclasses import replace

    from frmdn_worldmodels.games.envs import make_env
    from frmdn_worldmodels.runtime.seeds import episode_rng
    from frmdn_worldmodels.stages.collect import rollout_episode
    from tests.toy_game import CentringPolicy

    env_cfg = replace(agent_run.env, name="tests.toy_game:DOTS", max_steps=40)
    cfg = replace(
        agent_run, env=env_cfg, evaluate=replace(agent_run.evaluate, teacher="centring", video=False)
    )
    best = load_checkpoint(run_paths(cfg).controller / "best.pt")
    best["controller"]["discrete"] = True  # the same parameters, read as the toy game's three pushes
    save_checkpoint(run_paths(cfg).controller / "best.pt", **best)
    summary = evaluate.run(cfg)

    teacher = summary["teacher"]
    env = make_env(env_cfg)
    expected = []
    for seed in summary["seeds"]:
        policy = CentringPolicy(episode_rng("teacher", seed))
        expected.append(float(rollout_episode(env, env_cfg, policy, seed)["rewards"].sum()))
    assert teacher["policy"] == "centring" and teacher["returns"] == pytest.approx(expected)
    differences = np.subtract(summary["returns"], expected)
    paired = teacher["agent_minus_teacher"]
    assert paired["mean"] == pytest.approx(differences.mean())
    assert paired["se"] == pytest.approx(differences.std(ddof=1) / np.sqrt(len(differences)))
    random_paired = summary["random_policy"]["agent_minus_random"]["mean"]
    assert random_paired == pytest.approx(np.mean(summary["returns"]) - summary["random_policy"]["mean"])


def test_train_controller_in_the_real_game_on_ray(ray_session, agent_run, capsys):
    import shutil
    from dataclasses import replace

    from frmdn_worldmodels.runtime.io import load_checkpoint, read_jsonl
    from frmdn_worldmodels.stages import train_controller

    # the fixture's hand-made best.pt is no stage's output: the stage never overwrites what it did not make
    shutil.rmtree(run_paths(agent_run).controller)
    cfg = replace(
        agent_run,
        controller=replace(
            agent_run.controller,
            train_in="real",
            generations=2,
            population=3,
            rollouts=1,
            eval_every=2,
            eval_episodes=1,
            hidden=4,  # the Ray actors build Ha's controller with a hidden layer too
        ),
    )
    summary = train_controller.run(cfg)
    # the tiny config's dream settings are named as unused, not silently dropped
    err = capsys.readouterr().err
    assert "unused here: controller.dream_start='any'" in err and "eval_real_episodes=8" in err
    out = run_paths(cfg).controller
    rows = read_jsonl(out / "metrics.jsonl")
    assert summary["train_in"] == "real" and [row["generation"] for row in rows] == [1, 2]
    assert all(row["worst"] - 1e-9 <= row["mean"] <= row["best"] + 1e-9 for row in rows)
    best = load_checkpoint(out / "best.pt")
    assert best["train_in"] == "real" and best["generation"] == 2 and best["fitness"] == rows[1]["eval_mean"]
    assert best["controller"]["hidden"] == 4 and summary["num_params"] == (Z + H + 1) * 4 + 5 * 3

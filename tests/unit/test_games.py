"""One interface for games (``games/game.py``): every game, the built-in ones and one the tests bring, keeps
the same contract, and a game named in the config runs the whole pipeline with no other code knowing it."""

import dataclasses
import itertools

import numpy as np
import pytest

from frmdn_worldmodels.games.envs import action_dim, decode_action, encode_action, make_env
from frmdn_worldmodels.games.game import GAMES, game_of
from frmdn_worldmodels.games.policies import make_exploration_policy
from frmdn_worldmodels.runtime.config import CollectConfig, ConfigError, EnvConfig

TOY = "tests.toy_game:DOTS"
NAMES = ["carracing", "mario", "doom_takecover", TOY]


@pytest.mark.parametrize("name", NAMES)
def test_every_game_keeps_the_contract(name):
    """64x64 uint8 frames, actions in its space that encode to A floats and back, every exploration policy
    and every teacher acting in that space for a few steps."""
    env_cfg = EnvConfig(name=name, max_steps=5)
    game = game_of(env_cfg)
    for policy_name in [*game.policies, *(f"teacher {name}" for name in game.teachers)]:
        env = make_env(env_cfg, seed=3)
        try:
            rng = np.random.default_rng(0)
            if policy_name.startswith("teacher "):
                policy = game.teachers[policy_name.removeprefix("teacher ")](env_cfg, rng, env)
            else:
                collect = dataclasses.replace(CollectConfig(), policy=policy_name)
                policy = make_exploration_policy(env_cfg, collect, rng, env)
            obs, _ = env.reset(seed=3)
            policy.reset()
            for _ in range(3):
                assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
                action = policy.act(obs)
                assert env.action_space.contains(action)
                vector = encode_action(env_cfg, action)
                assert vector.shape == (action_dim(env_cfg),) and vector.dtype == np.float32
                np.testing.assert_array_equal(decode_action(env_cfg, vector), action)
                obs, *_ = env.step(action)
        finally:
            env.close()


def test_an_unknown_game_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="env.name: unknown game 'pong'"):
        game_of(EnvConfig(name="pong"))
    with pytest.raises(ConfigError, match="env.name: cannot load the game 'tests.toy_game:PONG'"):
        game_of(EnvConfig(name="tests.toy_game:PONG"))
    with pytest.raises(ConfigError, match="is a int, not a games.game.Game"):
        game_of(EnvConfig(name="tests.toy_game:SIZE"))
    assert "pong" not in GAMES


def test_doom_pays_one_a_tic_until_the_player_dies_or_the_cap():
    """Take Cover as World Models played it: Discrete(3), +1 a tic alive, the end a death (``terminated``)
    or the 2,100-tic cap (``truncated``); the random policy holds each action for 1 to 11 tics."""
    env_cfg = EnvConfig(name="doom_takecover", max_steps=2100, action_repeat=1)
    env = make_env(env_cfg, seed=1)
    try:
        policy = make_exploration_policy(env_cfg, CollectConfig(policy="random"), np.random.default_rng(0))
        obs, _ = env.reset(seed=1)
        policy.reset()
        actions, rewards, terminated, truncated = [], [], False, False
        while not (terminated or truncated):
            actions.append(policy.act(obs))
            obs, reward, terminated, truncated, _ = env.step(actions[-1])
            rewards.append(reward)
        assert set(rewards) == {1.0} and terminated and not truncated and len(rewards) < 2100
        holds = [len(list(run)) for _, run in itertools.groupby(actions)]
        assert max(holds[:-1]) <= 2 * 11  # two draws of the same action may follow each other
        short = make_env(dataclasses.replace(env_cfg, max_steps=5), seed=1)
        short.reset(seed=1)
        ends = [short.step(0)[3] for _ in range(5)]
        assert ends == [False] * 4 + [True]
        short.close()
    finally:
        env.close()


def test_doom_skill_sets_the_game_speed():
    """``env.doom_skill`` reaches the game: standing still, the first volley kills later at skill 4."""

    def tics_standing_still(skill: int) -> int:
        env = make_env(EnvConfig(name="doom_takecover", max_steps=2100, doom_skill=skill), seed=1)
        env.reset(seed=1)
        tics = 1
        while not any(env.step(0)[2:4]):
            tics += 1
        env.close()
        return tics

    fast, slow = tics_standing_still(5), tics_standing_still(4)
    assert slow > 1.5 * fast, (fast, slow)


DRIVERS_READ = {
    "carracing-hour.yaml": ["collect.policy: track_follower", "controller.imitate_actions: follower"],
    "mario-hour.yaml": ["collect.policy: ram_expert"],
    "carracing-selftaught.yaml": [],
    "mario-selftaught.yaml": [],
    "mario-hour-random.yaml": [],
    "doom-takecover.yaml": [],
}


@pytest.mark.parametrize("name", sorted(DRIVERS_READ))
def test_a_selftaught_config_reads_no_driver(name):
    """The self-taught configs take no data and no label from a teacher; the hour configs do, and say how."""
    from frmdn_worldmodels.games.game import drivers_read
    from frmdn_worldmodels.runtime.config import load_config
    from tests.unit.test_config import REPO  # the clone the configs are read from

    assert drivers_read(load_config(REPO / "configs" / name)) == DRIVERS_READ[name]

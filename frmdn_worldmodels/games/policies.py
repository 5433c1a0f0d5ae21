"""Exploration policies that gather the V and M training data: random actions that persist in time.

White-noise actions jitter in place and show the VAE and the memory little of the game, so, as World Models
did, the collected actions are random but smooth. Each game offers its own (``Game.policies``: CarRacing's in
``games/carracing.py``, Mario's in ``games/mario.py``); ``collect.policy`` picks one by name (``auto``: the
game's first). Every policy draws only from the ``numpy.random.Generator`` it is given, has ``reset()``
(start of an episode) and ``act(obs) -> action`` in the env's own action format; a policy may also read the
live game it is given (Mario's ``ram_expert``).
"""

from __future__ import annotations

import gymnasium
import numpy as np

from frmdn_worldmodels.games.envs import check_env_config
from frmdn_worldmodels.games.game import Policy, game_of
from frmdn_worldmodels.runtime.config import CollectConfig, ConfigError, EnvConfig, check_bounds

FOLLOWER_GAS = 0.15
"""The track follower's gas on the straight (``games.carracing.TrackFollowerCarPolicy.GAS``)."""


class HeldDiscretePolicy:
    """Draw a discrete action from ``probs`` and hold it for a Geometric(1 / mean_hold) number of steps."""

    def __init__(self, rng: np.random.Generator, probs: np.ndarray, mean_hold: float):
        self.rng = rng
        self.probs = np.asarray(probs, dtype=np.float64) / np.sum(probs)
        self.mean_hold = mean_hold
        self.action = 0
        self.steps_left = 0

    def reset(self) -> None:
        self.steps_left = 0

    def act(self, obs: np.ndarray) -> int:
        if self.steps_left == 0:
            self.action = int(self.rng.choice(len(self.probs), p=self.probs))
            self.steps_left = int(self.rng.geometric(1.0 / self.mean_hold))
        self.steps_left -= 1
        return self.action


def policy_name(env_cfg: EnvConfig, collect_cfg: CollectConfig) -> str:
    """The exploration policy ``collect.policy`` names for this game (``auto`` resolved), or a ConfigError."""
    check_env_config(env_cfg)
    choices = tuple(game_of(env_cfg).policies)
    if collect_cfg.policy == "auto":
        return choices[0]
    if collect_cfg.policy not in choices:
        raise ConfigError(
            f"collect.policy: {collect_cfg.policy!r} does not fit env.name={env_cfg.name} "
            f"(choose auto, {', '.join(choices)})"
        )
    return collect_cfg.policy


def check_policy_config(env_cfg: EnvConfig, collect_cfg: CollectConfig) -> None:
    """Refuse exploration settings that make no sense, naming the field (``ConfigError``)."""
    check_bounds(collect_cfg, "collect")
    policy_name(env_cfg, collect_cfg)


def make_exploration_policy(
    env_cfg: EnvConfig,
    collect_cfg: CollectConfig,
    rng: np.random.Generator,
    game: gymnasium.Env | None = None,
) -> Policy:
    """The exploration policy chosen by ``collect.policy`` for ``env.name``, drawing from ``rng``, playing
    ``game`` (only a policy that reads the live game uses it)."""
    check_policy_config(env_cfg, collect_cfg)
    return game_of(env_cfg).policies[policy_name(env_cfg, collect_cfg)](env_cfg, collect_cfg, rng, game)

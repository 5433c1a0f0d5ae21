"""VizDoom Take Cover: World Models' own dream test.

``VizdoomTakeCover-v1`` (``vizdoom`` 1.3.2, headless): the player stands at the back of a room while monsters
at the far wall throw fireballs; the actions are ``Discrete(3)`` (nothing, move left, move right), the reward
is +1 a tic alive, and the episode ends with the player's death. As in Ha & Schmidhuber's ``doomrnn``: no
frame skip (one step is one tic: ``env.action_repeat: 1``), episodes capped at 2,100 tics
(``env.max_steps: 2100``), skill 5 (``env.doom_skill``). The 320x240 screen has no HUD in this scenario, so
the whole frame is resized to 64x64 (World Models cut the HUD off ppaquette's 640x480 screen and inverted the
colours; neither is needed here).

Exploration policy ``random``, World Models' "more diverse random policy": a uniformly random action held for
a uniformly random 1-11 tics, then another. World Models kept only episodes longer than 100 tics; every
episode is kept here, so M also sees the short ones.
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TransformObservation

from frmdn_worldmodels.games.game import Game, register
from frmdn_worldmodels.runtime.config import CollectConfig, EnvConfig

SCREEN = (240, 320, 3)
LONGEST_HOLD = 11
"""World Models' random policy holds an action for 1 to this many tics."""


class HeldRandomPolicy:
    """A uniformly random action held for a uniformly random 1..``LONGEST_HOLD`` tics."""

    def __init__(self, rng: np.random.Generator, actions: int):
        self.rng, self.actions = rng, actions
        self.action, self.left = 0, 0

    def reset(self) -> None:
        self.left = 0

    def act(self, obs: np.ndarray) -> int:
        if self.left == 0:
            self.action = int(self.rng.integers(self.actions))
            self.left = int(self.rng.integers(1, LONGEST_HOLD + 1))
        self.left -= 1
        return self.action


def make(env_cfg: EnvConfig, render_mode: str | None) -> gymnasium.Env:
    """Take Cover at 320x240, the screen alone (the health in the observation's other key is not a frame)."""
    from vizdoom import gymnasium_wrapper  # noqa: F401  (registers the Vizdoom* ids with gymnasium)

    env = gymnasium.make(
        "VizdoomTakeCover-v1",
        frame_skip=1,
        doom_skill=env_cfg.doom_skill,
        render_mode=render_mode,
        max_episode_steps=None,
    )
    return TransformObservation(env, lambda obs: obs["screen"], spaces.Box(0, 255, SCREEN, np.uint8))


def _random(env_cfg: EnvConfig, collect: CollectConfig, rng: np.random.Generator, game) -> HeldRandomPolicy:
    return HeldRandomPolicy(rng, 3)


DOOM = register(
    Game(
        "doom_takecover",
        make,
        lambda env_cfg: spaces.Discrete(3),
        {"random": _random},
    )
)

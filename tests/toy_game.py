"""A game of the tests' own, known to the pipeline only through ``env.name: "tests.toy_game:DOTS"``.

A red dot on a 16x16 black screen drifts left or right; the agent pushes it (``Discrete(3)``: left, stay,
right) and earns 1 a step while the dot stays on the screen; the game ends when it leaves.
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces

from frmdn_worldmodels.games.game import Game

SIZE = 16


class DotGame(gymnasium.Env):
    """The dot game at 16x16 pixels."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode: str | None = None):
        self.observation_space = spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
        self.action_space = spaces.Discrete(3)
        self.render_mode = render_mode
        self.x, self.drift = SIZE // 2, 1

    def _frame(self) -> np.ndarray:
        frame = np.zeros((SIZE, SIZE, 3), np.uint8)
        frame[SIZE // 2 - 1 : SIZE // 2 + 1, self.x, 0] = 255
        return frame

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.x = int(self.np_random.integers(4, SIZE - 4))
        self.drift = int(self.np_random.choice([-1, 1]))
        return self._frame(), {}

    def step(self, action):
        self.x += self.drift * int(self.np_random.random() < 0.5) + int(action) - 1
        if not 0 <= self.x < SIZE:
            return np.zeros((SIZE, SIZE, 3), np.uint8), 0.0, True, False, {}
        return self._frame(), 1.0, False, False, {}

    def render(self) -> np.ndarray:
        return self._frame()


class UniformPolicy:
    """A uniformly random push each step."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> int:
        return int(self.rng.integers(3))


class CentringPolicy:
    """The toy game's teacher: push the dot towards the middle of the screen, reading where it is from the
    frame; a random push seven steps in ten, so its returns depend on its draws."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> int:
        if self.rng.random() < 0.7:
            return int(self.rng.integers(3))
        red = obs[..., 0].sum(axis=0)
        if not red.any():
            return 1
        x = int(np.argmax(red)) / len(red)
        return 0 if x > 0.5 else 2


DOTS = Game(
    "dots",
    lambda env_cfg, render_mode: DotGame(render_mode),
    lambda env_cfg: spaces.Discrete(3),
    {
        "random": lambda env_cfg, collect, rng, game: UniformPolicy(rng),
    },
    teachers={"centring": lambda env_cfg, rng, game: CentringPolicy(rng)},
)

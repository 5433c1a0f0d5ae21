"""CarRacing-v3: the game, its action box and its exploration policies.

``CarRacing-v3`` with its continuous action a = (steer in [-1, 1], gas in [0, 1], brake in [0, 1]). The 96x96
frame loses its bottom 12 rows (the speed/ABS/steering indicator bar) before resizing, as World Models did
(``env.crop_indicators``): the bar is not part of the scene and would use up VAE capacity on a few bright
pixels.

Exploration policies (``collect.policy``):

- ``brownian``: a latent u_t in R^3 follows the stationary Ornstein-Uhlenbeck / AR(1) process
  u_{t+1} = rho u_t + sqrt(1 - rho^2) eps_t, eps_t ~ N(0, I), u_0 ~ N(0, I), so u_t ~ N(0, I) at every t and
  corr(u_t, u_{t+k}) = rho^k (``collect.action_persistence``). It is squashed into the action box the way
  World Models' controller squashed its output: steer = tanh(u_0), gas = (tanh(u_1) + 1) / 2,
  brake = max(tanh(u_2), 0).
- ``track_follower``: a driver that keeps to the road, blended with the brownian driver, so the data shows
  laps being driven (the brownian car leaves the track and earns a tile in 2% of its steps) and also what the
  rest of the action box does there (a controller evolved in the dream finds any action M has not seen: one
  trained on the follower alone went full gas, which the dream paid for and the real track did not). With c
  the mean column of the grey road pixels in a band of rows ahead of the car and w the frame width, the
  follower's action is steer = clip(k (c - w/2) / (w/2), -1, 1), gas = g (1 - |steer|), brake = 0, with
  k = 3 and g = 0.15; the action played is (1 - s) a_follow + s a_brownian, with a weight s drawn per episode
  from U[0, ``collect.follower_blend``], so the episodes range from clean laps to the brownian car. Alone
  (s = 0) the follower scores 703 on average on 6 tracks of CarRacing-v3 with an action repeat of 2 (418 to
  821). With ``collect.follower_gas_max`` above 0.15, g itself is drawn per episode from
  U[0.15, ``follower_gas_max``]: faster laps end off the road at the turns (the follower alone, 4 tracks:
  686 at g = 0.15, 327 at 0.3, 273 at 0.5), so M sees what speed costs (screened and not kept:
  docs/results/carracing-hour.md). ``follower_action`` is the follower's own action on a frame: the label
  the imitation is fitted to with ``controller.imitate_actions: follower``.
- ``random``: i.i.d. uniform actions in the box.
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TransformObservation

from frmdn_worldmodels.games.game import Game, register
from frmdn_worldmodels.games.policies import FOLLOWER_GAS
from frmdn_worldmodels.runtime.config import CollectConfig, EnvConfig

INDICATOR_ROWS = 12
"""Height of CarRacing's indicator bar at the bottom of its 96x96 frame (World Models kept rows 0..83)."""
LOW = np.array([-1.0, 0.0, 0.0], dtype=np.float32)
HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)
"""CarRacing's action box: steering in [-1, 1], gas and brake in [0, 1]."""


class BrownianCarPolicy:
    """Smooth random driving: an AR(1) latent with correlation ``persistence`` per step, squashed into the
    box."""

    def __init__(self, rng: np.random.Generator, persistence: float):
        self.rng = rng
        self.persistence = persistence
        self.noise_scale = np.sqrt(1.0 - persistence**2)
        self.latent = np.zeros(3)

    def reset(self) -> None:
        self.latent = self.rng.standard_normal(3)

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = np.array(
            [
                np.tanh(self.latent[0]),
                0.5 * (np.tanh(self.latent[1]) + 1.0),
                max(np.tanh(self.latent[2]), 0.0),
            ],
            dtype=np.float32,
        )
        self.latent = self.persistence * self.latent + self.noise_scale * self.rng.standard_normal(3)
        return action


FOLLOW_ROWS = (0.47, 0.75)
"""The rows the track follower looks at, as fractions of the playfield's height from the top."""


def road_offset(frame: np.ndarray, cropped: bool) -> float | None:
    """Where the road ahead of the car lies: the mean column of the grey road pixels in the band of rows
    ``FOLLOW_ROWS`` (fractions of the playfield's height, the car sits at ~0.8) minus the centre, over the
    half-width, so -1 is the left edge and 1 the right; None when no road is in sight."""
    height, width = frame.shape[:2]
    playfield = height if cropped else round(height * (96 - INDICATOR_ROWS) / 96)
    band = frame[round(FOLLOW_ROWS[0] * playfield) : round(FOLLOW_ROWS[1] * playfield)].astype(np.int16)
    red, green = band[..., 0], band[..., 1]
    # road: grey (red ~ green ~ blue ~ 105); grass is green (green - red ~ 100), kerbs are red or white
    road = (np.abs(green - red) < 25) & (red > 60) & (red < 170)
    columns = np.nonzero(road)[1]
    if columns.size == 0:
        return None
    half = width / 2
    return float((columns.mean() + 0.5 - half) / half)


class TrackFollowerCarPolicy:
    """Drives towards the road ahead (``road_offset``) with steering gain 3 and gas g on the straight,
    blended with a ``BrownianCarPolicy`` of weight s ~ U[0, ``max_blend``] drawn per episode; g = 0.15, or
    g ~ U[0.15, ``max_gas``] per episode when ``max_gas`` is larger."""

    STEER_GAIN = 3.0
    GAS = FOLLOWER_GAS

    def __init__(
        self,
        rng: np.random.Generator,
        persistence: float,
        max_blend: float,
        cropped: bool,
        max_gas: float = GAS,
    ):
        self.rng = rng
        self.brownian = BrownianCarPolicy(rng, persistence)
        self.max_blend = max_blend
        self.max_gas = max_gas
        self.cropped = cropped
        self.blend = 0.0
        self.gas = self.GAS

    def reset(self) -> None:
        self.brownian.reset()
        self.blend = float(self.rng.uniform(0.0, self.max_blend))
        # drawn only when it can vary, so the default draws what it always drew
        if self.max_gas > self.GAS:
            self.gas = float(self.rng.uniform(self.GAS, self.max_gas))

    def act(self, obs: np.ndarray) -> np.ndarray:
        follow = follower_action(obs, self.cropped, self.gas)
        return ((1.0 - self.blend) * follow + self.blend * self.brownian.act(obs)).astype(np.float32)


def follower_action(frame: np.ndarray, cropped: bool, gas: float = TrackFollowerCarPolicy.GAS) -> np.ndarray:
    """The track follower's own action on ``frame`` (no blend): steer = clip(3 ``road_offset``, -1, 1)
    (straight on with no road in sight), gas = ``gas`` (1 - |steer|), no brake; float32 [3]."""
    offset = road_offset(frame, cropped)
    steer = 0.0 if offset is None else float(np.clip(TrackFollowerCarPolicy.STEER_GAIN * offset, -1.0, 1.0))
    return np.array([steer, gas * (1.0 - abs(steer)), 0.0], dtype=np.float32)


class UniformCarPolicy:
    """White-noise driving: each action uniform in the box, independently."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(LOW, HIGH).astype(np.float32)


def _crop_rows(env: gymnasium.Env, rows: int) -> gymnasium.Env:
    """Drop the bottom ``rows`` rows of an image observation."""
    space = env.observation_space
    height = space.shape[0] - rows
    cropped = spaces.Box(0, 255, shape=(height, *space.shape[1:]), dtype=np.uint8)
    return TransformObservation(env, lambda obs: obs[:height], cropped)


def make(env_cfg: EnvConfig, render_mode: str | None) -> gymnasium.Env:
    """CarRacing-v3 at 96x96 (less the indicator bar with ``env.crop_indicators``), continuous actions.

    ``max_episode_steps=-1`` removes the registered time limit, which would count raw frames; ours counts
    agent steps and is added last by ``make_env``.
    """
    env = gymnasium.make("CarRacing-v3", continuous=True, render_mode=render_mode, max_episode_steps=-1)
    return _crop_rows(env, INDICATOR_ROWS) if env_cfg.crop_indicators else env


def _follower(
    env_cfg: EnvConfig, collect: CollectConfig, rng: np.random.Generator, game
) -> TrackFollowerCarPolicy:
    return TrackFollowerCarPolicy(
        rng,
        collect.action_persistence,
        collect.follower_blend,
        env_cfg.crop_indicators,
        collect.follower_gas_max,
    )


CARRACING = register(
    Game(
        "carracing",
        make,
        lambda env_cfg: spaces.Box(LOW, HIGH, dtype=np.float32),
        {
            "brownian": lambda env_cfg, collect, rng, game: BrownianCarPolicy(
                rng, collect.action_persistence
            ),
            "track_follower": _follower,
            "random": lambda env_cfg, collect, rng, game: UniformCarPolicy(rng),
        },
        teachers={
            "track_follower": lambda env_cfg, rng, game: _follower(
                env_cfg, CollectConfig(follower_blend=0.0), rng, game
            )
        },
    )
)

"""Exploration policies that gather the V and M training data: random actions that persist in time.

White-noise actions jitter in place and show the VAE and the memory little of the game, so, as World Models
did, the collected actions are random but smooth:

- ``brownian`` (CarRacing): a latent u_t in R^3 follows the stationary Ornstein-Uhlenbeck / AR(1) process
  u_{t+1} = rho u_t + sqrt(1 - rho^2) eps_t, eps_t ~ N(0, I), u_0 ~ N(0, I), so u_t ~ N(0, I) at every t and
  corr(u_t, u_{t+k}) = rho^k (``collect.action_persistence``). It is squashed into the action box the way
  World Models' controller squashed its output: steer = tanh(u_0), gas = (tanh(u_1) + 1) / 2,
  brake = max(tanh(u_2), 0).
- ``right_biased`` (Mario): a button combination is held for a Geometric(1 / ``collect.mario_repeat``) number
  of steps (mean ``mario_repeat``); a new combination holds the right button with probability
  ``collect.right_bias`` (uniform among those that do, else uniform among the rest).
- ``track_follower`` (CarRacing): a driver that keeps to the road, blended with the brownian driver, so the
  data shows laps being driven (the brownian car leaves the track and earns a tile in 2% of its steps) and
  also what the rest of the action box does there (a controller evolved in the dream finds any action M has
  not seen: one trained on the follower alone went full gas, which the dream paid for and the real track did
  not). With c the mean column of the grey road pixels in a band of rows ahead of the car and w the frame
  width, the follower's action is steer = clip(k (c - w/2) / (w/2), -1, 1), gas = g (1 - |steer|),
  brake = 0, with k = 3 and g = 0.15; the action played is (1 - s) a_follow + s a_brownian, with a weight
  s drawn per episode from U[0, ``collect.follower_blend``], so the episodes range from clean laps to the
  brownian car. Alone (s = 0) the follower scores 703 on average on 6 tracks of CarRacing-v3 with an action
  repeat of 2 (418 to 821). With ``collect.follower_gas_max`` above 0.15, g itself is drawn per episode from
  U[0.15, ``follower_gas_max``]: faster laps end off the road at the turns (the follower alone, 4 tracks:
  686 at g = 0.15, 327 at 0.3, 273 at 0.5), so M sees what speed costs (screened on CarRacing and not kept:
  the dream still led CMA-ES away from its start, docs/results/carracing-hour.md).
  ``follower_action`` is the follower's own action on a frame: the label the imitation is fitted to with
  ``controller.imitate_actions: follower``.
- ``ram_expert`` (Mario): ``games.mario_expert``'s driver, which reads the game's RAM to run right and
  jump over what is ahead, with a uniformly random combination played instead in a share s of the steps,
  s drawn per episode from U[0, ``collect.expert_noise``] (the expert keeps its own state meanwhile), so the
  data show the level far past the first goomba and also the deaths a stray action causes. Alone (s = 0.1 on
  every step) it reaches a mean furthest x of ~2,000-2,400 on 1-1 and sometimes the flag.
- ``random``: CarRacing: i.i.d. uniform actions in the box; Mario: uniform combinations, held as above.

Every policy draws only from the ``numpy.random.Generator`` it is given, has ``reset()`` (start of an
episode) and ``act(obs) -> action`` in the env's own action format (float32 [3] or an int); ``ram_expert``
also reads the live game it is given.
"""

from __future__ import annotations

from typing import Protocol

import gymnasium
import numpy as np

from frmdn_worldmodels.games.envs import (
    CARRACING_HIGH,
    CARRACING_INDICATOR_ROWS,
    CARRACING_LOW,
    check_env_config,
    is_discrete,
    mario_buttons,
)
from frmdn_worldmodels.games.mario_expert import MarioExpert
from frmdn_worldmodels.runtime.config import CollectConfig, ConfigError, EnvConfig

POLICIES = {
    "carracing": ("brownian", "track_follower", "random"),
    "mario": ("right_biased", "ram_expert", "random"),
}
"""Exploration policies each game accepts; the first is what ``auto`` picks."""


class Policy(Protocol):
    def reset(self) -> None: ...

    def act(self, obs: np.ndarray): ...


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
    playfield = height if cropped else round(height * (96 - CARRACING_INDICATOR_ROWS) / 96)
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
    GAS = 0.15

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
        return self.rng.uniform(CARRACING_LOW, CARRACING_HIGH).astype(np.float32)


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


class MarioExpertPolicy:
    """``MarioExpert`` on the game's RAM, a uniformly random combination instead with a per-episode
    probability drawn from U[0, ``noise_max``]."""

    def __init__(
        self, rng: np.random.Generator, game: gymnasium.Env, buttons: list[list[str]], noise_max: float
    ):
        self.rng = rng
        self.noise_max = noise_max
        self.count = len(buttons)
        # .ram is nes-py's live view of the console's memory; every Mario action set holds both combinations
        self.expert = MarioExpert(lambda: game.unwrapped.ram)
        self.run, self.jump = (buttons.index(combo) for combo in (["right", "B"], ["right", "A", "B"]))
        self.noise = 0.0

    def reset(self) -> None:
        self.expert.reset()
        self.noise = float(self.rng.uniform(0.0, self.noise_max))

    def act(self, obs: np.ndarray) -> int:
        action = self.jump if self.expert.act() else self.run
        return int(self.rng.integers(self.count)) if self.rng.random() < self.noise else action


def right_biased_probs(buttons: list[list[str]], right_bias: float) -> np.ndarray:
    """Action probabilities: total mass ``right_bias`` spread over the combos holding ``right``, the rest over
    the others."""
    holds_right = np.array(["right" in combo for combo in buttons])
    if holds_right.all() or not holds_right.any():
        return np.full(len(buttons), 1.0 / len(buttons))
    return np.where(holds_right, right_bias / holds_right.sum(), (1.0 - right_bias) / (~holds_right).sum())


def policy_name(env_cfg: EnvConfig, collect_cfg: CollectConfig) -> str:
    """The exploration policy ``collect.policy`` names for this game (``auto`` resolved), or a ConfigError."""
    check_env_config(env_cfg)
    choices = POLICIES[env_cfg.name]
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
    policy_name(env_cfg, collect_cfg)
    if not 0.0 <= collect_cfg.action_persistence < 1.0:
        raise ConfigError(
            f"collect.action_persistence: must be in [0, 1), got {collect_cfg.action_persistence}"
        )
    if collect_cfg.mario_repeat < 1:
        raise ConfigError(f"collect.mario_repeat: must be at least 1, got {collect_cfg.mario_repeat}")
    if not 0.0 <= collect_cfg.follower_blend <= 1.0:
        raise ConfigError(f"collect.follower_blend: must be in [0, 1], got {collect_cfg.follower_blend}")
    if not TrackFollowerCarPolicy.GAS <= collect_cfg.follower_gas_max <= 1.0:
        raise ConfigError(
            f"collect.follower_gas_max: must be in [{TrackFollowerCarPolicy.GAS}, 1], "
            f"got {collect_cfg.follower_gas_max}"
        )
    if not 0.0 <= collect_cfg.right_bias <= 1.0:
        raise ConfigError(f"collect.right_bias: must be in [0, 1], got {collect_cfg.right_bias}")
    if not 0.0 <= collect_cfg.expert_noise <= 1.0:
        raise ConfigError(f"collect.expert_noise: must be in [0, 1], got {collect_cfg.expert_noise}")


def make_exploration_policy(
    env_cfg: EnvConfig,
    collect_cfg: CollectConfig,
    rng: np.random.Generator,
    game: gymnasium.Env | None = None,
) -> Policy:
    """The exploration policy chosen by ``collect.policy`` for ``env.name``, drawing from ``rng``, playing
    ``game`` (only ``ram_expert`` reads it)."""
    check_policy_config(env_cfg, collect_cfg)
    name = policy_name(env_cfg, collect_cfg)
    if not is_discrete(env_cfg):
        if name == "brownian":
            return BrownianCarPolicy(rng, collect_cfg.action_persistence)
        if name == "track_follower":
            return TrackFollowerCarPolicy(
                rng,
                collect_cfg.action_persistence,
                collect_cfg.follower_blend,
                env_cfg.crop_indicators,
                collect_cfg.follower_gas_max,
            )
        return UniformCarPolicy(rng)
    buttons = mario_buttons(env_cfg)
    if name == "ram_expert":
        if game is None:
            raise ValueError("collect.policy: ram_expert reads the game's memory: pass the game it plays")
        return MarioExpertPolicy(rng, game, buttons, collect_cfg.expert_noise)
    if name == "right_biased":
        probs = right_biased_probs(buttons, collect_cfg.right_bias)
    else:
        probs = np.full(len(buttons), 1.0 / len(buttons))
    return HeldDiscretePolicy(rng, probs, collect_cfg.mario_repeat)

"""The real games, as seeded ``gymnasium`` envs yielding small square RGB frames.

Two games, one factory (``make_env``), built from stock gymnasium wrappers:

- ``carracing``: ``CarRacing-v3`` with its continuous action a = (steer in [-1, 1], gas in [0, 1],
  brake in [0, 1]). The 96x96 frame loses its bottom 12 rows (the speed/ABS/steering indicator bar) before
  resizing, as World Models did (``env.crop_indicators``): the bar is not part of the scene and would use up
  VAE capacity on a few bright pixels.
- ``mario``: ``SuperMarioBros-<world>-<stage>-v0`` (gym-super-mario-bros 9, nes-py 9, both gymnasium-native)
  behind nes-py's ``JoypadSpace`` with a small discrete button-combination list (``env.mario_actions``). The
  full 240x256 screen is resized; the HUD (score, coins, time) is kept.

Both resize with OpenCV INTER_AREA (gymnasium's ``ResizeObservation``) to ``env.frame_size`` squared uint8
RGB: the same preprocessing when collecting, training and acting, because everything goes through
``make_env``. ``env.action_repeat`` repeats each agent action (rewards summed, stops early at the end) and the
time limit ``env.max_steps`` counts agent steps (``truncated``, never ``terminated``).

Actions are stored in episodes and fed to the memory as float vectors: ``encode_action`` (identity for
CarRacing, one-hot for Mario) and back with ``decode_action``. Mario's episodes also store where the player
and the enemies are in each frame (``sprite_centres``, read from the game's RAM), which V's loss can weigh
(``vae.player_weight``, ``vae.enemy_weight``).
"""

from __future__ import annotations

import re

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import RepeatAction, ResizeObservation, TimeLimit, TransformObservation

from frmdn_worldmodels.games.mario_expert import (
    ENEMY_SLOTS,
    SCREEN_HEIGHT,
    SCREEN_WIDTH,
    enemy_centres,
    screen_centre,
)
from frmdn_worldmodels.runtime.config import VAE_FRAME_SIZE, ConfigError, EnvConfig

ENV_NAMES = ("carracing", "mario")
MARIO_ACTION_SETS = ("right_only", "simple", "complex")
CARRACING_INDICATOR_ROWS = 12
CARRACING_LOW = np.array([-1.0, 0.0, 0.0], dtype=np.float32)
CARRACING_HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)
"""CarRacing's action box: steering in [-1, 1], gas and brake in [0, 1]."""
"""Height of CarRacing's indicator bar at the bottom of its 96x96 frame (World Models kept rows 0..83)."""


def check_env_config(env_cfg: EnvConfig) -> None:
    """Refuse an env section that cannot make an env, naming the field (``ConfigError``)."""
    if env_cfg.name not in ENV_NAMES:
        raise ConfigError(f"env.name: unknown game {env_cfg.name!r} (choose one of {', '.join(ENV_NAMES)})")
    if env_cfg.name == "mario":
        if not re.fullmatch(r"[1-8]-[1-4]", env_cfg.mario_level):
            raise ConfigError(
                f"env.mario_level: {env_cfg.mario_level!r} is not a Super Mario Bros level "
                "(world 1-8, stage 1-4, written like 1-1)"
            )
        if env_cfg.mario_actions not in MARIO_ACTION_SETS:
            raise ConfigError(
                f"env.mario_actions: unknown action set {env_cfg.mario_actions!r} "
                f"(choose one of {', '.join(MARIO_ACTION_SETS)})"
            )
    if env_cfg.frame_size != VAE_FRAME_SIZE:
        raise ConfigError(
            f"env.frame_size: the ConvVAE (V) reads {VAE_FRAME_SIZE}x{VAE_FRAME_SIZE} frames, "
            f"got {env_cfg.frame_size}"
        )
    for key, low in (("max_steps", 1), ("action_repeat", 1)):
        value = getattr(env_cfg, key)
        if value < low:
            raise ConfigError(f"env.{key}: must be at least {low}, got {value}")


def mario_buttons(env_cfg: EnvConfig) -> list[list[str]]:
    """The Mario action list: entry i is the list of NES buttons held by discrete action i."""
    from gym_super_mario_bros import actions

    lists = {
        "right_only": actions.RIGHT_ONLY,
        "simple": actions.SIMPLE_MOVEMENT,
        "complex": actions.COMPLEX_MOVEMENT,
    }
    return [list(buttons) for buttons in lists[env_cfg.mario_actions]]


def is_discrete(env_cfg: EnvConfig) -> bool:
    """Whether the game's actions are discrete (Mario) rather than continuous (CarRacing)."""
    if env_cfg.name not in ENV_NAMES:
        check_env_config(env_cfg)  # raises, naming env.name
    return env_cfg.name == "mario"


def action_dim(env_cfg: EnvConfig) -> int:
    """Width A of the stored/encoded action vector: 3 for CarRacing, the number of button combos for Mario."""
    return len(mario_buttons(env_cfg)) if is_discrete(env_cfg) else 3


def encode_action(env_cfg: EnvConfig, action) -> np.ndarray:
    """The env action as the float32 [A] vector stored in episodes and read by the memory.

    CarRacing: the action itself. Mario: the one-hot vector of the discrete action index.
    """
    if is_discrete(env_cfg):
        vector = np.zeros(action_dim(env_cfg), dtype=np.float32)
        vector[int(action)] = 1.0
        return vector
    vector = np.asarray(action, dtype=np.float32).reshape(-1)
    if vector.shape != (3,):
        raise ValueError(f"a CarRacing action has 3 numbers (steer, gas, brake), got shape {vector.shape}")
    return vector


def decode_action(env_cfg: EnvConfig, vector) -> np.ndarray | int:
    """The inverse of ``encode_action`` for any float [A] vector: argmax for Mario, clipped to the box for
    CarRacing."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.shape != (action_dim(env_cfg),):
        raise ValueError(
            f"expected an action vector of {action_dim(env_cfg)} numbers, got shape {vector.shape}"
        )
    if is_discrete(env_cfg):
        return int(np.argmax(vector))
    return np.clip(vector, CARRACING_LOW, CARRACING_HIGH).astype(np.float32)


def sprite_centres(env: gymnasium.Env) -> np.ndarray | None:
    """Where the sprites are centred in the frame ``env`` (made by ``make_env``) last returned: float32
    ``[1 + ENEMY_SLOTS, 2]`` (x, y) in pixels of the ``frame_size`` square, row 0 Mario, then the enemy slots
    (``games.mario_expert.enemy_centres``); NaN for a sprite off the screen (Mario above or below it, an
    empty slot). None for a game with no sprite positions (CarRacing)."""
    ram = getattr(env.unwrapped, "ram", None)
    if ram is None:
        return None
    centres = np.full((1 + ENEMY_SLOTS, 2), np.nan)
    player = screen_centre(ram)
    if player is not None:
        centres[0] = player
    centres[1:] = enemy_centres(ram)
    size = env.observation_space.shape[0]
    return (centres * [size / SCREEN_WIDTH, size / SCREEN_HEIGHT]).astype(np.float32)


def _crop_rows(env: gymnasium.Env, rows: int) -> gymnasium.Env:
    """Drop the bottom ``rows`` rows of an image observation."""
    space = env.observation_space
    height = space.shape[0] - rows
    cropped = spaces.Box(0, 255, shape=(height, *space.shape[1:]), dtype=np.uint8)
    return TransformObservation(env, lambda obs: obs[:height], cropped)


def _make_game(env_cfg: EnvConfig, render_mode: str | None) -> gymnasium.Env:
    """The game at its native resolution and frame rate, with its agent-facing action space.

    ``max_episode_steps=-1`` removes the registered time limit, which would count raw frames; ours counts
    agent steps and is added last by ``make_env``.
    """
    if env_cfg.name == "carracing":
        env = gymnasium.make("CarRacing-v3", continuous=True, render_mode=render_mode, max_episode_steps=-1)
        return _crop_rows(env, CARRACING_INDICATOR_ROWS) if env_cfg.crop_indicators else env
    import gym_super_mario_bros  # noqa: F401  (registers the SuperMarioBros-* ids with gymnasium)
    from nes_py.wrappers import JoypadSpace

    env = gymnasium.make(
        f"SuperMarioBros-{env_cfg.mario_level}-v0", render_mode=render_mode, max_episode_steps=-1
    )
    # nes-py returns a view of the emulator's screen buffer; the resize below copies it, so stored frames
    # never change under our feet.
    return JoypadSpace(env, mario_buttons(env_cfg))


def make_env(env_cfg: EnvConfig, seed: int | None = None, render_mode: str | None = None) -> gymnasium.Env:
    """The real game as a gymnasium env: uint8 [S, S, 3] frames, ``env_cfg.action_repeat``,
    ``env_cfg.max_steps``.

    With ``seed``, the env and its action space are seeded once here (a first ``reset(seed=seed)``), so later
    ``reset()`` calls without a seed continue a reproducible sequence; ``reset(seed=...)`` reseeds as usual.
    ``render_mode="rgb_array"`` makes ``render()`` return the full-resolution frame (for videos).
    """
    check_env_config(env_cfg)
    env = _make_game(env_cfg, render_mode)
    env = ResizeObservation(env, (env_cfg.frame_size, env_cfg.frame_size))
    if env_cfg.action_repeat > 1:
        env = RepeatAction(env, env_cfg.action_repeat)
    env = TimeLimit(env, env_cfg.max_steps)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env

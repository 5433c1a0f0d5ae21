"""The real games, as seeded ``gymnasium`` envs yielding small square RGB frames.

Every game (``games.game.Game``: ``carracing``, ``mario``, or one of your own) is made by one factory,
``make_env``, from stock gymnasium wrappers: the game's frame is resized with OpenCV INTER_AREA (gymnasium's
``ResizeObservation``) to ``env.frame_size`` squared uint8 RGB: the same preprocessing when collecting,
training and acting. ``env.action_repeat`` repeats each agent action (rewards summed, stops early at the end)
and the time limit ``env.max_steps`` counts agent steps (``truncated``, never ``terminated``).

Actions are stored in episodes and fed to the memory as float vectors: ``encode_action`` (a ``Box`` action as
is, a ``Discrete`` one one-hot) and back with ``decode_action``.
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import RepeatAction, ResizeObservation, TimeLimit

from frmdn_worldmodels.games.game import game_of
from frmdn_worldmodels.runtime.config import VAE_FRAME_SIZE, ConfigError, EnvConfig, check_bounds


def check_env_config(env_cfg: EnvConfig) -> None:
    """Refuse an env section that cannot make an env, naming the field (``ConfigError``)."""
    check_bounds(env_cfg, "env")
    game_of(env_cfg).check(env_cfg)
    if env_cfg.frame_size != VAE_FRAME_SIZE:
        raise ConfigError(
            f"env.frame_size: the ConvVAE (V) reads {VAE_FRAME_SIZE}x{VAE_FRAME_SIZE} frames, "
            f"got {env_cfg.frame_size}"
        )


def action_space(env_cfg: EnvConfig) -> spaces.Box | spaces.Discrete:
    """The game's agent-facing action space."""
    return game_of(env_cfg).action_space(env_cfg)


def is_discrete(env_cfg: EnvConfig) -> bool:
    """Whether the game's actions are discrete (Mario) rather than continuous (CarRacing)."""
    return isinstance(action_space(env_cfg), spaces.Discrete)


def _width(space: spaces.Box | spaces.Discrete) -> int:
    return int(space.n) if isinstance(space, spaces.Discrete) else int(np.prod(space.shape))


def action_dim(env_cfg: EnvConfig) -> int:
    """Width A of the stored/encoded action vector: the box's size, or the number of discrete actions."""
    return _width(action_space(env_cfg))


def encode_action(env_cfg: EnvConfig, action) -> np.ndarray:
    """The env action as the float32 [A] vector stored in episodes and read by the memory: a box action
    itself, a discrete action's one-hot vector."""
    space = action_space(env_cfg)  # once: this runs at every step of a collected episode
    if isinstance(space, spaces.Discrete):
        vector = np.zeros(_width(space), dtype=np.float32)
        vector[int(action)] = 1.0
        return vector
    vector = np.asarray(action, dtype=np.float32).reshape(-1)
    if vector.shape != (_width(space),):
        raise ValueError(f"a {env_cfg.name} action has {_width(space)} numbers, got shape {vector.shape}")
    return vector


def decode_action(env_cfg: EnvConfig, vector) -> np.ndarray | int:
    """The inverse of ``encode_action`` for any float [A] vector: argmax for a discrete game, clipped to the
    box for a continuous one."""
    space = action_space(env_cfg)
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vector.shape != (_width(space),):
        raise ValueError(f"expected an action vector of {_width(space)} numbers, got shape {vector.shape}")
    if isinstance(space, spaces.Discrete):
        return int(np.argmax(vector))
    return np.clip(vector, space.low.reshape(-1), space.high.reshape(-1)).astype(np.float32)


def sprite_centres(env: gymnasium.Env) -> np.ndarray | None:
    """Where the sprites are in the frame ``env`` last returned (``Game.sprites``), for an env made by
    ``make_env``; None for a game that does not say, or an env made otherwise."""
    game = getattr(env, "game", None)
    return None if game is None else game.sprites(env)


def make_env(env_cfg: EnvConfig, seed: int | None = None, render_mode: str | None = None) -> gymnasium.Env:
    """The real game as a gymnasium env: uint8 [S, S, 3] frames, ``env_cfg.action_repeat``,
    ``env_cfg.max_steps``.

    With ``seed``, the env and its action space are seeded once here (a first ``reset(seed=seed)``), so later
    ``reset()`` calls without a seed continue a reproducible sequence; ``reset(seed=...)`` reseeds as usual.
    ``render_mode="rgb_array"`` makes ``render()`` return the full-resolution frame (for videos).
    """
    check_env_config(env_cfg)
    game = game_of(env_cfg)
    env = game.make(env_cfg, render_mode)
    env = ResizeObservation(env, (env_cfg.frame_size, env_cfg.frame_size))
    if env_cfg.action_repeat > 1:
        env = RepeatAction(env, env_cfg.action_repeat)
    env = TimeLimit(env, env_cfg.max_steps)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    env.game = game  # what sprite_centres asks
    return env

"""One interface for games: a ``Game`` says how to make the env, what its actions are and how to explore it;
every stage asks ``game_of(env_cfg)`` instead of checking the game's name.

The built-in games register themselves (``games/carracing.py``, ``games/mario.py``). A game of your own is
one module holding a ``Game``, named in the config as ``env.name: "package.module:ATTRIBUTE"``: it is
imported wherever the config is read, Ray workers included, so nothing else needs to know it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import gymnasium
import numpy as np
from gymnasium import spaces

from frmdn_worldmodels.runtime.config import CollectConfig, Config, ConfigError, EnvConfig


class Policy(Protocol):
    """An exploration policy: ``reset()`` at the start of an episode, ``act(obs)`` in the env's own action
    format; it draws only from the generator it was made with."""

    def reset(self) -> None: ...

    def act(self, obs: np.ndarray): ...


PolicyFactory = Callable[[EnvConfig, CollectConfig, np.random.Generator, "gymnasium.Env | None"], Policy]
"""``(env section, collect section, generator, the live game) -> Policy``."""

TeacherFactory = Callable[[EnvConfig, np.random.Generator, "gymnasium.Env | None"], Policy]
"""``(env section, generator, the live game) -> Policy``: a hand-written driver playing alone."""


def _no_check(env_cfg: EnvConfig) -> None:
    """A game with no settings of its own beyond the env section's common fields."""


def _no_sprites(env: gymnasium.Env) -> None:
    """A game with no sprite positions."""


@dataclass(frozen=True)
class Game:
    """Everything the pipeline needs to know about one game."""

    name: str
    make: Callable[[EnvConfig, str | None], gymnasium.Env]
    """``(env section, render mode) -> env`` at the game's native resolution with its agent-facing action
    space and no time limit of its own: ``games.envs.make_env`` resizes, repeats actions and limits steps."""
    action_space: Callable[[EnvConfig], spaces.Box | spaces.Discrete]
    """Its action space: a ``Box`` is stored and fed to M as is (clipped to the box), a ``Discrete``
    one-hot."""
    policies: Mapping[str, PolicyFactory]
    """Exploration policies by ``collect.policy`` name; the first is what ``auto`` picks."""
    teachers: Mapping[str, TeacherFactory] = dataclasses.field(default_factory=dict)
    """Hand-written drivers that play the game alone (no exploration noise), by name: what
    ``evaluate.teacher`` scores on the agent's evaluation seeds. A game without one has none."""
    check: Callable[[EnvConfig], None] = _no_check
    """Refuse the game's own env settings (``ConfigError`` naming the field)."""
    sprites: Callable[[gymnasium.Env], np.ndarray | None] = _no_sprites
    """Where the sprites are in the last frame (``[S, 2]`` pixels, NaN off the screen), for V's weighted
    loss; None for a game that does not say."""


GAMES: dict[str, Game] = {}
"""The registered games by name."""


def register(game: Game) -> Game:
    """Make ``game`` known by its name (a module registers its game once, when imported)."""
    if game.name in GAMES and GAMES[game.name] is not game:
        raise ValueError(f"a game named {game.name!r} is registered already")
    GAMES[game.name] = game
    return game


def game_of(env_cfg: EnvConfig) -> Game:
    """The game ``env.name`` names: a registered name, or ``"module:ATTRIBUTE"`` (imported once)."""
    name = env_cfg.name
    if name in GAMES:
        return GAMES[name]
    module, _, attribute = name.partition(":")
    if not attribute:
        raise ConfigError(
            f"env.name: unknown game {name!r} (choose one of {', '.join(GAMES)}, or name your own game as "
            "'package.module:ATTRIBUTE')"
        )
    try:
        game = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"env.name: cannot load the game {name!r}: {error}") from None
    if not isinstance(game, Game):
        raise ConfigError(f"env.name: {name!r} is a {type(game).__name__}, not a games.game.Game")
    GAMES[name] = game
    return game


def drivers_read(cfg: Config) -> list[str]:
    """The settings through which a hand-written driver (a teacher of the game) teaches the agent: its data
    (``collect.policy`` named after a teacher, as CarRacing's follower blend and Mario's noisy expert are) or
    the follower's labels for the imitation. Empty: the agent is self-taught (``evaluate.teacher`` only scores
    the driver beside it)."""
    game = game_of(cfg.env)
    read = []
    if cfg.collect.policy in game.teachers:
        read.append(f"collect.policy: {cfg.collect.policy}")
    if cfg.controller.init == "imitate" and cfg.controller.imitate_actions == "follower":
        read.append("controller.imitate_actions: follower")
    return read

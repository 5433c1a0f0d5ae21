"""Super Mario Bros: the game, its button combinations, where its sprites are, and its exploration policies.

``SuperMarioBros-<world>-<stage>-v0`` (gym-super-mario-bros 9, nes-py 9, both gymnasium-native) behind
nes-py's ``JoypadSpace`` with a small discrete button-combination list (``env.mario_actions``). The full
240x256 screen is resized; the HUD (score, coins, time) is kept. Episodes also store where the player and the
enemies are in each frame (``sprite_centres``, read from the game's RAM), which V's loss can weigh
(``vae.player_weight``, ``vae.enemy_weight``).

Exploration policies (``collect.policy``):

- ``right_biased``: a button combination is held for a Geometric(1 / ``collect.mario_repeat``) number of
  steps (mean ``mario_repeat``); a new combination holds the right button with probability
  ``collect.right_bias`` (uniform among those that do, else uniform among the rest).
- ``ram_expert``: ``games.mario_expert``'s driver, which reads the game's RAM to run right and jump over what
  is ahead, with a uniformly random combination played instead in a share s of the steps, s drawn per
  episode from U[0, ``collect.expert_noise``] (the expert keeps its own state meanwhile), so the data show the
  level far past the first goomba and also the deaths a stray action causes. Alone (s = 0.1 on every step)
  it reaches a mean furthest x of ~2,000-2,400 on 1-1 and sometimes the flag.
- ``random``: uniform combinations, held as above.
"""

from __future__ import annotations

import re
import typing

import gymnasium
import numpy as np
from gymnasium import spaces

from frmdn_worldmodels.games.game import Game, register
from frmdn_worldmodels.games.mario_expert import (
    ENEMY_SLOTS,
    SCREEN_HEIGHT,
    SCREEN_WIDTH,
    MarioExpert,
    enemy_centres,
    screen_centre,
)
from frmdn_worldmodels.games.policies import HeldDiscretePolicy
from frmdn_worldmodels.runtime.config import CollectConfig, ConfigError, EnvConfig, MarioActions

ACTION_SETS = typing.get_args(MarioActions)


def check(env_cfg: EnvConfig) -> None:
    """Refuse a level or an action set the game does not have, naming the field."""
    if not re.fullmatch(r"[1-8]-[1-4]", env_cfg.mario_level):
        raise ConfigError(
            f"env.mario_level: {env_cfg.mario_level!r} is not a Super Mario Bros level "
            "(world 1-8, stage 1-4, written like 1-1)"
        )
    if env_cfg.mario_actions not in ACTION_SETS:
        raise ConfigError(
            f"env.mario_actions: unknown action set {env_cfg.mario_actions!r} "
            f"(choose one of {', '.join(ACTION_SETS)})"
        )


def mario_buttons(env_cfg: EnvConfig) -> list[list[str]]:
    """The Mario action list: entry i is the list of NES buttons held by discrete action i."""
    from gym_super_mario_bros import actions

    lists = {
        "right_only": actions.RIGHT_ONLY,
        "simple": actions.SIMPLE_MOVEMENT,
        "complex": actions.COMPLEX_MOVEMENT,
    }
    return [list(buttons) for buttons in lists[env_cfg.mario_actions]]


def sprite_centres(env: gymnasium.Env) -> np.ndarray | None:
    """Where the sprites are centred in the frame ``env`` (made by ``make_env``) last returned: float32
    ``[1 + ENEMY_SLOTS, 2]`` (x, y) in pixels of the ``frame_size`` square, row 0 Mario, then the enemy slots
    (``games.mario_expert.enemy_centres``); NaN for a sprite off the screen (Mario above or below it, an
    empty slot)."""
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


def make(env_cfg: EnvConfig, render_mode: str | None) -> gymnasium.Env:
    """The level at 240x256 behind ``JoypadSpace`` (``max_episode_steps=-1``: ``make_env`` adds the limit)."""
    import gym_super_mario_bros  # noqa: F401  (registers the SuperMarioBros-* ids with gymnasium)
    from nes_py.wrappers import JoypadSpace

    env = gymnasium.make(
        f"SuperMarioBros-{env_cfg.mario_level}-v0", render_mode=render_mode, max_episode_steps=-1
    )
    # nes-py returns a view of the emulator's screen buffer; make_env's resize copies it, so stored
    # frames never change under our feet.
    return JoypadSpace(env, mario_buttons(env_cfg))


def _held(env_cfg: EnvConfig, collect: CollectConfig, rng: np.random.Generator, right_bias: float | None):
    buttons = mario_buttons(env_cfg)
    probs = (
        np.full(len(buttons), 1.0 / len(buttons))
        if right_bias is None
        else right_biased_probs(buttons, right_bias)
    )
    return HeldDiscretePolicy(rng, probs, collect.mario_repeat)


def _expert(env_cfg: EnvConfig, collect: CollectConfig, rng: np.random.Generator, game) -> MarioExpertPolicy:
    if game is None:
        raise ValueError("collect.policy: ram_expert reads the game's memory: pass the game it plays")
    return MarioExpertPolicy(rng, game, mario_buttons(env_cfg), collect.expert_noise)


MARIO = register(
    Game(
        "mario",
        make,
        lambda env_cfg: spaces.Discrete(len(mario_buttons(env_cfg))),
        {
            "right_biased": lambda env_cfg, collect, rng, game: _held(
                env_cfg, collect, rng, collect.right_bias
            ),
            "ram_expert": _expert,
            "random": lambda env_cfg, collect, rng, game: _held(env_cfg, collect, rng, None),
        },
        teachers={
            "ram_expert": lambda env_cfg, rng, game: _expert(
                env_cfg, CollectConfig(expert_noise=0.0), rng, game
            )
        },
        check=check,
        sprites=sprite_centres,
    )
)

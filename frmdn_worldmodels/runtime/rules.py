"""The rules across config fields that the fields' types cannot say, all in one place.

A field's type says what it takes alone (``runtime.config``: choices, ranges), and the loader refuses anything
else. What remains are rules between fields: a value read only under another field's setting, a cap within
the horizon, fractions that must leave something. Each rule belongs to the section it constrains;
``check_rules`` runs those of the sections a command reads (``cli.check_config``, before any work) or a stage
run from code (``check_rules(cfg, "vae")``). One rule needs the game registry, above this layer:
``evaluate.teacher`` must be a teacher of the game (``stages.evaluate.check_evaluate_config``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from frmdn_worldmodels.runtime.config import SPRITE_WEIGHTS, Config, ConfigError

CONDITIONAL_FIELDS: tuple[tuple[str, str, Callable[[Config], bool]], ...] = (
    (
        "collect.follower_blend",
        "collect.policy: track_follower with env.name: carracing",
        lambda cfg: cfg.env.name == "carracing" and cfg.collect.policy == "track_follower",
    ),
    (
        "collect.follower_gas_max",
        "collect.policy: track_follower with env.name: carracing",
        lambda cfg: cfg.env.name == "carracing" and cfg.collect.policy == "track_follower",
    ),
    (
        "collect.right_bias",
        "env.name: mario with collect.policy: right_biased (or auto)",
        lambda cfg: cfg.env.name == "mario" and cfg.collect.policy in ("auto", "right_biased"),
    ),
    (
        "collect.mario_repeat",
        "env.name: mario with collect.policy: right_biased (or auto) or random",
        lambda cfg: cfg.env.name == "mario" and cfg.collect.policy != "ram_expert",
    ),
    (
        "collect.expert_noise",
        "collect.policy: ram_expert with env.name: mario",
        lambda cfg: cfg.env.name == "mario" and cfg.collect.policy == "ram_expert",
    ),
    ("controller.imitate_top", "controller.init: imitate", lambda cfg: cfg.controller.init == "imitate"),
    ("controller.imitate_weight", "controller.init: imitate", lambda cfg: cfg.controller.init == "imitate"),
    ("controller.imitate_actions", "controller.init: imitate", lambda cfg: cfg.controller.init == "imitate"),
    ("controller.pessimism", "controller.train_in: dream", lambda cfg: cfg.controller.train_in == "dream"),
    (
        "controller.dream_start_limit",
        "controller.dream_start: any",
        lambda cfg: cfg.controller.dream_start == "any",
    ),
)
"""Fields read only under a condition: (dotted name, the condition in words, the condition). A value other
than the default where the condition does not hold is refused, so that no value the user gave is silently
unused."""

RULES: dict[str, list[Callable[[Config], None]]] = {}
"""The rules by the section they constrain, in the order they are checked."""


def rule(section: str) -> Callable[[Callable[[Config], None]], Callable[[Config], None]]:
    """Register a rule (a function raising ``ConfigError`` naming the field) under ``section``."""

    def register(check: Callable[[Config], None]) -> Callable[[Config], None]:
        RULES.setdefault(section, []).append(check)
        return check

    return register


def check_rules(cfg: Config, *sections: str) -> None:
    """Every rule of ``sections`` (``run``: the top-level ones), first broken one raised."""
    for section in sections:
        for check in RULES.get(section, ()):
            check(cfg)


def _field_value(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


@rule("run")
def _conditional_fields_have_their_condition(cfg: Config) -> None:
    defaults = Config()
    for dotted, condition, holds in CONDITIONAL_FIELDS:
        value = _field_value(cfg, dotted)
        if value != _field_value(defaults, dotted) and not holds(cfg):
            raise ConfigError(
                f"{dotted}={value!r} is only read with {condition}, which this config does not have: "
                f"remove it or change the setting it depends on"
            )


@rule("run")
def _step_caps_within_the_horizon(cfg: Config) -> None:
    for section in ("collect", "controller"):
        cap = getattr(cfg, section).max_steps
        if not 0 <= cap <= cfg.env.max_steps:
            raise ConfigError(
                f"{section}.max_steps must be between 0 (the game's horizon) and env.max_steps="
                f"{cfg.env.max_steps}, got {cap}"
            )


@rule("vae")
def _sprite_weights_need_sprite_positions(cfg: Config) -> None:
    for key, name in SPRITE_WEIGHTS.items():
        value = getattr(cfg.vae, name)
        if value != 1 and cfg.env.name != "mario":
            raise ConfigError(
                f"vae.{name}={value} weighs the patches around the {key}, whose positions only Super Mario "
                f"Bros episodes record (env.name is {cfg.env.name!r})"
            )


@rule("memory_train")
def _validation_and_test_leave_training_episodes(cfg: Config) -> None:
    if cfg.memory_train.val_fraction + cfg.memory_train.test_fraction >= 1:
        raise ConfigError("memory_train.val_fraction + test_fraction must leave episodes for training")


@rule("sweep")
def _a_grid_and_extra_rows_that_fit_it(cfg: Config) -> None:
    tc, memory = cfg.memory_train, cfg.memory
    if not tc.sweep_kinds or not tc.sweep_components or not tc.sweep_ranks:
        raise ConfigError(
            "memory_train.sweep_kinds, sweep_components and sweep_ranks must each list one or more"
        )
    if "flow_context" in tc.sweep_extra and (memory.flow_context or "frmdn" not in tc.sweep_kinds):
        raise ConfigError(
            "memory_train.sweep_extra: the flow_context row needs FRMDN in sweep_kinds and a grid without "
            "memory.flow_context"
        )
    if "heads" in tc.sweep_extra and memory.predict_reward and memory.predict_done:
        raise ConfigError(
            "memory_train.sweep_extra: the heads row needs a grid without them: set memory.predict_reward "
            "and memory.predict_done to false"
        )


@rule("controller")
def _follower_labels_need_carracing(cfg: Config) -> None:
    if cfg.controller.imitate_actions == "follower" and cfg.env.name != "carracing":
        raise ConfigError(
            f"controller.imitate_actions=follower labels CarRacing frames; env.name is {cfg.env.name!r}"
        )


@rule("controller")
def _pessimism_needs_critics_and_one_plain_memory(cfg: Config) -> None:
    if cfg.controller.pessimism == 0:
        return
    if cfg.memory_train.critics < 1:
        raise ConfigError(
            f"controller.pessimism={cfg.controller.pessimism} weighs M's disagreement with its critics: "
            "set memory_train.critics to 1 or more"
        )
    if cfg.memory.ensemble > 1 or cfg.memory.dropout > 0:
        raise ConfigError(
            "controller.pessimism scores M's frames as one memory: it needs memory.ensemble 1 and "
            f"memory.dropout 0, got {cfg.memory.ensemble} and {cfg.memory.dropout}"
        )


@rule("iterate")
def _iterations_train_in_the_dream(cfg: Config) -> None:
    if cfg.iterate.iterations and cfg.controller.train_in != "dream":
        raise ConfigError(
            "iterate.iterations > 0 trains the controller in the dream: controller.train_in must be "
            f"'dream', got {cfg.controller.train_in!r}"
        )


@rule("speech")
def _a_speech_clip_holds_a_frame(cfg: Config) -> None:
    speech = cfg.speech
    if speech.clip_seconds > 0 and speech.clip_frames < 1:
        raise ConfigError(
            f"speech.clip_seconds={speech.clip_seconds} is shorter than one frame of {speech.frame}"
        )

"""The one seed tree: every random stream of a run is named by its purpose and derived from the run's seed.

A stream is ``numpy.random.SeedSequence([seed, purpose, *keys])`` (the keys: an episode, a generation, an
epoch, ...), so two purposes never share a stream, and a resumed or retried piece of work redraws exactly what
it drew before. The numbers are part of every result already published: a new purpose takes a new number.
"""

from __future__ import annotations

import numpy as np

PURPOSES: dict[str, int] = {
    "train": 0,  # CMA-ES candidates' dreams and real episodes
    "eval": 1,  # the controller stage's periodic evaluations
    "test": 2,  # the evaluate stage
    "iterate-eval": 3,  # the iterations' real-game scores
    "iterate-collect": 4,  # the iterations' collected episodes
    "fidelity": 5,  # the fidelity measurement's set, dreams and real seeds
    "player-patch": 7,  # experiments/player_patch.py
    "memory-score": 1_000_003,  # the one posterior sample each split of M's data is scored with
}
"""Purposes keyed off the run's seed."""

EPISODE_PURPOSES: dict[str, int] = {
    "action-noise": 7,  # an exploring controller's action noise in one episode
    "param-noise": 8,  # an exploring controller's parameter perturbation in one episode
    "teacher": 9,  # the teacher's own draws in one episode of ``evaluate.teacher``
    "policy": 10,  # a sampling controller's action draws in one episode (``controller.policy: sample``)
}
"""Purposes keyed off an episode's env seed (itself drawn from the tree): ``[purpose, episode seed]``."""


def seed_sequence(seed: int, purpose: str | None, *keys: int) -> np.random.SeedSequence:
    """The stream of ``purpose`` at ``keys``: ``SeedSequence([seed, PURPOSES[purpose], *keys])``. ``None``:
    the run's own streams ``[seed, *keys]`` (collected episode i: ``[seed, i]``; an epoch's shuffle of V's
    and M's data: ``[seed, epoch, ...]``)."""
    prefix = [] if purpose is None else [PURPOSES[purpose]]
    return np.random.SeedSequence([int(seed), *prefix, *(int(key) for key in keys)])


def seed_ints(seed: int, purpose: str | None, *keys: int, count: int) -> list[int]:
    """``count`` 32-bit seeds (env seeds, dream seeds) from one stream."""
    return [int(s) for s in seed_sequence(seed, purpose, *keys).generate_state(count)]


def seeded_rng(seed: int, purpose: str | None, *keys: int) -> np.random.Generator:
    """A numpy generator on one stream."""
    return np.random.default_rng(seed_sequence(seed, purpose, *keys))


def episode_rng(purpose: str, episode_seed: int) -> np.random.Generator:
    """A generator for one episode's exploration, keyed off its env seed."""
    return np.random.default_rng([EPISODE_PURPOSES[purpose], int(episode_seed)])

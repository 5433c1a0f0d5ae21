"""What Take Cover's skill changes: World Models' held random policy played at skill 5 and at skill 4 on the
same episode seeds, with the player's health read each tic (the screen has no HUD, so the health is a state
V cannot see).

    .venv/bin/python experiments/doom_skill.py [--episodes 20]

Prints (and writes ``doom_skill.json`` in the working folder) per skill: the mean episode length in tics,
the tic of the first hit, the hits seen before the death (drops of the health; the killing hit is not seen,
the episode ends with it) and the damage of each hit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frmdn_worldmodels.games.doom import HeldRandomPolicy  # noqa: E402 (sys.path)
from frmdn_worldmodels.games.envs import make_env  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import EnvConfig  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import write_json  # noqa: E402 (sys.path)


def health_trace(skill: int, seed: int) -> list[float]:
    """The player's health at the start and after every tic the player survived, under the held random
    policy seeded with ``seed`` (the game too)."""
    from vizdoom import GameVariable

    env = make_env(EnvConfig(name="doom_takecover", max_steps=2100, doom_skill=skill), seed=seed)
    policy = HeldRandomPolicy(np.random.default_rng(seed), 3)
    obs, _ = env.reset(seed=seed)
    game = env.unwrapped.game
    health = [game.get_game_variable(GameVariable.HEALTH)]
    while True:
        obs, _, terminated, truncated, _ = env.step(policy.act(obs))
        if terminated or truncated:
            env.close()
            return health
        health.append(game.get_game_variable(GameVariable.HEALTH))


def summary(traces: list[list[float]]) -> dict:
    damages = [[-d for d in np.diff(trace) if d < 0] for trace in traces]
    first_hits = [next((t for t, h in enumerate(trace) if h < trace[0]), len(trace)) for trace in traces]
    return {
        "length_mean": float(np.mean([len(trace) for trace in traces])),
        "first_hit_tic_mean": float(np.mean(first_hits)),
        "hits_seen_mean": float(np.mean([len(d) for d in damages])),
        "damages": sorted({float(d) for episode in damages for d in episode}),
        "lengths": [len(trace) for trace in traces],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=20, help="episode seeds 0..N-1 at each skill")
    args = parser.parse_args()
    if args.episodes < 1:
        parser.error(f"--episodes must be at least 1, got {args.episodes}")
    result = {
        f"skill {skill}": summary([health_trace(skill, seed) for seed in range(args.episodes)])
        for skill in (5, 4)
    }
    write_json(Path("doom_skill.json"), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Does the dream's death depend on the action? M's dreams from the real history just before each held-out
death, played with the recorded actions and with each constant action.

    .venv/bin/python experiments/action_effect.py --config configs/doom-takecover.yaml [--set runs_dir=...]

For every episode of M's test split that ends with the game's own end and lasts more than ``WINDOW`` steps:
the memory reads the recorded history (posterior means, the actions taken) up to ``WINDOW`` steps before the
end; from there ``DREAMS`` dreams (``dream.dynamics.DreamDynamics``, temperature 1, z_{t+1} drawn by M) run
``WINDOW`` steps under each action plan: the recorded actions, then each of the game's actions held
throughout. The same from the episode's first frame (``far``: most of it far from a death). Writes
``<run>/action_effect.json`` (also printed): per plan, the mean over episodes of the share of dreams that
ended within the window. A memory whose deaths do not depend on the action gives every plan the same share;
a controller can only learn to dodge in a dream that gives them different ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_args import run_parser  # noqa: E402 (the script's folder)

from frmdn_worldmodels.data.episodes import load_latents  # noqa: E402 (sys.path)
from frmdn_worldmodels.data.sequences import split_latent_files  # noqa: E402 (sys.path)
from frmdn_worldmodels.dream.dynamics import DreamDynamics  # noqa: E402 (sys.path)
from frmdn_worldmodels.dream.env import load_memory  # noqa: E402 (sys.path)
from frmdn_worldmodels.games.envs import action_space, encode_action  # noqa: E402 (sys.path)
from frmdn_worldmodels.models.memory import MemoryModel  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import ConfigError, load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import DataError, write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.paths import run_paths  # noqa: E402 (sys.path)

WINDOW = 30
"""Steps each dream runs: from this many steps before the recorded end (``near``) or from the first frame."""
DREAMS = 128
"""Dreams per episode and plan."""


@torch.no_grad()
def ended_share(
    memory: MemoryModel, latents: dict, start: int, plan: np.ndarray, generator: torch.Generator
) -> float:
    """The share of ``DREAMS`` dreams from step ``start`` of the recorded episode (state after reading its
    first ``start`` steps) that end within ``len(plan)`` steps, acting ``plan [W, A]``."""
    z = torch.from_numpy(latents["mu"]).float()
    actions = torch.from_numpy(latents["actions"]).float()
    state = None
    if start:
        _, state = memory.recur(z[None, :start], actions[None, :start], None)
    initial_state = None if state is None else tuple(part[0].numpy() for part in state)
    dynamics = DreamDynamics(
        memory, z[start : start + 1], None, len(plan), 1.0, use_mu=True, initial_state=initial_state
    )
    batch = dynamics.start(DREAMS, generator, index=[0] * DREAMS)
    ended = torch.zeros(DREAMS, dtype=torch.bool)
    for action in plan:
        batch.action[:] = torch.as_tensor(action)
        _, done = dynamics.step(batch, generator)
        ended |= done
    return float(ended.double().mean())


def main(argv: list[str] | None = None) -> int:
    args = run_parser(__doc__).parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        memory = load_memory(cfg, "cpu")
        tc = cfg.memory_train
        split = split_latent_files(run_paths(cfg).latents, tc.val_fraction, tc.test_fraction, cfg.seed)
    except (ConfigError, DataError) as error:
        print(f"action_effect: {error}", file=sys.stderr)
        return 2
    space = action_space(cfg.env)
    if not hasattr(space, "n"):
        print(
            f"action_effect: env.name={cfg.env.name} has continuous actions; this holds each of a discrete "
            "game's actions",
            file=sys.stderr,
        )
        return 2
    count = space.n
    constant = {f"action {a} held": np.stack([encode_action(cfg.env, a)] * WINDOW) for a in range(count)}
    generator = torch.Generator().manual_seed(cfg.seed)
    shares: dict[str, dict[str, list[float]]] = {"near": {}, "far": {}}
    for path in split["test"]:
        latents = load_latents(path)
        steps = len(latents["actions"])
        if not latents["terminals"][-1] or steps <= 2 * WINDOW:
            continue
        for where, start in (("near", steps - WINDOW), ("far", 0)):
            plans = {"recorded actions": latents["actions"][start : start + WINDOW], **constant}
            for name, plan in plans.items():
                share = ended_share(memory, latents, start, plan, generator)
                shares[where].setdefault(name, []).append(share)
    summary = {
        "window": WINDOW,
        "dreams": DREAMS,
        "episodes": len(next(iter(shares["near"].values()), [])),
        **{
            where: {
                name: {"mean": float(np.mean(v)), "se": float(np.std(v) / np.sqrt(len(v)))}
                for name, v in by_plan.items()
            }
            for where, by_plan in shares.items()
        },
    }
    write_json(run_paths(cfg).root / "action_effect.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

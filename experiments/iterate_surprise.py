"""What M predicts for the states the agent reaches: each round of iterative training, the memory that trained
the round's player (M of iteration i - 1) read along the episodes that player went on to play in the real
game (iteration i's new episodes), against the same memory on its own test split.

    .venv/bin/python experiments/iterate_surprise.py --config configs/carracing-selftaught.yaml [--set ...]

Teacher-forced on each episode from its first frame (z = V's posterior means, the actions played): M's NLL
per latent dimension, its reward head's squared error per step, and the return its reward head predicts
against the return the game paid. A memory that has seen play like the agent's scores the new episodes as it
scores its test split; one that has not shows it here, before the round's M trains on them. Writes
``<run>/iterate/surprise.json`` (also printed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_args import run_parser  # noqa: E402 (the script's folder)

from frmdn_worldmodels.data.episodes import list_npz, load_latents  # noqa: E402 (sys.path)
from frmdn_worldmodels.data.sequences import split_latent_files  # noqa: E402 (sys.path)
from frmdn_worldmodels.dream.env import load_memory  # noqa: E402 (sys.path)
from frmdn_worldmodels.models.memory import MemoryModel  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import Config, ConfigError, load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import DataError, read_json, write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.paths import run_paths  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.iterate import (  # noqa: E402 (sys.path)
    iteration_config,
    iteration_marker,
    new_episodes_prefix,
)


@torch.no_grad()
def read_episodes(memory: MemoryModel, paths: list[Path]) -> dict:
    """M along each episode of ``paths``: mean NLL per dimension and reward squared error per step, and the
    episodes' predicted and real returns."""
    nll, squared, predicted, real = [], [], [], []
    for path in paths:
        latents = load_latents(path)
        z = torch.from_numpy(latents["mu"]).float()[None]
        actions = torch.from_numpy(latents["actions"]).float()[None]
        log_prob, out = memory.sequence_log_prob(z, actions)
        rewards = latents["rewards"].astype(np.float64)
        reward = out.reward[0].double().numpy()
        nll.append(-log_prob[0].double().numpy() / z.shape[-1])
        squared.append((reward - rewards) ** 2)
        predicted.append(reward.sum())
        real.append(rewards.sum())
    return {
        "episodes": len(paths),
        "nll_per_dim": float(np.concatenate(nll).mean()),
        "reward_mse": float(np.concatenate(squared).mean()),
        "predicted_return": float(np.mean(predicted)),
        "real_return": float(np.mean(real)),
    }


def round_row(cfg: Config, iteration: int) -> dict | None:
    """Round ``iteration``'s row: M of iteration - 1 on the round's new episodes and on its test split (None
    while the round's episodes are not encoded yet), and the scores of the round's player."""
    previous, current = iteration_config(cfg, iteration - 1), iteration_config(cfg, iteration)
    prefix = new_episodes_prefix(iteration)
    new = [path for path in list_npz(run_paths(current).latents) if path.name.startswith(prefix)]
    if not new or not (run_paths(previous).memory / "memory.pt").exists():
        return None
    tc = cfg.memory_train
    test = split_latent_files(run_paths(previous).latents, tc.val_fraction, tc.test_fraction, cfg.seed)[
        "test"
    ]
    memory = load_memory(previous, "cpu")
    marker = iteration_marker(cfg, iteration - 1)
    player = read_json(marker) if marker.exists() else {}
    return {
        "iteration": iteration,
        "player_dream_score": player.get("dream_best"),
        "player_real_mean": player.get("real_mean"),
        "new_episodes": read_episodes(memory, new),
        "test_split": read_episodes(memory, test),
    }


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        rows = [row for i in range(1, cfg.iterate.iterations + 1) if (row := round_row(cfg, i))]
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = run_paths(cfg).iterate
    if not rows:
        print(
            f"error: {out}: no iteration has encoded episodes yet; run `python run.py iterate`",
            file=sys.stderr,
        )
        return 2
    write_json(out / "surprise.json", {"rows": rows})
    print("round | NLL/dim new (test) | reward MSE new (test) | return M / game (new) | player dream / real")
    for row in rows:
        new, test = row["new_episodes"], row["test_split"]
        player = " / ".join(
            "-" if v is None else f"{v:.1f}" for v in (row["player_dream_score"], row["player_real_mean"])
        )
        print(
            f"{row['iteration']:5d} | {new['nll_per_dim']:.3f} ({test['nll_per_dim']:.3f}) | "
            f"{new['reward_mse']:.3f} ({test['reward_mse']:.3f}) | "
            f"{new['predicted_return']:.1f} / {new['real_return']:.1f} | {player}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

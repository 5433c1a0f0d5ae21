"""Does M know when Mario dies? M's done head, teacher-forced on the run's encoded episodes (posterior means
and the actions taken), at the step each episode ended with the game's own end, against the other steps, on
the memory's training and test splits (the split ``train-memory`` used).

    .venv/bin/python experiments/done_head.py --config configs/mario-hour-expert.yaml [--set name=...]

Writes ``<run>/done_head.json`` (also printed). For each split: how many episodes end with a terminal step,
the done probability p the dream draws at that step (``MemoryModel.done_probability``: the head's logit
with the loss's positive weight and the done horizon taken out; mean, median, share above 0.5), the highest p
in the 5 steps before it, the chance that a dream through the episode's last 6 steps ends in one of them
(``caught_mean``: 1 - prod(1 - p) over those steps, at temperature 1; the figure that compares heads trained
with different ``memory_train.done_horizon``), the chance that it ends before them (``early_mean``: the
false alarms a dream pays for), and the mean p over every other step. A head that generalises
gives the test split's deaths about the training split's probabilities; one that learned its training deaths
gives them far less.
With ``memory.heads_read_z`` the head reads the next frame, which already shows the end (Doom's last frame
is dark): ``drawn`` gives the same figures for the dream's own chance at each step of the real history, over
z_{t+1} drawn from M (``drawn_done_probabilities``), whether M sees the end coming.
When the episodes store Mario's position, ``by_end`` gives the same figures for the deaths where he fell
off the screen (``fell``: a pit) and for the others (``on_screen``: an enemy or the clock).
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

from frmdn_worldmodels.data.episodes import load_episode, load_latents  # noqa: E402 (sys.path)
from frmdn_worldmodels.data.sequences import split_latent_files  # noqa: E402 (sys.path)
from frmdn_worldmodels.dream.env import load_memory  # noqa: E402 (sys.path)
from frmdn_worldmodels.models.memory import MemoryModel  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import ConfigError, load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import DataError, write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.paths import run_paths  # noqa: E402 (sys.path)

BEFORE = 5
"""Steps before the end whose highest probability is reported (an early warning is also a usable head)."""
DRAWS = 32
"""Draws of z_{t+1} per step for ``drawn`` (heads that read the drawn frame)."""


@torch.no_grad()
def done_probabilities(memory: MemoryModel, latents: dict[str, np.ndarray]) -> np.ndarray:
    """p_t = P(the episode ended with step t) for every step of one episode, reading z_t = mu_t and a_t (and
    z_{t+1} = mu_{t+1}, with heads that read it): the per-step chance the dream draws."""
    z = torch.from_numpy(latents["mu"]).float()[None]
    actions = torch.from_numpy(latents["actions"]).float()[None]
    _, out = memory.sequence_log_prob(z, actions)
    return memory.done_probability(out.done_logit[0]).numpy()


@torch.no_grad()
def drawn_done_probabilities(
    memory: MemoryModel, latents: dict[str, np.ndarray], draws: int, generator: torch.Generator
) -> np.ndarray:
    """With heads that read z_{t+1}: the chance the dream ends at step t when it draws z_{t+1} itself from
    the real history (z_<=t = mu, a_<=t), E over ``draws`` draws at temperature 1 of p(done | h, z_{t+1}).
    ``done_probabilities`` reads the real next frame; this is what a dream going through the same history
    would do: whether M sees a death coming, not only the frame that shows it."""
    z = torch.from_numpy(latents["mu"]).float()[None]
    actions = torch.from_numpy(latents["actions"]).float()[None]
    _, out = memory.sequence_log_prob(z, actions)
    total = torch.zeros(out.done_logit.shape[1])
    for _ in range(draws):
        drawn = memory.sample(out, 1.0, generator)
        _, logit = memory.outcome(out, drawn)
        total += memory.done_probability(logit[0])
    return (total / draws).numpy()


def summarise(probabilities: list[np.ndarray]) -> dict:
    """The figures of the module docstring over episodes whose last step is a terminal one."""
    if not probabilities:
        return {"episodes": 0}
    last = np.array([p[-1] for p in probabilities])
    before = np.array([p[-1 - BEFORE : -1].max() if len(p) > 1 else 0.0 for p in probabilities])
    caught = np.array([1.0 - np.prod(1.0 - p[-1 - BEFORE :]) for p in probabilities])
    early = np.array([1.0 - np.prod(1.0 - p[: -1 - BEFORE]) for p in probabilities])
    others = np.concatenate([p[:-1] for p in probabilities])
    return {
        "episodes": len(probabilities),
        "end_mean": float(last.mean()),
        "end_median": float(np.median(last)),
        "end_share_above_half": float((last > 0.5).mean()),
        f"before_{BEFORE}_max_mean": float(before.mean()),
        "caught_mean": float(caught.mean()),
        "early_mean": float(early.mean()),
        "other_steps_mean": float(others.mean()) if len(others) else None,
    }


def end_kind(episode: Path) -> str | None:
    """``fell`` when Mario is off the screen in the episode's last frame, ``on_screen`` when he is not, None
    for an episode without his positions (or without its episode file)."""
    if not episode.is_file():
        return None
    player = load_episode(episode).get("player")
    if player is None:
        return None
    return "fell" if np.isnan(player[-1]).any() else "on_screen"


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        memory = load_memory(cfg, "cpu")
        if memory.config.predict_done is False:
            raise ConfigError("memory.predict_done is false: this memory has no done head")
        tc = cfg.memory_train
        split = split_latent_files(run_paths(cfg).latents, tc.val_fraction, tc.test_fraction, cfg.seed)
    except (ConfigError, DataError) as error:
        print(f"done_head: {error}", file=sys.stderr)
        return 2
    summary = {}
    generator = torch.Generator().manual_seed(cfg.seed)
    for name in ("train", "test"):
        ended, drawn, kinds = [], [], {}
        for path in split.get(name, []):
            latents = load_latents(path)
            if latents["terminals"][-1]:
                ended.append(done_probabilities(memory, latents))
                kinds.setdefault(end_kind(run_paths(cfg).episodes / path.name), []).append(ended[-1])
                if memory.config.heads_read_z:
                    drawn.append(drawn_done_probabilities(memory, latents, DRAWS, generator))
        summary[name] = summarise(ended)
        if drawn:
            summary[name]["drawn"] = summarise(drawn)
        if None not in kinds and kinds:
            summary[name]["by_end"] = {kind: summarise(kinds.get(kind, [])) for kind in ("fell", "on_screen")}
    write_json(run_paths(cfg).root / "done_head.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

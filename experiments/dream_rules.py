"""What each of the dream's rules does to its fidelity: the run's ``run.py fidelity`` measurement re-scored
in dreams that break one rule at a time, against the same real-game returns (the real game does not depend on
the dream's rules, so it is played once, by ``run.py fidelity``).

    .venv/bin/python experiments/dream_rules.py --config configs/carracing-hour.yaml [--set ...]

The rules undone, one a row (and all of them together, the dream before they were made):
- ``full horizon``: a dream from step t of a real episode runs the whole horizon, not the H - t steps the game
  had left;
- ``tau on done``: the temperature divides the done logit (sigma(logit / tau));
- ``done horizon as a step's chance``: a head trained on "the episode ends within H steps" drawn at every step
  as if it said "ends now";
- ``weighted done as is``: the logit of a head trained with positive weight w, not shifted by -log w;
- ``done head uncalibrated``: without the bias b that sets the head's mean chance on the training steps to the
  data's rate of ends.
Each ``--variant KEY=VALUE [KEY=VALUE ...]`` adds a row: every rule, in the dream of the run's settings with
these overrides, as CMA-ES would rank by it; for instance ``controller.pessimism=4`` (the run's critics
trained: ``memory_train.critics``), ``controller.temperature=1.3``, or ``controller.dream_start=any
controller.max_steps=50`` (short dreams from recorded frames). The overrides change the dream only: the real
returns are the measurement's.
The rules of the memory's training (``memory.heads_read_z``, ``memory_train.carry_state``, the checkpoint
chosen on the whole validation loss) need a memory trained without them: a run of its own, with its own
``run.py fidelity``.

Writes ``<run>/fidelity/dream_rules.json`` (also printed): per variant, Spearman's rho and Pearson's r of the
dream means against the real means, the mean gap dream - real, the dreams' mean length and, with pessimism,
the mean penalty a dream step (overall and per controller).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_args import run_parser  # noqa: E402 (the script's folder)

from frmdn_worldmodels.dream.env import critic_files, load_memory  # noqa: E402 (sys.path)
from frmdn_worldmodels.models.memory import MemoryModel  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import Config, ConfigError, load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import DataError, read_json, write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.paths import run_paths  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.rules import check_rules  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.fidelity import dream_set, pearson, scored_set, spearman  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.train_controller import DreamFitness, load_best  # noqa: E402 (sys.path)

RULES = (
    "full horizon",
    "tau on done",
    "done horizon as a step's chance",
    "weighted done as is",
    "done head uncalibrated",
)


def break_rules(dream: DreamFitness, memory: MemoryModel, broken: tuple[str, ...]) -> None:
    """Undo ``broken`` rules in ``dream`` (its dynamics and memory are this variant's copies)."""
    dynamics = dream.dream.dynamics
    if "full horizon" in broken:
        dynamics.limits.fill_(dynamics.horizon)
    if "done horizon as a step's chance" in broken:
        memory.done_horizon = 1
    if "weighted done as is" in broken:
        memory.done_pos_weight = 1.0
    if "done head uncalibrated" in broken:
        memory.done_bias = 0.0
    if "tau on done" in broken and dynamics.temperature > 0:
        calibrated, tau = memory.done_probability, dynamics.temperature
        memory.done_probability = lambda logit: calibrated(logit / tau)


def variants(cfg: Config, extra: dict[str, Config]) -> dict[str, tuple[Config, tuple[str, ...]]]:
    """Each row's name, the config its dream is of and the rules it breaks."""
    rows = {"every rule": (cfg, ()), **{f"without: {rule}": (cfg, (rule,)) for rule in RULES}}
    rows["none of them"] = (cfg, RULES)
    return rows | {name: (variant, ()) for name, variant in extra.items()}


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument(
        "--variant", action="append", nargs="+", default=[], metavar="KEY=VALUE", help="a dream's overrides"
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        measured = read_json(run_paths(cfg).fidelity / "fidelity.json")
        best = load_best(cfg)
        extra = {
            " ".join(overrides): load_config(args.config, args.set + overrides) for overrides in args.variant
        }
        for variant in extra.values():
            check_rules(variant, "memory_train", "controller")
            if variant.controller.pessimism:
                critic_files(variant)
    except (ConfigError, DataError) as error:
        print(f"dream_rules: {error} (run `python run.py fidelity` first)", file=sys.stderr)
        return 2
    real = np.array([row["real"]["mean"] for row in measured["rows"]])
    results = {}
    for name, (variant, broken) in variants(cfg, extra).items():
        memory = load_memory(cfg)  # each variant breaks rules on a copy of its own
        controller, members = scored_set(cfg, memory, best)
        if [member.name for member in members] != [row["name"] for row in measured["rows"]]:
            print(
                "dream_rules: the controller set differs from fidelity.json's; rerun fidelity",
                file=sys.stderr,
            )
            return 2
        dreamt, _ = dream_set(
            variant, memory, controller, members, lambda dream: break_rules(dream, memory, broken)
        )
        means = dreamt.returns.double().mean(1).numpy()
        rho, r = spearman(means, real), pearson(means, real)
        results[name] = {
            "spearman": rho,
            "pearson": r,
            "mean_gap": float((means - real).mean()),
            "dream_mean_length": float(dreamt.lengths.double().mean()),
        }
        if dreamt.penalties is not None:
            penalties, lengths = dreamt.penalties.double(), dreamt.lengths.double()
            results[name]["penalty_per_step"] = float(penalties.sum() / lengths.sum().clamp(min=1))
            by_controller = penalties.sum(1) / lengths.sum(1).clamp(min=1)
            results[name]["penalty_per_step_by_controller"] = dict(
                zip([row["name"] for row in measured["rows"]], by_controller.tolist(), strict=True)
            )
        shown = "undefined" if rho is None or math.isnan(rho) else f"{rho:+.3f}"
        print(f"dream_rules: {name:40s} Spearman {shown}", file=sys.stderr)
    summary = {"controllers": len(real), "real_mean_steps": measured["real_mean_steps"], "variants": results}
    write_json(run_paths(cfg).fidelity / "dream_rules.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

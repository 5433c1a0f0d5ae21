"""Which controller should a round of dream training keep: the generation's best-ranked candidate (the
champion, ``controller.keep: champion``) or CMA-ES's mean (``controller.keep: mean``, World Models' choice)?
Both come out of the same search, so one finished run answers it for each of its rounds, paired.

    .venv/bin/python experiments/keep_mean.py --config configs/carracing-selftaught.yaml \\
        [--rounds 4-13] [--episodes 16] [--set ...]

For each round of the run's iterative training (0 = the pipeline's controller): the champion its last periodic
evaluation kept (``controller/best.pt``) and the CMA-ES mean after its last generation (``es_state.pt``), each
scored in the real game on the same ``--episodes`` seeds (the first of the ``iterate-eval`` seeds the rounds
are scored on) and in the round's own dream (its evaluation dreams, on which the champion was kept). Only the
champions played the rounds' new episodes, so this measures the rule within a round, not what it would change
over later rounds. Writes ``<run>/iterate/keep_mean.json`` (also printed), with the seconds and the machine's
matmul rate.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_args import run_parser  # noqa: E402 (the script's folder)

from frmdn_worldmodels.agent.play import controller_for  # noqa: E402 (sys.path)
from frmdn_worldmodels.agent.workers import run_pool  # noqa: E402 (sys.path)
from frmdn_worldmodels.dream.env import load_memory  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import Config, ConfigError, load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import DataError, load_checkpoint, write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.machine import matmul_peak  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.paths import run_paths  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.pool import PoolKeeper  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.seeds import seed_ints  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.iterate import iteration_config, score  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.train_controller import DreamFitness, load_best  # noqa: E402 (sys.path)
from frmdn_worldmodels.train.es import CMAES  # noqa: E402 (sys.path)


def parse_rounds(text: str | None, last: int) -> list[int]:
    """``A-B`` or ``A`` (0 <= A <= B <= ``last``); None: every round."""
    if text is None:
        return list(range(last + 1))
    first, _, end = text.partition("-")
    try:
        low, high = int(first), int(end or first)
    except ValueError:
        raise ConfigError(f"--rounds must be A-B or A, got {text!r}") from None
    if not 0 <= low <= high <= last:
        raise ConfigError(f"--rounds {text}: the run's rounds are 0-{last}")
    return list(range(low, high + 1))


def round_row(current: Config, iteration: int, seeds: list[int], keeper: PoolKeeper) -> dict:
    """Round ``iteration``'s champion and CMA-ES mean, in its dream and in the real game on ``seeds``."""
    c = current.controller
    es = CMAES.from_state_dict(load_checkpoint(run_paths(current).controller / "es_state.pt")["es"])
    best = load_best(current)
    kept = {"champion": best["params"].numpy().astype(np.float32), "mean": es.mean.astype(np.float32)}
    memory = load_memory(current, "cpu")
    fitness = DreamFitness(current, memory, controller_for(current.env, memory, c))
    try:
        dream = {
            name: fitness.episodes(p, c.eval_episodes, int(best["generation"])) for name, p in kept.items()
        }
    finally:
        fitness.close()
    pool = run_pool(current, keeper=keeper)
    try:
        real = {name: score(pool, p, seeds, c.envs_per_worker) for name, p in kept.items()}
    finally:
        pool.close()
    difference = real["mean"] - real["champion"]
    return {
        "iteration": iteration,
        "generation": int(best["generation"]),
        **{f"dream_{name}": float(returns.mean()) for name, returns in dream.items()},
        **{f"real_{name}": float(returns.mean()) for name, returns in real.items()},
        "real_mean_minus_champion": float(difference.mean()),
        "real_difference_se": float(difference.std(ddof=1) / np.sqrt(len(difference))),
        "returns": {name: returns.tolist() for name, returns in real.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument("--rounds", help="A-B: the rounds to score (default: all)")
    parser.add_argument("--episodes", type=int, help="real episodes each (default: iterate.eval_episodes)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        rounds = parse_rounds(args.rounds, cfg.iterate.iterations)
        episodes = cfg.iterate.eval_episodes if args.episodes is None else args.episodes
        if episodes < 2:
            raise ConfigError(f"--episodes must be 2 or more for a standard error, got {episodes}")
        missing = [
            i for i in rounds if not (run_paths(iteration_config(cfg, i)).controller / "es_state.pt").exists()
        ]
        if missing:
            raise DataError(f"{run_paths(cfg).iterate}: rounds {missing} have no controller yet")
    except (ConfigError, DataError) as error:
        print(f"keep_mean: {error}", file=sys.stderr)
        return 2
    seeds = seed_ints(cfg.seed, "iterate-eval", count=episodes)
    record = {"matmul_gflops": round(matmul_peak(), 1), "seeds": seeds, "rows": []}
    started = time.perf_counter()
    with PoolKeeper() as keeper:
        for iteration in rounds:
            row = round_row(iteration_config(cfg, iteration), iteration, seeds, keeper)
            record["rows"].append(row)
            record["seconds"] = round(time.perf_counter() - started, 1)
            write_json(run_paths(cfg).iterate / "keep_mean.json", record)
            dream = f"dream champion {row['dream_champion']:.1f} mean {row['dream_mean']:.1f}"
            real = f"real champion {row['real_champion']:.1f} mean {row['real_mean']:.1f}"
            difference = f"{row['real_mean_minus_champion']:+.1f} ± {row['real_difference_se']:.1f}"
            print(f"round {iteration:2d}: {dream} | {real} | mean - champion {difference}", flush=True)
    rows = record["rows"]
    per_round = np.array([row["real_mean_minus_champion"] for row in rows])
    spread = per_round.std(ddof=1) / np.sqrt(len(rows)) if len(rows) > 1 else float("nan")
    print(
        f"over {len(rows)} rounds: mean - champion {per_round.mean():+.1f} (± {spread:.1f} over rounds); "
        f"the mean ahead in {int((per_round > 0).sum())} of {len(rows)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

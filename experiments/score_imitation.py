"""The reference row of a dream-trained run: its CMA-ES start alone (``controller.init: imitate``, no dream
training), scored on the evaluate stage's own test seeds, so it sits next to the run's final score.

    .venv/bin/python experiments/score_imitation.py --config configs/carracing-hour.yaml [--set seed=N ...]

Reads the run's latents and memory (``run.py train-memory`` first), fits the imitation exactly as
``train-controller`` does, plays ``evaluate.episodes`` real episodes on the rollout workers and writes
``<run>/imitation_score.json`` (``--out NAME`` for another name in the run's folder, to keep a screen of
``--set controller.hidden=N`` beside it; also printed): the fit's figures and the returns' mean, std, min,
max and values (for Mario the same of the furthest x).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_args import run_parser  # noqa: E402 (the script's folder)

from frmdn_worldmodels.agent.play import controller_for  # noqa: E402 (sys.path)
from frmdn_worldmodels.agent.workers import map_seeds, run_pool  # noqa: E402 (sys.path)
from frmdn_worldmodels.dream.env import load_memory  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import ConfigError, load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import DataError, write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.paths import run_paths  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.seeds import seed_ints  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.evaluate import episode_stats  # noqa: E402 (sys.path)
from frmdn_worldmodels.train.imitate import imitate_collected  # noqa: E402 (sys.path)


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument(
        "--out", default="imitation_score.json", help="the result's file name in the run's folder"
    )
    args = parser.parse_args(argv)
    try:
        if Path(args.out).name != args.out or not args.out.endswith(".json"):
            raise ConfigError(f"--out must be a .json file name in the run's folder, got {args.out!r}")
        cfg = load_config(args.config, args.set)
        if cfg.controller.init != "imitate":
            raise ConfigError(
                f"controller.init is {cfg.controller.init!r}: this run does not start from an imitation"
            )
        memory = load_memory(cfg, "cpu")
    except (ConfigError, DataError) as error:
        print(f"score_imitation: {error}", file=sys.stderr)
        return 2
    controller = controller_for(cfg.env, memory, cfg.controller)
    start = controller.initial_params(torch.Generator().manual_seed(cfg.seed))  # as train-controller starts
    imitation = imitate_collected(cfg, memory, controller, start)
    seeds = seed_ints(cfg.seed, "test", 0, count=cfg.evaluate.episodes)  # the evaluate stage's seeds
    started = time.perf_counter()
    pool = run_pool(cfg, memory=memory)
    try:
        params = imitation.params.numpy().astype(np.float32)
        episodes = map_seeds(pool, "evaluate", params, seeds, cfg.controller.envs_per_worker)
    finally:
        pool.close()
    result = {
        "imitation": imitation.summary(),
        "episodes": len(episodes),
        **episode_stats(episodes),
        "seconds": round(time.perf_counter() - started, 1),
        "seeds": seeds,
    }
    write_json(run_paths(cfg).root / args.out, result)
    print(json.dumps({key: value for key, value in result.items() if key not in ("seeds", "returns")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

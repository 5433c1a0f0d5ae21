"""The teacher's row of a results table: the game's hand-written driver alone (``Game.teachers``), on the
evaluate stage's own test seeds of a run's seed, with no trained model.

    .venv/bin/python experiments/score_teacher.py --config configs/carracing-hour.yaml [--set seed=N ...]

Plays ``evaluate.episodes`` real episodes with the teacher ``evaluate.teacher`` names (``--teacher`` for
another), drawing from the same generators as ``evaluate`` does, so its returns are the ones ``evaluate``
reports beside a trained agent of that seed. Prints and writes (``--out``, default
``<run>/teacher_score.json``) the returns' mean, std, min, max and values (for Mario the same of the furthest
x), the seconds and the machine's matmul rate.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from run_args import run_parser  # noqa: E402 (the script's folder)

from frmdn_worldmodels.agent.play import Episode, play_episode, teacher_batch  # noqa: E402 (sys.path)
from frmdn_worldmodels.agent.workers import split_seeds  # noqa: E402 (sys.path)
from frmdn_worldmodels.games.envs import make_env  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.config import ConfigError, EnvConfig, load_config  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.io import write_json  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.machine import matmul_peak  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.paths import run_paths  # noqa: E402 (sys.path)
from frmdn_worldmodels.runtime.seeds import seed_ints  # noqa: E402 (sys.path)
from frmdn_worldmodels.stages.evaluate import check_evaluate_config, episode_stats  # noqa: E402 (sys.path)


def play_teacher(env_cfg: EnvConfig, teacher: str, seeds: list[int]) -> list[Episode]:
    """The teacher's episodes on ``seeds``, one env, as ``RolloutWorker.evaluate(teacher=...)`` plays them."""
    env = make_env(env_cfg)
    try:
        return [play_episode(env, teacher_batch(env_cfg, teacher, [env], [seed]), seed) for seed in seeds]
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    parser = run_parser(__doc__)
    parser.add_argument("--teacher", help="a teacher of the game (default: the config's evaluate.teacher)")
    parser.add_argument("--workers", type=int, default=2, help="processes playing side by side")
    parser.add_argument("--out", help="the result's path (default: <run>/teacher_score.json)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        teacher = args.teacher or cfg.evaluate.teacher
        if not teacher:
            raise ConfigError("no teacher: name one with --teacher or evaluate.teacher")
        check_evaluate_config(
            dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, teacher=teacher))
        )
        if args.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    except ConfigError as error:
        print(f"score_teacher: {error}", file=sys.stderr)
        return 2
    seeds = seed_ints(cfg.seed, "test", 0, count=cfg.evaluate.episodes)  # the evaluate stage's seeds
    gflops = matmul_peak()
    started = time.perf_counter()
    parts = [part for part in split_seeds(seeds, args.workers) if part]
    if len(parts) == 1:
        episodes = play_teacher(cfg.env, teacher, parts[0])
    else:
        with ProcessPoolExecutor(len(parts)) as pool:
            played = pool.map(play_teacher, [cfg.env] * len(parts), [teacher] * len(parts), parts)
            episodes = [episode for part in played for episode in part]
    result = {
        "teacher": teacher,
        "env": cfg.env.name,
        "seed": cfg.seed,
        "episodes": len(episodes),
        **episode_stats(episodes),
        "seconds": round(time.perf_counter() - started, 1),
        "matmul_gflops": round(gflops, 1),
        "seeds": seeds,
    }
    write_json(Path(args.out) if args.out else run_paths(cfg).root / "teacher_score.json", result)
    print(json.dumps({key: value for key, value in result.items() if key not in ("seeds", "returns")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

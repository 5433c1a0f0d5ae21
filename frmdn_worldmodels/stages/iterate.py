"""``python run.py iterate``: World Models' iterative training, after the pipeline's first controller.

Random exploration never shows the memory what good play leads to, so a controller trained in its dream
exploits what the memory never saw. Ha & Schmidhuber's remedy, iteration i = 1 .. ``iterate.iterations``:

1. play ``iterate.episodes`` real episodes with the current best controller acting through V + M, with
   exploration noise (``iterate.noise``: ``action`` perturbs each action, ``params`` draws one perturbed
   controller per episode), collected by the collect stage's own collector (``stages.collect``) as ordinary
   episode files;
2. train M further, from its previous weights, on every episode so far (V too with ``iterate.retrain_vae``);
3. continue CMA-ES in the new dream from the previous mean;
4. score the new best controller in the real game (``iterate.eval_episodes``, the random policy on the same
   seeds alongside).

Iteration i is a run of its own in ``<run>/iterate/it<i>/`` (its ``episodes/``, ``vae/``, ``latents/``,
``memory/``, ``controller/``; ``iteration_config`` derives its config), made by the registered stages
(collect, train-vae, encode, train-memory, train-controller), so each step resumes after a kill and is
redone when what it was made from changed. Earlier episodes are hard links, not copies. The stages that
play on Ray share the command's ``PoolKeeper``.
``iterate/summary.json`` holds one row per iteration (0 = the pipeline's controller): ``iteration``,
``episodes_total``, ``real_mean``, ``real_std``, ``dream_best``, ``random_mean``, ``seconds``;
``iterate/scores.png`` plots them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from pathlib import Path

import numpy as np

from frmdn_worldmodels.agent.play import ControllerPlayer
from frmdn_worldmodels.data.episodes import list_npz
from frmdn_worldmodels.runtime.config import Config, IterateNoise
from frmdn_worldmodels.runtime.io import DataError, atomic_write_bytes, load_checkpoint, read_json, write_json
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.plots import plot_curves
from frmdn_worldmodels.runtime.pool import ActorPool, PoolKeeper
from frmdn_worldmodels.runtime.progress import note
from frmdn_worldmodels.runtime.records import Stage, file_digest, recorded_seconds
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.runtime.seeds import seed_ints
from frmdn_worldmodels.stages.collect import EpisodeSet, collect_episodes, episode_seeds


def iteration_config(cfg: Config, iteration: int) -> Config:
    """The run of iteration ``iteration`` (0 = the pipeline's own run): ``<run>/iterate/it<i>/``, with the
    budgets of one iteration (``iterate.memory_epochs``, ``iterate.generations``)."""
    if iteration == 0:
        return cfg
    root = run_paths(cfg).iterate.resolve()
    return dataclasses.replace(
        cfg,
        runs_dir=str(root),
        name=f"it{iteration:02d}",
        memory_train=dataclasses.replace(cfg.memory_train, epochs=cfg.iterate.memory_epochs),
        vae=dataclasses.replace(cfg.vae, epochs=cfg.iterate.memory_epochs),
        controller=dataclasses.replace(cfg.controller, generations=cfg.iterate.generations),
    )


def new_episodes_prefix(iteration: int) -> str:
    """The name prefix of the episodes iteration ``iteration`` plays (``it<i>_ep_<j>.npz``)."""
    return f"it{iteration:02d}_"


def iteration_marker(cfg: Config, iteration: int) -> Path:
    """The file holding iteration ``iteration``'s row of the summary once it is scored."""
    if iteration == 0:
        return run_paths(cfg).iterate / "iteration0.json"
    return run_paths(iteration_config(cfg, iteration)).root / "iteration.json"


def _link_all(sources: list[Path], folder: Path) -> None:
    """Hard-link ``sources`` into ``folder`` (a copy where the file system cannot link), keeping the names."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        target = folder / source.name
        if target.exists():
            continue
        try:
            os.link(source, target)
        except OSError:
            atomic_write_bytes(target, source.read_bytes())


def _policy_digest(cfg: Config) -> str:
    return file_digest(run_paths(cfg).controller / "best.pt")


def _params_digest(params: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(params, dtype=np.float32).tobytes()).hexdigest()[:16]


def _player(previous: Config, noise: IterateNoise, scale: float) -> tuple[ControllerPlayer, np.ndarray]:
    """The previous run's best controller acting through its V and M, with the exploration noise; and its
    parameters."""
    from frmdn_worldmodels.dream.env import load_memory
    from frmdn_worldmodels.models.vae import load_vae
    from frmdn_worldmodels.stages.train_controller import load_best

    params = load_best(previous)["params"].numpy().astype(np.float32)
    vae = load_vae(run_paths(previous).vae / "vae.pt", "cpu").state_dict()
    memory = load_memory(previous, "cpu").to_checkpoint()
    player = ControllerPlayer(
        previous.env, vae, memory, params, previous.memory_train.use_mu, previous.controller, noise, scale
    )
    return player, params


def _played(folder: Path, episodes: EpisodeSet, seed: int) -> dict[str, dict]:
    """The ``seed``, ``return`` and ``steps`` of each episode of ``episodes`` in ``folder``."""
    played = {}
    for index in range(episodes.count):
        with np.load(folder / episodes.name(index)) as arrays:
            rewards = arrays["rewards"]
        env_seed = episode_seeds(seed, index, episodes.purpose, episodes.keys)[0]
        played[episodes.name(index)] = {
            "seed": env_seed,
            "return": float(rewards.sum()),
            "steps": len(rewards),
        }
    return played


def collect_iteration(
    cfg: Config, previous: Config, current: Config, iteration: int, keeper: PoolKeeper | None = None
) -> dict:
    """Step 1: the episodes of every earlier run, linked, and ``iterate.episodes`` new ones
    (``it<i>_ep_<j>.npz``, seeded by ``iterate-collect``) played by the previous run's best controller
    through its V and M, with exploration noise; returns the episodes stage's summary."""
    it = cfg.iterate
    settings = {
        "episodes": it.episodes,
        "noise": it.noise,
        "noise_scale": it.noise_scale,
        "iteration": iteration,
    }
    stage = Stage(current, "collect", inputs={"policy": _policy_digest(previous), "iterate": settings})
    if (done := stage.done()) is not None:
        return done
    note(f"[iterate] iteration {iteration}/{it.iterations}: collecting {it.episodes} episodes")
    stage.open()
    folder = stage.folder
    _link_all(list_npz(run_paths(previous).episodes), folder)
    player, params = _player(previous, it.noise, it.noise_scale)
    episodes = EpisodeSet(
        it.episodes, player, new_episodes_prefix(iteration), "iterate-collect", (iteration,)
    )
    collected = collect_episodes(
        current, folder, on_written=stage.record_progress, episodes=episodes, keeper=keeper
    )
    if collected["failed"]:
        raise DataError(
            f"iteration {iteration}: {len(collected['failed'])} episode(s) could not be collected "
            f"({collected['failed']}); rerun the same command to collect just those"
        )
    earlier = (
        read_json(run_paths(previous).episodes / "summary.json").get("episodes", {}) if iteration > 1 else {}
    )
    made_by = {
        "iteration": iteration,
        "policy": str(run_paths(previous).controller / "best.pt"),
        "policy_params": _params_digest(params),
        "noise": it.noise,
        "noise_scale": it.noise_scale,
    }
    new = {name: {**info, **made_by} for name, info in _played(folder, episodes, cfg.seed).items()}
    summary = {
        "iteration": iteration,
        "episodes_total": len(list_npz(folder)),
        "new_episodes": it.episodes,
        "episodes": {**earlier, **new},
    }
    return stage.finish(summary)


def _share_vae(previous: Config, current: Config) -> None:
    """Without ``iterate.retrain_vae`` every iteration reads the pipeline's V: its folder's files, linked."""
    source, target = run_paths(previous).vae, run_paths(current).vae
    _link_all(
        [
            source / name
            for name in ("vae.pt", "made_from.json", "summary.json", "config.yaml")
            if (source / name).exists()
        ],
        target,
    )


def _stage_seconds(current: Config, iteration: int) -> float:
    """Wall seconds the stages of iteration ``iteration`` have worked, over every invocation (0 for iteration
    0: its stages are the pipeline's own, reported under their names). V counts only when retrained: the
    shared one's linked record is the pipeline's."""
    if iteration == 0:
        return 0.0
    paths = run_paths(current)
    folders = [paths.episodes, paths.latents, paths.memory, paths.controller]
    if current.iterate.retrain_vae:
        folders.append(paths.vae)
    return float(sum(seconds for folder in folders if (seconds := recorded_seconds(folder)) is not None))


def score(pool: ActorPool, params: np.ndarray | None, seeds: list[int], envs_per_worker: int) -> np.ndarray:
    """Returns of ``params`` (None: uniformly random actions) on the real-game ``seeds``."""
    from frmdn_worldmodels.agent.workers import map_seeds

    desc = f"[iterate] scoring {'the random policy' if params is None else 'the best controller'}"
    episodes = map_seeds(pool, "evaluate", params, seeds, envs_per_worker, desc=desc)
    return np.array([episode.ret for episode in episodes])


def train_iteration(cfg: Config, iteration: int, keeper: PoolKeeper) -> tuple[dict, dict]:
    """Steps 1-3 of iteration ``iteration`` >= 1, each a registered stage on the iteration's run (each skips
    what it has done): (the episodes' summary, the controller's)."""
    from frmdn_worldmodels.stages import encode, train_controller, train_memory, train_vae
    from frmdn_worldmodels.train.es import CMAES

    previous, current = iteration_config(cfg, iteration - 1), iteration_config(cfg, iteration)
    collected = collect_iteration(cfg, previous, current, iteration, keeper)
    if cfg.iterate.retrain_vae:
        train_vae.run(current, initial=run_paths(previous).vae / "vae.pt")
    else:
        _share_vae(previous, current)
    encode.run(current)
    train_memory.run(current, initial=run_paths(previous).memory / "memory.pt")
    es = CMAES.from_state_dict(load_checkpoint(run_paths(previous).controller / "es_state.pt")["es"])
    controller = train_controller.run(current, initial_mean=es.mean, keeper=keeper)
    return collected, controller


def score_iteration(cfg: Config, iteration: int, keeper: PoolKeeper, eval_seeds: list[int]) -> dict:
    """Step 4: the iteration's best controller in the real game, with the random policy on the same seeds
    (scored once, kept in ``iterate/random.json``); ``{"real", "random"}`` returns."""
    from frmdn_worldmodels.agent.workers import run_pool
    from frmdn_worldmodels.stages.train_controller import load_best

    current = iteration_config(cfg, iteration)
    params = load_best(current)["params"].numpy().astype(np.float32)
    envs = cfg.controller.envs_per_worker
    pool = run_pool(current, keeper=keeper)
    try:
        real = score(pool, params, eval_seeds, envs)
        random_path = run_paths(cfg).iterate / "random.json"
        if random_path.exists() and read_json(random_path).get("seeds") == eval_seeds:
            random = np.array(read_json(random_path)["returns"])
        else:
            random = score(pool, None, eval_seeds, envs)
            write_json(random_path, {"seeds": eval_seeds, "returns": random.tolist()})
    finally:
        pool.close()
    return {"real": real, "random": random}


def iterate_row(cfg: Config, iteration: int, keeper: PoolKeeper, eval_seeds: list[int]) -> dict:
    """Iteration ``iteration``'s row of the summary: its stages run (none for iteration 0, the pipeline's
    own), its controller scored unless its marker holds the score of this controller on these seeds."""
    current = iteration_config(cfg, iteration)
    if iteration:
        collected, controller = train_iteration(cfg, iteration, keeper)
    else:
        collected = {"episodes_total": len(list_npz(run_paths(cfg).episodes))}
        controller = read_json(run_paths(cfg).controller / "summary.json")
    marker = iteration_marker(cfg, iteration)
    policy = _policy_digest(current)
    if marker.exists():
        row = read_json(marker)
        if row.get("eval_seeds") == eval_seeds and row.get("policy") == policy:
            return row
    started = time.perf_counter()
    scores = score_iteration(cfg, iteration, keeper, eval_seeds)
    real, random = scores["real"], scores["random"]
    # the returns of the play that fed this iteration's M (the previous controller, with its noise)
    played = [
        info["return"]
        for info in collected.get("episodes", {}).values()
        if info.get("iteration") == iteration
    ]
    row = {
        "iteration": iteration,
        "episodes_total": collected["episodes_total"],
        "real_mean": float(real.mean()),
        "real_std": float(real.std()),
        "real_returns": real.tolist(),
        "played_mean": float(np.mean(played)) if played else None,
        "played_std": float(np.std(played)) if played else None,
        "dream_best": controller.get("best_score"),
        "random_mean": float(random.mean()),
        "random_std": float(random.std()),
        "controller": str(run_paths(current).controller / "best.pt"),
        "seconds": round(_stage_seconds(current, iteration) + time.perf_counter() - started, 1),
        "eval_seeds": eval_seeds,
        "policy": policy,
    }
    write_json(marker, row)
    note(
        f"[iterate] iteration {iteration}: real {row['real_mean']:.1f} ± {row['real_std']:.1f} "
        f"(random {row['random_mean']:.1f}), dream best {row['dream_best']}"
    )
    return row


def run(cfg: Config, keeper: PoolKeeper | None = None) -> dict:
    """Run every iteration that is not done yet (each resumes where a kill left it); returns the summary.
    ``keeper``: the command's ``PoolKeeper`` (a keeper of its own when called alone)."""
    check_rules(cfg, "iterate")
    base = run_paths(cfg)
    if not (base.controller / "best.pt").exists():
        raise DataError(
            f"{base.controller / 'best.pt'}: no controller to iterate from; run `python run.py "
            "pipeline` (or collect .. train-controller) first"
        )
    out = base.iterate
    out.mkdir(parents=True, exist_ok=True)
    eval_seeds = seed_ints(cfg.seed, "iterate-eval", count=cfg.iterate.eval_episodes)
    with contextlib.ExitStack() as stack:
        keeper = keeper or stack.enter_context(PoolKeeper())
        # the stages run every time (each skips what it has done and redoes what a changed setting or a new
        # upstream made stale), so a kept score is always the score of the controller they leave behind
        rows = [
            iterate_row(cfg, iteration, keeper, eval_seeds) for iteration in range(cfg.iterate.iterations + 1)
        ]
    plot_scores(out / "scores.png", rows, noisy=cfg.iterate.noise_scale > 0)
    summary = {
        "iterations": cfg.iterate.iterations,
        "rows": [{k: v for k, v in row.items() if k != "eval_seeds"} for row in rows],
        "final_controller": rows[-1]["controller"],
        "plot": str(out / "scores.png"),
    }
    write_json(out / "summary.json", summary)
    return summary


def plot_scores(path: Path, rows: list[dict], noisy: bool) -> None:
    """Real and dream score of each iteration's best controller, with the random policy's, and the return of
    the play that each iteration's M read (``noisy``: with exploration noise)."""
    iterations = [row["iteration"] for row in rows]
    fed = [row for row in rows if row.get("played_mean") is not None]  # rows before the field have none
    series = {
        "real game (best controller)": (iterations, [row["real_mean"] for row in rows]),
        "dream (its training score)": (iterations, [row["dream_best"] for row in rows]),
        "random policy, real game": (iterations, [row["random_mean"] for row in rows]),
        "its play M read" + (" (with exploration noise)" if noisy else ""): (
            [row["iteration"] for row in fed],
            [row["played_mean"] for row in fed],
        ),
    }
    plot_curves(
        path,
        series,
        xlabel="iteration",
        ylabel="mean return",
        title="Iterative training: dream vs real game",
        integer_x=True,
    )

"""``python run.py evaluate`` (the trained controller in the real game) and ``python run.py dream`` (in the
dream).

``evaluate``: ``evaluate.episodes`` real episodes (in parallel on Ray) with the controller of
``<run>/controller/best.pt``, on seeds that training never used; mean +- std of the returns; with
``evaluate.random_baseline`` the same seeds played by uniformly random actions, and with ``evaluate.teacher``
by the game's teacher (a hand-written driver, alone), each with the paired difference agent - other
(mean and standard error over the seeds); GIFs of the best and the worst episode. ``taught_by`` lists the
settings through which a driver taught the agent (``games.game.drivers_read``; empty: self-taught). Outputs in
``<run>/evaluate/``: ``summary.json``, ``best.gif``, ``worst.gif``.

``dream``: one dream of the memory driven by the controller, every step's ``z`` decoded by the VAE, as
``<run>/dream/dream.gif`` with ``summary.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from frmdn_worldmodels.agent.play import Episode, controller_for
from frmdn_worldmodels.agent.workers import run_pool, seed_chunks
from frmdn_worldmodels.dream.env import load_memory, make_dream_env
from frmdn_worldmodels.games.game import drivers_read, game_of
from frmdn_worldmodels.models.controller import Controller
from frmdn_worldmodels.runtime.config import Config, ConfigError
from frmdn_worldmodels.runtime.io import DataError, atomic_write_bytes, write_json
from frmdn_worldmodels.runtime.paths import prepare_stage, run_paths
from frmdn_worldmodels.runtime.plots import save_image_grid
from frmdn_worldmodels.runtime.pool import ActorPool, PoolKeeper
from frmdn_worldmodels.runtime.records import Stage
from frmdn_worldmodels.runtime.seeds import seed_ints
from frmdn_worldmodels.stages.train_controller import load_best


def write_gif(path: str | Path, frames: Sequence[np.ndarray], fps: float = 25.0, scale: int = 1) -> None:
    """uint8 ``[H, W, 3]`` frames as a looping GIF (written atomically), each pixel enlarged ``scale`` x."""
    import imageio.v3 as iio

    if not len(frames):
        raise ValueError(f"{path}: no frames to write")
    video = np.stack(frames)
    if scale > 1:
        video = video.repeat(scale, axis=1).repeat(scale, axis=2)
    atomic_write_bytes(path, iio.imwrite("<bytes>", video, extension=".gif", duration=1000.0 / fps, loop=0))


def _stats(values: Sequence[float], name: str = "returns") -> dict:
    """Mean, std, min, max and the values themselves (under ``name``)."""
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        name: [round(float(v), 3) for v in values],
    }


def episode_stats(episodes: Sequence[Episode]) -> dict:
    """Mean, std, min, max and values of the episodes' returns, and the same of how far right each got under
    ``max_x`` (Super Mario Bros; left out for games that do not report it)."""
    stats = _stats([episode.ret for episode in episodes])
    if all(episode.max_x is not None for episode in episodes):
        stats["max_x"] = _stats([episode.max_x for episode in episodes], "values")
    return stats


def paired_difference(first: Sequence[Episode], second: Sequence[Episode]) -> dict:
    """Mean and standard error of ``first - second`` episode by episode (the same seeds, in order), of the
    returns and, where both report it, of the furthest x."""
    if [e.seed for e in first] != [e.seed for e in second]:
        raise ValueError("a paired difference needs the same seeds in the same order")

    def mean_se(values: np.ndarray) -> dict:
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        return {"mean": float(values.mean()), "se": float(se)}

    stats = mean_se(np.array([a.ret - b.ret for a, b in zip(first, second, strict=True)]))
    if all(e.max_x is not None for e in (*first, *second)):
        stats["max_x"] = mean_se(np.array([a.max_x - b.max_x for a, b in zip(first, second, strict=True)]))
    return stats


def check_evaluate_config(cfg: Config) -> None:
    """Refuse a teacher the game does not have (``ConfigError`` naming ``evaluate.teacher``)."""
    teachers = game_of(cfg.env).teachers
    if cfg.evaluate.teacher and cfg.evaluate.teacher not in teachers:
        raise ConfigError(
            f"evaluate.teacher: {cfg.evaluate.teacher!r} is not a teacher of env.name={cfg.env.name} "
            f"(choose {', '.join(teachers) or 'nothing: this game has none'}, or leave it empty)"
        )


def _controller(expected: Controller, best: dict, path: Path) -> Controller:
    """The controller shape stored in ``best.pt`` (one saved before ``hidden`` existed is linear), which must
    fit this run's memory, game and ``controller.hidden``."""
    controller = Controller(**best["controller"])
    if controller != expected:
        raise DataError(
            f"{path}: the controller was trained for {controller}, but this run's memory and game need "
            f"{expected}; train the controller again"
        )
    return controller


def _play(
    cfg: Config, pool: ActorPool, seeds: list[int], params: np.ndarray, teacher: str
) -> dict[str, list[Episode]]:
    """The episodes of the controller, the random policy (``evaluate.random_baseline``) and the teacher on
    ``seeds``, by player, in one map so they share the actors."""
    chunks = seed_chunks(pool, seeds, cfg.controller.envs_per_worker)
    players = {"controller": (params, None)}
    if cfg.evaluate.random_baseline:
        players["random policy"] = (None, None)
    if teacher:
        players[f"teacher ({teacher})"] = (None, teacher)
    jobs = [
        (controller, chunk, name == "controller" and cfg.evaluate.video, by)
        for name, (controller, by) in players.items()
        for chunk in chunks
    ]
    results = pool.map("evaluate", jobs, "[evaluate] " + ", then ".join(players), [len(j[1]) for j in jobs])
    episodes = [episode for result in results for episode in result]
    return {name: episodes[i * len(seeds) : (i + 1) * len(seeds)] for i, name in enumerate(players)}


def run(cfg: Config, keeper: PoolKeeper | None = None) -> dict:
    """Score the trained controller in the real game (and random actions and the teacher on the same seeds,
    with the paired differences); ``keeper``: the command's ``PoolKeeper``, whose rollout actors it reuses
    when they hold the same models."""
    check_evaluate_config(cfg)
    paths = run_paths(cfg)
    best_path = paths.controller / "best.pt"
    best = load_best(cfg)
    stage = Stage(cfg, "evaluate")
    if (finished := stage.open()) is not None:  # the same controller scored the same way already
        return {**finished, "skipped": True}
    out = stage.folder
    teacher = cfg.evaluate.teacher
    memory = load_memory(cfg, "cpu")
    _controller(controller_for(cfg.env, memory, cfg.controller), best, best_path)  # as the workers do
    seeds = seed_ints(cfg.seed, "test", 0, count=cfg.evaluate.episodes)
    params = best["params"].numpy().astype(np.float32)
    started = time.perf_counter()
    pool = run_pool(cfg, memory=memory, keeper=keeper)
    try:
        played = _play(cfg, pool, seeds, params, teacher)
    finally:
        pool.close()
    episodes = played["controller"]
    returns = [episode.ret for episode in episodes]
    summary = {
        "env": cfg.env.name,
        "episodes": len(episodes),
        "seed": cfg.seed,
        "seeds": seeds,
        "taught_by": drivers_read(cfg),
        "controller": {
            "train_in": best.get("train_in"),
            "generation": best.get("generation"),
            "training_score": best.get("fitness"),
        },
        **episode_stats(episodes),
        "steps": [episode.steps for episode in episodes],
        "seconds": round(time.perf_counter() - started, 2),
    }
    if cfg.evaluate.random_baseline:
        random_episodes = played["random policy"]
        summary["random_policy"] = episode_stats(random_episodes)
        summary["random_policy"]["agent_minus_random"] = paired_difference(episodes, random_episodes)
    if teacher:
        teacher_episodes = played[f"teacher ({teacher})"]
        summary["teacher"] = {"policy": teacher, **episode_stats(teacher_episodes)}
        summary["teacher"]["agent_minus_teacher"] = paired_difference(episodes, teacher_episodes)
    if cfg.evaluate.video:
        order = np.argsort(returns)
        fps = 50.0 / cfg.env.action_repeat
        for name, index in (("best", order[-1]), ("worst", order[0])):
            write_gif(out / f"{name}.gif", episodes[index].frames, fps, cfg.evaluate.video_scale)
            summary[f"{name}_video"] = {
                "path": str(out / f"{name}.gif"),
                "return": round(returns[index], 3),
                "seed": episodes[index].seed,
            }
    return stage.finish(summary)


def dream_sheet(frames: Sequence[np.ndarray], tiles: int = 20, columns: int = 5) -> list[list[np.ndarray]]:
    """At most ``tiles`` frames spread evenly over the dream, first and last included, in rows of
    ``columns``: the whole dream at a glance (what the decoder shows of the world, and of the player)."""
    picked = np.unique(np.linspace(0, len(frames) - 1, min(tiles, len(frames))).round().astype(int))
    chosen = [frames[i] for i in picked]
    return [chosen[i : i + columns] for i in range(0, len(chosen), columns)]


@torch.inference_mode()
def run_dream(cfg: Config) -> dict:
    """Roll out the trained controller in the memory's dream and render it as ``<run>/dream/dream.gif``, with
    ``dream.png``, a sheet of frames spread over it."""
    best = load_best(cfg)
    paths = run_paths(cfg)
    env = make_dream_env(cfg, render_mode="rgb_array")
    dream = env.unwrapped
    expected = controller_for(cfg.env, dream.memory, cfg.controller)
    controller = _controller(expected, best, paths.controller / "best.pt")
    params = best["params"].to(dream.device)
    out = prepare_stage(cfg, paths.dream)
    obs, info = env.reset(seed=cfg.seed)
    draws = torch.Generator(device=dream.device).manual_seed(cfg.seed)  # a sampling controller's
    frames, total, steps, terminated, truncated = [env.render()], 0.0, 0, False, False
    while not (terminated or truncated):
        features = torch.as_tensor(obs, device=dream.device)
        z, h = features[: controller.z_dim], features[controller.z_dim :]
        action = controller.act(params, z.unsqueeze(0), h.unsqueeze(0), controller.uniforms((1,), draws))[0]
        obs, reward, terminated, truncated, _ = env.step(
            int(action) if controller.discrete else action.cpu().numpy()
        )
        frames.append(env.render())
        total, steps = total + reward, steps + 1
    env.close()
    write_gif(out / "dream.gif", frames, 50.0 / cfg.env.action_repeat, cfg.evaluate.video_scale)
    sheet = dream_sheet(frames)
    save_image_grid(out / "dream.png", sheet, scale=cfg.evaluate.video_scale)
    summary = {
        "return": round(total, 3),
        "steps": steps,
        "ended": "done" if terminated else "horizon",
        "temperature": dream.temperature,
        "start_frame": info["start_index"],
        "video": str(out / "dream.gif"),
        "sheet": str(out / "dream.png"),
    }
    write_json(out / "summary.json", summary)
    return summary

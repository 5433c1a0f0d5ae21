"""Collect real-game episodes for V and M, in parallel on Ray (``python run.py collect``).

Episode i is written to ``<run>/episodes/ep_{i:05d}.npz`` (layout in docs/architecture.md;
``data.episodes``) and is a pure function of (``seed``, i, the env and collect sections): its env seed and
its policy's generator both come from ``numpy.random.SeedSequence([seed, i])``, so a retried, resumed or
re-collected episode is the same episode, whichever worker plays it.

- Parallel: one Ray actor per worker (``collect.workers``; 0 = one per CPU Ray sees) keeps its env alive
  across episodes (a Mario env takes ~0.2 s to build, longer than many of its episodes), plays an episode,
  validates it and compresses it; the driver writes the bytes atomically (temporary name, then rename), so
  the episodes land on the driver's disk even when the workers run on other machines of a cluster
  (``--set ray.address=auto`` or ``RAY_ADDRESS``; every node needs this project importable, e.g. the same
  checkout path or ``pip install -e .``).
- Resumable: files that already load and validate are skipped; unreadable ones are collected again (the
  summary names them); leftover temporary files of a killed run are removed.
- Failures (the pool of ``runtime.pool``): an episode whose env raises is retried on a fresh env; one whose
  worker process or node dies goes at once to the next ready worker (the dead one is replaced); one that takes
  longer than ``collect.episode_timeout`` seconds on a ready worker (a hung emulator) has its worker killed
  and is retried; each at most ``collect.retries`` times. The other episodes are kept and the summary lists
  what failed and why (also every episode left when workers keep dying, or when no worker is ready for
  ``collect.episode_timeout`` seconds). Rerunning the command retries only the missing episodes.
- ``terminals`` records the game's own end (``terminated``: Mario died or finished, the car left the
  playfield or finished the lap), never the time limit, which the memory could not predict from a frame.
- The summary (``run``'s return value) is also written to ``<run>/episodes/summary.json``, beside the
  ``config.yaml`` of the stage; ``frames`` counts agent steps (each stores one frame); ``worker_nodes`` is how
  many Ray nodes the workers ran on; ``worker_start_seconds`` is the longest a worker took from its creation
  to being ready for episodes (scheduling, process start, imports); ``worker_cpu_seconds`` is the CPU time the
  workers' processes used (a load-independent cost measure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium
import numpy as np

from frmdn_worldmodels.data.episodes import episode_arrays, load_episode, validate_episode
from frmdn_worldmodels.games.envs import action_dim, check_env_config, encode_action, make_env, sprite_centres
from frmdn_worldmodels.games.policies import Policy, check_policy_config, make_exploration_policy
from frmdn_worldmodels.runtime.cluster import init_ray
from frmdn_worldmodels.runtime.config import (
    CollectConfig,
    Config,
    ConfigError,
    EnvConfig,
    check_run_config,
    step_limit,
)
from frmdn_worldmodels.runtime.io import DataError, atomic_write_bytes, npz_bytes, write_json
from frmdn_worldmodels.runtime.paths import run_paths
from frmdn_worldmodels.runtime.pool import ActorPool, PoolKeeper, PoolWorker, WorkerInfo
from frmdn_worldmodels.runtime.progress import note
from frmdn_worldmodels.runtime.progress import progress as progress_bar
from frmdn_worldmodels.runtime.records import Stage
from frmdn_worldmodels.runtime.rules import check_rules
from frmdn_worldmodels.runtime.seeds import seed_sequence

EpisodeFn = Callable[[gymnasium.Env, EnvConfig, Policy, int], dict[str, np.ndarray]]
"""(env, env_cfg, policy, env_seed) -> episode arrays; ``rollout_episode`` unless a test injects another."""


def episode_name(index: int) -> str:
    return f"ep_{index:05d}.npz"


def episode_seeds(
    base_seed: int, index: int, purpose: str | None = None, keys: tuple[int, ...] = ()
) -> tuple[int, np.random.Generator]:
    """(env seed, policy generator) of episode ``index``: independent streams of
    ``seed_sequence(base_seed, purpose, *keys, index)`` (the collect stage's: SeedSequence([base_seed,
    index]))."""
    env_seq, policy_seq = seed_sequence(base_seed, purpose, *keys, index).spawn(2)
    return int(env_seq.generate_state(1)[0]), np.random.default_rng(policy_seq)


class Player(typing.Protocol):
    """Who plays a collection's episodes: a picklable object sent to every worker, asked for each episode's
    policy there."""

    def policy(self, env: gymnasium.Env, rng: np.random.Generator, env_seed: int) -> Policy:
        """The policy of the episode played from ``env.reset(seed=env_seed)``, drawing from ``rng``."""
        ...


@dataclass(frozen=True)
class Explorer:
    """The collect section's exploration policy (``collect.policy``): the collect stage's player."""

    env_cfg: EnvConfig
    collect_cfg: CollectConfig

    def policy(self, env: gymnasium.Env, rng: np.random.Generator, env_seed: int) -> Policy:
        return make_exploration_policy(self.env_cfg, self.collect_cfg, rng, env)


@dataclass(frozen=True)
class EpisodeSet:
    """The episodes one collection makes: files ``<prefix>ep_<i>.npz`` for i < ``count``, episode i seeded by
    ``episode_seeds(seed, i, purpose, keys)`` and played by ``player``."""

    count: int
    player: Player
    prefix: str = ""
    purpose: str | None = None
    keys: tuple[int, ...] = ()

    def name(self, index: int) -> str:
        return f"{self.prefix}{episode_name(index)}"


def collect_env_config(cfg: Config) -> EnvConfig:
    """The env section with the time limit of collection (``collect.max_steps``, 0 = the game's horizon)."""
    return dataclasses.replace(cfg.env, max_steps=step_limit(cfg, cfg.collect.max_steps))


def rollout_episode(
    env: gymnasium.Env, env_cfg: EnvConfig, policy: Policy, seed: int
) -> dict[str, np.ndarray]:
    """Play ``policy`` from ``env.reset(seed=seed)`` to the end (or the env's time limit): the episode arrays.

    ``obs`` [T+1] holds the first frame and the frame after every action; ``actions`` are encoded with
    ``encode_action``; ``terminals[t]`` is gymnasium's ``terminated`` of step t (truncation is not an end);
    Mario's episodes add where he and the enemies are in each frame (``player``, ``enemies``: see
    ``frmdn_worldmodels.data.episodes`` and ``frmdn_worldmodels.games.envs.sprite_centres``).
    """
    obs, _ = env.reset(seed=seed)
    policy.reset()
    frames, actions, rewards, terminals = [obs], [], [], []
    sprites = [sprite_centres(env)]
    done = False
    while not done:
        action = policy.act(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(obs)
        sprites.append(sprite_centres(env))
        actions.append(encode_action(env_cfg, action))
        rewards.append(reward)
        terminals.append(terminated)
        done = terminated or truncated
    return episode_arrays(
        f"episode of env seed {seed}",
        np.stack(frames),
        np.stack(actions),
        rewards,
        terminals,
        None if sprites[0] is None else np.stack(sprites),
    )


def _describe(error: BaseException) -> str:
    """``Type: message (at file:line)`` of the innermost frame, short enough for a summary."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


class EpisodeWorker(PoolWorker):
    """Plays, validates and compresses episodes with one long-lived env (a Ray actor in ``collect_episodes``).

    Never raises for an episode: an env error comes back as ``{"index", "error"}`` and the env is rebuilt
    for the next episode, since an env that raised may be in any state.
    """

    def __init__(
        self,
        env_cfg: EnvConfig,
        episodes: EpisodeSet,
        episode_fn: EpisodeFn = rollout_episode,
    ):
        import cv2

        # One worker holds one CPU: OpenCV's resize threads would only compete with the other workers.
        cv2.setNumThreads(1)
        self.env_cfg, self.episodes, self.episode_fn = env_cfg, episodes, episode_fn
        self.env: gymnasium.Env | None = None

    def collect(self, index: int, base_seed: int) -> dict:
        """Episode ``index``: ``{"index", "data" (npz bytes), "frames", "process_cpu_seconds"}`` or
        ``{"index", "error"}``."""
        episodes = self.episodes
        try:
            if self.env is None:
                self.env = make_env(self.env_cfg)
            env_seed, policy_rng = episode_seeds(base_seed, index, episodes.purpose, episodes.keys)
            policy = episodes.player.policy(self.env, policy_rng, env_seed)
            arrays = self.episode_fn(self.env, self.env_cfg, policy, env_seed)
            validate_episode(episodes.name(index), arrays)
            data = npz_bytes(**arrays)
        except Exception as error:  # noqa: BLE001  (any env error is reported per episode, never fatal)
            self.close()
            return {"index": index, "error": _describe(error)}
        return {
            "index": index,
            "data": data,
            "frames": int(arrays["rewards"].shape[0]),
            "process_cpu_seconds": time.process_time(),  # this worker's CPU so far, start-up included
        }

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            with contextlib.suppress(Exception):  # closing a broken env must not hide why it broke
                env.close()


def check_collect_config(cfg: Config) -> None:
    """Refuse a config collection cannot use before any work starts (``ConfigError`` naming the field)."""
    check_env_config(cfg.env)
    check_policy_config(cfg.env, cfg.collect)
    check_run_config(cfg)
    check_rules(cfg, "run")  # collect.max_steps against the horizon, the policy's own fields


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            f"runs_dir: cannot write episodes to {folder} ({type(error).__name__}: {error.strerror or error})"
        ) from None


def collect_episode_set(cfg: Config) -> EpisodeSet:
    """The collect stage's episodes: ``collect.episodes`` of the exploration policy."""
    return EpisodeSet(cfg.collect.episodes, Explorer(collect_env_config(cfg), cfg.collect))


def _plan(folder: Path, cfg: Config, episodes: EpisodeSet) -> tuple[list[int], list[int], dict[str, str]]:
    """(indices to collect, indices already complete, {unreadable file: why}) of ``episodes``.

    A readable episode of another game or frame size is refused rather than overwritten or mixed in.
    """
    frame_size, width = cfg.env.frame_size, action_dim(cfg.env)
    todo, done, replaced = [], [], {}
    for index in range(episodes.count):
        path = folder / episodes.name(index)
        if not path.exists():
            todo.append(index)
            continue
        try:
            arrays = load_episode(path)
        except DataError as error:
            replaced[path.name] = str(error)
            todo.append(index)
            continue
        if arrays["obs"].shape[1:3] != (frame_size, frame_size) or arrays["actions"].shape[1] != width:
            raise DataError(
                f"{path}: holds {arrays['obs'].shape[1]}x{arrays['obs'].shape[2]} frames and "
                f"{arrays['actions'].shape[1]}-d actions, but env.name={cfg.env.name} with "
                f"env.frame_size={frame_size} makes {frame_size}x{frame_size} frames and {width}-d actions; "
                "use another run name (--set name=...) or remove the folder"
            )
        done.append(index)
    return todo, done, replaced


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files that a killed run left behind (``frmdn_worldmodels.runtime.io`` names them
    ``.<name>.<random>.tmp``)."""
    for path in folder.glob(".*ep_*.npz.*.tmp"):
        path.unlink(missing_ok=True)


class _Tally:
    """What a collection writes and counts as its episodes come back from the pool (its callbacks)."""

    def __init__(self, folder: Path, episodes: EpisodeSet, todo: list[int], bar, on_written):
        self.folder, self.episodes, self.todo, self.bar, self.on_written = (
            folder,
            episodes,
            todo,
            bar,
            on_written,
        )
        self.written = 0
        self.failed: dict[str, str] = {}
        self.frames = 0
        self.worker_cpu: dict[tuple[str, int], float] = {}
        """(node, pid) -> its process's CPU seconds at its latest episode."""
        self.started = time.perf_counter()

    def name(self, job: int) -> str:
        return self.episodes.name(self.todo[job])

    def write(self, job: int, result: dict, worker: WorkerInfo) -> None:
        atomic_write_bytes(self.folder / self.name(job), result["data"])
        self.worker_cpu[worker.node_id, worker.pid] = result["process_cpu_seconds"]
        self.written += 1
        self.frames += result["frames"]
        self.bar.update(1)
        self.bar.set_postfix({"frames/s": f"{self.frames / (time.perf_counter() - self.started):.0f}"})
        if self.on_written is not None:
            self.on_written()

    def retry(self, job: int, attempts: int, error: str) -> None:
        note(f"collect: {self.name(job)} attempt {attempts} failed, retrying: {error}")

    def fail(self, job: int, attempts: int, error: str) -> None:
        self.failed[self.name(job)] = error
        if attempts:  # the pool says once why the jobs never attempted fail
            note(f"collect: {self.name(job)} failed after {attempts} attempts: {error}")


def _worker_pool(cfg: Config, episodes: EpisodeSet, episode_fn: EpisodeFn, jobs: int) -> ActorPool:
    """One ``EpisodeWorker`` actor per worker (``collect.workers``: 0 = one per CPU Ray sees, at most one per
    job)."""
    import ray

    init_ray(cfg.ray)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    workers = min(cfg.collect.workers or max(int(cpus), 1), jobs)
    # Several workers per CPU would never be scheduled with num_cpus=1 each; share the CPUs instead.
    worker_class = ray.remote(num_cpus=min(1.0, cpus / workers), max_restarts=0)(EpisodeWorker)
    env_cfg = collect_env_config(cfg)
    c = cfg.collect
    return ActorPool(
        lambda: worker_class.remote(env_cfg, episodes, episode_fn),
        workers,
        c.retries,
        c.episode_timeout,
        c.episode_timeout,
        "collect.episode_timeout",
        "episode",
    )


def collect_episodes(
    cfg: Config,
    folder: str | Path,
    episode_fn: EpisodeFn = rollout_episode,
    progress: bool = True,
    on_written: Callable[[], None] | None = None,
    episodes: EpisodeSet | None = None,
    keeper: PoolKeeper | None = None,
) -> dict:
    """Make ``folder`` hold valid ``episodes`` (default: the collect stage's), collecting the missing ones on
    Ray.

    ``episode_fn`` (a picklable top-level function) replaces ``rollout_episode`` in the workers, e.g. a test
    that makes one episode's env fail; ``on_written`` is called after each episode file is written (the
    stage records its work time there); ``keeper``: the command's ``PoolKeeper``, whose idle actors give
    their CPUs up first. Returns the summary dict (see the module docstring).
    """
    check_collect_config(cfg)
    episodes = episodes or collect_episode_set(cfg)
    folder = Path(folder)
    _check_writable(folder)
    _remove_stale_temporaries(folder)
    start = time.perf_counter()
    todo, done, replaced = _plan(folder, cfg, episodes)
    for name, reason in replaced.items():
        note(f"collect: {name} is unreadable, collecting it again ({reason})")
    summary = {"env": cfg.env.name, "episodes": episodes.count, "written": 0, "skipped": len(done)}
    summary.update(replaced=replaced, failed={}, frames=0, frames_per_second=0.0, seconds=0.0, workers=0)
    summary.update(worker_nodes=0, worker_start_seconds=0.0, worker_cpu_seconds=0.0, folder=str(folder))
    if not todo:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        return summary
    if keeper is not None:
        keeper.release()
    pool = _worker_pool(cfg, episodes, episode_fn, len(todo))
    bar = progress_bar(
        total=episodes.count,
        initial=len(done),
        unit="ep",
        desc=f"collect {cfg.env.name}",
        disable=not progress,
    )
    tally = _Tally(folder, episodes, todo, bar, on_written)
    try:
        jobs = [(index, cfg.seed) for index in todo]
        pool.run(
            "collect", jobs, tally.write, tally.fail, tally.retry, check=lambda result: result.get("error")
        )
    finally:
        bar.close()
        pool.close()
    summary.update(
        written=tally.written,
        failed=dict(sorted(tally.failed.items())),
        frames=tally.frames,
        seconds=round(time.perf_counter() - start, 3),
        frames_per_second=round(tally.frames / max(time.perf_counter() - tally.started, 1e-9), 1),
        workers=pool.size,
        worker_nodes=len({worker.node_id for worker in pool.started}),
        worker_start_seconds=round(max((worker.start_seconds for worker in pool.started), default=0.0), 3),
        worker_cpu_seconds=round(sum(tally.worker_cpu.values()), 3),
    )
    return summary


def run(cfg: Config) -> dict:
    """``python run.py collect``: collect ``collect.episodes`` episodes into the run's episodes folder."""
    check_collect_config(cfg)
    folder = run_paths(cfg).episodes
    _check_writable(folder)
    stage = Stage(cfg, "collect")
    # even when finished, every file is checked again: a missing or broken one is collected again
    stage.open()
    summary = collect_episodes(cfg, folder, on_written=stage.record_progress)
    if not summary["failed"]:
        return stage.finish(summary)
    write_json(folder / "summary.json", summary)  # not finished: a rerun collects the missing episodes
    note(
        f"collect: {len(summary['failed'])} episode(s) failed (see {folder / 'summary.json'}); "
        "rerun the same command to collect just those"
    )
    return summary

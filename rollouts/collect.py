"""Collect real-game episodes for V and M, in parallel on Ray (``python run.py collect``).

Episode i is written to ``<run>/episodes/ep_{i:05d}.npz`` (layout in DESIGN.md; ``worldmodel.data``) and is a
pure function of (``seed``, i, the env and collect sections): its env seed and its policy's generator both come
from ``numpy.random.SeedSequence([seed, i])``, so a retried, resumed or re-collected episode is the same
episode, whichever worker plays it.

- Parallel: one Ray actor per worker (``collect.workers``; 0 = one per CPU Ray sees) keeps its env alive
  across episodes (a Mario env takes ~0.2 s to build, longer than many of its episodes), plays an episode,
  validates it and compresses it; the driver writes the bytes atomically (temporary name, then rename), so
  the episodes land on the driver's disk even when the workers run on other machines of a cluster
  (``--set ray.address=auto`` or ``RAY_ADDRESS``; every node needs this project importable, e.g. the same
  checkout path or ``pip install -e .``).
- Resumable: files that already load and validate are skipped; unreadable ones are collected again (the
  summary names them); leftover temporary files of a killed run are removed.
- Failures: an episode whose env raises is retried on a fresh env, one whose worker process dies, or takes
  longer than ``collect.episode_timeout`` seconds (a hung emulator), is retried on a new worker, each at most
  ``collect.retries`` times; the other episodes are kept and the summary
  lists what failed and why. Rerunning the command retries only the missing episodes.
- ``terminals`` records the game's own end (``terminated``: Mario died or finished, the car left the
  playfield or finished the lap), never the time limit, which the memory could not predict from a frame.
- The summary (``run``'s return value) is also written to ``<run>/episodes/summary.json``, beside the
  ``config.yaml`` of the stage; ``frames`` counts agent steps (each stores one frame); ``worker_start_seconds``
  is the longest a worker took from its creation to starting its first episode (process start, imports, env);
  ``worker_cpu_seconds`` is the CPU time the workers' processes used (a load-independent cost measure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

import gymnasium
import numpy as np
from tqdm import tqdm

from rollouts.envs import action_dim, check_env_config, encode_action, make_env
from rollouts.parallel import init_ray
from rollouts.policies import Policy, check_policy_config, make_exploration_policy
from worldmodel.config import CollectConfig, Config, ConfigError, EnvConfig
from worldmodel.data import load_episode, validate_episode
from worldmodel.io import DataError, atomic_write_bytes, npz_bytes, write_json
from worldmodel.runs import prepare_stage, run_paths

EpisodeFn = Callable[[gymnasium.Env, EnvConfig, Policy, int], dict[str, np.ndarray]]
"""(env, env_cfg, policy, env_seed) -> episode arrays; ``rollout_episode`` unless a test injects another."""


def episode_name(index: int) -> str:
    return f"ep_{index:05d}.npz"


def episode_seeds(base_seed: int, index: int) -> tuple[int, np.random.Generator]:
    """(env seed, policy generator) of episode ``index``: independent streams of SeedSequence([base_seed, index])."""
    env_seq, policy_seq = np.random.SeedSequence([base_seed, index]).spawn(2)
    return int(env_seq.generate_state(1)[0]), np.random.default_rng(policy_seq)


def collect_env_config(cfg: Config) -> EnvConfig:
    """The env section with the time limit of collection: min(env.max_steps, collect.max_steps) agent steps."""
    return dataclasses.replace(cfg.env, max_steps=min(cfg.env.max_steps, cfg.collect.max_steps))


def rollout_episode(env: gymnasium.Env, env_cfg: EnvConfig, policy: Policy, seed: int) -> dict[str, np.ndarray]:
    """Play ``policy`` from ``env.reset(seed=seed)`` to the end (or the env's time limit): the episode arrays.

    ``obs`` [T+1] holds the first frame and the frame after every action; ``actions`` are encoded with
    ``encode_action``; ``terminals[t]`` is gymnasium's ``terminated`` of step t (truncation is not an end).
    """
    obs, _ = env.reset(seed=seed)
    policy.reset()
    frames, actions, rewards, terminals = [obs], [], [], []
    done = False
    while not done:
        action = policy.act(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(obs)
        actions.append(encode_action(env_cfg, action))
        rewards.append(reward)
        terminals.append(terminated)
        done = terminated or truncated
    return {
        "obs": np.stack(frames).astype(np.uint8, copy=False),
        "actions": np.stack(actions).astype(np.float32, copy=False),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminals": np.asarray(terminals, dtype=np.bool_),
    }


def _describe(error: BaseException) -> str:
    """``Type: message (at file:line)`` of the innermost frame, short enough for a summary."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


class EpisodeWorker:
    """Plays, validates and compresses episodes with one long-lived env (a Ray actor in ``collect_episodes``).

    Never raises for an episode: an env error comes back as ``{"index", "error"}`` and the env is rebuilt
    for the next episode, since an env that raised may be in any state.
    """

    def __init__(self, env_cfg: EnvConfig, collect_cfg: CollectConfig, episode_fn: EpisodeFn = rollout_episode):
        import cv2

        # One worker holds one CPU: OpenCV's resize threads would only compete with the other workers.
        cv2.setNumThreads(1)
        self.env_cfg = env_cfg
        self.collect_cfg = collect_cfg
        self.episode_fn = episode_fn
        self.env: gymnasium.Env | None = None

    def collect(self, index: int, base_seed: int) -> dict:
        start = time.perf_counter()
        try:
            if self.env is None:
                self.env = make_env(self.env_cfg)
            env_seed, policy_rng = episode_seeds(base_seed, index)
            policy = make_exploration_policy(self.env_cfg, self.collect_cfg, policy_rng)
            arrays = self.episode_fn(self.env, self.env_cfg, policy, env_seed)
            validate_episode(episode_name(index), arrays)
            data = npz_bytes(**arrays)
        except Exception as error:  # noqa: BLE001  (any env error is reported per episode, never fatal)
            self.close()
            return {"index": index, "error": _describe(error)}
        return {
            "index": index,
            "data": data,
            "frames": int(arrays["rewards"].shape[0]),
            "seconds": time.perf_counter() - start,
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
    if cfg.seed < 0:
        raise ConfigError(f"seed: must be >= 0 (it seeds numpy's SeedSequence), got {cfg.seed}")
    for key, low in (("episodes", 0), ("max_steps", 1), ("retries", 0), ("workers", 0), ("episode_timeout", 0)):
        value = getattr(cfg.collect, key)
        if value < low:
            raise ConfigError(f"collect.{key}: must be at least {low}, got {value}")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            f"runs_dir: cannot write episodes to {folder} ({type(error).__name__}: {error.strerror or error})"
        ) from None


def _plan(folder: Path, cfg: Config) -> tuple[list[int], list[int], dict[str, str]]:
    """(indices to collect, indices already complete, {unreadable file: why}) for episodes 0..N-1.

    A readable episode of another game or frame size is refused rather than overwritten or mixed in.
    """
    frame_size, width = cfg.env.frame_size, action_dim(cfg.env)
    todo, done, replaced = [], [], {}
    for index in range(cfg.collect.episodes):
        path = folder / episode_name(index)
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
    """Temporary files that a killed run left behind (``worldmodel.io`` names them ``.<name>.<random>.tmp``)."""
    for path in folder.glob(".ep_*.npz.*.tmp"):
        path.unlink(missing_ok=True)


def collect_episodes(
    cfg: Config,
    folder: str | Path,
    episode_fn: EpisodeFn = rollout_episode,
    progress: bool = True,
) -> dict:
    """Make ``folder`` hold valid episodes 0..``collect.episodes``-1, collecting the missing ones on Ray.

    ``episode_fn`` (a picklable top-level function) replaces ``rollout_episode`` in the workers, e.g. a test
    that makes one episode's env fail. Returns the summary dict (see the module docstring).
    """
    import ray

    check_collect_config(cfg)
    folder = Path(folder)
    _check_writable(folder)
    _remove_stale_temporaries(folder)
    start = time.perf_counter()
    todo, done, replaced = _plan(folder, cfg)
    for name, reason in replaced.items():
        print(f"collect: {name} is unreadable, collecting it again ({reason})", file=sys.stderr)
    summary = {
        "env": cfg.env.name,
        "episodes": cfg.collect.episodes,
        "written": 0,
        "skipped": len(done),
        "replaced": replaced,
        "failed": {},
        "frames": 0,
        "frames_per_second": 0.0,
        "seconds": 0.0,
        "workers": 0,
        "worker_start_seconds": 0.0,
        "worker_cpu_seconds": 0.0,
        "folder": str(folder),
    }
    if not todo:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        return summary

    init_ray(cfg.ray)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    workers = min(cfg.collect.workers or max(int(cpus), 1), len(todo))
    # Several workers per CPU would never be scheduled with num_cpus=1 each; share the CPUs instead.
    worker_class = ray.remote(num_cpus=min(1.0, cpus / workers), max_restarts=0)(EpisodeWorker)
    env_cfg = collect_env_config(cfg)

    created: dict[int, float] = {}  # id(worker handle) -> creation time, until its first episode arrives
    start_delays: list[float] = []
    worker_cpu: dict[int, float] = {}  # id(worker handle) -> its process's CPU seconds at its latest episode

    def new_worker():
        worker = worker_class.remote(env_cfg, cfg.collect, episode_fn)
        created[id(worker)] = time.perf_counter()
        return worker

    pending = deque(todo)
    attempts = dict.fromkeys(todo, 0)
    running: dict = {}  # object ref -> (worker, index)
    started: dict = {}  # object ref -> when its episode was sent
    timeout = cfg.collect.episode_timeout or None

    def send(worker, index: int) -> None:
        ref = worker.collect.remote(index, cfg.seed)
        running[ref], started[ref] = (worker, index), time.perf_counter()

    def replace(worker):
        pool.remove(worker)
        ray.kill(worker)
        fresh = new_worker()
        pool.append(fresh)
        return fresh

    frames = 0
    crashes_in_a_row = 0
    bar = tqdm(total=cfg.collect.episodes, initial=len(done), unit="ep", desc=f"collect {cfg.env.name}",
               disable=not progress, dynamic_ncols=True)
    collect_start = time.perf_counter()
    pool = [new_worker() for _ in range(workers)]
    try:
        for worker in pool:
            if pending:
                send(worker, pending.popleft())
        while running:
            oldest = min(started.values())
            wait = None if timeout is None else max(0.0, oldest + timeout - time.perf_counter())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait)
            if ready:
                ref = ready[0]
            else:  # the oldest episode ran out of time: its worker may hang forever, so it is killed
                ref = min(started, key=started.get)
            worker, index = running.pop(ref)
            del started[ref]
            if not ready:
                result = {"index": index, "error": f"timed out after {timeout:g} s (collect.episode_timeout)"}
                worker = replace(worker)
            else:
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    # The worker process died (crash, OOM kill, lost node): replace it; its episode is retried.
                    result = {"index": index, "error": f"worker died: {type(error).__name__}: {str(error)[:300]}"}
                    worker = replace(worker)
                    crashes_in_a_row += 1
                except ray.exceptions.RayError as error:
                    result = {"index": index, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            name = episode_name(index)
            if "error" in result:
                attempts[index] += 1
                if attempts[index] <= cfg.collect.retries:
                    bar.write(f"collect: {name} attempt {attempts[index]} failed, retrying: {result['error']}")
                    pending.appendleft(index)
                else:
                    bar.write(f"collect: {name} failed after {attempts[index]} attempts: {result['error']}")
                    summary["failed"][name] = result["error"]
                if crashes_in_a_row > max(3, 2 * workers):
                    # Workers die on start-up or every episode (e.g. the package cannot be imported on the nodes).
                    for left in pending:
                        summary["failed"][episode_name(left)] = f"not attempted: workers keep dying ({result['error']})"
                    pending.clear()
            else:
                crashes_in_a_row = 0
            if pending:  # the worker's next episode first, so it plays while this one is written
                send(worker, pending.popleft())
            if "error" not in result:
                atomic_write_bytes(folder / name, result["data"])
                if id(worker) in created:  # its first episode: how long the worker took to start
                    start_delays.append(time.perf_counter() - created.pop(id(worker)) - result["seconds"])
                worker_cpu[id(worker)] = result["process_cpu_seconds"]
                summary["written"] += 1
                frames += result["frames"]
                bar.update(1)
                bar.set_postfix({"frames/s": f"{frames / (time.perf_counter() - collect_start):.0f}"})
    finally:
        bar.close()
        for worker in pool:
            ray.kill(worker)
    elapsed = time.perf_counter() - start
    summary.update(
        frames=frames,
        seconds=round(elapsed, 3),
        frames_per_second=round(frames / max(time.perf_counter() - collect_start, 1e-9), 1),
        workers=workers,
        worker_start_seconds=round(max(start_delays, default=0.0), 3),
        worker_cpu_seconds=round(sum(worker_cpu.values()), 3),
    )
    return summary


def run(cfg: Config) -> dict:
    """``python run.py collect``: collect ``collect.episodes`` episodes into the run's episodes folder."""
    check_collect_config(cfg)
    folder = run_paths(cfg).episodes
    _check_writable(folder)
    prepare_stage(cfg, folder)
    summary = collect_episodes(cfg, folder)
    write_json(folder / "summary.json", summary)
    if summary["failed"]:
        print(
            f"collect: {len(summary['failed'])} episode(s) failed (see {folder / 'summary.json'}); "
            "rerun the same command to collect just those",
            file=sys.stderr,
        )
    return summary

"""Real-game rollouts on Ray: actors that each hold their envs and the models (loaded once) and play a job's
episodes in lockstep, and a pool that keeps them busy, replaces an actor that dies and runs its job again (a
bounded number of times).

The models travel as plain state dicts through Ray's object store (``ray.put`` once), not as file paths, so the
actors work on any node of a cluster.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from agents.agent import Episode, WorldModelAgent, controller_for, play_episodes
from rollouts.envs import make_env
from worldmodel.config import EnvConfig
from worldmodel.memory import MemoryModel
from worldmodel.vae import ConvVAE


class RolloutWorker:
    """Holds up to ``envs`` real envs, the VAE and the memory; plays episodes in lockstep for any controller."""

    def __init__(self, env_cfg: EnvConfig, vae_state: dict, memory_payload: dict, use_mu: bool,
                 max_steps: int | None = None, envs: int = 16, device: str = "cpu", threads: int = 1):
        # one core per actor: torch's own thread pool would fight the other actors for the same cores
        torch.set_num_threads(threads)
        if envs < 1:
            raise ValueError(f"a rollout worker needs at least one env, got envs={envs}")
        self.env_cfg, self.use_mu, self.max_steps, self.device = env_cfg, use_mu, max_steps, device
        self.max_envs = envs
        self.envs = [make_env(env_cfg)]  # more are made when a job asks for more episodes at once
        self.vae = ConvVAE(vae_state["fc_mu.weight"].shape[0])
        self.vae.load_state_dict(vae_state)
        self.vae.to(device).eval()
        self.memory = MemoryModel.from_checkpoint(memory_payload).to(device).eval()
        self.controller = controller_for(env_cfg, self.memory)
        self.agent = WorldModelAgent(self.vae, self.memory, self.controller, torch.zeros(self.controller.num_params),
                                     use_mu, device)

    def evaluate(self, params: np.ndarray | None, seeds: Sequence[int], record: bool = False) -> list[Episode]:
        """One episode per seed, up to ``envs`` of them at a time in lockstep. ``params``: one controller
        ``[n]`` for all, one per episode ``[len(seeds), n]``, or ``None`` for uniformly random actions."""
        if params is not None:
            params = np.asarray(params, dtype=np.float32)
            if params.ndim == 2 and len(params) != len(seeds):
                raise ValueError(f"{len(params)} controllers for {len(seeds)} episodes")
        episodes = []
        for start in range(0, len(seeds), self.max_envs):
            chunk = [int(seed) for seed in seeds[start : start + self.max_envs]]
            while len(self.envs) < len(chunk):
                self.envs.append(make_env(self.env_cfg))
            agent = None
            if params is not None:
                agent = self.agent
                agent.set_params(params[start : start + len(chunk)] if params.ndim == 2 else params)
            episodes += play_episodes(self.envs, agent, chunk, self.max_steps, record)
        return episodes

    def close(self) -> None:
        for env in self.envs:
            env.close()


class ActorPool:
    """Runs jobs (an actor method's arguments) on a fixed number of actors, results in job order.

    An actor that dies (process crash, lost node) or raises is killed and replaced by ``make_actor()``, and its
    job goes back to the queue; a job that fails more than ``max_retries`` times raises ``RuntimeError``.
    """

    def __init__(self, make_actor: Callable[[], Any], size: int, max_retries: int = 2):
        if size < 1:
            raise ValueError(f"an actor pool needs at least one actor, got size={size}")
        self.make_actor, self.max_retries = make_actor, max_retries
        self.actors = [make_actor() for _ in range(size)]
        self.replaced = 0
        """How many actors were replaced after a failure (over the pool's life)."""

    def map(self, method: str, jobs: Sequence[tuple], on_result: Callable[[int, Any], None] | None = None) -> list:
        """``getattr(actor, method).remote(*job)`` for every job; ``on_result(index, result)`` as each one ends."""
        import ray

        results: list = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        failures = [0] * len(jobs)
        idle = list(self.actors)
        running: dict = {}  # object ref -> (actor, job index)
        while queue or running:
            while queue and idle:
                actor, index = idle.pop(), queue.popleft()
                running[getattr(actor, method).remote(*jobs[index])] = (actor, index)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayError as error:
                failures[index] += 1
                if failures[index] > self.max_retries:
                    raise RuntimeError(f"rollout job {index} failed {failures[index]} times; last error: {error}") from error
                print(f"rollout actor failed on job {index} ({type(error).__name__}); replacing it and retrying",
                      file=sys.stderr)
                self.actors.remove(actor)
                ray.kill(actor)
                actor = self.make_actor()
                self.actors.append(actor)
                self.replaced += 1
                queue.appendleft(index)
            else:
                if on_result is not None:
                    on_result(index, results[index])
            idle.append(actor)
        return results

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def rollout_pool(env_cfg: EnvConfig, vae_state: dict, memory_payload: dict, use_mu: bool, max_steps: int | None,
                 workers: int, envs_per_worker: int = 16, max_retries: int = 2) -> ActorPool:
    """A pool of ``RolloutWorker`` actors (``workers``: 0 = one per CPU Ray sees), the models put once."""
    import ray

    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    size = workers or cpus
    actor_class = ray.remote(num_cpus=min(1.0, cpus / size), max_restarts=0)(RolloutWorker)
    vae_ref, memory_ref = ray.put(vae_state), ray.put(memory_payload)
    return ActorPool(
        lambda: actor_class.remote(env_cfg, vae_ref, memory_ref, use_mu, max_steps, envs_per_worker), size, max_retries
    )


def split_seeds(seeds: Sequence[int], parts: int) -> list[list[int]]:
    """``seeds`` cut into at most ``parts`` nearly equal consecutive chunks (none empty)."""
    parts = max(1, min(parts, len(seeds)))
    return [list(map(int, chunk)) for chunk in np.array_split(np.asarray(seeds, dtype=np.int64), parts)]


def chunk_count(episodes: int, workers: int, envs_per_worker: int) -> int:
    """How many jobs to cut ``episodes`` into: at least one per worker, none larger than ``envs_per_worker``."""
    return max(min(workers, episodes), -(-episodes // envs_per_worker))

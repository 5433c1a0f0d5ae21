"""Real-game rollouts on Ray: actors that each hold their envs and the models (loaded once) and play a job's
episodes in lockstep, run by the pool of ``runtime.pool`` (the one collection uses: a dead, failing or hung
actor is replaced and its job run again, a bounded number of times).

The models travel as plain state dicts through Ray's object store (``ray.put`` once), not as file paths, so
the actors work on any node of a cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from frmdn_worldmodels.agent.play import (
    Episode,
    WorldModelAgent,
    controller_for,
    play_episodes,
    teacher_batch,
)
from frmdn_worldmodels.games.envs import make_env
from frmdn_worldmodels.models.memory import MemoryModel
from frmdn_worldmodels.models.vae import ConvVAE
from frmdn_worldmodels.runtime.config import Config, ControllerConfig, EnvConfig, check_bounds
from frmdn_worldmodels.runtime.pool import ActorPool, PoolKeeper, PoolWorker


class RolloutWorker(PoolWorker):
    """Holds up to ``envs`` real envs, the VAE and the memory; plays episodes in lockstep for any
    controller."""

    def __init__(
        self,
        env_cfg: EnvConfig,
        vae_state: dict,
        memory_payload: dict,
        use_mu: bool,
        max_steps: int | None = None,
        envs: int = 16,
        device: str = "cpu",
        threads: int = 1,
        controller: ControllerConfig | None = None,
    ):
        """``controller``: the config section that shapes the controller (``hidden``, ``policy``; None: the
        defaults), so the actor builds the controller the candidates' parameters are for."""
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
        self.controller = controller_for(env_cfg, self.memory, controller or ControllerConfig())
        self.agent = WorldModelAgent(
            self.vae, self.memory, self.controller, torch.zeros(self.controller.num_params), use_mu, device
        )

    def evaluate(
        self,
        params: np.ndarray | None,
        seeds: Sequence[int],
        record: bool = False,
        teacher: str | None = None,
    ) -> list[Episode]:
        """One episode per seed, up to ``envs`` of them at a time in lockstep. ``params``: one controller
        ``[n]`` for all, one per episode ``[len(seeds), n]``, or ``None`` for uniformly random actions;
        ``teacher``: play the game's teacher of that name instead (``Game.teachers``), each episode drawing
        from ``episode_rng("teacher", seed)``."""
        if teacher is not None:
            return self._play_teacher(teacher, seeds, record)
        if params is not None:
            params = np.asarray(params, dtype=np.float32)
            if params.ndim == 2 and len(params) != len(seeds):
                raise ValueError(f"{len(params)} controllers for {len(seeds)} episodes")
        episodes = []
        for start, chunk in self._lockstep(seeds):
            agent = None
            if params is not None:
                agent = self.agent
                agent.set_params(params[start : start + len(chunk)] if params.ndim == 2 else params)
            episodes += play_episodes(self.envs, agent, chunk, self.max_steps, record)
        return episodes

    def _play_teacher(self, teacher: str, seeds: Sequence[int], record: bool) -> list[Episode]:
        episodes = []
        for _, chunk in self._lockstep(seeds):
            envs = self.envs[: len(chunk)]
            batch = teacher_batch(self.env_cfg, teacher, envs, chunk)
            episodes += play_episodes(envs, batch, chunk, self.max_steps, record)
        return episodes

    def _lockstep(self, seeds: Sequence[int]) -> Iterator[tuple[int, list[int]]]:
        """(offset, seeds) of each lockstep batch of at most ``envs`` episodes, with the envs to play them."""
        for start in range(0, len(seeds), self.max_envs):
            chunk = [int(seed) for seed in seeds[start : start + self.max_envs]]
            while len(self.envs) < len(chunk):
                self.envs.append(make_env(self.env_cfg))
            yield start, chunk

    def close(self) -> None:
        for env in self.envs:
            env.close()


def rollout_pool(
    env_cfg: EnvConfig,
    vae_state: dict,
    memory_payload: dict,
    use_mu: bool,
    max_steps: int | None,
    controller: ControllerConfig,
    keeper: PoolKeeper | None = None,
) -> ActorPool:
    """A pool of ``RolloutWorker`` actors (``controller.workers``: 0 = one per CPU Ray sees), the models put
    once; with a ``keeper``, the actors of the pool it keeps when that holds the same models and settings
    (``max_steps`` None: the env's own time limit).

    A job that fails (its actor died, raised, or ran longer than ``controller.job_timeout``) is run again on
    another actor, at most ``controller.retries`` times; then ``map`` raises ``RuntimeError``.
    """
    import ray

    check_bounds(controller, "controller")
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    size = controller.workers or cpus
    max_steps = max_steps or env_cfg.max_steps  # the same episodes: the env truncates there

    def make() -> ActorPool:
        actor_class = ray.remote(num_cpus=min(1.0, cpus / size), max_restarts=0)(RolloutWorker)
        vae_ref, memory_ref = ray.put(vae_state), ray.put(memory_payload)
        return ActorPool(
            lambda: actor_class.remote(
                env_cfg,
                vae_ref,
                memory_ref,
                use_mu,
                max_steps,
                controller.envs_per_worker,
                controller=controller,
            ),
            size,
            controller.retries,
            controller.job_timeout,
            controller.job_timeout,
            "controller.job_timeout",
            "rollout job",
        )

    settings = (
        controller.envs_per_worker,
        controller.hidden,
        controller.policy,
        controller.retries,
        controller.job_timeout,
    )
    key = ("rollout", repr(env_cfg), _digest(vae_state), _digest(memory_payload), use_mu, max_steps, size)
    return make() if keeper is None else keeper.get((*key, *settings), make)


def _digest(payload: object) -> str:
    """A digest of a state dict or checkpoint payload: its tensors' bytes, dtypes and shapes, and the rest's
    ``repr``, in order."""
    digest = hashlib.sha256()

    def feed(item: object) -> None:
        if isinstance(item, torch.Tensor):
            digest.update(f"{item.dtype}{tuple(item.shape)}".encode())
            digest.update(item.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(item, dict):
            for name, value in item.items():
                digest.update(repr(name).encode())
                feed(value)
        elif isinstance(item, list | tuple):
            for value in item:
                feed(value)
        else:
            digest.update(repr(item).encode())

    feed(payload)
    return digest.hexdigest()


def run_pool(
    cfg: Config,
    max_steps: int | None = None,
    memory: MemoryModel | None = None,
    keeper: PoolKeeper | None = None,
) -> ActorPool:
    """A pool of rollout actors holding the V of the run ``cfg`` (its ``vae/vae.pt``) and ``memory``, by
    default the run's own (``memory/memory.pt``); ``keeper``: as in ``rollout_pool``."""
    from frmdn_worldmodels.dream.env import load_memory
    from frmdn_worldmodels.models.vae import load_vae
    from frmdn_worldmodels.runtime.cluster import init_ray
    from frmdn_worldmodels.runtime.paths import run_paths

    init_ray(cfg.ray)
    vae = load_vae(run_paths(cfg).vae / "vae.pt", "cpu")
    memory = memory if memory is not None else load_memory(cfg, "cpu")
    payload = memory.to_checkpoint()
    use_mu = cfg.memory_train.use_mu
    return rollout_pool(cfg.env, vae.state_dict(), payload, use_mu, max_steps, cfg.controller, keeper)


def seed_chunks(pool: ActorPool, seeds: Sequence[int], envs_per_worker: int) -> list[list[int]]:
    """``seeds`` cut into the lockstep jobs of ``pool``: at least one per actor, none above
    ``envs_per_worker``."""
    return split_seeds(seeds, chunk_count(len(seeds), pool.size, envs_per_worker))


def map_seeds(
    pool: ActorPool,
    method: str,
    params: np.ndarray | None,
    seeds: Sequence[int],
    envs_per_worker: int,
    *extra: object,
    desc: str | None = None,
    on_chunk: Callable[[list[int], list], None] | None = None,
) -> list:
    """``method(params, chunk, *extra)`` on the pool for every lockstep chunk of ``seeds``; the per-episode
    results, flattened in the order of ``seeds``. ``desc``: a progress bar of the episodes under that name.
    ``on_chunk(positions in seeds, results)`` is called as each chunk finishes."""
    chunks = seed_chunks(pool, seeds, envs_per_worker)
    jobs = [(params, chunk, *extra) for chunk in chunks]
    starts = np.cumsum([0, *(len(chunk) for chunk in chunks)])

    def delivered(index: int, result: list) -> None:
        on_chunk(list(range(starts[index], starts[index + 1])), result)

    on_result = None if on_chunk is None else delivered
    results = pool.map(method, jobs, desc, [len(chunk) for chunk in chunks], on_result)
    return [item for result in results for item in result]


def split_seeds(seeds: Sequence[int], parts: int) -> list[list[int]]:
    """``seeds`` cut into at most ``parts`` nearly equal consecutive chunks (none empty)."""
    parts = max(1, min(parts, len(seeds)))
    return [list(map(int, chunk)) for chunk in np.array_split(np.asarray(seeds, dtype=np.int64), parts)]


def chunk_count(episodes: int, workers: int, envs_per_worker: int) -> int:
    """How many jobs to cut ``episodes`` into: at least one per worker, none larger than
    ``envs_per_worker``."""
    return max(min(workers, episodes), -(-episodes // envs_per_worker))

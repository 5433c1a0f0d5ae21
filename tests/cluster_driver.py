"""The driver of tests/integration/test_cluster.py, run in a process of its own (``python
tests/cluster_driver.py OUT``, with the project on PYTHONPATH and RAY_TMPDIR a private folder) so that its
two-node Ray cluster never meets the test session's local Ray, nor other processes' ``ray.init()``.

It starts a ``ray.cluster_utils.Cluster`` (head: 1 CPU, plus a second node of 1 CPU, as two machines would
be), then:

1. collects 8 short episodes into ``OUT/collect/episodes`` while the first episode attempted on the head node
   has its worker process killed mid-episode (``os.kill`` from here, SIGKILL), and the second node, once it
   has finished an episode, is removed (``cluster.remove_node``) in the middle of its next one;
2. adds a fresh second node and scores a real-game controller population (``RealFitness`` with tiny VAE and
   memory models) once without faults, as the reference, then again while one rollout actor is killed
   mid-job and then the second node removed mid-job, and a last time on the head node alone.

Every attempted episode is logged to ``OUT/attempts.jsonl`` by the workers themselves (node, pid, time), and
the measurements go to ``OUT/report.json``; tests/integration/test_cluster.py asserts on them and on the
files.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

EPISODES = 8
TIMEOUT = 120.0
"""``collect.episode_timeout`` and ``controller.job_timeout``: the faults must cost far less than this."""


def log_attempt(log_dir: str, **fields) -> None:
    with open(Path(log_dir) / "attempts.jsonl", "a") as handle:  # one short line per write: appends don't mix
        handle.write(json.dumps({**fields, "time": time.time()}) + "\n")


def read_attempts(log_dir: str | Path) -> list[dict]:
    path = Path(log_dir) / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def claim(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists: True for the one caller that created it."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(descriptor, text.encode())
    os.close(descriptor)
    return True


def staged_episode(env, env_cfg, policy, seed, log_dir: str, head: str):
    """``rollout_episode`` in a collection worker, staging the two faults (see the module docstring).

    The head node's first attempt announces its pid in ``kill_me`` and waits to be killed. The second node
    waits until that has happened, so that both nodes play; after it finished one episode, its next one
    announces ``remove_node`` and waits for the node to go.
    """
    import ray

    from frmdn_worldmodels.stages.collect import rollout_episode

    node, pid, folder = ray.get_runtime_context().get_node_id(), os.getpid(), Path(log_dir)
    log_attempt(log_dir, event="start", seed=seed, node=node, pid=pid)
    if node == head and claim(folder / "kill_me", str(pid)):
        time.sleep(600)
    if node != head:
        deadline = time.time() + 60
        while not (folder / "killed").exists() and time.time() < deadline:
            time.sleep(0.02)
        finished_here = [a for a in read_attempts(log_dir) if a["event"] == "done" and a["node"] == node]
        if finished_here and claim(folder / "remove_node", str(pid)):
            time.sleep(600)
    arrays = rollout_episode(env, env_cfg, policy, seed)
    log_attempt(log_dir, event="done", seed=seed, node=node, pid=pid)
    return arrays


class Faults(threading.Thread):
    """Runs ``step()`` every 10 ms beside the driver's work until it returns True or ``stop`` is set."""

    def __init__(self, step):
        super().__init__(daemon=True)
        self.step, self.stop, self.error = step, threading.Event(), None

    def run(self) -> None:
        try:
            while not self.stop.is_set() and not self.step():
                time.sleep(0.01)
        except Exception as error:  # noqa: BLE001  (reported by the driver, which fails the scenario)
            self.error = error

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(30)
        if self.error is not None:
            raise self.error

    def __enter__(self):
        self.start()
        return self


def collect_config(out: Path):
    """The config of the collection phase (the test rebuilds it to check the episodes)."""
    from frmdn_worldmodels.runtime.config import load_config

    return load_config(
        None,
        [
            f"runs_dir={out}",
            "name=collect",
            f"collect.episodes={EPISODES}",
            "collect.max_steps=10",
            "collect.workers=2",
            f"collect.episode_timeout={TIMEOUT}",
            "collect.retries=2",
        ],
    )


def collect_phase(cluster, worker_node, head: str, out: Path) -> dict:
    from frmdn_worldmodels.runtime.paths import run_paths
    from frmdn_worldmodels.stages.collect import collect_episodes

    cfg = collect_config(out)
    events: dict = {}

    def step() -> bool:
        kill_me, remove = out / "kill_me", out / "remove_node"
        if "killed_pid" not in events and kill_me.exists() and kill_me.read_text():
            events["killed_pid"] = int(kill_me.read_text())
            os.kill(events["killed_pid"], signal.SIGKILL)
            events["killed_at"] = time.time()
            (out / "killed").touch()
        if "removed_at" not in events and remove.exists():
            cluster.remove_node(worker_node, allow_graceful=False)
            events["removed_at"] = time.time()
        return "killed_pid" in events and "removed_at" in events

    began = time.perf_counter()
    with Faults(step):
        summary = collect_episodes(
            cfg,
            run_paths(cfg).episodes,
            functools.partial(staged_episode, log_dir=str(out), head=head),
            progress=False,
        )
    return {
        "summary": summary,
        "seconds": time.perf_counter() - began,
        "folder": str(run_paths(cfg).episodes),
        **events,
    }


def rollout_phase(cluster, head: str, out: Path) -> dict:
    import torch

    from frmdn_worldmodels.agent.play import controller_for
    from frmdn_worldmodels.models.memory import MemoryModel
    from frmdn_worldmodels.models.vae import ConvVAE
    from frmdn_worldmodels.runtime.config import load_config
    from frmdn_worldmodels.runtime.io import save_checkpoint
    from frmdn_worldmodels.runtime.paths import run_paths
    from frmdn_worldmodels.stages.train_controller import RealFitness

    second = cluster.add_node(num_cpus=1)
    z_dim = 8
    cfg = load_config(
        None,
        [
            f"runs_dir={out}",
            "name=rollouts",
            f"vae.latent_dim={z_dim}",
            "memory.hidden=12",
            "memory.components=2",
            "memory.rank=1",
            "memory.flow_hidden=8",
            "env.max_steps=30",
            "controller.train_in=real",
            "controller.workers=2",
            "controller.envs_per_worker=2",
            f"controller.job_timeout={TIMEOUT}",
            "controller.retries=2",
        ],
    )
    torch.manual_seed(0)
    memory = MemoryModel(z_dim, 3, cfg.memory).eval()
    save_checkpoint(run_paths(cfg).vae / "vae.pt", state_dict=ConvVAE(z_dim).state_dict())
    controller = controller_for(cfg.env, memory, cfg.controller)
    candidates = np.random.default_rng(0).normal(size=(4, controller.num_params))
    fitness = RealFitness(cfg, memory)
    pool = fitness.pool
    report: dict = {}
    try:
        began = time.perf_counter()
        reference, _ = fitness.population(candidates, 2, 0)  # 8 episodes in 4 jobs of 2, no faults
        report["reference_seconds"] = time.perf_counter() - began
        second_id = next(info.node_id for info in pool.started if info.node_id != head)
        replaced, retried = pool.replaced, pool.retried

        def step() -> bool:
            for job, info, seconds in pool.running():
                if seconds < 0.15 or info is None:
                    continue
                if "killed_pid" not in report and info.node_id == head:
                    os.kill(info.pid, signal.SIGKILL)
                    report.update(killed_pid=info.pid, killed_job=job)
                elif "killed_pid" in report and pool.replaced > replaced and info.node_id == second_id:
                    cluster.remove_node(second, allow_graceful=False)
                    report.update(removed_job=job, removed_after=time.perf_counter() - began)
                    return True
            return False

        began = time.perf_counter()
        with Faults(step):
            faulty, _ = fitness.population(candidates, 2, 0)
        report["faulty_seconds"] = time.perf_counter() - began
        report.update(replaced=pool.replaced - replaced, retried=pool.retried - retried)
        began = time.perf_counter()
        alone, _ = fitness.population(candidates[:2], 2, 1)  # the next generation, on the head node alone
        report["alone_seconds"] = time.perf_counter() - began
        report.update(
            reference=reference.tolist(),
            faulty=faulty.tolist(),
            alone=alone.tolist(),
            head=head,
            second=second_id,
            jobs_per_node=dict(pool.jobs_per_node),
            started_nodes=[info.node_id for info in pool.started],
            started_pids=[info.pid for info in pool.started],
        )
    finally:
        fitness.close()
    return report


def main(out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    began = time.perf_counter()
    for attempt in range(3):
        try:
            cluster = Cluster(
                initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
            )
            break
        except Exception as error:
            # On a loaded machine the head's raylet sometimes misses its start-up deadline (Ray's own
            # "timed out during startup"); that is not what this scenario tests, so it starts again.
            print(f"cluster start attempt {attempt + 1} failed: {error}", file=sys.stderr)
            if attempt == 2:
                raise
    try:
        worker_node = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        head = ray.get_runtime_context().get_node_id()  # the driver runs on the head node
        report = {"head": head, "cluster_start_seconds": time.perf_counter() - began}
        report["collect"] = collect_phase(cluster, worker_node, head, out)
        report["rollouts"] = rollout_phase(cluster, head, out)
        report["total_seconds"] = time.perf_counter() - began
        (out / "report.json").write_text(json.dumps(report, indent=1))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

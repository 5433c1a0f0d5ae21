"""The tests of ``tests/unit/test_cluster.py``'s subject that start Ray or a subprocess."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from frmdn_worldmodels.data.episodes import list_npz, load_episode
from frmdn_worldmodels.games.envs import make_env
from frmdn_worldmodels.games.policies import make_exploration_policy
from frmdn_worldmodels.stages.collect import collect_env_config, episode_name, episode_seeds, rollout_episode
from tests.cluster_driver import EPISODES, TIMEOUT, collect_config, read_attempts
from tests.unit.test_cluster import ROOT, pytest

# two Ray nodes started and faults injected: half a minute on an idle machine (make test-slow)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """Runs tests/cluster_driver.py once: (its report, its output folder)."""
    out = tmp_path_factory.mktemp("cluster")
    # every node's workers import the project, whatever the working directory of their raylet
    path = os.pathsep.join([str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # A Cluster records its address in <Ray's temp dir>/ray_current_cluster, where any other process's plain
    # ray.init() on this machine would find it and join it: a private temp dir (short, for Ray's socket paths)
    # keeps other test sessions off this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="raycl", dir="/tmp")
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "cluster_driver.py"), str(out)],
            cwd=ROOT,
            env={**env, "PYTHONPATH": path, "RAY_TMPDIR": ray_tmp},
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads((out / "report.json").read_text()), out


def test_collection_on_two_nodes_survives_a_killed_worker_and_a_lost_node(cluster_run):
    report, out = cluster_run
    head, phase = report["head"], report["collect"]
    summary = phase["summary"]
    assert summary["written"] == EPISODES and summary["failed"] == {} and summary["skipped"] == 0
    assert summary["workers"] == 2 and summary["worker_nodes"] == 2
    assert phase["seconds"] < TIMEOUT / 2  # the faults cost seconds, not the 120 s episode timeout

    # every episode is on the driver's disk, each the one its seed defines, whichever node played it
    cfg = collect_config(out)
    folder = Path(phase["folder"])
    assert [path.name for path in list_npz(folder)] == [episode_name(i) for i in range(EPISODES)]
    env_cfg = collect_env_config(cfg)
    env = make_env(env_cfg)
    index_of = {}
    for index in range(EPISODES):
        env_seed, policy_rng = episode_seeds(cfg.seed, index)
        index_of[env_seed] = index
        expected = rollout_episode(
            env, env_cfg, make_exploration_policy(env_cfg, cfg.collect, policy_rng), env_seed
        )
        episode = load_episode(folder / episode_name(index))
        for key, array in expected.items():
            np.testing.assert_array_equal(episode[key], array, err_msg=f"{episode_name(index)} {key}")
    env.close()

    attempts = read_attempts(out)
    done = [a for a in attempts if a["event"] == "done"]
    assert sorted(index_of[a["seed"]] for a in done) == list(range(EPISODES))  # each finished exactly once
    assert any(a["node"] != head for a in done)  # the second node's episodes landed on the driver's disk too
    # the worker killed mid-episode on the head node: replaced, and its episode played again elsewhere
    killed = [a for a in attempts if a["pid"] == phase["killed_pid"]]
    assert [a["event"] for a in killed] == ["start"] and killed[0]["node"] == head
    assert any(a["seed"] == killed[0]["seed"] and a["pid"] != phase["killed_pid"] for a in done)
    # the episode lost with the removed node was started again within seconds, by the head node
    second = next(a["node"] for a in attempts if a["node"] != head)
    lost = [
        a
        for a in attempts
        if a["node"] == second
        and a["event"] == "start"
        and not any(d["pid"] == a["pid"] and d["seed"] == a["seed"] for d in done)
    ]
    assert len(lost) == 1
    rerun = [
        a for a in attempts if a["seed"] == lost[0]["seed"] and a["event"] == "start" and a["node"] == head
    ]
    assert len(rerun) == 1 and rerun[0]["time"] - phase["removed_at"] < 30
    assert not any(a["node"] == second and a["time"] > phase["removed_at"] for a in attempts)


def test_real_game_generation_on_two_nodes_survives_a_killed_actor_and_a_lost_node(cluster_run):
    report, _ = cluster_run
    rollouts = report["rollouts"]
    head, second = rollouts["head"], rollouts["second"]
    assert head != second and set(rollouts["jobs_per_node"]) == {head, second}  # both nodes played episodes
    # the generation with an actor killed and then its node removed, each mid-job, scores exactly what the
    # generation without faults scored: the same jobs, rerun by the same code on the actors left
    assert rollouts["faulty"] == rollouts["reference"]
    assert rollouts["replaced"] == 2 and rollouts["retried"] == 2
    assert rollouts["killed_pid"] in rollouts["started_pids"]
    assert rollouts["faulty_seconds"] < TIMEOUT / 2  # not the 120 s job timeout
    # the next generation runs on the head node alone, with the lost actor's replacement never scheduled
    assert len(rollouts["alone"]) == 2 and rollouts["alone_seconds"] < TIMEOUT / 2
    assert rollouts["started_nodes"].count(second) == 1

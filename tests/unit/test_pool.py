"""The Ray actor pool of collection and real-game rollouts (``runtime.pool``): results in job order, a dead
actor replaced and its job rerun on a live actor at once (never waiting on a replacement Ray cannot schedule),
a hung job killed after its timeout and rerun, bounded retries, and a clear end when no actor is left or
actors keep dying. (The two-node cluster version is tests/integration/test_cluster.py.)"""

import os
import sys
import time

import numpy as np
import pytest
import ray

from frmdn_worldmodels.runtime.config import EnvConfig
from frmdn_worldmodels.runtime.pool import PoolWorker

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ToyWorker(PoolWorker):
    """Scores a candidate as sum(params) + seed. ``plan`` maps a candidate's first parameter to what its job
    does instead: ``crash_once`` / ``crash`` (the whole process dies, the first time or every time) or
    ``hang_once`` (the first attempt never returns)."""

    def __init__(self, marker_dir: str, plan: dict[int, str] | None = None, fail_init: bool = False):
        if fail_init:
            raise RuntimeError("injected start-up failure")
        self.marker_dir, self.plan = marker_dir, plan or {}

    def evaluate(self, params, seeds):
        key = int(params[0])
        mode = self.plan.get(key)
        marker = os.path.join(self.marker_dir, f"attempt_{key}")
        first = not os.path.exists(marker)
        with open(marker, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        if mode == "crash" or (mode == "crash_once" and first):
            os._exit(1)
        if mode == "hang_once" and first:
            time.sleep(3600)
        return [float(np.sum(params)) + seed for seed in seeds]


def toy_jobs(count: int, seeds=(10, 20)) -> list[tuple]:
    return [(np.full(4, float(i)), list(seeds)) for i in range(count)]


def alive(handles) -> list[bool]:
    """Whether each actor still answers."""
    states = []
    for handle in handles:
        try:
            ray.get(handle.ping.remote(), timeout=60)
            states.append(True)
        except ray.exceptions.RayActorError:
            states.append(False)
    return states


@pytest.mark.parametrize(
    "override",
    [
        "controller.job_timeout=-1",
        "controller.retries=-1",
        "controller.workers=-1",
        "controller.envs_per_worker=0",
    ],
)
def test_bad_rollout_pool_settings_are_refused_with_the_field(override):
    """Read from a config or built in code: the pool's settings outside their bounds are refused, by name."""
    import dataclasses

    from frmdn_worldmodels.agent.workers import rollout_pool
    from frmdn_worldmodels.runtime.config import ConfigError, load_config

    name, value = override.split("=")
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_config(None, [override])
    built = dataclasses.replace(load_config(None, []).controller, **{name.split(".")[1]: int(value)})
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        rollout_pool(EnvConfig(), {}, {}, False, None, built)

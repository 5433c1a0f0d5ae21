"""Collection and real-game rollouts on a real two-node Ray cluster (``ray.cluster_utils.Cluster``: head 1
CPU + one more node of 1 CPU): workers on both nodes, episodes on the driver's disk, a worker process killed
mid-job is replaced and its job rerun, a removed node loses only its jobs, which are rerun at once, far
inside the timeouts (120 s).

The cluster runs in a process of its own (tests/cluster_driver.py), so it never meets the session's local Ray
(``ray_session``); it reports what happened in ``report.json`` and the workers log every attempt.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_a_cluster_address_where_nothing_listens_is_named_within_seconds():
    """``ray.address=127.0.0.1:1``: refused with the address and what to do, exit code 2, no hang (Ray's own
    connect would wait minutes without a word)."""
    import time

    from frmdn_worldmodels.runtime.cluster import REACH_SECONDS, check_reachable
    from frmdn_worldmodels.runtime.config import ConfigError

    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"ray.address=127.0.0.1:1: no Ray cluster answers there"):
        check_reachable("127.0.0.1:1")
    with pytest.raises(ConfigError, match="host:port"):
        check_reachable("nowhere")
    check_reachable("auto")  # Ray's own lookup
    assert time.perf_counter() - started < 2 * REACH_SECONDS

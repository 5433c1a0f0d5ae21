"""The tests of ``tests/unit/test_pool.py``'s subject that start Ray or a subprocess."""

import sys
import time

import numpy as np
import pytest
import ray

from frmdn_worldmodels.runtime.pool import ActorPool, PoolKeeper
from tests.unit.test_pool import ToyWorker, alive, toy_jobs

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run in Ray's workers


def attempts(folder, key: int) -> list[int]:
    """The pids of the processes that attempted candidate ``key``'s job, in order."""
    path = folder / f"attempt_{key}"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def expected(count: int, seeds=(10, 20)) -> list[list[float]]:
    return [[4.0 * i + seed for seed in seeds] for i in range(count)]


def timed_map(pool: ActorPool, count: int, warm_up: bool = False) -> tuple[list, float]:
    """(results, seconds) of ``pool.map`` over ``count`` toy jobs, after a first job when ``warm_up``; closes
    the pool."""
    try:
        if warm_up:
            pool.map("evaluate", toy_jobs(1))
        began = time.perf_counter()
        results = pool.map("evaluate", toy_jobs(count))
        return results, time.perf_counter() - began
    finally:
        pool.close()


def first_live_then_unschedulable(folder, live: int, **kwargs):
    """``make_actor`` whose first ``live`` actors start normally and whose replacements need a resource no
    node has, so Ray never schedules them: what a replacement sees when its node is gone and the others are
    busy."""
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ToyWorker)
    made = []

    def make():
        made.append(1)
        options = {} if len(made) <= live else {"resources": {"absent_resource": 1}}
        return actor_class.options(**options).remote(str(folder), **kwargs)

    return make


def dead(handles, within: float = 30.0) -> list[bool]:
    """Whether each actor stops answering within ``within`` seconds: ``ray.kill`` returns before the actor
    is gone, so a ping sent right after it may still be answered."""
    deadline = time.monotonic() + within
    states = []
    for handle in handles:
        while (answered := alive([handle])[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        states.append(not answered)
    return states


def test_a_crashing_rollout_actor_is_replaced_and_its_candidate_reevaluated(ray_session, tmp_path):
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ToyWorker)
    pool = ActorPool(lambda: actor_class.remote(str(tmp_path), {3: "crash_once"}), size=2, retries=2)
    try:
        results = pool.map("evaluate", toy_jobs(6))
    finally:
        pool.close()
    assert results == expected(6)  # every candidate, in order, once
    assert pool.replaced == 1 and pool.retried == 1 and len(attempts(tmp_path, 3)) == 2
    assert sum(pool.jobs_per_node.values()) == 6


def test_map_counts_each_jobs_episodes_in_its_progress_bar(ray_session, tmp_path, capsys):
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ToyWorker)
    pool = ActorPool(lambda: actor_class.remote(str(tmp_path)), size=2)
    try:
        jobs = [(np.full(4, 0.0), [1, 2, 3]), (np.full(4, 1.0), [4])]
        assert pool.map("evaluate", jobs, "[toy] scoring", [3, 1]) == [[1.0, 2.0, 3.0], [8.0]]
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("[toy] scoring") and "4/4" in last and "episode" in last
        pool.map("evaluate", toy_jobs(2))
        assert "scoring" not in capsys.readouterr().err  # no name, no bar
        with pytest.raises(ValueError, match="1 sizes for 2 jobs"):
            pool.map("evaluate", toy_jobs(2), "[toy]", [2])
    finally:
        pool.close()


def test_a_candidate_that_always_kills_its_actor_fails_after_bounded_retries(ray_session, tmp_path):
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ToyWorker)
    pool = ActorPool(
        lambda: actor_class.remote(str(tmp_path), {1: "crash"}), size=2, retries=1, label="rollout job"
    )
    try:
        with pytest.raises(RuntimeError, match="rollout job 1 failed 2 times; last error: worker died"):
            pool.map("evaluate", toy_jobs(3))
    finally:
        pool.close()
    assert len(attempts(tmp_path, 1)) == 2  # 1 try + 1 retry


def test_a_hung_job_is_killed_after_its_timeout_and_rerun(ray_session, tmp_path):
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ToyWorker)
    pool = ActorPool(
        lambda: actor_class.remote(str(tmp_path), {2: "hang_once"}), size=2, retries=1, timeout=2.0
    )
    results, elapsed = timed_map(pool, 5, warm_up=True)  # the first start-up is not timed
    assert results == expected(5)
    assert 2.0 <= elapsed < 30.0
    hung, rerun = attempts(tmp_path, 2)
    assert hung != rerun  # the rerun ran in another process: the hung one was killed
    assert pool.replaced == 1 and pool.retried == 1


def test_a_dead_actors_job_goes_to_a_live_actor_without_waiting_for_its_replacement(ray_session, tmp_path):
    make = first_live_then_unschedulable(tmp_path, live=2, plan={1: "crash_once"})
    pool = ActorPool(make, size=2, retries=2, timeout=120.0, start_timeout=120.0)
    results, elapsed = timed_map(pool, 6)
    assert results == expected(6)
    assert elapsed < 30.0  # not the 120 s timeout: the lost job was rerun on the actor that was alive
    crashed, rerun = attempts(tmp_path, 1)
    assert crashed != rerun
    assert (
        pool.replaced == 1 and len(pool.started) == 2
    )  # the replacement never started, and nobody waited on it


def test_jobs_fail_clearly_when_no_actor_is_left(ray_session, tmp_path):
    make = first_live_then_unschedulable(tmp_path, live=2, plan={0: "crash", 1: "crash"})
    pool = ActorPool(
        make, size=2, retries=3, start_timeout=5.0, timeout_name="controller.job_timeout", label="rollout job"
    )
    try:
        with pytest.raises(
            RuntimeError,
            match=r"rollout job \d failed [12] times; last error: no worker became ready "
            r"within 5 s \(controller\.job_timeout\); Ray sees \d+ CPUs on 1 alive",
        ):
            pool.map("evaluate", toy_jobs(2))
    finally:
        pool.close()
    assert (
        len(attempts(tmp_path, 0)) + len(attempts(tmp_path, 1)) == 2
    )  # each actor died once, then none was left


def test_workers_that_die_on_start_up_end_the_pool_with_the_reason(ray_session, tmp_path):
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ToyWorker)
    failures = []
    pool = ActorPool(lambda: actor_class.remote(str(tmp_path), fail_init=True), size=1, retries=2)
    try:
        pool.run(
            "evaluate",
            toy_jobs(3),
            on_result=lambda *_: pytest.fail("no job can succeed"),
            on_failure=lambda index, count, error: failures.append((index, count, error)),
        )
    finally:
        pool.close()
    assert [index for index, _, _ in failures] == [0, 1, 2]
    for _, count, error in failures:
        assert count == 0 and error.startswith("not attempted: workers keep dying")
        assert "injected start-up failure" in error
    assert pool.gave_up and pool.started == []
    assert not list(tmp_path.iterdir())  # no job ever reached an actor


def test_a_result_the_check_rejects_is_retried_and_the_actor_kept(ray_session, tmp_path):
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ToyWorker)
    pool = ActorPool(lambda: actor_class.remote(str(tmp_path)), size=1, retries=1)
    seen, failures, retries = [], [], []
    rejected = set()

    def check(result):
        if result[0] == 14.0 and 1 not in rejected:  # job 1's first result
            rejected.add(1)
            return "bad result"
        return None

    try:
        pool.run(
            "evaluate",
            toy_jobs(3),
            lambda index, result, worker: seen.append((index, result, worker.pid)),
            lambda *args: failures.append(args),
            lambda *args: retries.append(args),
            check=check,
        )
    finally:
        pool.close()
    assert sorted(index for index, _, _ in seen) == [0, 1, 2] and failures == []
    assert retries == [(1, 1, "bad result")]
    assert len({pid for _, _, pid in seen}) == 1 and pool.replaced == 0


def test_a_keeper_hands_a_closed_pool_to_the_next_user_of_its_key(ray_session, tmp_path):
    """A ``PoolKeeper``: a pool its user closed is the next user's of the same key, with the same actors (none
    started again); a pool still in use is not shared; a pool of another key kills the kept one first (its
    idle actors hold CPUs), and so does ``release`` (before collection's own pool); the block's end kills what
    it kept; without a keeper, ``close`` kills."""
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ToyWorker)
    made = []

    def make_actor():
        made.append(1)
        return actor_class.remote(str(tmp_path))

    def make() -> ActorPool:
        return ActorPool(make_actor, size=2)

    def handles(pool: ActorPool) -> list:
        return [slot.handle for slot in pool._slots]

    with PoolKeeper() as keeper:
        first = keeper.get("a", make)
        assert first.map("evaluate", toy_jobs(2)) == expected(2)
        kept = handles(first)
        first.close()
        again = keeper.get("a", make)
        assert again is first and again.map("evaluate", toy_jobs(3)) == expected(3)
        assert len(made) == 2 and alive(kept) == [True, True]  # no actor started again
        busy = keeper.get("a", make)  # the kept pool is in use: a pool of its own, killed by its close
        assert busy is not again
        busy_handles = handles(busy)
        busy.close()
        assert dead(busy_handles) == [True, True] and alive(kept) == [True, True]
        again.close()
        other = keeper.get("b", make)
        assert dead(kept) == [True, True], "the kept pool was killed before the new one started"
        other.close()
        kept = handles(other)
        keeper.release()  # what collection does before it makes its own pool
        assert dead(kept) == [True, True]
        last = keeper.get("c", make)
        last.close()
        kept = handles(last)
        assert alive(kept) == [True, True]
    assert dead(kept) == [True, True], "the block's end killed the kept pool"
    plain = make()
    plain_handles = handles(plain)
    plain.close()
    assert dead(plain_handles) == [True, True]

"""One pool of Ray actors for every stage that plays episodes in parallel: collection's ``EpisodeWorker``
actors and the real-game ``RolloutWorker`` actors of ``train-controller --in real`` and ``evaluate``.

The contract, for every caller:

- Jobs go only to actors that have answered a readiness ping (``PoolWorker.ping``). A replacement that Ray
  cannot schedule yet (say no CPU is free after a node died) holds no job; the live actors take the waiting
  jobs meanwhile, and nobody waits on the replacement unless no actor is left.
- A job's clock (``timeout``) starts when a ready actor is handed the job, so start-up and scheduling never
  count. An actor whose job runs out of time is killed (it may hang forever) and replaced, and the job is run
  again.
- An actor whose call fails (its process or its node died, or the method raised) is killed and replaced at
  once, and its job goes to the front of the queue for the next ready actor: a node that dies is a job lost,
  not a hang.
- A job is attempted at most ``1 + retries`` times; then the caller's ``on_failure`` is told why.
- The pool always ends. More than ``max(3, 2 x size)`` actor deaths in a row without a job finishing (workers
  that die on start-up, e.g. the project cannot be imported on the nodes), or jobs waiting ``start_timeout``
  seconds with no actor ready (the cluster lost the nodes the actors need), fail every job not done, with
  the reason.

- A ``PoolKeeper``, made by a command and handed to each of its stages, keeps the last pool a stage got from
  it (``keeper.get(key, make)``) up after that stage's ``close``: the next stage that asks for the same
  ``key`` (the same models and settings) gets its actors, which are up, instead of starting new ones (each
  imports torch and builds the models: seconds). It keeps at most one pool, and closes it before it makes
  another: its idle actors hold CPUs the new ones need.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from frmdn_worldmodels.runtime.progress import note, progress


class PoolWorker:
    """Base of the pool's actor classes: the readiness ping that tells the pool where the actor runs."""

    def ping(self) -> dict:
        """``{"node_id", "pid"}`` of this actor's process; answered only once ``__init__`` has finished."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@dataclass(frozen=True)
class WorkerInfo:
    """A ready actor: its Ray node, its process id and how long it took from creation to its ping's answer."""

    node_id: str
    pid: int
    start_seconds: float


@dataclass
class _Slot:
    handle: Any
    created: float
    ref: Any = None
    """The ping's reference while starting, the job's while busy, ``None`` while idle."""
    info: WorkerInfo | None = None
    """Set once the actor answered its ping."""
    job: int | None = None
    sent: float = 0.0


STALL_NOTE = 30.0
"""Seconds without a ready actor, jobs waiting, before the pool says so."""

OnResult = Callable[[int, Any, WorkerInfo], None]
"""(job index, result, the actor that made it)."""
OnAttempt = Callable[[int, int, str], None]
"""(job index, attempts so far, why the last one failed)."""


def _limit(seconds: float | None) -> float | None:
    return seconds if seconds else None  # 0 means no limit, as in the config fields


class ActorPool:
    """Runs jobs (argument tuples of one actor method) on ``size`` actors made by ``make_actor()``.

    The actors must derive from ``PoolWorker``. ``timeout``: seconds a job may run on its actor;
    ``start_timeout``: seconds jobs may wait while no actor is ready; both ``None`` or 0 for no limit.
    ``timeout_name`` (the config field) and ``label`` (what a job is) go into the failure messages. The pool
    lives across ``run``/``map`` calls.
    """

    def __init__(
        self,
        make_actor: Callable[[], Any],
        size: int,
        retries: int = 2,
        timeout: float | None = None,
        start_timeout: float | None = None,
        timeout_name: str = "timeout",
        label: str = "job",
    ):
        if size < 1:
            raise ValueError(f"an actor pool needs at least one actor, got size={size}")
        if retries < 0 or (timeout or 0) < 0 or (start_timeout or 0) < 0:
            raise ValueError(f"retries and timeouts must be >= 0, got {retries}, {timeout}, {start_timeout}")
        self.make_actor, self.size, self.retries = make_actor, size, retries
        self.timeout, self.start_timeout = _limit(timeout), _limit(start_timeout)
        self.timeout_name, self.label = timeout_name, label
        self.replaced = 0
        """Actors killed and replaced after a failure, over the pool's life."""
        self.retried = 0
        """Job attempts that failed and were queued again, over the pool's life."""
        self.started: list[WorkerInfo] = []
        """Every actor that became ready, replacements included."""
        self.jobs_per_node: Counter[str] = Counter()
        """Jobs finished per Ray node id."""
        self.gave_up: str | None = None
        """Set when actors kept dying: the pool then fails every job at once."""
        self._deaths_in_a_row = 0
        self.keeper: PoolKeeper | None = None
        """The keeper that lends this pool out (its ``close`` then hands it back), None for a plain pool."""
        self.lent = False
        """A kept pool's user has it (``PoolKeeper.get``) and has not closed it yet."""
        self._slots = [self._start() for _ in range(size)]

    def _start(self) -> _Slot:
        handle = self.make_actor()
        return _Slot(handle, time.perf_counter(), ref=handle.ping.remote())

    def _replace(self, slot: _Slot) -> None:
        import ray

        ray.kill(slot.handle)
        index = self._slots.index(slot)
        if self.gave_up is None:
            self._slots[index] = self._start()
            self.replaced += 1
        else:
            del self._slots[index]

    def _died(self, slot: _Slot, error: Exception) -> None:
        """An actor's process is gone: replace it, unless actors keep dying (then stop making new ones)."""
        self._deaths_in_a_row += 1
        if self._deaths_in_a_row > max(3, 2 * self.size) and self.gave_up is None:
            self.gave_up = f"workers keep dying ({_short(error)})"
        self._replace(slot)

    def _cluster(self) -> str:
        import ray

        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
        return f"Ray sees {ray.cluster_resources().get('CPU', 0):g} CPUs on {alive} alive node(s)"

    def running(self) -> list[tuple[int, WorkerInfo, float]]:
        """(job index, actor, seconds it has run) of every job running now (for monitoring and tests)."""
        now = time.perf_counter()
        return [(slot.job, slot.info, now - slot.sent) for slot in list(self._slots) if slot.job is not None]

    def run(
        self,
        method: str,
        jobs: Sequence[tuple],
        on_result: OnResult,
        on_failure: OnAttempt,
        on_retry: OnAttempt | None = None,
        check: Callable[[Any], str | None] | None = None,
    ) -> None:
        """``getattr(actor, method).remote(*job)`` for every job, until each one succeeded or failed for good.

        ``on_result`` is called for each result as it comes (after the actor got its next job, so the caller's
        work overlaps the actor's); ``check(result)`` may call a result a failure (an error string: the actor
        reported it and stays in use); ``on_retry`` is told of each failed attempt that will be retried
        (default: a note), ``on_failure`` of each job that will not run again. If a callback raises, the
        actors still busy are replaced, so the pool stays usable.
        """
        _Run(self, method, jobs, on_result, on_failure, on_retry, check).loop()

    def map(
        self,
        method: str,
        jobs: Sequence[tuple],
        desc: str | None = None,
        sizes: Sequence[int] | None = None,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list:
        """The results of ``run`` in job order; ``RuntimeError`` when a job fails more than ``retries``
        times. ``desc``: show a progress bar of that name, counting jobs or, with ``sizes``, each job's
        episodes as it finishes. ``on_result(job index, result)`` is called as each job finishes (to save
        it before the others end)."""
        results: list = [None] * len(jobs)
        unit = "job" if sizes is None else "episode"
        sizes = [1] * len(jobs) if sizes is None else list(sizes)
        if len(sizes) != len(jobs):
            raise ValueError(f"{len(sizes)} sizes for {len(jobs)} jobs")
        bar = progress(total=sum(sizes), desc=desc, unit=unit, disable=desc is None)

        def store(index: int, result: Any, _worker: WorkerInfo) -> None:
            results[index] = result
            if on_result is not None:
                on_result(index, result)
            bar.update(sizes[index])

        def fail(index: int, attempts: int, error: str) -> None:
            if attempts:
                raise RuntimeError(f"{self.label} {index} failed {attempts} times; last error: {error}")
            raise RuntimeError(f"{self.label} {index} could not run: {error}")

        try:
            self.run(method, jobs, store, fail)
        finally:
            bar.close()
        return results

    def close(self) -> None:
        """Kill every actor, busy, idle or still starting; a kept pool goes back to its keeper instead."""
        if self.keeper is not None:
            self.lent = False
            return
        import ray

        for slot in self._slots:
            ray.kill(slot.handle)
        self._slots = []


class _Run:
    """One ``ActorPool.run``: its queue of jobs, their attempts, and the loop that hands them to actors."""

    def __init__(
        self,
        pool: ActorPool,
        method: str,
        jobs: Sequence[tuple],
        on_result: OnResult,
        on_failure: OnAttempt,
        on_retry: OnAttempt | None,
        check: Callable[[Any], str | None] | None,
    ):
        self.pool, self.method, self.jobs = pool, method, jobs
        self.on_result, self.on_failure, self.check = on_result, on_failure, check
        self.on_retry = on_retry or (
            lambda index, count, error: note(
                f"{pool.label} {index}: attempt {count} failed, retrying: {error}"
            )
        )
        self.queue = deque(range(len(jobs)))
        self.attempts = [0] * len(jobs)
        self.stalled_since: float | None = None
        """Since when jobs wait with no ready actor (None: not stalled)."""
        self.stall_noted = False

    def failed(self, index: int, error: str) -> None:
        """An attempt of job ``index`` failed: first in line again (a lost job is rerun as soon as an actor is
        ready) while it has retries left, else the caller is told."""
        self.attempts[index] += 1
        if self.attempts[index] <= self.pool.retries and self.pool.gave_up is None:
            self.queue.appendleft(index)
            self.pool.retried += 1
            self.on_retry(index, self.attempts[index], error)
        else:
            self.on_failure(index, self.attempts[index], error)

    def fail_waiting(self, reason: str) -> None:
        """Every job still queued fails, for ``reason`` (said once here: the callers may list the jobs)."""
        if self.queue:
            note(f"{len(self.queue)} {self.pool.label}(s) left fail: {reason}")
        while self.queue:
            index = self.queue.popleft()
            attempts = self.attempts[index]
            self.on_failure(index, attempts, reason if attempts else f"not attempted: {reason}")

    def dispatch(self) -> None:
        """The next queued jobs to the ready, idle actors."""
        for slot in self.pool._slots:
            if not self.queue:
                return
            if slot.info is not None and slot.job is None:
                slot.job = self.queue.popleft()
                slot.ref = getattr(slot.handle, self.method).remote(*self.jobs[slot.job])
                slot.sent = time.perf_counter()

    def wait_seconds(self, busy: list[_Slot]) -> float | None:
        """How long to wait for the next result: until the first job's timeout, the start timeout or the stall
        note (None: for good)."""
        pool, now = self.pool, time.perf_counter()
        deadlines = [slot.sent + pool.timeout for slot in busy] if pool.timeout else []
        if self.queue and not busy:  # jobs wait and no actor is ready: only starting ones are left
            if self.stalled_since is None:
                self.stalled_since, self.stall_noted = now, False
            if pool.start_timeout:
                deadlines.append(self.stalled_since + pool.start_timeout)
            if not self.stall_noted:
                deadlines.append(self.stalled_since + STALL_NOTE)
        else:
            self.stalled_since = None
        return max(0.0, min(deadlines) - now) if deadlines else None

    def nothing_came(self, busy: list[_Slot]) -> None:
        """The wait ran out: kill the actors whose job timed out (they may hang forever); fail the waiting
        jobs after the start timeout; say once why nothing moves."""
        pool, now = self.pool, time.perf_counter()
        for slot in busy:
            if pool.timeout and now >= slot.sent + pool.timeout:
                index = slot.job
                pool._replace(slot)
                self.failed(index, f"timed out after {pool.timeout:g} s ({pool.timeout_name})")
        if self.stalled_since is None:
            return
        if pool.start_timeout and now >= self.stalled_since + pool.start_timeout:
            limit = f"{pool.start_timeout:g} s ({pool.timeout_name})"
            self.fail_waiting(f"no worker became ready within {limit}; {pool._cluster()}")
        elif not self.stall_noted and now >= self.stalled_since + STALL_NOTE:
            self.stall_noted = True  # with no limit it may wait for good
            limit = f"{pool.start_timeout:g} s ({pool.timeout_name})" if pool.start_timeout else "no limit"
            note(
                f"{len(self.queue)} {pool.label}(s) waiting, no worker ready for {STALL_NOTE:g} s: "
                f"waiting for Ray to start one ({limit}); {pool._cluster()}"
            )

    def came(self, slot: _Slot) -> None:
        """``slot``'s call answered: a ping (the actor is ready), a result, or a failure."""
        import ray

        pool = self.pool
        index, slot.job, ref, slot.ref = slot.job, None, slot.ref, None
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as error:  # process crash, OOM kill, lost node
            pool._died(slot, error)
            if index is not None:
                self.failed(index, f"worker died: {_short(error)}")
            return
        except ray.exceptions.RayError as error:  # the method raised, or its result was lost
            pool._replace(slot)  # its state is unknown after an error
            if index is not None:
                self.failed(index, _short(error))
            return
        if index is None:  # a ping: the actor is ready for jobs
            slot.info = WorkerInfo(result["node_id"], result["pid"], time.perf_counter() - slot.created)
            pool.started.append(slot.info)
            return
        error = self.check(result) if self.check is not None else None
        if error is not None:
            self.failed(index, error)
            return
        pool._deaths_in_a_row = 0
        pool.jobs_per_node[slot.info.node_id] += 1
        self.dispatch()
        self.on_result(index, result, slot.info)

    def loop(self) -> None:
        """Until every job succeeded or failed for good; if a callback raises, the busy actors are
        replaced."""
        import ray

        pool = self.pool
        try:
            while True:
                if pool.gave_up is not None:
                    self.fail_waiting(pool.gave_up)
                self.dispatch()
                busy = [slot for slot in pool._slots if slot.job is not None]
                if not self.queue and not busy:
                    return
                wait = self.wait_seconds(busy)
                by_ref = {slot.ref: slot for slot in pool._slots if slot.ref is not None}
                ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=wait)
                if ready:
                    self.came(by_ref[ready[0]])
                else:
                    self.nothing_came(busy)
        except BaseException:
            for slot in [slot for slot in pool._slots if slot.job is not None]:
                pool._replace(slot)
            raise


class PoolKeeper:
    """Keeps one pool up between the stages of a command (see the module's contract); a context manager that
    kills what it kept at the end."""

    def __init__(self) -> None:
        self.key: Hashable = None
        self.pool: ActorPool | None = None

    def get(self, key: Hashable, make: Callable[[], ActorPool], keep: bool = True) -> ActorPool:
        """The kept pool if it was made for ``key`` and its last user closed it; else ``make()``, kept (when
        ``keep`` and nothing else is kept) for the next user of ``key``."""
        kept = self.pool
        if kept is not None and self.key == key and not kept.lent:
            kept.lent = True
            return kept
        self.release()  # before the new pool's actors ask for CPUs
        pool = make()
        if keep and self.pool is None:
            self.key, self.pool, pool.keeper, pool.lent = key, pool, self, True
        return pool

    def release(self) -> None:
        """Kill the kept pool if nobody has it (a pool in use stays with its user, who closes it)."""
        pool = self.pool
        if pool is not None and not pool.lent:
            self.key, self.pool, pool.keeper = None, None, None
            pool.close()

    def __enter__(self) -> PoolKeeper:
        return self

    def __exit__(self, *_: object) -> None:
        if self.pool is not None:
            self.pool.lent = False
        self.release()


def _short(error: BaseException) -> str:
    """``Type: first line ... last line`` of a Ray error: a remote traceback's last line names the cause."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()] or [""]
    text = lines[0][:200] if len(lines) == 1 else f"{lines[0][:150]} ... {lines[-1].strip()[:150]}"
    return f"{type(error).__name__}: {text}"

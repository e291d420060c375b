"""
The job's state machine: which task runs where, and when the job is done.

Sans-IO in the manner of h11: the server feeds in events (a worker joined, an
attempt succeeded, the time is now T, ...) with L{Scheduler.handle} and asks
for decisions with L{Scheduler.next_assignment} and
L{Scheduler.cancellations}; nothing here touches a socket, a timer or Twisted,
and the clock only arrives in events, so every transition is tested by calling
methods and reading attributes.  All job state lives here; transports hold
only connection state.

Phases::

    MAPPING --all map tasks done--> REDUCING --all reduce tasks done--> FINISHED
       \\________________________________\\__ a task failed for good __> FAILED

An empty source goes from MAPPING straight to FINISHED.

What happens when things fail (see docs/guide.md):

  - A worker that leaves loses its running attempts; their tasks go back in
    the queue.  That is not the task's fault and costs it no attempt.
  - A worker silent for longer than its lease (no message of any kind) is
    I{suspect}: its running attempts are cancelled and requeued, and it gets
    no work until it is heard from again.
  - An attempt that fails (the user's code raised, or killed its process)
    counts against its task; the task is retried, on another worker when
    there is one, until it has failed C{max_attempts} times.  Then the job
    fails, or, with C{skip_bad_records}, a map task is skipped and its key
    reported.
  - When nothing is left to hand out, an idle worker gets a backup copy of the
    running task that has run longest (once it has run longer than
    C{backup_after}).  The first attempt to succeed wins; the others are
    cancelled, and the outputs of every attempt but the winner are discarded.
"""

from __future__ import annotations

import enum
import statistics
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from octotwist.errors import RemoteProtocolError
from octotwist.messages import TaskId, TaskKind


class Phase(enum.Enum):
    MAPPING = "mapping"
    REDUCING = "reducing"
    FINISHED = "finished"
    FAILED = "failed"


class TaskStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


#: The only phase changes there are; L{Scheduler._enter} enforces them.
_TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.MAPPING: frozenset({Phase.REDUCING, Phase.FINISHED, Phase.FAILED}),
    Phase.REDUCING: frozenset({Phase.FINISHED, Phase.FAILED}),
    Phase.FINISHED: frozenset(),
    Phase.FAILED: frozenset(),
}


# Events: what the server tells the scheduler.


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    worker: str
    slots: int = 1


@dataclass(frozen=True, slots=True)
class WorkerLeft:
    """The worker's connection is gone; its running attempts are lost."""

    worker: str


@dataclass(frozen=True, slots=True)
class Heard:
    """A message (any message) arrived from C{worker} at time C{now}."""

    worker: str
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """The time is C{now}: expire the leases of silent workers."""

    now: float


@dataclass(frozen=True, slots=True)
class AttemptSucceeded:
    worker: str
    task: TaskId
    attempt: int


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    worker: str
    task: TaskId
    attempt: int
    key: str | None
    error: str
    traceback: str


Event = WorkerJoined | WorkerLeft | Heard | Tick | AttemptSucceeded | AttemptFailed


# Decisions: what the scheduler tells the server.


@dataclass(frozen=True, slots=True)
class Assignment:
    """Run C{attempt} of C{task}; for a map task, C{key} is its source key."""

    task: TaskId
    attempt: int
    key: Any = None
    backup: bool = False  # a second copy of a task that is still running


@dataclass(frozen=True, slots=True)
class Cancellation:
    """Tell C{worker} to stop C{attempt} of C{task}; its output is not wanted."""

    worker: str
    task: TaskId
    attempt: int
    why: str


class _NoWork:
    def __repr__(self) -> str:
        return "NO_WORK"


#: Returned by L{Scheduler.next_assignment} when the worker should wait.
NO_WORK: Final = _NoWork()


class Verdict(enum.Enum):
    """Whether the outputs of a finished attempt count."""

    ACCEPTED = "accepted"  # first success: commit its outputs
    DISCARDED = "discarded"  # cancelled, late duplicate, or job over: drop its outputs


@dataclass(frozen=True, slots=True)
class JobFailure:
    """Why the job failed: the last attempt's error, with where it happened."""

    task: TaskId
    key: str | None
    worker: str
    error: str
    traceback: str
    attempts: int
    workers: tuple[str, ...] = ()  # every worker an attempt failed on


@dataclass(frozen=True, slots=True)
class SkippedRecord:
    """A map task dropped after failing every attempt (C{skip_bad_records})."""

    task: TaskId
    key: str | None
    error: str
    attempts: int


class InvalidEvent(RemoteProtocolError):
    """An event that cannot happen in the current state; the state is unchanged."""


@dataclass(slots=True)
class _Task:
    id: TaskId
    key: Any = None
    status: TaskStatus = TaskStatus.PENDING
    attempts: int = 0  # attempts started so far
    failures: int = 0
    running: dict[int, str] = field(default_factory=dict)  # live attempt -> worker
    started: dict[int, float] = field(default_factory=dict)  # live attempt -> when
    # Immutable, so that the many tasks that never need one share the empty
    # one: a 1.5 GB job has thousands of tasks and these are rarely set.
    abandoned: frozenset[int] = frozenset()  # cancelled attempts
    failed_on: tuple[str, ...] = ()


@dataclass(slots=True)
class _Worker:
    name: str
    slots: int
    last_heard: float = 0.0
    suspect: bool = False  # silent past its lease: no new work until heard from
    running: set[tuple[TaskId, int]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Counts:
    """Progress of one phase; C{total} and C{pending} are C{None} while the
    number of source keys is unknown."""

    done: int
    running: int
    pending: int | None
    total: int | None


def _short_repr(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 200 else text[:200] + "..."


class Scheduler:
    """
    Hands out map tasks first-come-first-served, then one reduce task per
    partition, and says when the job is finished or has failed.

    @param keys: the source's keys, drawn one at a time as map tasks are
        handed out (with one key of look-ahead, to know when they run out).
    @param reduce_tasks: the number of partitions.
    @param total: the number of keys, when the source knows it (progress only).
    @param max_attempts: how many times a task may fail before the job fails.
    @param lease: seconds a worker may stay silent before its attempts are
        cancelled and requeued.
    @param skip_bad_records: skip a map task that failed C{max_attempts}
        times instead of failing the job.
    @param backup_after: seconds a task must have run, at least, before an
        idle worker gets a backup copy of it (C{None}: no backup tasks).
        The bar rises to twice the median time of the phase's finished tasks.
    """

    def __init__(
        self,
        keys: Iterable[Any],
        reduce_tasks: int,
        *,
        total: int | None = None,
        max_attempts: int = 1,
        lease: float = float("inf"),
        skip_bad_records: bool = False,
        backup_after: float | None = None,
    ) -> None:
        if reduce_tasks < 1:
            raise ValueError("reduce_tasks must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.reduce_tasks = reduce_tasks
        self.max_attempts = max_attempts
        self.lease = lease
        self.skip_bad_records = skip_bad_records
        self.backup_after = backup_after
        self.phase = Phase.MAPPING
        self.failure: JobFailure | None = None
        self.skipped: list[SkippedRecord] = []
        self.now = 0.0
        self._keys: Iterator[Any] = iter(keys)
        self._total = total
        self._lookahead: list[Any] = []
        self._maps: list[_Task] = []
        self._reduces: list[_Task] = []
        self._pending: deque[_Task] = deque()  # tasks to (re)run before new keys
        self._workers: dict[str, _Worker] = {}
        self._done = dict.fromkeys(TaskKind, 0)  # tasks done, by kind
        self._durations: dict[TaskKind, list[float]] = {kind: [] for kind in TaskKind}
        self._cancellations: list[Cancellation] = []
        self._peek()
        self._advance()

    # Events in.

    def handle(self, event: Event) -> Verdict | None:
        """
        Apply one event.  Returns a L{Verdict} for L{AttemptSucceeded} and
        C{None} otherwise.  Attempts to cancel pile up in L{cancellations}.

        @raise InvalidEvent: the event names an unknown worker, or an attempt
            that worker was never given; nothing changes.
        """
        match event:
            case WorkerJoined(worker, slots):
                if worker in self._workers:
                    raise InvalidEvent(f"worker {worker!r} joined twice")
                self._workers[worker] = _Worker(worker, max(1, slots), self.now)
            case WorkerLeft(worker):
                gone = self._worker(worker)
                for task_id, attempt in sorted(gone.running, key=str):
                    self._release(self._task(task_id), attempt)
                del self._workers[worker]
            case Heard(worker, now):
                w = self._worker(worker)
                self.now = max(self.now, now)
                w.last_heard = now
                w.suspect = False
            case Tick(now):
                self.now = max(self.now, now)
                self._expire_leases()
            case AttemptSucceeded(worker, task_id, attempt):
                task = self._reported_attempt(worker, task_id, attempt)
                if task is None or task.status is TaskStatus.DONE or self.done:
                    if task is not None:
                        self._forget(task, attempt)
                    return Verdict.DISCARDED
                self._durations[task_id.kind].append(self.now - task.started[attempt])
                self._forget(task, attempt)
                self._complete(task, "another attempt finished first")
                return Verdict.ACCEPTED
            case AttemptFailed(worker, task_id, attempt, key, error, tb):
                task = self._reported_attempt(worker, task_id, attempt)
                if task is None or task.status is TaskStatus.DONE or self.done:
                    if task is not None:
                        self._forget(task, attempt)
                    return None
                self._forget(task, attempt)
                task.failures += 1
                task.failed_on += (worker,)
                if key is None and task_id.kind is TaskKind.MAP:
                    key = _short_repr(task.key)  # e.g. the process died: we know it
                if task.failures < self.max_attempts:
                    self._requeue_if_idle(task)
                elif self.skip_bad_records and task_id.kind is TaskKind.MAP:
                    self.skipped.append(SkippedRecord(task_id, key, error, task.attempts))
                    self._complete(task, "the task is skipped")
                else:
                    self.failure = JobFailure(
                        task_id, key, worker, error, tb, task.attempts, tuple(task.failed_on)
                    )
                    self._enter(Phase.FAILED)
            case _:
                raise TypeError(f"not a scheduler event: {event!r}")
        return None

    # Decisions out.

    def next_assignment(self, worker: str) -> Assignment | _NoWork:
        """
        The next attempt C{worker} should run, or L{NO_WORK} if it should wait
        (all its slots busy, it is suspect, nothing to do, or the job is over).
        """
        w = self._worker(worker)
        if len(w.running) >= w.slots or w.suspect or self.done:
            return NO_WORK
        task = self._take_pending(worker)
        backup = False
        if task is None:
            task = self._backup_candidate(worker)
            backup = task is not None
        if task is None:
            return NO_WORK
        task.attempts += 1
        task.status = TaskStatus.RUNNING
        task.running[task.attempts] = worker
        task.started[task.attempts] = self.now
        w.running.add((task.id, task.attempts))
        return Assignment(task.id, task.attempts, task.key, backup)

    def cancellations(self) -> list[Cancellation]:
        """The attempts to cancel since the last call (and forget them)."""
        out, self._cancellations = self._cancellations, []
        return out

    def is_live(self, worker: str, task: TaskId, attempt: int) -> bool:
        """Whether output from this attempt may still count."""
        w = self._workers.get(worker)
        return w is not None and (task, attempt) in w.running

    def accepts_output(self, worker: str, task: TaskId, attempt: int) -> bool:
        """
        Whether output C{worker} sends for this attempt is to be kept:
        C{True} while the attempt is live, C{False} once it was cancelled
        (late output, to drop).

        @raise InvalidEvent: the worker was never given this attempt, or has
            already reported it finished.
        """
        return self._reported_attempt(worker, task, attempt) is not None

    def is_done(self, task: TaskId) -> bool:
        """Whether C{task} has succeeded (its output counts)."""
        return self._task(task).status is TaskStatus.DONE

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.FAILED)

    def workers(self) -> list[str]:
        return list(self._workers)

    def running(self, worker: str) -> list[tuple[TaskId, int]]:
        """The attempts C{worker} is running, in task order."""
        return sorted(self._worker(worker).running, key=lambda r: (r[0].index, r[1]))

    def counts(self, kind: TaskKind) -> Counts:
        tasks = self._maps if kind is TaskKind.MAP else self._reduces
        done = self._done[kind]
        running = sum(t.status is TaskStatus.RUNNING for t in tasks)
        if kind is TaskKind.REDUCE:
            total: int | None = self.reduce_tasks
        elif not self._lookahead:  # every key has been drawn
            total = len(self._maps)
        else:
            total = self._total
        pending = None if total is None else total - done - running
        return Counts(done, running, pending, total)

    # Internals.

    def _enter(self, phase: Phase) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise AssertionError(f"illegal phase change {self.phase} -> {phase}")
        self.phase = phase
        if phase is Phase.REDUCING:
            self._reduces = [_Task(TaskId(TaskKind.REDUCE, p)) for p in range(self.reduce_tasks)]
            self._pending.extend(self._reduces)
        if self.done:  # nothing running matters any more
            for task in (*self._maps, *self._reduces):
                self._cancel_all(task, f"the job is {phase.value}")

    def _advance(self) -> None:
        """Move to the next phase when the current one has nothing left."""
        done = self._done
        if (
            self.phase is Phase.MAPPING
            and not self._lookahead
            and done[TaskKind.MAP] == len(self._maps)
        ):
            self._enter(Phase.REDUCING if self._maps else Phase.FINISHED)
        if self.phase is Phase.REDUCING and done[TaskKind.REDUCE] == len(self._reduces):
            self._enter(Phase.FINISHED)

    def _complete(self, task: _Task, why: str) -> None:
        task.status = TaskStatus.DONE
        self._done[task.id.kind] += 1
        self._cancel_all(task, why)
        self._advance()

    def _cancel_all(self, task: _Task, why: str) -> None:
        for attempt, worker in list(task.running.items()):
            self._forget(task, attempt)
            task.abandoned |= {attempt}
            self._cancellations.append(Cancellation(worker, task.id, attempt, why))

    def _expire_leases(self) -> None:
        for w in self._workers.values():
            if w.suspect or self.now - w.last_heard <= self.lease:
                continue
            w.suspect = True
            for task_id, attempt in sorted(w.running, key=str):
                task = self._task(task_id)
                self._forget(task, attempt)
                task.abandoned |= {attempt}
                self._cancellations.append(
                    Cancellation(
                        w.name, task_id, attempt, f"worker silent for over {self.lease:g} s"
                    )
                )
                self._requeue_if_idle(task)

    def _peek(self) -> None:
        if not self._lookahead:
            for key in self._keys:
                self._lookahead.append(key)
                break

    def _take_pending(self, worker: str) -> _Task | None:
        """
        The first pending task, passing over one that already failed on
        C{worker} while some other worker, on which it has not failed, could
        take it instead.
        """
        passed_over: list[_Task] = []
        chosen = None
        while self._pending:
            task = self._pending.popleft()
            if task.status is not TaskStatus.PENDING:
                continue
            if worker in task.failed_on and self._someone_else_for(task, worker):
                passed_over.append(task)
                continue
            chosen = task
            break
        self._pending.extendleft(reversed(passed_over))
        if chosen is not None:
            return chosen
        if self.phase is Phase.MAPPING and self._lookahead:
            task = _Task(TaskId(TaskKind.MAP, len(self._maps)), self._lookahead.pop())
            self._maps.append(task)
            self._peek()
            return task
        return None

    def _someone_else_for(self, task: _Task, worker: str) -> bool:
        return any(
            name != worker and name not in task.failed_on and not w.suspect
            for name, w in self._workers.items()
        )

    def _backup_candidate(self, worker: str) -> _Task | None:
        """The longest-running task with a single attempt elsewhere, if slow enough."""
        if self.backup_after is None or self._pending or self._lookahead:
            return None
        tasks = self._maps if self.phase is Phase.MAPPING else self._reduces
        kind = TaskKind.MAP if self.phase is Phase.MAPPING else TaskKind.REDUCE
        durations = self._durations[kind]
        bar = max(self.backup_after, 2 * statistics.median(durations) if durations else 0.0)
        best: _Task | None = None
        best_start = self.now - bar
        for task in tasks:
            if task.status is not TaskStatus.RUNNING or len(task.running) != 1:
                continue
            ((attempt, owner),) = task.running.items()
            if owner == worker:
                continue
            if task.started[attempt] <= best_start:
                best, best_start = task, task.started[attempt]
        return best

    def _forget(self, task: _Task, attempt: int) -> None:
        worker = task.running.pop(attempt)
        task.started.pop(attempt, None)
        if worker in self._workers:
            self._workers[worker].running.discard((task.id, attempt))

    def _requeue_if_idle(self, task: _Task) -> None:
        if task.status is TaskStatus.RUNNING and not task.running:
            task.status = TaskStatus.PENDING
            self._pending.appendleft(task)

    def _release(self, task: _Task, attempt: int) -> None:
        """Forget a running attempt; a task left with none goes back in the queue."""
        self._forget(task, attempt)
        self._requeue_if_idle(task)

    def _worker(self, name: str) -> _Worker:
        try:
            return self._workers[name]
        except KeyError:
            raise InvalidEvent(f"unknown worker {name!r}") from None

    def _task(self, task_id: TaskId) -> _Task:
        tasks = self._maps if task_id.kind is TaskKind.MAP else self._reduces
        if not 0 <= task_id.index < len(tasks):
            raise InvalidEvent(f"unknown task {task_id}")
        return tasks[task_id.index]

    def _reported_attempt(self, worker: str, task_id: TaskId, attempt: int) -> _Task | None:
        """
        The task of an attempt C{worker} reports on: the task when the attempt
        is live, C{None} when it was cancelled (a late report, to discard).

        @raise InvalidEvent: the worker was never given this attempt.
        """
        w = self._worker(worker)
        task = self._task(task_id)
        if (task_id, attempt) in w.running:
            return task
        if attempt in task.abandoned:
            return None
        raise InvalidEvent(f"worker {worker!r} is not running {task_id} #{attempt}")

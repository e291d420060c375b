"""
The job's state machine: which task runs where, and when the job is done.

Sans-IO in the manner of h11: the server feeds in events (a worker joined, an
attempt succeeded, ...) with L{Scheduler.handle} and asks for decisions with
L{Scheduler.next_assignment}; nothing here touches a socket, a timer, a clock
or Twisted, so every transition is tested by calling methods and reading
attributes.  All job state lives here; transports hold only connection state.

Phases::

    MAPPING --all map tasks done--> REDUCING --all reduce tasks done--> FINISHED
       \\________________________________\\__ a task failed for good __> FAILED

An empty source goes from MAPPING straight to FINISHED.
"""

from __future__ import annotations

import enum
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


Event = WorkerJoined | WorkerLeft | AttemptSucceeded | AttemptFailed


# Decisions: what the scheduler tells the server.


@dataclass(frozen=True, slots=True)
class Assignment:
    """Run C{attempt} of C{task}; for a map task, C{key} is its source key."""

    task: TaskId
    attempt: int
    key: Any = None


class _NoWork:
    def __repr__(self) -> str:
        return "NO_WORK"


#: Returned by L{Scheduler.next_assignment} when the worker should wait.
NO_WORK: Final = _NoWork()


class Verdict(enum.Enum):
    """Whether the outputs of a finished attempt count."""

    ACCEPTED = "accepted"  # first success: commit its outputs
    DISCARDED = "discarded"  # late duplicate or job over: drop its outputs


@dataclass(frozen=True, slots=True)
class JobFailure:
    """Why the job failed: the last attempt's error, with where it happened."""

    task: TaskId
    key: str | None
    worker: str
    error: str
    traceback: str
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
    running: dict[int, str] = field(default_factory=dict)  # attempt -> worker


@dataclass(slots=True)
class _Worker:
    name: str
    slots: int
    running: set[tuple[TaskId, int]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Counts:
    """Progress of one phase; C{total} and C{pending} are C{None} while the
    number of source keys is unknown."""

    done: int
    running: int
    pending: int | None
    total: int | None


class Scheduler:
    """
    Hands out map tasks first-come-first-served, then one reduce task per
    partition, and says when the job is finished or has failed.

    @param keys: the source's keys, drawn one at a time as map tasks are
        handed out (with one key of look-ahead, to know when they run out).
    @param reduce_tasks: the number of partitions.
    @param total: the number of keys, when the source knows it (progress only).
    @param max_attempts: how many times a task may fail before the job fails.
    """

    def __init__(
        self,
        keys: Iterable[Any],
        reduce_tasks: int,
        *,
        total: int | None = None,
        max_attempts: int = 1,
    ) -> None:
        if reduce_tasks < 1:
            raise ValueError("reduce_tasks must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.reduce_tasks = reduce_tasks
        self.max_attempts = max_attempts
        self.phase = Phase.MAPPING
        self.failure: JobFailure | None = None
        self._keys: Iterator[Any] = iter(keys)
        self._total = total
        self._lookahead: list[Any] = []
        self._maps: list[_Task] = []
        self._reduces: list[_Task] = []
        self._pending: deque[_Task] = deque()  # tasks to (re)run before new keys
        self._workers: dict[str, _Worker] = {}
        self._done = dict.fromkeys(TaskKind, 0)  # tasks done, by kind
        self._peek()
        self._advance()

    # Events in.

    def handle(self, event: Event) -> Verdict | None:
        """
        Apply one event.  Returns a L{Verdict} for L{AttemptSucceeded} and
        C{None} otherwise.

        @raise InvalidEvent: the event names an unknown worker or an attempt
            that worker is not running; nothing changes.
        """
        match event:
            case WorkerJoined(worker, slots):
                if worker in self._workers:
                    raise InvalidEvent(f"worker {worker!r} joined twice")
                self._workers[worker] = _Worker(worker, max(1, slots))
            case WorkerLeft(worker):
                gone = self._worker(worker)
                for task_id, attempt in sorted(gone.running, key=str):
                    self._release(self._task(task_id), attempt)
                del self._workers[worker]
            case AttemptSucceeded(worker, task_id, attempt):
                task = self._running_attempt(worker, task_id, attempt)
                if task.status is TaskStatus.DONE or self.done:
                    self._forget(task, attempt)
                    return Verdict.DISCARDED
                self._forget(task, attempt)
                task.status = TaskStatus.DONE
                self._done[task_id.kind] += 1
                self._advance()
                return Verdict.ACCEPTED
            case AttemptFailed(worker, task_id, attempt, key, error, tb):
                task = self._running_attempt(worker, task_id, attempt)
                self._release(task, attempt)
                if task.status is TaskStatus.DONE or self.done:
                    return None
                task.failures += 1
                if task.failures >= self.max_attempts:
                    self.failure = JobFailure(task_id, key, worker, error, tb, task.attempts)
                    self._enter(Phase.FAILED)
            case _:
                raise TypeError(f"not a scheduler event: {event!r}")
        return None

    # Decisions out.

    def next_assignment(self, worker: str) -> Assignment | _NoWork:
        """
        The next attempt C{worker} should run, or L{NO_WORK} if it should wait
        (all its slots busy, nothing pending, or the job is over).
        """
        w = self._worker(worker)
        if len(w.running) >= w.slots or self.phase not in (
            Phase.MAPPING,
            Phase.REDUCING,
        ):
            return NO_WORK
        task = self._take_pending()
        if task is None:
            return NO_WORK
        task.attempts += 1
        task.status = TaskStatus.RUNNING
        task.running[task.attempts] = worker
        w.running.add((task.id, task.attempts))
        return Assignment(task.id, task.attempts, task.key)

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.FAILED)

    def workers(self) -> list[str]:
        return list(self._workers)

    def has_free_slot(self, worker: str) -> bool:
        w = self._worker(worker)
        return len(w.running) < w.slots

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

    def _peek(self) -> None:
        if not self._lookahead:
            for key in self._keys:
                self._lookahead.append(key)
                break

    def _take_pending(self) -> _Task | None:
        while self._pending:
            task = self._pending.popleft()
            if task.status is TaskStatus.PENDING:
                return task
        if self.phase is Phase.MAPPING and self._lookahead:
            task = _Task(TaskId(TaskKind.MAP, len(self._maps)), self._lookahead.pop())
            self._maps.append(task)
            self._peek()
            return task
        return None

    def _forget(self, task: _Task, attempt: int) -> None:
        worker = task.running.pop(attempt)
        self._workers[worker].running.discard((task.id, attempt))

    def _release(self, task: _Task, attempt: int) -> None:
        """Forget a running attempt; a task left with none goes back in the queue."""
        self._forget(task, attempt)
        if task.status is TaskStatus.RUNNING and not task.running:
            task.status = TaskStatus.PENDING
            self._pending.appendleft(task)

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

    def _running_attempt(self, worker: str, task_id: TaskId, attempt: int) -> _Task:
        w = self._worker(worker)
        if (task_id, attempt) not in w.running:
            raise InvalidEvent(f"worker {worker!r} is not running {task_id} #{attempt}")
        return self._task(task_id)

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

A job of several steps (L{octotwist.job.Step}) goes round again: when a
step's last reduce task is done, the next step's MAPPING begins, with one
map task per reduce task of the step before (its input is that task's
output, which the server forwards undecoded); a map-only step (no
partitions) goes from MAPPING to the next step's MAPPING, one map task per
map task of its own that succeeded.  Each step is a barrier, as in mrjob
and Hadoop: step I{k}+1 starts when step I{k} is done.  L{Scheduler.step}
says which step runs; L{Scheduler.output_tasks} which tasks' outputs are
the job's results.

A job that resumes (its server died: L{octotwist.resume}) is handed what
an earlier run finished (L{Resumed}): the first step's map tasks as
batches of keys, which become tasks that are done from the start (the
server leaves their keys out of C{keys}), and, as every later task is
made, the question whether it was done before.  A task is known across
runs by its L{Origin}, since its index is not stable: batches are sized
anew in every run.

An empty source goes from MAPPING straight to FINISHED; a source whose
C{__iter__} raises fails the job at once (L{Scheduler.source_error}).

Map tasks carry batches of source items, as C{multiprocessing.Pool.imap}'s
C{chunksize} does, so that a source of many tiny items does not pay a
message, an attempt and a round trip per item.  The batch size adapts
(L{Batching}): the first tasks carry one item each; a batch may grow
from one that finished within C{target_seconds} (to as many items as would
have fitted, at most eight times as many), and shrinks when one took
longer; it is bounded by bytes (C{target_bytes} of packed input, by the
average size of the items read so far, which the server reports with
L{InputSized}), by C{max_items}, and, when the source's size is known, so
that the job still makes C{spread} tasks per worker slot.  A big item thus
travels alone, slow items go one or a few per task, and a job of a dozen
items keeps one item per task.  Progress (L{Scheduler.counts}) counts map I{items}, so
C{len(source)} stays the map total however the items are batched.

What happens when things fail (see docs/guide.md):

  - A worker that leaves loses its running attempts; their tasks go back in
    the queue.  That is not the task's fault and costs it no attempt; nor is
    an attempt the worker gives back (L{AttemptReturned}).
  - A worker silent for C{suspect_after} seconds (no message of any kind:
    a few missed heartbeats) is I{suspect}: it gets no new work until it is
    heard from again, and its running attempts keep their lease (a slow one
    gets a backup copy elsewhere, as any, and once nothing else is left to
    hand out, at once).  Silent for longer than its lease,
    its running attempts are cancelled and requeued too.  Both changes are
    told as L{Silence} news (L{Scheduler.news}), for the server to log.
  - An attempt that fails (the user's code raised, or killed its process)
    counts against its task; the task is retried, whole batch and all, on
    another worker when there is one, until it has failed C{max_attempts}
    times.  Then the job fails, naming the key the last attempt failed at.
  - With C{skip_bad_records}, only a single record is ever skipped: a map
    task of the first step of one item that failed every attempt is dropped
    and its key reported (a later step's map task maps a whole partition of
    the step before: it fails the job instead).  A batch that failed every
    attempt is split instead, each part a new task with attempts of its
    own: the item it failed at alone, and the rest together; when that item
    is unknown (the process died), into one task per item.  A bad record therefore costs up to twice
    C{max_attempts} attempts, and no good record is ever dropped with it.
  - When nothing is left to hand out, an idle worker gets a backup copy of the
    running task that has run longest (once it has run longer than
    C{backup_after}).  The first attempt to succeed wins; the others are
    cancelled, and the outputs of every attempt but the winner are discarded.
"""

from __future__ import annotations

import enum
import statistics
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final, Protocol

from octotwist.errors import OctotwistError, RemoteProtocolError
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
    SPLIT = "split"  # a batch that failed for good, replaced by smaller tasks


#: The only phase changes there are; L{Scheduler._enter} enforces them.
_TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    # (MAPPING -> MAPPING: a map-only step, then the next step's map.)
    Phase.MAPPING: frozenset({Phase.MAPPING, Phase.REDUCING, Phase.FINISHED, Phase.FAILED}),
    Phase.REDUCING: frozenset({Phase.MAPPING, Phase.FINISHED, Phase.FAILED}),
    Phase.FINISHED: frozenset(),
    Phase.FAILED: frozenset(),
}


# Events: what the server tells the scheduler.


@dataclass(frozen=True, slots=True)
class WorkerJoined:
    worker: str
    slots: int = 1


@dataclass(frozen=True, slots=True)
class WorkerSlots:
    """The worker may hold C{slots} attempts at once from now on (its link wants more)."""

    worker: str
    slots: int


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
    """
    @ivar seconds: how long the attempt ran, as its worker measured it (a
        map batch is sized by that, not by the round trip it also took);
        C{None}: the time from being handed out to now.
    """

    worker: str
    task: TaskId
    attempt: int
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    worker: str
    task: TaskId
    attempt: int
    key: str | None
    error: str
    traceback: str


@dataclass(frozen=True, slots=True)
class AttemptReturned:
    """
    The attempt could not run on this worker for a reason that is neither
    the task's fault nor a failure (it could not open the files it was sent
    by name, and is to be sent their bytes): the task goes back in the
    queue, as if the worker had left, and costs no attempt.
    """

    worker: str
    task: TaskId
    attempt: int


@dataclass(frozen=True, slots=True)
class InputSized:
    """
    The server packed map task C{task}'s input into C{nbytes} bytes: what
    the next batches are sized by (L{Batching.target_bytes}).
    """

    task: TaskId
    nbytes: int


Event = (
    WorkerJoined
    | WorkerLeft
    | WorkerSlots
    | Heard
    | Tick
    | AttemptSucceeded
    | AttemptFailed
    | AttemptReturned
    | InputSized
)


# Decisions: what the scheduler tells the server.


@dataclass(frozen=True, slots=True)
class Assignment:
    """
    Run C{attempt} of C{task}; for a map task of the first step, C{keys}
    are its source keys, in order; for one of a later step, the one task
    of the step before whose output it maps.
    """

    task: TaskId
    attempt: int
    keys: tuple[Any, ...] = ()
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


class SourceError(OctotwistError):
    """The job's source raised; the exception is the C{__cause__}."""


@dataclass(frozen=True, slots=True)
class Origin:
    """
    What a task's input is, the same in every run of the job (a task's
    index is not): for a map task of the first step, its source C{keys};
    for a reduce task, its C{(step, partition)}; for a map task of a later
    step, the origin of the task whose output it maps.  With its kind and
    step, it names the task.
    """

    keys: tuple[Any, ...] = ()
    partition: tuple[int, int] | None = None


class Resumed(Protocol):
    """
    What an earlier run of the job finished (L{octotwist.resume.Resume}).

    @ivar batches: the first step's map tasks that finished, as their keys.
    """

    @property
    def batches(self) -> Sequence[tuple[Any, ...]]: ...

    def restore(self, task: TaskId, origin: Origin) -> bool:
        """
        Whether the task of this C{origin} (now numbered C{task}) finished
        in an earlier run; if so, its outputs are in place under C{task}.
        """


@dataclass(frozen=True, slots=True)
class Batching:
    """
    How many source items a map task carries; see the module docstring.
    With the defaults, 100,000 tiny items on one worker of two processes
    make a few dozen tasks, and files of 64 KB or more go one per task.

    @ivar max_items: most items in one task; C{1} turns batching off.
    @ivar target_bytes: packed input a batch aims at, judged by the average
        packed size of the items read so far.
    @ivar target_seconds: a batch grows only from one that finished within
        this time (to as many items as would have fitted, at most 8 times as
        many), and shrinks toward it from one that took longer.  The time is
        the attempt's as its worker measured it (L{AttemptSucceeded.seconds}:
        a long link's round trip is not the batch's doing), else as the
        scheduler sees it, from being handed out to its success.
    @ivar spread: when the source's size is known, it makes at least this
        many tasks per worker slot, as C{Pool.map}'s default chunksize does
        (C{len / (4 * processes)}): a small job keeps its parallelism, and
        one of a dozen items keeps one item per task.
    """

    max_items: int = 10_000
    target_bytes: int = 64 * 1024
    target_seconds: float = 0.1
    spread: int = 4

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.target_bytes < 1 or self.spread < 1:
            raise ValueError("max_items, target_bytes and spread must be at least 1")
        if not self.target_seconds > 0:
            raise ValueError("target_seconds must be positive")


#: One item per map task, as octo.py had it.
NO_BATCHING: Final = Batching(max_items=1)

#: Most a batch size grows by from one finished task to the next.
_GROWTH: Final = 8


@dataclass(slots=True)
class _Task:
    id: TaskId
    keys: tuple[Any, ...] = ()  # a map task's source keys
    status: TaskStatus = TaskStatus.PENDING
    attempts: int = 0  # attempts started so far
    failures: int = 0
    running: dict[int, str] = field(default_factory=dict)  # live attempt -> worker
    started: dict[int, float] = field(default_factory=dict)  # live attempt -> when
    # Immutable, so that the many tasks that never need one share the empty
    # one: a 1.5 GB job has thousands of tasks and these are rarely set.
    abandoned: frozenset[int] = frozenset()  # cancelled attempts
    failed_on: tuple[str, ...] = ()
    sized: bool = False  # its input's size was counted (L{InputSized})


@dataclass(slots=True)
class _Worker:
    name: str
    slots: int
    last_heard: float = 0.0
    suspect: bool = False  # silent a while: no new work until heard from
    expired: bool = False  # silent past its lease: its attempts were requeued
    running: set[tuple[TaskId, int]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Silence:
    """
    News of a worker's silence: it became suspect after C{seconds} of it,
    or (C{back}) it was heard from again after C{seconds}.
    """

    worker: str
    seconds: float
    back: bool = False


@dataclass(frozen=True, slots=True)
class Counts:
    """
    Progress of one phase; C{total} and C{pending} are C{None} while the
    number of source keys is unknown.

    Map counts are of source I{items} (keys), not of tasks, since a map task
    carries a batch of them: C{total} is C{len(source)} (the number of keys
    drawn, once they ran out), C{done} the items whose task succeeded or was
    skipped, C{running} those of tasks with an attempt running.  Reduce
    counts are of tasks, one per partition.
    """

    done: int
    running: int
    pending: int | None
    total: int | None


def _short_repr(key: Any) -> str:
    """A key as a worker reports it (L{octotwist._child}): its repr, cut at 200 characters."""
    text = repr(key)
    return text if len(text) <= 200 else text[:200] + "..."


def _describe(keys: tuple[Any, ...]) -> str:
    """A failed map task's key, when the worker could not say which it failed at."""
    if len(keys) == 1:
        return _short_repr(keys[0])
    return f"one of {len(keys)}: {_short_repr(keys[0])} ... {_short_repr(keys[-1])}"


def _item_at(keys: tuple[Any, ...], reported: str | None) -> int | None:
    """
    Which of a batch's keys a worker reported as the one it failed at (it
    reports the repr), or C{None} when it did not say or no single key
    matches.
    """
    if reported is None or len(keys) < 2:
        return None
    found = [i for i, key in enumerate(keys) if _short_repr(key) == reported]
    return found[0] if len(found) == 1 else None


class Scheduler:
    """
    Hands out map tasks first-come-first-served, then one reduce task per
    partition, step by step, and says when the job is finished or has
    failed.

    @param keys: the source's keys, drawn a batch at a time as map tasks
        are handed out (with one key of look-ahead, to know when they run
        out).  If iterating them raises, the job fails at once: L{phase}
        becomes C{FAILED}, L{source_error} holds the exception and
        L{failure} stays C{None}.
    @param reduce_tasks: the number of partitions; for a job of several
        steps, each step's, in order, C{0} for a map-only step.
    @param total: the number of keys, when the source knows it (progress,
        and sizing the last batches).
    @param max_attempts: how many times a task may fail before the job fails.
    @param lease: seconds a worker may stay silent before its attempts are
        cancelled and requeued.
    @param suspect_after: seconds a worker may stay silent before it gets
        no new work (it is I{suspect}); at most C{lease}.
    @param skip_bad_records: skip a map task that failed C{max_attempts}
        times instead of failing the job.
    @param backup_after: seconds a task must have run, at least, before an
        idle worker gets a backup copy of it (C{None}: no backup tasks).
        The bar rises to twice the median time of the phase's finished tasks.
    @param batching: how many keys a map task carries (L{Batching}, its
        defaults unless given; L{NO_BATCHING} for one each).
    @param resumed: what an earlier run of the job finished; C{keys} then
        leaves out the keys of its batches.
    """

    def __init__(
        self,
        keys: Iterable[Any],
        reduce_tasks: int | Sequence[int],
        *,
        total: int | None = None,
        max_attempts: int = 1,
        lease: float = float("inf"),
        suspect_after: float = float("inf"),
        skip_bad_records: bool = False,
        backup_after: float | None = None,
        batching: Batching | None = None,
        resumed: Resumed | None = None,
    ) -> None:
        steps = (reduce_tasks,) if isinstance(reduce_tasks, int) else tuple(reduce_tasks)
        if isinstance(reduce_tasks, int) and reduce_tasks < 1:
            raise ValueError("reduce_tasks must be at least 1")
        if not steps or any(p < 0 for p in steps):
            raise ValueError("each step's partitions must be at least 0 (0: a map-only step)")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if lease <= 0:
            raise ValueError("lease must be positive")
        #: Each step's partitions (0: a map-only step).
        self.steps = steps
        #: The step that runs now, from 0.
        self.step = 0
        self.max_attempts = max_attempts
        self.lease = lease
        self.suspect_after = min(suspect_after, lease)
        self._news: list[Silence] = []
        self.skip_bad_records = skip_bad_records
        self.backup_after = backup_after
        self.batching = batching or Batching()
        self.phase = Phase.MAPPING
        self.failure: JobFailure | None = None
        #: What the source raised while its keys were drawn (the job failed).
        self.source_error: Exception | None = None
        self.skipped: list[SkippedRecord] = []
        self.now = 0.0
        self._total = total
        self._lookahead: list[Any] = []
        self._drawn = 0  # keys drawn into tasks
        self._items_done = 0  # keys of map tasks done (or skipped)
        self._open_maps = 0  # map tasks neither done nor split
        self._limit = 1  # the batch size finished tasks vouch for (see _resize)
        self._items_sized = 0  # keys, and bytes, of the inputs the server sized
        self._bytes_sized = 0
        self._maps: list[_Task] = []  # this step's
        self._reduces: list[_Task] = []
        # Every step's tasks, for late reports of a step that is over.
        self._tasks: dict[tuple[TaskKind, int], list[_Task]] = {(TaskKind.MAP, 0): self._maps}
        self._pending: deque[_Task] = deque()  # tasks to (re)run before new keys
        self._workers: dict[str, _Worker] = {}
        self._done = dict.fromkeys(TaskKind, 0)  # tasks done, by kind
        self._durations: dict[TaskKind, list[float]] = {kind: [] for kind in TaskKind}
        self._cancellations: list[Cancellation] = []
        self._resumed = resumed
        for batch in resumed.batches if resumed is not None else ():
            task = self._new_map(tuple(batch))
            self._drawn += len(task.keys)
            if self._was_done(task):
                self._restored(task)
            else:  # (what the journal had of it was lost): it runs again
                self._pending.append(task)
        try:
            self._keys: Iterator[Any] = iter(keys)
            self._lookahead.extend(islice(self._keys, 1))
        except Exception as e:
            self._keys = iter(())
            self._source_failed(e)
        else:
            self._advance()

    @property
    def reduce_tasks(self) -> int:
        """The partitions of this step's map output (0: a map-only step)."""
        return self.steps[self.step]

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
            case WorkerSlots(worker, slots):
                self._worker(worker).slots = max(1, slots)
            case WorkerLeft(worker):
                gone = self._worker(worker)
                for task_id, attempt in sorted(gone.running, key=str):
                    self._release(self._task(task_id), attempt)
                del self._workers[worker]
            case Heard(worker, now):
                w = self._worker(worker)
                self.now = max(self.now, now)
                if w.suspect:
                    self._news.append(Silence(worker, now - w.last_heard, back=True))
                w.last_heard = now
                w.suspect = w.expired = False
            case Tick(now):
                self.now = max(self.now, now)
                self._suspect_the_silent()
                self._expire_leases()
            case AttemptSucceeded(worker, task_id, attempt, ran):
                task = self._reported_attempt(worker, task_id, attempt)
                if task is None or task.status is TaskStatus.DONE or self.done:
                    if task is not None:
                        self._forget(task, attempt)
                    return Verdict.DISCARDED
                seconds = self.now - task.started[attempt]
                self._durations[task_id.kind].append(seconds)
                if task_id.kind is TaskKind.MAP:
                    self._resize(len(task.keys), seconds if ran is None else ran)
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
                reported = key
                if key is None and task_id.kind is TaskKind.MAP:
                    key = _describe(task.keys)  # e.g. the process died: we know that much
                if task.failures < self.max_attempts:
                    self._requeue_if_idle(task)
                elif self.skip_bad_records and task_id.kind is TaskKind.MAP and task_id.step == 0:
                    if len(task.keys) > 1:
                        self._split(task, _item_at(task.keys, reported))
                    else:
                        self.skipped.append(SkippedRecord(task_id, key, error, task.attempts))
                        self._complete(task, "the task is skipped")
                else:
                    self.failure = JobFailure(
                        task_id, key, worker, error, tb, task.attempts, tuple(task.failed_on)
                    )
                    self._enter(Phase.FAILED)
            case AttemptReturned(worker, task_id, attempt):
                task = self._reported_attempt(worker, task_id, attempt)
                if task is not None and task.status is not TaskStatus.DONE and not self.done:
                    self._release(task, attempt)
                elif task is not None:
                    self._forget(task, attempt)
            case InputSized(task_id, nbytes):
                task = self._task(task_id)
                first_map = task_id.kind is TaskKind.MAP and task_id.step == 0
                if first_map and not task.sized and nbytes >= 0:
                    task.sized = True
                    self._items_sized += len(task.keys)
                    self._bytes_sized += nbytes
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
        if self.done:  # the source raised as its next keys were drawn
            return NO_WORK
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
        return Assignment(task.id, task.attempts, task.keys, backup)

    def news(self) -> list[Silence]:
        """Workers that fell silent or were heard again since the last call (and forget them)."""
        out, self._news = self._news, []
        return out

    def is_suspect(self, worker: str) -> bool:
        """Whether C{worker} has been silent a while (it gets no new work)."""
        return self._worker(worker).suspect

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

    def origin(self, task_id: TaskId) -> Origin:
        """
        What C{task_id}'s input is, the same in every run (see L{Origin}):
        a later step's map task is followed back to the task it maps.
        """
        task = self._task(task_id)
        while task.id.kind is TaskKind.MAP and task.id.step > 0:
            task = self._task(task.keys[0])
        if task.id.kind is TaskKind.REDUCE:
            return Origin(partition=(task.id.step, task.id.index))
        return Origin(keys=task.keys)

    def is_done(self, task: TaskId) -> bool:
        """Whether C{task} has succeeded (its output counts)."""
        return self._task(task).status is TaskStatus.DONE

    def keys(self, task: TaskId) -> tuple[Any, ...]:
        """A map task's keys (L{Assignment.keys}); C{()} for a reduce task."""
        return self._task(task).keys

    def output_tasks(self, step: int | None = None) -> list[TaskId]:
        """
        The tasks whose outputs are C{step}'s results (by default the last
        step's: the job's), in order: its reduce tasks, or, for a map-only
        step, its map tasks that succeeded.  Complete once the step is done.
        """
        step = len(self.steps) - 1 if step is None else step
        if self.steps[step]:
            tasks = self._tasks.get((TaskKind.REDUCE, step), [])
        else:
            tasks = self._tasks.get((TaskKind.MAP, step), [])
        return [t.id for t in tasks if t.status is TaskStatus.DONE]

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.FAILED)

    def workers(self) -> list[str]:
        return list(self._workers)

    def running(self, worker: str) -> list[tuple[TaskId, int]]:
        """The attempts C{worker} is running, in task order."""
        return sorted(self._worker(worker).running, key=lambda r: (r[0].index, r[1]))

    def counts(self, kind: TaskKind) -> Counts:
        """Progress of one phase: map items, or reduce tasks (see L{Counts})."""
        total: int | None
        if kind is TaskKind.REDUCE:
            done = self._done[kind]
            running = sum(t.status is TaskStatus.RUNNING for t in self._reduces)
            total = self.reduce_tasks
        else:
            done = self._items_done
            running = sum(len(t.keys) for t in self._maps if t.status is TaskStatus.RUNNING)
            # Once every key has been drawn, the count is known for sure.
            total = self._drawn if not self._lookahead else self._total
        pending = None if total is None else total - done - running
        return Counts(done, running, pending, total)

    # Internals.

    def _enter(self, phase: Phase) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise AssertionError(f"illegal phase change {self.phase} -> {phase}")
        self.phase = phase
        if phase is Phase.REDUCING:
            self._reduces = [
                _Task(TaskId(TaskKind.REDUCE, p, self.step)) for p in range(self.reduce_tasks)
            ]
            self._tasks[(TaskKind.REDUCE, self.step)] = self._reduces
            for task in self._reduces:
                if self._was_done(task):
                    self._restored(task)
                else:
                    self._pending.append(task)
        if self.done:  # nothing running matters any more
            for task in (*self._maps, *self._reduces):
                self._cancel_all(task, f"the job is {phase.value}")

    def _advance(self) -> None:
        """
        Move to the next phase when the current one has nothing left, as
        many times as it takes: in a job that resumes, a whole phase may
        have been done before.
        """
        while True:
            at = (self.phase, self.step)
            if self.phase is Phase.MAPPING and not self._lookahead and not self._open_maps:
                if not self._maps:  # nothing to map: nothing comes of any later step either
                    self._enter(Phase.FINISHED)
                elif self.reduce_tasks:
                    self._enter(Phase.REDUCING)
                else:
                    self._next_step()
            if self.phase is Phase.REDUCING and self._done[TaskKind.REDUCE] == len(self._reduces):
                self._next_step()
            if (self.phase, self.step) == at:
                return

    def _next_step(self) -> None:
        """This step is done: map its outputs in the next step's MAPPING, or finish."""
        if self.step + 1 == len(self.steps):
            self._enter(Phase.FINISHED)
            return
        producers = self.output_tasks(self.step)
        self.step += 1
        self._maps, self._reduces = [], []
        self._tasks[(TaskKind.MAP, self.step)] = self._maps
        # One map task per producer, made now: its output was sized by the
        # step that made it, and the server forwards it as it is.
        self.batching = NO_BATCHING
        self._keys, self._lookahead = iter(()), []
        self._total = self._drawn = len(producers)
        self._items_done = self._open_maps = 0
        self._limit, self._items_sized, self._bytes_sized = 1, 0, 0
        self._done = dict.fromkeys(TaskKind, 0)
        self._durations = {kind: [] for kind in TaskKind}
        for producer in producers:
            task = self._new_map((producer,))
            if self._was_done(task):
                self._restored(task)
            else:
                self._pending.append(task)
        self._enter(Phase.MAPPING)

    def _was_done(self, task: _Task) -> bool:
        """Whether an earlier run finished C{task} (its outputs are then in place)."""
        return self._resumed is not None and self._resumed.restore(task.id, self.origin(task.id))

    def _restored(self, task: _Task) -> None:
        """C{task} finished in an earlier run: it is done without running."""
        task.status = TaskStatus.DONE
        self._done[task.id.kind] += 1
        if task.id.kind is TaskKind.MAP:
            self._open_maps -= 1
            self._items_done += len(task.keys)

    def _complete(self, task: _Task, why: str) -> None:
        task.status = TaskStatus.DONE
        self._done[task.id.kind] += 1
        if task.id.kind is TaskKind.MAP:
            self._open_maps -= 1
            self._items_done += len(task.keys)
        self._cancel_all(task, why)
        self._advance()

    def _split(self, task: _Task, item: int | None) -> None:
        """
        Replace a batch that failed every attempt by new tasks: the item it
        failed at alone and the rest together, or, when that item is not
        known, one task per item.
        """
        keys = task.keys
        if item is None:
            parts = [(key,) for key in keys]
        else:
            parts = [keys[:item] + keys[item + 1 :], keys[item : item + 1]]
        task.status = TaskStatus.SPLIT
        self._open_maps -= 1
        self._cancel_all(task, "the task is split")
        new = [self._new_map(part) for part in parts]
        self._pending.extendleft(reversed(new))

    def _new_map(self, keys: tuple[Any, ...]) -> _Task:
        task = _Task(TaskId(TaskKind.MAP, len(self._maps), self.step), keys)
        self._maps.append(task)
        self._open_maps += 1
        return task

    def _resize(self, items: int, seconds: float) -> None:
        """Let batches grow after a quick task of C{items}, or shrink after a slow one."""
        b = self.batching
        if seconds <= b.target_seconds:
            # As many items as would have fitted in the target time, but at
            # most _GROWTH times as many: a quick task of few items says
            # little about the time of many.
            grow = _GROWTH if seconds <= 0 else min(_GROWTH, b.target_seconds / seconds)
            self._limit = max(self._limit, min(b.max_items, int(items * grow)))
        elif items * _GROWTH >= self._limit:
            # A slow task of far fewer items than batches have now is an old
            # one that waited (for a process to start, say): no evidence.
            self._limit = max(1, min(self._limit, int(items * b.target_seconds / seconds)))

    def _batch_size(self) -> int:
        """How many keys the next new map task takes (see L{Batching})."""
        b = self.batching
        n = min(b.max_items, self._limit)
        if n > 1 and self._bytes_sized:
            n = min(n, b.target_bytes * self._items_sized // self._bytes_sized)
        if n > 1 and self._total is not None:
            slots = sum(w.slots for w in self._workers.values() if not w.suspect) or 1
            n = min(n, -(-self._total // (b.spread * slots)))
        return max(1, n)

    def _draw(self, n: int) -> tuple[Any, ...] | None:
        """
        The next C{n} keys at most (and the look-ahead refilled), or C{None}
        when iterating the source raised: then the job has failed.
        """
        keys, self._lookahead = self._lookahead, []
        try:
            if n > len(keys):
                keys.extend(islice(self._keys, n - len(keys)))
            self._lookahead.extend(islice(self._keys, 1))
        except Exception as e:
            self._source_failed(e)
            return None
        self._drawn += len(keys)
        return tuple(keys)

    def _source_failed(self, error: Exception) -> None:
        self.source_error = error
        self._lookahead = []
        self._enter(Phase.FAILED)

    def _cancel_all(self, task: _Task, why: str) -> None:
        for attempt, worker in list(task.running.items()):
            self._forget(task, attempt)
            task.abandoned |= {attempt}
            self._cancellations.append(Cancellation(worker, task.id, attempt, why))

    def _suspect_the_silent(self) -> None:
        for w in self._workers.values():
            if not w.suspect and self.now - w.last_heard > self.suspect_after:
                w.suspect = True
                self._news.append(Silence(w.name, self.now - w.last_heard))

    def _expire_leases(self) -> None:
        for w in self._workers.values():
            if w.expired or self.now - w.last_heard <= self.lease:
                continue
            w.expired = True
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
            keys = self._draw(self._batch_size())
            return None if keys is None else self._new_map(keys)
        return None

    def _someone_else_for(self, task: _Task, worker: str) -> bool:
        return any(
            name != worker and name not in task.failed_on and not w.suspect
            for name, w in self._workers.items()
        )

    def _backup_candidate(self, worker: str) -> _Task | None:
        """
        The longest-running task with a single attempt elsewhere, if slow
        enough; first, and at once, one whose attempt is on a suspect
        worker (silent: it may never report, and the lease is long).
        """
        if self.backup_after is None or self._pending or self._lookahead:
            return None
        tasks = self._maps if self.phase is Phase.MAPPING else self._reduces
        kind = TaskKind.MAP if self.phase is Phase.MAPPING else TaskKind.REDUCE
        durations = self._durations[kind]
        bar = max(self.backup_after, 2 * statistics.median(durations) if durations else 0.0)
        best: _Task | None = None
        best_start = self.now - bar
        stranded: _Task | None = None
        stranded_start = float("inf")
        for task in tasks:
            if task.status is not TaskStatus.RUNNING or len(task.running) != 1:
                continue
            ((attempt, owner),) = task.running.items()
            if owner == worker:
                continue
            started = task.started[attempt]
            holder = self._workers.get(owner)
            if holder is not None and holder.suspect:
                if started < stranded_start:
                    stranded, stranded_start = task, started
            elif started <= best_start:
                best, best_start = task, started
        return stranded or best

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
        tasks = self._tasks.get((task_id.kind, task_id.step), [])
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

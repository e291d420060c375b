"""
The server: Twisted glue between transports, the scheduler and the store.

L{JobServer} owns a L{Scheduler} and a L{BlobStore}.  Each authenticated
connection gets a L{_WorkerSession}; sessions turn messages into scheduler
events, and the server turns the scheduler's decisions into messages.  When
the scheduler says the job is finished, the server decodes the last step's
outputs and calls the job's C{final()} (or writes C{key<TAB>value} lines),
tells every worker to shut down, and fires L{JobServer.result}.  Between two
steps it forwards one task's output blobs to the next step's map task as
they are, never decoding them.

An attempt's counters (L{octotwist.counters}) are added to the job's only
when the scheduler accepts the attempt; what its code printed is logged as
C{[map 17 attempt 1 on w2] text} and kept for the status page, for every
attempt that reports it.

One peer cannot stop the job.  Every message has had its field types checked
by the codec; here its values are checked too (a Hello with no slots, output
for an attempt the worker was never given), and whatever goes wrong while
one peer's message is handled, a refusal or a bug, closes that peer's
connection alone: its tasks go back in the queue and the job goes on.  The
timers and the status page keep working through any error.  What cannot be
retried away (a spill file that cannot be written) fails the job instead.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from octotwist import codec, counters, messages
from octotwist._child import user_traceback
from octotwist.config import FaultPolicy
from octotwist.errors import OctotwistError, RemoteProtocolError
from octotwist.job import Job
from octotwist.journal import FinishedTask, Journal, JournalError
from octotwist.machine import local_address, same_machine
from octotwist.messages import TaskId, TaskKind
from octotwist.ordering import sorted_order
from octotwist.outbox import Outbox
from octotwist.output import Results, stdout
from octotwist.resume import Resume
from octotwist.scheduler import (
    NO_WORK,
    Assignment,
    AttemptFailed,
    AttemptReturned,
    AttemptSucceeded,
    Heard,
    InputSized,
    Phase,
    Scheduler,
    Tick,
    Verdict,
    WorkerJoined,
    WorkerLeft,
    WorkerSlots,
)
from octotwist.sources import UNREACHABLE, Files, Lines, item
from octotwist.store import BlobStore, SpillError
from octotwist.timeline import Timeline, eta
from octotwist.transport import MessageChannel

_log = Logger()

#: Reduce partitions when neither the job nor the command line says.
DEFAULT_REDUCE_TASKS = 8
#: The most tasks a worker's process holds ahead of the one it runs, however
#: long its link (each holds its input in the worker's memory).
MAX_AHEAD = 8
#: Heartbeat intervals a worker may miss before it is suspect, and gets no
#: new task until it is heard from (a busy link delays a beat; two and a
#: half missed are a silence worth acting on).
SUSPECT_AFTER_BEATS = 2.5
#: Failed attempts the status page keeps (the newest).
MAX_FAILURES_SHOWN = 50
#: Most tasks a worker may say it runs at once (C{octo client -p}), and most
#: it may ask to have queued: far more than a machine has cores.  A Hello
#: past it is nonsense, and would hand one worker every task.
MAX_SLOTS = 4096
#: Longest worker name, host name or machine id a Hello may carry.
MAX_NAME = 200
#: What the server keeps of a failed attempt's error line and key, and of
#: its traceback (each is kept for the status page and the job's failure).
MAX_ERROR_TEXT = 2000
MAX_TRACEBACK = 64 * 1024
#: What the server keeps of an attempt's printed output (the worker keeps
#: the last 64 KiB: L{octotwist._child.MAX_PRINTED}), and how many attempts'
#: output the status page shows (the newest).
MAX_PRINTED = 80 * 1024
MAX_PRINTED_SHOWN = 50
#: Most distinct counters a job keeps (a task keeps at most 1000 of its own).
MAX_JOB_COUNTERS = 10_000


@dataclass
class JobOutcome:
    """How the job ended."""

    ok: bool
    error: str | None = None
    results: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


class JobServer:
    """
    Runs one job for whichever workers connect.

    @param job: the loaded job.
    @param reactor: for timers.
    @param reduce_tasks: partitions, overriding the job's C{reduce_tasks}.
    @param output: where results go when the job has no C{final()}
        (standard output by default); it is committed or aborted as the
        job ends.
    @param policy: retries, leases and backup tasks.
    @param sort: hand C{final()} (or the output) the results in key order
        (L{octotwist.ordering.sorted_order}), rather than partition by partition as each
        reduce task ends.
    @param journal: the state directory's journal (C{--state-dir}): every
        task that counts is recorded there, and what an earlier run of the
        same job (L{octotwist.resume.fingerprint}) finished is not run again.
    @param fingerprint: what names the job in the journal.
    @param stays: the server outlives the job (C{octo serve}): its
        workers are told to come back for the next one.
    """

    def __init__(
        self,
        job: Job,
        reactor: IReactorTime,
        *,
        reduce_tasks: int | None = None,
        output: Results | None = None,
        store: BlobStore | None = None,
        policy: FaultPolicy | None = None,
        sort: bool = True,
        progress_interval: float = 10.0,
        journal: Journal | None = None,
        fingerprint: str = "",
        stays: bool = False,
    ) -> None:
        self.job = job
        self.reactor = reactor
        self.stays = stays
        default = reduce_tasks or job.reduce_tasks or DEFAULT_REDUCE_TASKS
        steps = job.functions.steps
        #: Each step's partitions: its own reduce_tasks, else the default;
        #: 0 for a map-only step.
        self.partitions = tuple(
            0 if step.reducefn is None else step.reduce_tasks or default for step in steps
        )
        self.output = output if output is not None else stdout()
        self.store = store if store is not None else BlobStore()
        self.policy = policy = policy or FaultPolicy()
        self.sort = sort
        skip = policy.skip_bad_records
        if skip and isinstance(job.source, Lines):
            # One item of lines() is a range of many lines: skipping one
            # would drop all of them.
            _log.warn(
                "--skip-bad-records does not skip ranges of a lines() source (each holds many "
                "records): a range that fails every attempt fails the job"
            )
            skip = False
        #: The job's counters: the totals of the attempts that counted.
        self.counters: dict[str, int] = {}
        self._counters_full = False
        #: The job's journal, when it has a state directory.
        self.resume: Resume | None = None
        #: Later steps' map tasks restored whose inputs the store still holds.
        self._inputs_done: list[TaskId] = []
        self._keep_progress = False
        self._own_workers = False
        keys: Iterable[Any] = job.source
        if journal is not None:
            self.resume = Resume.start(journal, fingerprint, job.name, self.partitions)
            self.resume.restorer = self._restore
            keys = self.resume.remaining(job.source)
        self.scheduler = Scheduler(
            keys,
            self.partitions,
            total=job.source_size(),
            max_attempts=policy.max_attempts,
            lease=policy.task_timeout,
            suspect_after=SUSPECT_AFTER_BEATS * policy.heartbeat,
            skip_bad_records=skip,
            backup_after=policy.backup_after,
            resumed=self.resume,
        )
        self._forget_inputs()
        self.result: Deferred[JobOutcome] = Deferred()
        self._sessions: dict[str, _WorkerSession] = {}
        self._all_sessions: set[_WorkerSession] = set()
        self._started = reactor.seconds()
        #: Every attempt and the job's figures over time (the status page's task stream).
        self.timeline = Timeline(self._started)
        #: When each phase of each step sent its first task (for its ETA).
        self._phase_began: dict[tuple[str, int], float] = {}
        self._welcome = messages.Welcome(
            job.name,
            job.pickled_functions,
            self.partitions[0] or 1,
            policy.heartbeat,
            self.partitions if len(steps) > 1 or not self.partitions[0] else (),
            stays,
        )
        self._ticker = LoopingCall(self._tick)
        self._last_tick: float | None = None
        self._ticker.clock = reactor
        self._outcome: JobOutcome | None = None
        self._progress = LoopingCall(self._log_progress)
        self._progress.clock = reactor
        self._progress_interval = progress_interval
        self._waiting_logged = False
        #: Log a progress line every C{progress_interval} seconds (turned off
        #: while live progress bars show the same).
        self.log_progress = True
        #: Failed attempts, newest last (for the status page); bounded.
        self.failures: deque[dict[str, Any]] = deque(maxlen=MAX_FAILURES_SHOWN)
        self.bytes_received = 0
        #: Task input sent to workers (map inputs, reduce inputs), and of
        #: it the first step's map inputs, read from the source.
        self.bytes_sent = 0
        self.map_input_bytes = 0
        #: What attempts printed, newest last (for the status page); bounded.
        self.printed: deque[dict[str, Any]] = deque(maxlen=MAX_PRINTED_SHOWN)
        self._results = 0  # written so far
        self._written = 0  # partitions written (to an output that takes early writes)
        self._finishing: list[Callable[[], None]] = []
        self._output_begun = False
        #: The results' reader went away as they were delivered (a closed pipe).
        self.output_gone = False
        self._bug_logged = False

    def before_final(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once, just before the results go to C{final()} (or
        the output): a live progress display must stop drawing before the
        job's own output starts.
        """
        self._finishing.append(callback)

    def start(self, workers_coming: bool = False) -> None:
        """
        Begin: log progress now and then; finish at once for an empty job.

        @param workers_coming: our own workers are on their way (C{octo
            run}): do not tell the user that we wait for some.
        """
        maps = self.scheduler.counts(TaskKind.MAP).total
        reduces = ", then ".join(
            f"{p} reduce task{'' if p == 1 else 's'}" if p else "no reduce" for p in self.partitions
        )
        _log.info(
            "job {job}: {maps} to map, {reduces}{steps}{waiting}",
            job=self.job.name,
            maps="an unknown number of source keys"
            if maps is None
            else f"{maps} source key{'' if maps == 1 else 's'}",
            reduces=reduces,
            steps=f" ({len(self.partitions)} steps)" if len(self.partitions) > 1 else "",
            waiting="" if workers_coming else "; waiting for workers",
        )
        if self.resume is not None:
            self._log_resumed(self.resume)
        self._waiting_logged = workers_coming
        self._own_workers = workers_coming
        if self._progress_interval > 0 and self.log_progress:
            self._progress.start(self._progress_interval, now=False)
        self._ticker.start(min(1.0, self.policy.heartbeat), now=True)
        self._check_done()

    # Called by transports.

    def accept(self, channel: MessageChannel) -> _WorkerSession:
        """The C{accept} callable handed to a L{TaskServer}."""
        session = _WorkerSession(self, channel)
        self._all_sessions.add(session)
        if self._outcome is not None:
            channel.send(messages.Shutdown(self._outcome.ok, "the job is over", self.stays))
            channel.close()
        else:
            channel.send(self._welcome)
        return session

    # Called by sessions.

    def joined(self, session: _WorkerSession, hello: messages.Hello) -> None:
        """
        A worker said Hello: it becomes a worker of the scheduler, and only
        then one of ours (C{session.name} is set), so that no session ever
        names a worker the scheduler does not know.

        @raise RemoteProtocolError: the Hello makes no sense.
        """
        _check_hello(hello)
        name = hello.name
        n = 1
        while name in self._sessions:
            n += 1
            name = f"{hello.name}#{n}"
        self.scheduler.handle(WorkerJoined(name, hello.slots + hello.prefetch))
        self.timeline.joined(name, hello.slots)
        session.slots = hello.slots + hello.prefetch
        self._sessions[name] = session
        session.name, session.hello = name, hello
        self.scheduler.handle(Heard(name, self.reactor.seconds()))
        # The same kernel (boot id), and a connection from its own network
        # stack: containers and namespaces share the first, not the second.
        session.same_machine = same_machine(hello.machine) and (
            local_address(session.channel.peer_address) is not False
        )
        _log.info(
            "worker {worker} joined from {peer} ({slots} process{es}{here})",
            worker=name,
            peer=session.channel.peer,
            slots=hello.slots,
            es="" if hello.slots == 1 else "es",
            here=", on this machine" if session.same_machine else "",
        )
        self._dispatch()

    def left(self, session: _WorkerSession, reason: str) -> None:
        self._all_sessions.discard(session)
        name = session.name
        if name is None or self._sessions.get(name) is not session:
            return
        del self._sessions[name]
        if self.finished:
            return
        lost = self.scheduler.running(name)
        self.scheduler.handle(WorkerLeft(name))
        for task, attempt in lost:
            self.store.discard(task, attempt)
            self.timeline.ended(task, attempt, self.reactor.seconds(), "lost", why=reason)
        self._cancel()
        _log.warn(
            "worker {worker} left ({reason}); {n} running task{s} go{es} back in the queue",
            worker=name,
            reason=reason,
            n=len(lost),
            s="" if len(lost) == 1 else "s",
            es="es" if len(lost) == 1 else "",
        )
        self._dispatch()

    def heard(self, name: str) -> None:
        self.scheduler.handle(Heard(name, self.reactor.seconds()))
        self._tell_silences()

    def _tell_silences(self) -> None:
        """Say, once each, which workers fell silent and which are back."""
        for news in self.scheduler.news():
            if news.back:
                _log.info(
                    "worker {worker} is back, after {t:.1f} s of silence",
                    worker=news.worker,
                    t=news.seconds,
                )
            elif not self.scheduler.done:
                _log.warn(
                    "worker {worker} silent for {t:.0f} s; no new task for it until it is "
                    "heard from (its running tasks go to others after {lease:g} s)",
                    worker=news.worker,
                    t=news.seconds,
                    lease=self.policy.task_timeout,
                )

    def task_output(self, name: str, msg: messages.TaskOutput) -> None:
        """
        Store one part of an attempt's output.

        @raise RemoteProtocolError: the worker was never given this attempt.
        """
        # Output of a cancelled or expired attempt can never count: drop it
        # now rather than store it.
        if not self.scheduler.accepts_output(name, msg.task, msg.attempt):
            return
        try:
            self.store.add_part(msg.task, msg.attempt, msg.partition, msg.data, msg.end)
        except SpillError as e:
            # Every retry would fill the same disk: fail now, once.
            self._fail(str(e))

    def task_done(self, name: str, msg: messages.TaskDone) -> None:
        _check_counters(msg.counters)
        task = msg.task
        session = self._sessions[name]
        session.sent_by_name.discard((task, msg.attempt))
        self._measure_link(name, session, msg)
        verdict = self.scheduler.handle(AttemptSucceeded(name, task, msg.attempt, msg.seconds))
        self.timeline.ended(
            task,
            msg.attempt,
            self.reactor.seconds(),
            "ok" if verdict is Verdict.ACCEPTED else "superseded",
            msg.seconds,
            records_in=msg.records_in,
            records_out=msg.records_out,
            counters=dict(msg.counters),
            output=msg.output,
            process=msg.process,
        )
        self._printed(name, task, msg.attempt, msg.output)
        if verdict is Verdict.ACCEPTED:
            shuffled = task.kind is TaskKind.MAP and self.partitions[task.step] > 0
            if self.resume is not None and not self._journal(task, msg, shuffled):
                return
            nbytes = self.store.commit(task, msg.attempt, by_task=not shuffled)
            self._count(msg.counters)
            if shuffled:
                self._count((("octotwist.bytes_shuffled", nbytes),))
            if task.kind is TaskKind.MAP and task.step > 0:
                # The output it mapped, of the step before, is not needed again.
                for producer in self.scheduler.keys(task):
                    self.store.forget(producer)
            if task.kind is TaskKind.REDUCE:
                # Its input is no longer needed (an attempt still sending it
                # holds what it reads).
                self.store.drop(task.index, task.step)
                if (
                    self.output.early
                    and self.job.final is None
                    and not self.sort
                    and task.step == len(self.partitions) - 1
                ):
                    try:
                        self._write_results(self._reduces_done_in_order())
                    except Exception as e:  # a full disk, a key str() cannot encode
                        self._fail(f"cannot write the results: {type(e).__name__}: {e}")
                        return
        else:
            self.store.discard(msg.task, msg.attempt)
        self._after_change()

    def _measure_link(self, name: str, session: _WorkerSession, msg: messages.TaskDone) -> None:
        """
        Keep as many tasks in flight to a worker as its link needs: each of
        its processes should find its next task there when it finishes one,
        so a process holds 1 + (round trip / task time) of them, not one
        ahead (the LAN's).  The round trip is what a task took here beyond
        what it took there, the least of the last few (a task that waited
        behind another took longer); the task time, their median.
        """
        sent = session.sent_at.pop((msg.task, msg.attempt), None)
        hello = session.hello
        if sent is None or hello is None:
            return
        session.round_trips.append(max(0.0, self.reactor.seconds() - sent - msg.seconds))
        session.task_seconds.append(msg.seconds)
        rtt = min(session.round_trips)
        work = max(statistics.median(session.task_seconds), 0.001)
        ahead = min(MAX_AHEAD, math.ceil(rtt / work))  # (0 on a LAN: the worker's own)
        slots = max(hello.slots + hello.prefetch, hello.slots * (1 + ahead))
        if slots != session.slots:
            session.slots = slots
            self.scheduler.handle(WorkerSlots(name, slots))
            _log.debug(
                "worker {worker}: {rtt:.0f} ms round trips, {work:.0f} ms tasks: "
                "{slots} tasks in flight",
                worker=name,
                rtt=rtt * 1000,
                work=work * 1000,
                slots=slots,
            )

    def _journal(self, task: TaskId, msg: messages.TaskDone, shuffled: bool) -> bool:
        """
        Record an accepted attempt in the journal before it counts here,
        so that what counted survives us; C{False}: the journal could not
        take it (a full disk), and the job has failed saying where.
        """
        assert self.resume is not None
        outputs = self.store.staged(task, msg.attempt)
        counts = list(msg.counters)
        if shuffled:
            size = sum(len(blob) for blobs in outputs.values() for blob in blobs)
            counts.append(("octotwist.bytes_shuffled", size))
        try:
            files = self.resume.record(task, self.scheduler.origin(task), outputs, counts)
        except JournalError as e:
            self.store.discard(task, msg.attempt)
            self._fail(str(e))
            return False
        self.store.moved(task, msg.attempt, files)
        return True

    def _restore(self, task: TaskId, done: FinishedTask) -> None:
        """
        A task an earlier run finished (L{Resume.restore}): its outputs and
        counters count as an accepted attempt's do, from the state directory.
        """
        shuffled = task.kind is TaskKind.MAP and self.partitions[task.step] > 0
        self.store.restore(task, done.blobs, by_task=not shuffled)
        self._count(done.counters)
        if task.kind is TaskKind.REDUCE:
            self.store.drop(task.index, task.step)
        elif task.step > 0:
            # Called by the scheduler as it makes the task: what it maps is
            # forgotten once the scheduler is ours to ask (_forget_inputs).
            self._inputs_done.append(task)

    def _forget_inputs(self) -> None:
        """Forget the inputs of later steps' map tasks that were restored."""
        while self._inputs_done:
            for producer in self.scheduler.keys(self._inputs_done.pop()):
                self.store.forget(producer)

    def _log_resumed(self, resume: Resume) -> None:
        for note in resume.dropped:
            _log.warn("{note}", note=note)
        if not resume.resumed:
            return
        maps, reduces = resume.restored[TaskKind.MAP], resume.restored[TaskKind.REDUCE]
        _log.info(
            "resuming job {job} from {directory}: {maps} map task{ms} and {reduces} reduce "
            "task{rs} finished before its server stopped, and are not run again",
            job=self.job.name,
            directory=str(resume.journal.directory),
            maps=maps,
            ms="" if maps == 1 else "s",
            reduces=reduces,
            rs="" if reduces == 1 else "s",
        )

    def task_failed(self, name: str, msg: messages.TaskFailed) -> None:
        session = self._sessions[name]
        named = (msg.task, msg.attempt) in session.sent_by_name
        session.sent_by_name.discard((msg.task, msg.attempt))
        if named and msg.error.startswith(UNREACHABLE):
            self._cannot_read_files(name, session, msg)
            return
        # Kept for the status page and the job's failure: bounded, whatever
        # the worker sent.
        msg = messages.TaskFailed(
            msg.task,
            msg.attempt,
            None if msg.key is None else _clip(msg.key, MAX_ERROR_TEXT),
            _clip(msg.error, MAX_ERROR_TEXT),
            _clip(msg.traceback, MAX_TRACEBACK),
            msg.output,
            msg.process,
        )
        live = self.scheduler.is_live(name, msg.task, msg.attempt)
        self.scheduler.handle(
            AttemptFailed(name, msg.task, msg.attempt, msg.key, msg.error, msg.traceback)
        )
        self._printed(name, msg.task, msg.attempt, msg.output)
        self.store.discard(msg.task, msg.attempt)
        self.timeline.ended(
            msg.task,
            msg.attempt,
            self.reactor.seconds(),
            "failed",
            key=msg.key,
            error=msg.error,
            traceback=msg.traceback,
            output=msg.output,
            process=msg.process,
        )
        if live:
            self.failures.append(
                {
                    "task": str(msg.task),
                    "attempt": msg.attempt,
                    "worker": name,
                    "key": None if msg.key is None else str(msg.key),
                    "error": msg.error,
                    "traceback": msg.traceback,
                    "elapsed": round(self.reactor.seconds() - self._started, 3),
                }
            )
            _log.error(
                "{task} attempt {attempt} failed on worker {worker}{at}: {error}",
                task=str(msg.task),
                attempt=msg.attempt,
                worker=name,
                at=f" at key {msg.key}" if msg.key is not None else "",
                error=msg.error,
            )
        self._after_change()

    def _cannot_read_files(
        self, name: str, session: _WorkerSession, msg: messages.TaskFailed
    ) -> None:
        """
        A worker sent a file's path could not open it (it runs in a
        container, as another user, or on another machine that looked like
        this one): from now on it gets the files' bytes, and the attempt
        goes back in the queue at no cost.
        """
        self.scheduler.handle(AttemptReturned(name, msg.task, msg.attempt))
        self._printed(name, msg.task, msg.attempt, msg.output)
        self.store.discard(msg.task, msg.attempt)
        if session.reads_files:  # (the other tasks sent by name come back too)
            session.reads_files = False
            _log.warn(
                "worker {worker} cannot open the job's files ({error}); sending it their bytes",
                worker=name,
                error=msg.error.removeprefix(UNREACHABLE).strip(),
            )
        self._after_change()

    def _count(self, counts: Iterable[tuple[str, int]]) -> None:
        """Add an accepted attempt's counters to the job's."""
        totals = self.counters
        for name, n in counts:
            if name in totals:
                totals[name] += n
            elif len(totals) < MAX_JOB_COUNTERS:
                totals[name] = n
            elif not self._counters_full:
                self._counters_full = True
                _log.warn(
                    "the job has {n} counters; new ones (such as {name!r}) are not kept: a "
                    "counter per key is data, to emit as a pair",
                    n=MAX_JOB_COUNTERS,
                    name=name[:60],
                )

    def _printed(self, name: str, task: TaskId, attempt: int, text: str) -> None:
        """Log what an attempt's code printed, and keep it for the status page."""
        if not text:
            return
        text = _clip(text, MAX_PRINTED)
        self.printed.append(
            {
                "task": str(task),
                "attempt": attempt,
                "worker": name,
                "text": text,
                "elapsed": round(self.reactor.seconds() - self._started, 3),
            }
        )
        prefix = f"[{task} attempt {attempt} on {name}]"
        for line in text.splitlines():
            _log.info("{prefix} {line}", prefix=prefix, line=line, printed=True)

    def _tick(self) -> None:
        # A LoopingCall stops for good at the first exception: never let one out.
        try:
            self._on_tick()
        except Exception:
            self._bug(Failure(), "the server's timer")

    def _on_tick(self) -> None:
        now = self.reactor.seconds()
        last, self._last_tick = self._last_tick, now
        if last is not None and now - last > self.policy.heartbeat + 1.0:
            # Our own reactor was blocked (a slow source read, say): the
            # workers' heartbeats sit unread in socket buffers, so their
            # silence says nothing about them.  Count them as heard.
            _log.warn(
                "the server was busy for {t:.1f} s; not holding it against the workers",
                t=now - last,
            )
            for name in self._sessions:
                self.scheduler.handle(Heard(name, now))
        self.scheduler.handle(Tick(now))
        self._tell_silences()
        self._after_change()
        self._sample(now)

    def _sample(self, now: float, last: bool = False) -> None:
        """The job's figures now, for the status page's charts (once a second)."""
        self.timeline.sample(
            now,
            last=last,
            map_done=self.scheduler.counts(TaskKind.MAP).done,
            reduce_done=self.scheduler.counts(TaskKind.REDUCE).done,
            bytes_received=self.bytes_received,
            bytes_sent=self.bytes_sent,
            memory={name: s.rss for name, s in sorted(self._sessions.items())},
        )

    def _cancel(self) -> None:
        """Carry out the scheduler's cancellations."""
        for c in self.scheduler.cancellations():
            self.store.discard(c.task, c.attempt)
            self.timeline.ended(c.task, c.attempt, self.reactor.seconds(), "cancelled", why=c.why)
            session = self._sessions.get(c.worker)
            if session is not None:
                session.outbox.send(messages.Cancel(c.task, c.attempt))
            if not self.scheduler.done:
                _log.info(
                    "cancelled {task} attempt {attempt} on {worker}: {why}",
                    task=str(c.task),
                    attempt=c.attempt,
                    worker=c.worker,
                    why=c.why,
                )

    # Decisions.

    def _after_change(self) -> None:
        self._forget_inputs()
        self._cancel()
        if not self._check_done():
            self._dispatch()

    def _dispatch(self) -> None:
        """Give every worker with a free slot as much work as it can take."""
        if self.finished:
            return
        for name, session in list(self._sessions.items()):
            if self.finished:
                return  # a task's input could not be made (_WorkerSession.send_failed)
            if self._sessions.get(name) is not session:
                continue  # it left while we served the others
            try:
                self._fill(name, session)
            except Exception:
                # Whatever it was, it concerns this worker: it goes, and its
                # tasks go back in the queue.
                session.close(self._bug(Failure(), f"sending work to {name}"))
        if self.scheduler.done:  # the source raised as keys were drawn: say so now
            self._check_done()
            return
        if self._sessions or self._waiting_logged:
            return
        self._waiting_logged = True
        _log.info("no workers connected; waiting for one")

    def _fill(self, name: str, session: _WorkerSession) -> None:
        """Give one worker as many tasks as it has free slots."""
        while not self.scheduler.done and not session.closed and not self.finished:
            assignment = self.scheduler.next_assignment(name)
            if assignment is NO_WORK:
                return
            assert isinstance(assignment, Assignment)  # mypy does not narrow `is NO_WORK`
            if assignment.backup:
                silent = [
                    other
                    for other in self._sessions
                    if self.scheduler.is_suspect(other)
                    and any(t == assignment.task for t, _ in self.scheduler.running(other))
                ]
                _log.info(
                    "{task} is {why}; running a backup copy on {worker}",
                    task=str(assignment.task),
                    why=f"on silent worker {silent[0]}" if silent else "slow",
                    worker=name,
                )
            self._send_task(session, assignment.task, assignment.attempt, assignment.keys)
            now, task = self.reactor.seconds(), assignment.task
            self._phase_began.setdefault((task.kind.value, task.step), now)
            self.timeline.sent(
                task, task.kind.value, assignment.attempt, name, now, assignment.backup
            )

    def _send_task(
        self, session: _WorkerSession, task: TaskId, attempt: int, keys: tuple[Any, ...]
    ) -> None:
        blobs: Iterable[bytes]
        if task.kind is TaskKind.MAP and task.step == 0:
            if session.reads_files and isinstance(self.job.source, (Files, Lines)):
                session.sent_by_name.add((task, attempt))
            blobs = self._lazy_map_input(task, keys, session)
        elif task.kind is TaskKind.MAP:
            # The outputs of a task of the step before, as they are: a
            # reduce output and a map-only output are both (keys, values).
            blobs = self._stored_input(lambda: self.store.outputs(keys[0]))
        else:
            blobs = self._stored_input(lambda: self.store.blobs(task.index, task.step))

        def part(data: bytes, end: bool) -> messages.TaskInput:
            self.bytes_sent += len(data)
            return messages.TaskInput(task, attempt, data, end)

        session.sent_at[(task, attempt)] = self.reactor.seconds()
        session.outbox.send_blobs(blobs, part)
        if not self.finished and not session.closed:  # (its input could not be made)
            session.outbox.send(messages.Assign(task, attempt))

    def _lazy_map_input(
        self, task: TaskId, keys: tuple[Any, ...], session: _WorkerSession
    ) -> Iterator[bytes]:
        """
        A map task's input, read from the source and packed only when the
        worker's outbox reaches it: a worker that reads slowly, given many
        tasks at once, holds one packed input on the server, not all of
        them (the outbox says what raised: L{_WorkerSession.send_failed}).
        """
        blob = self._map_input(task, keys, session)
        self.scheduler.handle(InputSized(task, len(blob)))
        self.map_input_bytes += len(blob)
        yield blob

    def _map_input(self, task: TaskId, keys: tuple[Any, ...], session: _WorkerSession) -> bytes:
        """
        A map task's input: its batch of keys and their values, read from
        the source now and packed as one blob C{(keys, values)}, compressed
        unless the worker is on this machine.  A file of L{octotwist.sources}
        goes by name when the worker can open it.

        @raise _SourceError: reading a value raised (the message names the
            key and carries the user's traceback), or a value cannot be
            pickled.
        """
        source = self.job.source
        local, sees_files = session.same_machine, session.reads_files
        values = []
        key: Any = None
        try:
            for key in keys:
                values.append(item(source, key, local=local, sees_files=sees_files))
        except Exception as e:
            raise _SourceError(
                f"reading source[{_short_repr(key)}] raised {_error_line(e)}\n{user_traceback(e)}"
            ) from e
        try:
            return codec.pack((keys, values), compress=not local)
        except Exception as e:
            for key, value in zip(keys, values, strict=True):  # which one?
                try:
                    codec.pack(value, compress=False)
                except Exception as bad:
                    raise _SourceError(
                        f"source[{_short_repr(key)}] cannot be sent to a worker: {_error_line(bad)}"
                    ) from bad
            raise _SourceError(f"the input of {task} cannot be sent: {_error_line(e)}") from e

    def _stored_input(self, blobs: Callable[[], Iterator[bytes]]) -> Iterator[bytes]:
        """
        A task's input from the store (a reduce task's partition, or a
        later step's map input), read as the outbox sends it.  A spill
        file that cannot be read fails the job (L{_WorkerSession.send_failed}).
        """
        try:
            yield from blobs()
        except OSError as e:
            raise _InputError(f"cannot read the spill file: {e.strerror or e}") from e

    @property
    def finished(self) -> bool:
        return self._outcome is not None

    def _check_done(self) -> bool:
        if self.finished:
            return True
        if self.scheduler.phase is Phase.FINISHED:
            callbacks, self._finishing = self._finishing, []
            for callback in callbacks:
                callback()
            self._finish_ok()
            return True
        if self.scheduler.phase is Phase.FAILED:
            source_error = self.scheduler.source_error
            if source_error is not None:
                self._fail(
                    "source raised while listing its keys: "
                    f"{_error_line(source_error)}\n{user_traceback(source_error)}"
                )
                return True
            f = self.scheduler.failure
            assert f is not None
            where = (
                f"{f.task}"
                if len(self.partitions) == 1
                else (
                    f"step {f.task.step + 1} of {len(self.partitions)}: "
                    f"{f.task.kind.value} {f.task.index}"
                )
            )
            where += f" (key {f.key})" if f.key is not None else ""
            workers = ", ".join(dict.fromkeys(f.workers))
            self._fail(
                f"{where} failed on worker {f.worker} after {f.attempts} "
                f"attempt{'s' if f.attempts != 1 else ''} (on {workers}): "
                f"{f.error}"
                # (a traceback that is only the error line again says nothing more)
                + (f"\n{f.traceback}" if f.traceback.strip() != f.error.strip() else "")
            )
            return True
        return False

    def _reduces_done_in_order(self) -> list[TaskId]:
        """The last step's reduce tasks, from partition 0, up to the first not done."""
        step = len(self.partitions) - 1
        done: list[TaskId] = []
        for n in range(self.partitions[step]):
            task = TaskId(TaskKind.REDUCE, n, step)
            if not self.scheduler.is_done(task):
                break
            done.append(task)
        return done

    def _write_results(self, tasks: list[TaskId]) -> None:
        """
        Write the results of C{tasks} from the C{self._written}-th on to
        the output, in order, and forget them.  Called as reduce tasks
        finish when the output takes early writes (L{Results.early}), so
        that the last reduce is followed by one partition's writing, not
        all of them.
        """
        self._begin_output()
        while self._written < len(tasks):
            task, partition = tasks[self._written], self._written
            # Counted as written before it is: a partition that fails half
            # way fails the job, and is never written twice.
            self._written += 1
            for blob in self.store.outputs(task):
                keys, values = codec.unpack(blob)
                self.output.write_partition(partition, keys, values)
                self._results += len(keys)
            self.store.forget(task)

    def _begin_output(self) -> None:
        """
        Tell the output, once, how many partitions the results have (a
        directory output makes a part file for each): the last step's
        reduce tasks, or, for a map-only last step, its map tasks.
        """
        if not self._output_begun:
            self._output_begun = True
            self.output.begin(self.partitions[-1] or max(1, len(self.scheduler.output_tasks())))

    def _finish_ok(self) -> None:
        try:
            if self.sort:
                self._deliver_sorted()
            elif self.job.final is None:
                self._write_results(self.scheduler.output_tasks())
            else:
                self._call_final(self.job.final)
        except BrokenPipeError:
            # Whoever read the results has stopped reading (octo run job.py |
            # head): the job did its part, and the rest has nowhere to go.
            self.output_gone = True
        except Exception as e:
            if self.job.final is None:  # a full disk, a key str() cannot encode
                self._fail(f"cannot write the results: {type(e).__name__}: {e}")
            else:
                self._fail("final() raised:\n" + user_traceback(e))
            return
        for record in self.scheduler.skipped:
            _log.warn(
                "skipped {task} (key {key}): it failed {n} attempts; last error: {error}",
                task=str(record.task),
                key=record.key,
                n=record.attempts,
                error=record.error,
            )
        self._end(JobOutcome(True, None, self._results, self.reactor.seconds() - self._started))

    def _call_final(self, final: Callable[[Any, Any], Any]) -> None:
        for task in self.scheduler.output_tasks():
            for blob in self.store.outputs(task):
                keys, values = codec.unpack(blob)
                for key, value in zip(keys, values, strict=True):
                    final(key, value)
                self._results += len(keys)
            self.store.forget(task)

    def _deliver_sorted(self) -> None:
        """
        Every partition's results in one key order (L{sorted_order}), to
        C{final()} or the output, as octo.py called C{final()} over sorted
        keys.  The partitions are decoded together, which a job's results
        (far fewer than its records) afford.  An output of a file per
        partition gets each partition in key order, as Hadoop's do.
        """
        if self.job.final is None and self.output.partitioned:
            self._begin_output()
            for partition, task in enumerate(self.scheduler.output_tasks()):
                k, v = self._decoded(task)
                order = sorted_order(k)
                self.output.write_partition(partition, [k[i] for i in order], [v[i] for i in order])
                self._results += len(k)
            return
        keys: list[Any] = []
        values: list[Any] = []
        for task in self.scheduler.output_tasks():
            k, v = self._decoded(task)
            keys += k
            values += v
        order = sorted_order(keys)
        final = self.job.final
        if final is not None:
            for i in order:
                final(keys[i], values[i])
                self._results += 1
            return
        self._begin_output()
        step = 10_000
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            self._results += len(chunk)  # (counted as handed over: a pipe takes them in part)
            self.output.write([keys[i] for i in chunk], [values[i] for i in chunk])

    def _decoded(self, task: TaskId) -> tuple[list[Any], list[Any]]:
        """A task's results, decoded, and forgotten by the store."""
        keys: list[Any] = []
        values: list[Any] = []
        for blob in self.store.outputs(task):
            k, v = codec.unpack(blob)
            keys += k
            values += v
        self.store.forget(task)
        return keys, values

    def cancel(self, why: str, *, resumable: bool = False) -> None:
        """
        End the job now, as failed (its server is being stopped): the
        workers are told why, the output is taken back.  Nothing happens if
        it has ended already.

        @param resumable: keep what the journal holds, if there is one, for
            the next run of the same job (the server stops, the job does
            not end).
        """
        if self.finished:
            return
        if resumable and self.resume is not None:
            self._keep_progress = True
            _log.info(
                "the progress of job {job} is kept in {directory}: run the same command to "
                "resume it{workers}",
                job=self.job.name,
                directory=str(self.resume.journal.directory),
                workers="" if self._own_workers else " (its workers reconnect to it by themselves)",
            )
        self._fail(why)

    def _fail_unless_over(self, error: str) -> None:
        if not self.finished:
            self._fail(error)

    def _fail(self, error: str) -> None:
        _log.error("job {job} failed: {error}", job=self.job.name, error=error)
        self._end(JobOutcome(False, error, 0, self.reactor.seconds() - self._started))

    def _end(self, outcome: JobOutcome) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        now = self.reactor.seconds()
        self.timeline.end_all(now, "cancelled", "the job ended")
        with contextlib.suppress(Exception):  # (a picture of time is not worth a job)
            self._sample(now, last=True)
        for timer in (self._progress, self._ticker):
            if timer.running:
                timer.stop()
        outcome.stats = self.status()
        outcome.counters = dict(sorted(self.counters.items()))
        try:
            if self.output_gone:
                pass  # nothing more can reach the reader
            elif outcome.ok:
                self.output.commit()
            else:
                self.output.abort()
        except BrokenPipeError:
            self.output_gone = True
        except OSError as e:  # a full disk, say: the results are not there
            error = f"cannot write the results: {type(e).__name__}: {e}"
            outcome = JobOutcome(False, error, 0, outcome.seconds, outcome.stats)
            self._outcome = outcome
            _log.error("job {job} failed: {error}", job=self.job.name, error=outcome.error)
        if self.resume is not None and not self._keep_progress:
            try:
                self.resume.end(outcome.ok, outcome.error)
            except JournalError as e:
                _log.warn("{error}", error=str(e))
        if outcome.ok and self.output_gone:
            _log.info(
                "job {job} finished in {t:.2f} s; the reader of its results stopped reading "
                "after {n}",
                job=self.job.name,
                n=outcome.results,
                t=outcome.seconds,
            )
        elif outcome.ok:
            _log.info(
                "job {job} finished: {n} result{s} in {t:.2f} s",
                job=self.job.name,
                n=outcome.results,
                s="" if outcome.results == 1 else "s",
                t=outcome.seconds,
            )
        _log.debug(
            "task input sent: {sent} bytes, {mapped} of them source items; task output "
            "received: {received} bytes",
            sent=self.bytes_sent,
            mapped=self.map_input_bytes,
            received=self.bytes_received,
        )
        if outcome.ok and outcome.counters:
            _log.info("counters:\n{table}", table=counters.table(outcome.counters))
        # Workers hang up when they read this; the transport closes whatever
        # is left when it stops (TaskServer.stop).  A job that is not over
        # (its server stops, and the next resumes it) tells others' workers
        # nothing: they lose the connection, and reconnect to that server.
        # A silent worker would not read it: it is dropped at once, so that
        # stopping does not wait for it to hang up (it takes the job for
        # over when it finds us gone).
        keep_workers = self._keep_progress and not self._own_workers
        for session in list(self._all_sessions):
            session.outbox.clear()  # task inputs nobody needs any more
            if keep_workers:
                continue
            name = session.name
            if (
                name is not None
                and self._sessions.get(name) is session
                and self.scheduler.is_suspect(name)
            ):
                _log.info("dropping silent worker {worker}: the job is over", worker=name)
                session.closed = True
                session.channel.abort()
            else:
                session.outbox.send(messages.Shutdown(outcome.ok, outcome.error or "", self.stays))
        self.store.close()
        self.result.callback(outcome)

    def status(self, stream_since: int | None = None) -> dict[str, Any]:
        """
        Everything the status page and the progress display show, as
        JSON-ready data (the schema is in docs/status.md).

        @param stream_since: also the task stream and the samples over time
            (L{Timeline.json}), its finished attempts from this number on.
        """
        now = self.reactor.seconds()
        elapsed = now - self._started
        outcome = self._outcome
        phases: dict[str, dict[str, Any]] = {}
        for kind in TaskKind:
            c = self.scheduler.counts(kind)
            began = self._phase_began.get((kind.value, self.scheduler.step))
            phases[kind.value] = {
                "total": c.total,
                "done": c.done,
                "running": c.running,
                "pending": c.pending,
                "eta": None if outcome is not None else eta(c.done, c.total, began, now),
            }
        workers = [
            self._worker_status(name, session, now)
            for name, session in sorted(self._sessions.items())
        ]
        done = sum(p["done"] for p in phases.values())
        status = {
            "job": self.job.name,
            "phase": self.scheduler.phase.value,
            "step": self.scheduler.step + 1,
            "steps": len(self.partitions),
            "ok": None if outcome is None else outcome.ok,
            "error": None if outcome is None else outcome.error,
            "elapsed": round(outcome.seconds if outcome else elapsed, 3),
            "map": phases["map"],
            "reduce": phases["reduce"],
            "workers": workers,
            "failures": list(self.failures),
            "printed": list(self.printed),
            "counters": dict(sorted(self.counters.items())),
            "resumed": None
            if self.resume is None or not self.resume.resumed
            else {kind.value: n for kind, n in self.resume.restored.items()},
            "skipped": [
                {"task": str(r.task), "key": str(r.key), "error": r.error, "attempts": r.attempts}
                for r in self.scheduler.skipped
            ],
            "throughput": {
                "tasks_per_second": round(done / elapsed, 3) if elapsed > 0 else 0.0,
                "bytes_received": self.bytes_received,
                "bytes_sent": self.bytes_sent,
                "map_input_bytes": self.map_input_bytes,
                "bytes_per_second": round(self.bytes_received / elapsed) if elapsed > 0 else 0,
            },
        }
        if stream_since is not None:
            status["stream"] = self.timeline.json(stream_since)
        return status

    def _worker_status(self, name: str, session: _WorkerSession, now: float) -> dict[str, Any]:
        """One worker's line of L{status}; one broken session cannot break the page."""
        entry: dict[str, Any] = {
            "name": name,
            "host": None,
            "pid": None,
            "peer": None,
            "processes": None,
            "running": [],
            "tasks_done": session.tasks_done,
            "last_heard": round(now - session.last_heard, 3),
            "memory": session.rss,
            "suspect": False,
        }
        try:
            hello = session.hello
            if hello is not None:
                entry.update(host=hello.host, pid=hello.pid, processes=hello.slots)
            entry["peer"] = session.channel.peer
            entry["suspect"] = self.scheduler.is_suspect(name)
            if not self.scheduler.done:
                running = self.scheduler.running(name)
                entry["running"] = [f"{task} attempt {attempt}" for task, attempt in running]
        except Exception:
            self._bug(Failure(), f"describing worker {name}")
        return entry

    def _bug(self, failure: Failure, where: str) -> str:
        """
        Log an unexpected exception: one line each time, its traceback the
        first time only (at -v every time), so that a peer that triggers it
        over and over cannot flood the log.

        @return: the one-line description, for the peer's closing.
        """
        error = f"{where} raised {failure.type.__name__}: {failure.getErrorMessage()}"
        if not self._bug_logged:
            self._bug_logged = True
            _log.failure(
                "{error} (unexpected: please report it, with this traceback)",
                failure,
                level=LogLevel.error,
                error=error,
            )
        else:
            _log.error("{error} (unexpected; its traceback is logged with -v)", error=error)
            _log.failure("{error}", failure, level=LogLevel.debug, error=error)
        return error

    def _log_progress(self) -> None:
        try:
            self._report_progress()
        except Exception:
            self._bug(Failure(), "the progress line")

    def _report_progress(self) -> None:
        s = self.status()
        _log.info(
            "{phase}: map {md}/{mt}, reduce {rd}/{rt}, {w} worker{ws}, {t:.0f}s",
            phase=s["phase"] if s["steps"] == 1 else f"step {s['step']}/{s['steps']} {s['phase']}",
            md=s["map"]["done"],
            mt=s["map"]["total"] or "?",
            rd=s["reduce"]["done"],
            rt=s["reduce"]["total"],
            w=len(s["workers"]),
            ws="" if len(s["workers"]) == 1 else "s",
            t=s["elapsed"],
        )


class _InputError(OctotwistError):
    """A task's input cannot be made: the job fails with this message."""


class _SourceError(_InputError):
    """The job's source raised while a task was being read from it."""


def _error_line(e: BaseException) -> str:
    """C{e} as the last line of its traceback: C{KeyError: 'k'}."""
    return "".join(traceback.format_exception_only(e)).strip()


def _short_repr(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_hello(hello: messages.Hello) -> None:
    """
    @raise RemoteProtocolError: a field of C{hello} makes no sense; the
        message says which and what it may be.
    """
    if not hello.name:
        raise RemoteProtocolError("Hello with an empty worker name")
    for field_name, text in (
        ("name", hello.name),
        ("host", hello.host),
        ("machine", hello.machine),
    ):
        if text is not None and (len(text) > MAX_NAME or not text.isprintable()):
            raise RemoteProtocolError(
                f"Hello: {field_name} {text[:60]!r} is not a printable name of at most "
                f"{MAX_NAME} characters"
            )
    if not 1 <= hello.slots <= MAX_SLOTS:
        raise RemoteProtocolError(
            f"Hello: slots must be 1 to {MAX_SLOTS} (tasks run at once), got {hello.slots}"
        )
    if not 0 <= hello.prefetch <= MAX_SLOTS:
        raise RemoteProtocolError(
            f"Hello: prefetch must be 0 to {MAX_SLOTS} (tasks queued), got {hello.prefetch}"
        )
    if not 0 <= hello.pid < 2**32:
        raise RemoteProtocolError(f"Hello: pid {hello.pid} is not a process id")


def _check_counters(counts: tuple[tuple[str, int], ...]) -> None:
    """
    @raise RemoteProtocolError: an attempt's counters are more, or longer
        named, than L{octotwist.counters} lets a task keep.
    """
    if len(counts) > counters.MAX_COUNTERS + 10:  # (and octotwist's own)
        raise RemoteProtocolError(f"TaskDone with {len(counts)} counters")
    for name, n in counts:
        if len(name) > counters.MAX_NAME or not name.isprintable() or abs(n) > counters.LIMIT:
            raise RemoteProtocolError(f"TaskDone: counter {name[:60]!r} = {n} is not one")


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class _WorkerSession:
    """
    The server's side of one connection: message -> server call.

    Whatever handling a message raises closes this connection, and only
    this one: a peer's protocol violation with a warning, anything else
    (a bug) with an error line (L{JobServer._bug}).
    """

    def __init__(self, server: JobServer, channel: MessageChannel) -> None:
        self.server = server
        self.channel = channel
        self.outbox = Outbox(channel, self.send_failed)
        #: Set by L{JobServer.joined} once the scheduler took the worker.
        self.name: str | None = None
        self.hello: messages.Hello | None = None
        self.last_heard = server.reactor.seconds()
        self.tasks_done = 0
        #: We closed the connection: what still arrives is not read.
        self.closed = False
        #: It can open the files of the job's source that this machine can
        #: (it runs here): they go by name (L{octotwist.sources}) until it
        #: says it cannot.
        self.reads_files = True
        #: The first step's map attempts sent while it did (some of their
        #: files by name), until they report.
        self.sent_by_name: set[tuple[TaskId, int]] = set()
        #: When each attempt it holds was sent; what its link takes, of the
        #: last few tasks (L{JobServer._measure_link}); the attempts it may hold.
        self.sent_at: dict[tuple[TaskId, int], float] = {}
        self.round_trips: deque[float] = deque(maxlen=16)
        self.task_seconds: deque[float] = deque(maxlen=16)
        self.slots = 0
        #: It runs on this machine, in this network namespace: its inputs
        #: go uncompressed (set when it joins).
        self.same_machine = False
        #: Bytes of memory its task processes hold, as its last heartbeat said.
        self.rss = 0

    def message_received(self, message: messages.Message) -> None:
        if self.closed:
            return
        try:
            self._handle(message)
        except RemoteProtocolError as e:
            _log.warn("closing connection from {peer}: {error}", peer=self._peer(), error=str(e))
            self.close(str(e))
        except Exception:
            where = f"handling a {type(message).__name__} from {self._peer()}"
            self.close(self.server._bug(Failure(), where))

    def send_failed(self, failure: Failure, peer: str) -> None:
        """
        Making a message for this peer raised, as its outbox sent it: a
        source that cannot be read fails the job, as when a task is
        assigned; anything else concerns this worker only (it goes, and its
        tasks go back in the queue).
        """
        if failure.check(_InputError):
            self.server._fail_unless_over(failure.getErrorMessage())
        else:
            self.close(self.server._bug(failure, f"sending work to {peer}"))

    def close(self, why: str) -> None:
        """Hang up on this peer; the server forgets it when the transport says it is gone."""
        if self.closed:
            return
        self.closed = True
        self.outbox.clear()
        try:
            self.channel.close()
        except Exception:
            self.server._bug(Failure(), f"closing the connection from {self._peer()} ({why})")

    def _peer(self) -> str:
        try:
            return self.channel.peer
        except Exception:
            return "?"

    def _handle(self, message: messages.Message) -> None:
        if self.server.finished:
            return
        self.last_heard = self.server.reactor.seconds()
        if self.name is not None:
            self.server.heard(self.name)
        match message:
            case messages.Hello() if self.name is None:
                self.server.joined(self, message)
            case _ if self.name is None:
                raise RemoteProtocolError(f"expected Hello, got {type(message).__name__}")
            case messages.Hello():
                raise RemoteProtocolError("a second Hello on one connection")
            case messages.TaskOutput(task, attempt, partition):
                self._check_attempt(task, attempt)
                self._check_partition(task, partition)
                self.server.bytes_received += len(message.data)
                self.server.task_output(self.name, message)
            case messages.TaskDone(task, attempt):
                self._check_attempt(task, attempt)
                self.server.task_done(self.name, message)
                self.tasks_done += 1
            case messages.TaskFailed(task, attempt):
                self._check_attempt(task, attempt)
                self.server.task_failed(self.name, message)
            case messages.Heartbeat(_, rss):
                self.rss = rss
            case _:
                raise RemoteProtocolError(f"unexpected {type(message).__name__} from a worker")

    def _check_attempt(self, task: TaskId, attempt: int) -> None:
        if attempt < 1:
            raise RemoteProtocolError(f"{task}: attempt {attempt} (attempts count from 1)")

    def _check_partition(self, task: TaskId, partition: int) -> None:
        steps = self.server.partitions
        if task.step >= len(steps):
            raise RemoteProtocolError(f"{task}: the job has {len(steps)} step(s)")
        limit = (steps[task.step] or 1) if task.kind is TaskKind.MAP else 1
        if not 0 <= partition < limit:
            raise RemoteProtocolError(f"{task}: output for partition {partition} out of range")

    def connection_lost(self, reason: str) -> None:
        self.closed = True
        self.outbox.clear()
        self.server.left(self, reason)

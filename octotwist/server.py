"""
The server: Twisted glue between transports, the scheduler and the store.

L{JobServer} owns a L{Scheduler} and a L{BlobStore}.  Each authenticated
connection gets a L{_WorkerSession}; sessions turn messages into scheduler
events, and the server turns the scheduler's decisions into messages.  When
the scheduler says the job is finished, the server decodes the reduce outputs
in partition order and calls the job's C{final()} (or writes C{key<TAB>value}
lines), tells every worker to shut down, and fires L{JobServer.result}.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from octotwist import codec, messages
from octotwist.errors import OctotwistError, RemoteProtocolError
from octotwist.job import Job
from octotwist.messages import TaskId, TaskKind
from octotwist.scheduler import (
    NO_WORK,
    AttemptFailed,
    AttemptSucceeded,
    Phase,
    Scheduler,
    Verdict,
    WorkerJoined,
    WorkerLeft,
)
from octotwist.store import BlobStore
from octotwist.transport import MessageChannel

_log = Logger()

#: Reduce partitions when neither the job nor the command line says.
DEFAULT_REDUCE_TASKS = 8
HEARTBEAT_INTERVAL = 5.0


@dataclass
class JobOutcome:
    """How the job ended."""

    ok: bool
    error: str | None = None
    results: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


def write_lines(stream: IO[str]) -> Callable[[Any, Any], None]:
    """A C{final()} that writes C{key<TAB>value} lines to C{stream}."""

    def final(key: Any, value: Any) -> None:
        stream.write(f"{key}\t{value}\n")

    return final


class JobServer:
    """
    Runs one job for whichever workers connect.

    @param job: the loaded job.
    @param reactor: for timers.
    @param reduce_tasks: partitions, overriding the job's C{reduce_tasks}.
    @param output: where results go when the job has no C{final()}.
    """

    def __init__(
        self,
        job: Job,
        reactor: IReactorTime,
        *,
        reduce_tasks: int | None = None,
        output: IO[str] | None = None,
        store: BlobStore | None = None,
        progress_interval: float = 10.0,
    ) -> None:
        self.job = job
        self.reactor = reactor
        self.reduce_tasks = reduce_tasks or job.reduce_tasks or DEFAULT_REDUCE_TASKS
        self.output = output if output is not None else sys.stdout
        self.store = store if store is not None else BlobStore()
        self.scheduler = Scheduler(job.source, self.reduce_tasks, total=job.source_size())
        self.result: Deferred[JobOutcome] = Deferred()
        self._sessions: dict[str, _WorkerSession] = {}
        self._all_sessions: set[_WorkerSession] = set()
        self._started = reactor.seconds()
        self._welcome = messages.Welcome(
            job.name, job.pickled_functions, self.reduce_tasks, HEARTBEAT_INTERVAL
        )
        self._outcome: JobOutcome | None = None
        self._progress = LoopingCall(self._log_progress)
        self._progress.clock = reactor
        self._progress_interval = progress_interval
        self._waiting_logged = False

    def start(self) -> None:
        """Begin: log progress now and then; finish at once for an empty job."""
        maps = self.scheduler.counts(TaskKind.MAP).total
        _log.info(
            "job {job}: {maps} map tasks, {reduces} reduce tasks; waiting for workers",
            job=self.job.name,
            maps="an unknown number of" if maps is None else maps,
            reduces=self.reduce_tasks,
        )
        if self._progress_interval > 0:
            self._progress.start(self._progress_interval, now=False)
        self._check_done()

    # Called by transports.

    def accept(self, channel: MessageChannel) -> _WorkerSession:
        """The C{accept} callable handed to a L{TaskServer}."""
        session = _WorkerSession(self, channel)
        self._all_sessions.add(session)
        if self._outcome is not None:
            channel.send(messages.Shutdown(self._outcome.ok, "the job is over"))
            channel.close()
        else:
            channel.send(self._welcome)
        return session

    # Called by sessions.

    def joined(self, session: _WorkerSession, hello: messages.Hello) -> str:
        name = hello.name
        n = 1
        while name in self._sessions:
            n += 1
            name = f"{hello.name}#{n}"
        self._sessions[name] = session
        self.scheduler.handle(WorkerJoined(name, hello.slots))
        _log.info(
            "worker {worker} joined from {peer} ({slots} process{es})",
            worker=name,
            peer=session.channel.peer,
            slots=hello.slots,
            es="" if hello.slots == 1 else "es",
        )
        self._dispatch()
        return name

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
        _log.warn(
            "worker {worker} left ({reason}); {n} running tasks go back in the queue",
            worker=name,
            reason=reason,
            n=len(lost),
        )
        self._dispatch()

    def task_done(self, name: str, msg: messages.TaskDone) -> None:
        verdict = self.scheduler.handle(AttemptSucceeded(name, msg.task, msg.attempt))
        if verdict is Verdict.ACCEPTED:
            self.store.commit(msg.task, msg.attempt)
        else:
            self.store.discard(msg.task, msg.attempt)
        self._after_change()

    def task_failed(self, name: str, msg: messages.TaskFailed) -> None:
        self.scheduler.handle(
            AttemptFailed(name, msg.task, msg.attempt, msg.key, msg.error, msg.traceback)
        )
        self.store.discard(msg.task, msg.attempt)
        _log.error(
            "{task} failed on worker {worker}{at}: {error}",
            task=str(msg.task),
            worker=name,
            at=f" at key {msg.key}" if msg.key is not None else "",
            error=msg.error,
        )
        self._after_change()

    # Decisions.

    def _after_change(self) -> None:
        if not self._check_done():
            self._dispatch()

    def _dispatch(self) -> None:
        """Give every worker with a free slot as much work as it can take."""
        if self.finished:
            return
        for name, session in list(self._sessions.items()):
            while not self.scheduler.done:
                assignment = self.scheduler.next_assignment(name)
                if assignment is NO_WORK:
                    break
                try:
                    self._send_task(session, assignment.task, assignment.attempt, assignment.key)
                except _SourceError as e:
                    self._fail(str(e))
                    return
        if self._sessions or self._waiting_logged:
            return
        self._waiting_logged = True
        _log.info("no workers connected; waiting for one")

    def _send_task(self, session: _WorkerSession, task: TaskId, attempt: int, key: Any) -> None:
        if task.kind is TaskKind.MAP:
            try:
                value = self.job.source[key]
                blobs = [codec.pack((key, value))]
            except Exception as e:
                raise _SourceError(f"reading source[{key!r}] raised {type(e).__name__}: {e}") from e
        else:
            blobs = self.store.blobs(TaskKind.MAP, task.index)
        for blob in blobs:
            for data, end in codec.parts(blob):
                session.channel.send(messages.TaskInput(task, attempt, data, end))
        session.channel.send(messages.Assign(task, attempt))

    @property
    def finished(self) -> bool:
        return self._outcome is not None

    def _check_done(self) -> bool:
        if self.finished:
            return True
        if self.scheduler.phase is Phase.FINISHED:
            self._finish_ok()
            return True
        if self.scheduler.phase is Phase.FAILED:
            f = self.scheduler.failure
            assert f is not None
            where = f"{f.task}" + (f" (key {f.key})" if f.key is not None else "")
            self._fail(
                f"{where} failed on worker {f.worker} after {f.attempts} "
                f"attempt{'s' if f.attempts != 1 else ''}: {f.error}\n{f.traceback}"
            )
            return True
        return False

    def _finish_ok(self) -> None:
        final = self.job.final or write_lines(self.output)
        results = 0
        try:
            for partition in range(self.reduce_tasks):
                for blob in self.store.blobs(TaskKind.REDUCE, partition):
                    for key, value in codec.unpack(blob):
                        final(key, value)
                        results += 1
                self.store.drop(TaskKind.REDUCE, partition)
        except Exception as e:
            import traceback

            self._fail("final() raised:\n" + "".join(traceback.format_exception(e)))
            return
        if self.job.final is None:
            self.output.flush()
        self._end(JobOutcome(True, None, results, self.reactor.seconds() - self._started))

    def _fail(self, error: str) -> None:
        _log.error("job {job} failed: {error}", job=self.job.name, error=error)
        self._end(JobOutcome(False, error, 0, self.reactor.seconds() - self._started))

    def _end(self, outcome: JobOutcome) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        if self._progress.running:
            self._progress.stop()
        outcome.stats = self.stats()
        if outcome.ok:
            _log.info(
                "job {job} finished: {n} results in {t:.2f} s",
                job=self.job.name,
                n=outcome.results,
                t=outcome.seconds,
            )
        for session in list(self._all_sessions):
            session.channel.send(messages.Shutdown(outcome.ok, outcome.error or ""))
            session.channel.close()
        self.store.close()
        self.result.callback(outcome)

    def stats(self) -> dict[str, Any]:
        m = self.scheduler.counts(TaskKind.MAP)
        r = self.scheduler.counts(TaskKind.REDUCE)
        return {
            "phase": self.scheduler.phase.value,
            "map": {"done": m.done, "running": m.running, "total": m.total},
            "reduce": {"done": r.done, "running": r.running, "total": r.total},
            "workers": sorted(self._sessions),
            "elapsed": self.reactor.seconds() - self._started,
        }

    def _log_progress(self) -> None:
        s = self.stats()
        _log.info(
            "{phase}: map {md}/{mt}, reduce {rd}/{rt}, {w} workers, {t:.0f}s",
            phase=s["phase"],
            md=s["map"]["done"],
            mt=s["map"]["total"] or "?",
            rd=s["reduce"]["done"],
            rt=s["reduce"]["total"],
            w=len(s["workers"]),
            t=s["elapsed"],
        )


class _SourceError(OctotwistError):
    """The job's source raised while a task was being read from it."""


class _WorkerSession:
    """The server's side of one connection: message -> server call."""

    def __init__(self, server: JobServer, channel: MessageChannel) -> None:
        self.server = server
        self.channel = channel
        self.name: str | None = None

    def message_received(self, message: messages.Message) -> None:
        try:
            self._handle(message)
        except RemoteProtocolError as e:
            _log.warn(
                "closing connection from {peer}: {error}", peer=self.channel.peer, error=str(e)
            )
            self.channel.close()

    def _handle(self, message: messages.Message) -> None:
        if self.server.finished:
            return
        match message:
            case messages.Hello() if self.name is None:
                self.name = self.server.joined(self, message)
            case _ if self.name is None:
                raise RemoteProtocolError(f"expected Hello, got {type(message).__name__}")
            case messages.TaskOutput(task, attempt, partition, data, end):
                self._check_partition(task, partition)
                self.server.store.add_part(task, attempt, partition, data, end)
            case messages.TaskDone():
                self.server.task_done(self.name, message)
            case messages.TaskFailed():
                self.server.task_failed(self.name, message)
            case messages.Heartbeat():
                pass
            case _:
                raise RemoteProtocolError(f"unexpected {type(message).__name__} from a worker")

    def _check_partition(self, task: TaskId, partition: int) -> None:
        limit = self.server.reduce_tasks if task.kind is TaskKind.MAP else 1
        if not 0 <= partition < limit:
            raise RemoteProtocolError(f"{task}: output for partition {partition} out of range")

    def connection_lost(self, reason: str) -> None:
        self.server.left(self, reason)

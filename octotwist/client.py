"""
The worker: connects to a server, receives the job, runs what it is told.

L{WorkerSession} is the worker's side of one connection; L{run_worker}
connects (retrying with backoff while the server is not there), runs
sessions until the server says the job is over, and returns.

A server message that makes no sense here (an C{Assign} before the
C{Welcome}, a heartbeat interval of zero), or that makes handling it raise
for any reason, closes the connection with one error line saying why; the
worker then reconnects, waiting longer each time the server does it again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from octotwist import messages
from octotwist.errors import AuthenticationError, RemoteProtocolError
from octotwist.machine import machine_id
from octotwist.messages import TaskId
from octotwist.outbox import Outbox
from octotwist.transport import IReactor, MessageChannel, TaskClient
from octotwist.worker import Crashed, Finished, Outcome, ProcessPool

_log = Logger()


class WorkerSession:
    """
    The worker's side of one connection.

    @ivar ended: fires with the server's L{messages.Shutdown}, or with
        C{None} when the connection was lost before one arrived.
    @ivar pool: the task processes: those of the job before, kept
        (L{run_worker}), or made for this job's C{Welcome}.  When the
        session ends it is still set if the processes stay for the next
        job (L{connection_lost}), else C{None}.
    """

    def __init__(
        self,
        reactor: IWorkerReactor,
        channel: MessageChannel,
        name: str,
        processes: int,
        task_lines: bool = True,
        pool: ProcessPool | None = None,
    ) -> None:
        self.task_lines = task_lines
        self.reactor = reactor
        self.channel = channel
        self.outbox = Outbox(channel)
        self.name = name
        self.processes = processes
        self.pool = pool
        self.welcome: messages.Welcome | None = None
        self.ended: Deferred[messages.Shutdown | None] = Deferred()
        self._inputs: dict[tuple[TaskId, int], list[bytes]] = {}
        self._parts: dict[tuple[TaskId, int], list[bytes]] = {}
        self._running: dict[tuple[TaskId, int], Callable[[], None]] = {}
        self._heartbeat: LoopingCall | None = None
        self._shutdown: messages.Shutdown | None = None
        #: A task of the job finished here (the worker has worked for it).
        self.worked = False
        #: Why we hung up on the server, if we did (it sent something wrong).
        self.refused: str | None = None
        # Who we are, first: a cluster (octo serve) tells its workers from
        # its submitters by what they say first; a server of one job
        # (octo server) sends its Welcome meanwhile.
        channel.send(
            messages.Hello(
                name,
                socket.gethostname(),
                os.getpid(),
                processes,
                prefetch=processes,
                machine=machine_id(),
            )
        )

    def message_received(self, message: messages.Message) -> None:
        if self.refused is not None:
            return  # we hung up; what still arrives is not read
        try:
            self._handle(message)
        except RemoteProtocolError as e:
            self._refuse(str(e))
        except Exception:
            failure = Failure()
            why = (
                f"handling its {type(message).__name__} raised "
                f"{failure.type.__name__}: {failure.getErrorMessage()}"
            )
            _log.failure("{why}", failure, level=LogLevel.debug, why=why)
            self._refuse(f"{why} (unexpected: please report it; the traceback is logged with -v)")

    def _refuse(self, why: str) -> None:
        self.refused = why
        _log.error(
            "closing the connection to the server {peer}: {why}", peer=self.channel.peer, why=why
        )
        self.outbox.clear()
        self.channel.close()

    def _handle(self, message: messages.Message) -> None:
        if self.welcome is None and not isinstance(message, (messages.Welcome, messages.Shutdown)):
            raise RemoteProtocolError(f"expected Welcome, got {type(message).__name__}")
        match message:
            case messages.Welcome() if self.welcome is None:
                if message.reduce_tasks < 1:
                    raise RemoteProtocolError(
                        f"Welcome with {message.reduce_tasks} reduce tasks (at least 1)"
                    )
                if any(p < 0 for p in message.partitions):
                    raise RemoteProtocolError(
                        f"Welcome with steps of {list(message.partitions)[:20]} partitions "
                        "(0 or more)"
                    )
                if not message.heartbeat_interval > 0:
                    raise RemoteProtocolError(
                        f"Welcome with a heartbeat interval of {message.heartbeat_interval} s"
                    )
                self._start(message)
            case messages.TaskInput(task, attempt, data, end):
                key = (task, attempt)
                if not end:
                    self._parts.setdefault(key, []).append(data)
                    return
                pending = self._parts.pop(key, None)
                blob = data if pending is None else b"".join([*pending, data])
                self._inputs.setdefault(key, []).append(blob)
            case messages.Assign(task, attempt):
                if (task, attempt) in self._running:
                    raise RemoteProtocolError(f"{task} attempt {attempt} assigned twice")
                self._run(task, attempt)
            case messages.Cancel(task, attempt):
                kill = self._running.pop((task, attempt), None)
                if kill is not None:
                    kill()
            case messages.Shutdown():
                self._shutdown = message
                self.channel.close()
            case _:
                _log.warn("ignoring unexpected {kind} from the server", kind=type(message).__name__)

    def _start(self, welcome: messages.Welcome) -> None:
        self.welcome = welcome
        if self.pool is None:
            self.pool = ProcessPool(self.reactor, welcome.functions, self.processes)
        else:
            # The job before's processes: the same pids, this job's functions.
            self.pool.load(welcome.functions)
        _log.info(
            "running job {job} with {n} process{es}",
            job=welcome.job_name,
            n=self.processes,
            es="" if self.processes == 1 else "es",
        )
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(welcome.heartbeat_interval, now=False)

    def _beat(self) -> None:
        rss = self.pool.rss() if self.pool is not None else 0
        self.channel.send(messages.Heartbeat(tuple(sorted(self._running, key=str)), rss))

    def _run(self, task: TaskId, attempt: int) -> None:
        assert self.pool is not None and self.welcome is not None
        key = (task, attempt)
        inputs = self._inputs.pop(key, [])
        _log.debug("running {task} (attempt {attempt})", task=str(task), attempt=attempt)

        def on_output(partition: int, blob: bytes) -> None:
            self.outbox.send_blob(
                blob, lambda data, end: messages.TaskOutput(task, attempt, partition, data, end)
            )

        d, kill = self.pool.run(task, self._partitions(task), inputs, on_output)
        self._running[key] = kill
        d.addCallback(self._report, task, attempt)

    def _partitions(self, task: TaskId) -> int:
        """
        The partitions of C{task}'s output: its step's (0: a map-only step),
        1 for a reduce task.

        @raise RemoteProtocolError: the server named a step the job lacks.
        """
        assert self.welcome is not None
        steps = self.welcome.partitions or (self.welcome.reduce_tasks,)
        if task.step >= len(steps):
            raise RemoteProtocolError(f"{task}: the job has {len(steps)} step(s)")
        return steps[task.step]

    def _report(self, outcome: Outcome, task: TaskId, attempt: int) -> None:
        if self._running.pop((task, attempt), None) is None:
            return  # cancelled
        match outcome:
            case Finished(records_in, records_out, seconds, counts, printed):
                self.worked = True
                # One line per task: what this worker is doing, at a glance.
                _log.emit(
                    LogLevel.info if self.task_lines else LogLevel.debug,
                    "{task} done in {seconds:.2f} s ({n_in} in, {n_out} out)",
                    task=str(task) if attempt == 1 else f"{task} attempt {attempt}",
                    seconds=seconds,
                    n_in=_records(records_in),
                    n_out=_records(records_out),
                )
                self.outbox.send(
                    messages.TaskDone(
                        task,
                        attempt,
                        records_in,
                        records_out,
                        seconds,
                        tuple(sorted(counts.items())),
                        printed,
                        outcome.process,
                    )
                )
            case Crashed(key, error, tb, printed):
                # octo run's own workers: the server logs the failure, once.
                _log.emit(
                    LogLevel.error if self.task_lines else LogLevel.debug,
                    "{task} failed{at}: {error}",
                    task=str(task),
                    at=f" at key {key}" if key is not None else "",
                    error=error,
                )
                self.outbox.send(
                    messages.TaskFailed(task, attempt, key, error, tb, printed, outcome.process)
                )

    def connection_lost(self, reason: str) -> None:
        self.outbox.clear()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._running.clear()
        shutdown, pool = self._shutdown, self.pool
        if pool is None:
            self.ended.callback(shutdown)
        elif self._keeps_pool():
            pool.cancel_all()
            self.ended.callback(shutdown)
        else:
            self.pool = None
            pool.stop().addCallback(lambda _: self.ended.callback(shutdown))

    def _keeps_pool(self) -> bool:
        """
        Whether the task processes stay for the next job: only when the
        server said this job is over and more will come (C{Shutdown(more=True)},
        a cluster's), or when no job started on this connection.

        Then the processes are in a state we know: the job is over, so what
        is left of it (a backup copy still running, say) is cancelled and
        nothing else of it is owed; they are idle for the next job's
        functions.  A connection lost mid-job (the server died or restarted,
        the network failed, we hung up) leaves tasks whose results nobody
        will count and that the server may already have handed to others,
        of a job that may be over: they must not go on, and the next
        C{Welcome} may come from another server; the processes stop, as
        they did before workers stayed.
        """
        if self.welcome is None:
            return True
        return self._shutdown is not None and self._shutdown.more


def _records(n: int) -> str:
    return f"{n:,} record{'s' if n != 1 else ''}"


class IWorkerReactor(IReactor, IReactorProcess):
    """A worker's reactor: a transport's (L{IReactor}), and it starts the task processes."""


def default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


#: Seconds a worker's first connection attempt may take, whatever its --wait.
FIRST_ATTEMPT = 10.0


async def run_worker(
    reactor: IWorkerReactor,
    client: TaskClient,
    *,
    processes: int = 1,
    name: str | None = None,
    wait: float = 120.0,
    task_lines: bool = True,
    wait_after_work: float | None = None,
) -> messages.Shutdown:
    """
    Work for the server until it says the job is over (for a cluster, C{octo
    serve}, that it stops: between its jobs, reconnect and wait for the next).

    While the server cannot be reached, retry with exponential backoff (0.5 s
    doubling to 10 s) for up to C{wait} seconds, logging each failure.  A
    lost connection before the job is over is retried the same way.

    The task processes stay from one of a cluster's jobs to the next: the
    same processes (the same pids) run each job, after loading its
    functions (L{ProcessPool.load}), so a job pays for no interpreter
    start-up, and a worker's C{-p} processes are the ones an operator sees.
    A connection lost mid-job stops them (L{WorkerSession._keeps_pool}
    says why); the next job starts new ones.

    @param task_lines: log a line as each task ends (else only with -v),
        and when the server says the job is over.
    @param wait_after_work: once this worker has finished a task for a job
        whose server does not stay (C{octo server}), retry for only this
        long, then take the job for over and return: a server that went
        away after work was done has most likely ended its job while this
        worker could not hear it (a link down at the end).  C{None}: C{wait}.
    @return: the server's final L{messages.Shutdown}.
    @raise AuthenticationError: the server rejected our secret (not retried:
        it will not get better).
    @raise ConnectionError: the server stayed unreachable for C{wait} seconds.
    """
    name = name or default_name()
    delay = 0.5
    refused_delay = 0.5  # before reconnecting to a server we hung up on
    since: float | None = None
    sessions: list[WorkerSession] = []
    # The task processes, kept from one of a cluster's jobs to the next
    # (WorkerSession.connection_lost says when): None while none are.
    pool: ProcessPool | None = None
    # The job of octo server this worker did work for, if it did.
    worked_for: str | None = None

    def accept(channel: MessageChannel) -> WorkerSession:
        sessions.append(WorkerSession(reactor, channel, name, processes, task_lines, pool))
        return sessions[-1]

    try:
        while True:
            attempt = client.connect(accept)
            # An attempt that hangs (a TLS port spoken to in plain TCP) ends when
            # --wait does; a first one gets at least FIRST_ATTEMPT seconds.
            # Once we worked for a job whose server does not stay, a server
            # that is gone has most likely ended it: a short wait.
            limit = wait if worked_for is None else min(wait, wait_after_work or wait)
            left = limit if since is None else since + limit - reactor.seconds()
            attempt.addTimeout(max(left, FIRST_ATTEMPT if since is None else 0.5), reactor)
            try:
                await _stoppable(attempt)
            except (AuthenticationError, RemoteProtocolError, defer.CancelledError):
                raise
            except Exception as e:
                now = reactor.seconds()
                since = now if since is None else since
                timed_out = isinstance(e, defer.TimeoutError)
                if now - since >= limit or timed_out:
                    if worked_for is not None and limit < wait:
                        return _gone(worked_for, limit)
                    why = "connecting did not finish in time" if timed_out else str(e)
                    raise ConnectionError(
                        f"gave up: no server at {client.settings.connect} for {wait:.0f} s ({why})"
                    ) from None
                pause = min(delay, max(since + limit - now, 0.0))  # no later than --wait says
                _log.info(
                    "cannot reach the server at {where} ({error}); retrying in {delay:.1f} s",
                    where=client.settings.connect,
                    error=_short(e),
                    delay=pause,
                )
                await deferLater(reactor, pause)
                delay = min(delay * 2, 10.0)
                continue
            since, delay = None, 0.5
            shutdown = await sessions[-1].ended
            pool = sessions[-1].pool
            welcome = sessions[-1].welcome
            if welcome is not None and (sessions[-1].worked or welcome.stays):
                worked_for = None if welcome.stays else welcome.job_name
            if shutdown is not None and shutdown.more:
                # A cluster's job is over and the cluster stays: the next job's
                # Welcome comes on a new connection.
                _log.emit(
                    LogLevel.info if task_lines else LogLevel.debug,
                    "the server says the job is over{how}; waiting for its next job",
                    how=""
                    if shutdown.ok
                    else f" (it failed: {_short(Exception(shutdown.reason))})",
                )
                refused_delay = 0.5
                continue
            if shutdown is not None:
                if task_lines:  # (octo run's own workers: the server says it all)
                    _log.info(
                        "the server says the job is over{how}; exiting",
                        how=""
                        if shutdown.ok
                        else f" (it failed: {_short(Exception(shutdown.reason))})",
                    )
                return shutdown
            refused = sessions[-1].refused
            if refused is None:
                refused_delay = 0.5
                _log.warn("lost the connection to the server; reconnecting")
                continue
            # It will likely say the same again: do not hammer it.
            _log.warn("reconnecting to the server in {delay:.1f} s", delay=refused_delay)
            await deferLater(reactor, refused_delay)
            refused_delay = min(refused_delay * 2, 10.0)
    finally:
        # Kept processes nobody will use (we gave up reconnecting, or were
        # stopped, mid-job too): they stop with us, not when their pipes
        # happen to close, and a task they run is cut short.
        live = sessions[-1].pool if sessions else None
        for spare in {id(kept): kept for kept in (pool, live) if kept is not None}.values():
            if not spare.stopping:
                await spare.stop()


async def _stoppable(attempt: Deferred[MessageChannel]) -> MessageChannel:
    """
    Await a connection attempt such that our being cancelled (the worker
    is stopped: its lifeline closed, Ctrl-C) raises C{CancelledError}, and
    nothing else does.

    Cancelling the attempt itself makes it fail with whatever its transport
    says: an endpoint's C{ConnectingCancelledError}, a lost connection, a
    failed handshake.  The retry loop would take that for the server being
    unreachable and go on retrying for C{--wait} seconds, a worker outliving
    whoever stopped it.  An attempt that ends only later (its transport
    cleans up first) ends into nothing: a channel it opened after all is
    closed.  A transport's own C{CancelledError}, not ours, is a failed
    attempt like any other.
    """
    cancelled = False

    def cancel(_: Deferred[MessageChannel]) -> None:
        nonlocal cancelled
        cancelled = True
        attempt.cancel()

    waiting: Deferred[MessageChannel] = Deferred(cancel)

    def relay(result: MessageChannel | Failure) -> None:
        if isinstance(result, Failure):
            if not waiting.called:
                waiting.errback(result)
        elif not waiting.called:
            waiting.callback(result)
        else:
            result.close()  # (we were cancelled, and Deferred.cancel fired us already)

    attempt.addBoth(relay)
    try:
        return await waiting
    except Exception as e:
        if cancelled:
            raise defer.CancelledError() from None
        if isinstance(e, defer.CancelledError):
            raise ConnectionError(f"the connection attempt was cancelled ({e!r})") from e
        raise


def _gone(job: str, waited: float) -> messages.Shutdown:
    """The end we take a job's to be when its server went away after our work."""
    why = (
        f"the server of job {job} has been gone for {waited:.0f} s since this worker worked "
        "for it: the job most likely ended while the server could not reach this worker"
    )
    _log.warn("{why}; exiting", why=why)
    return messages.Shutdown(True, why)


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]

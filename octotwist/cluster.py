"""
A server that stays: C{octo serve}.  It listens with no job; workers
(C{octo client HOST}) connect and stay, and submitters (C{octo submit})
send it jobs, which run one after another in the order they came.

One port serves both, over any transport, with the same secret: a peer
says first who it is (a worker its C{Hello}, a submitter its C{Submit}).
A worker joins the running job, or waits for the next; when a job ends
its workers are told to come back (C{Shutdown(more=True)}) and reconnect
for the next one.  Each job is a L{JobServer} of its own, as under C{octo
server}, so everything that holds for one job (retries, leases, backup
tasks, exact results) holds for each; a job that fails is over, and the
next starts as if it had not been there.

A submitted script is loaded here, as C{octo server} loads one, before
anything is queued: a broken one is refused with the message C{octo run}
gives, and nothing runs.  Its results go back to its submitter as they
are written (L{messages.ResultText}); a submitter that disconnects does not
stop its job (C{--detach} semantics), whose results then go nowhere.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from octotwist import messages
from octotwist.config import FORMATS, FaultPolicy, JobConfig
from octotwist.errors import OctotwistError
from octotwist.job import Job, load_job
from octotwist.outbox import Outbox
from octotwist.output import Results
from octotwist.server import JobOutcome, JobServer
from octotwist.store import DEFAULT_MEMORY_LIMIT, BlobStore
from octotwist.transport import ChannelHandler, IReactor, MessageChannel, ServerSettings, Transport

_log = Logger()

#: Bytes of what final() printed gathered before they are sent.
_CHUNK = 64 * 1024


@dataclass(eq=False)
class ClusterJob:
    """
    One submitted job, queued, running or over.

    @ivar state: C{queued}, C{running}, C{done}, C{failed} or C{cancelled}.
    """

    id: int
    name: str
    job: Job | None
    config: JobConfig
    submitter: _Peer | None
    state: str = "queued"
    error: str | None = None
    results: int = 0
    submitted: float = field(default_factory=time.time)
    server: JobServer | None = None
    cancelled: bool = False


class ClusterServer:
    """
    The jobs and peers of one C{octo serve}.  Hand L{accept} to a
    L{octotwist.transport.TaskServer}.

    @param policy: the fault policy of every job.
    @param memory_limit: map output each job keeps in memory before it
        spills to disk.
    """

    def __init__(
        self,
        reactor: IReactor,
        *,
        policy: FaultPolicy | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ) -> None:
        self.reactor = reactor
        self.policy = policy or FaultPolicy()
        self.memory_limit = memory_limit
        #: Every job submitted, oldest first.
        self.jobs: list[ClusterJob] = []
        self._queue: deque[ClusterJob] = deque()
        self._running: ClusterJob | None = None
        self._idle: list[_Peer] = []  # workers waiting for a job
        self._ids = itertools.count(1)
        self._scripts = Path(tempfile.mkdtemp(prefix="octo-serve-"))
        #: Each finished job's results, for octo results (while we run).
        self._results = self._scripts / "results"
        self._results.mkdir()
        self._stopped = False

    def accept(self, channel: MessageChannel) -> _Peer:
        """The C{accept} callable handed to a L{TaskServer}."""
        return _Peer(self, channel)

    def stop(self) -> None:
        """
        The server stops: the running job is cancelled (its workers lose
        the connection and retry, as when a server dies), queued ones go.
        """
        self._stopped = True
        for queued in self._queue:
            self._tell_ended(queued, False, "the server was stopped before the job started")
        self._queue.clear()
        if self._running is not None and self._running.server is not None:
            self._running.server.cancel("the job was cancelled: its server was stopped")
        shutil.rmtree(self._scripts, ignore_errors=True)

    # Peers.

    def worker_arrived(self, peer: _Peer) -> None:
        running = self._running
        if running is not None and running.server is not None:
            peer.join(running.server)
        else:
            self._idle.append(peer)

    def peer_gone(self, peer: _Peer) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(peer)
        for queued in self.jobs:
            if queued.submitter is peer:
                queued.submitter = None  # the job goes on (detached)

    # Questions (octo jobs, octo cancel).

    def ask(
        self,
        peer: _Peer,
        question: messages.ListJobs | messages.CancelJob | messages.FetchResults,
    ) -> None:
        """Answer C{question} (the asker hangs up once it has the answer)."""
        match question:
            case messages.ListJobs(limit):
                shown = self.jobs[-limit:] if limit > 0 else []
                peer.outbox.send(messages.JobList(tuple(_entry(j) for j in shown)))
            case messages.FetchResults(number):
                self._send_results(peer, number)
            case messages.CancelJob(number):
                found = next((j for j in self.jobs if j.id == number), None)
                if found is None:
                    peer.outbox.send(messages.JobRefused(f"there is no job {number}"))
                else:
                    self.cancel(
                        found, f"the job was cancelled by octo cancel from {peer.channel.peer}"
                    )
                    peer.outbox.send(messages.JobList((_entry(found),)))

    def _send_results(self, peer: _Peer, number: int) -> None:
        found = next((j for j in self.jobs if j.id == number), None)
        if found is None:
            peer.outbox.send(messages.JobRefused(f"there is no job {number}"))
        elif found.state in ("queued", "running"):
            peer.outbox.send(
                messages.JobRefused(
                    f"job {number} is {found.state}: its results can be fetched once it is done"
                )
            )
        else:
            path = self._results / str(number)
            if found.state == "done" and path.exists():
                peer.outbox.send_blobs(_chunks(path), lambda part, end: messages.ResultText(part))
            peer.outbox.send(
                messages.JobEnded(found.id, found.state == "done", found.error or "", found.results)
            )

    def cancel(self, queued: ClusterJob, why: str) -> None:
        """End a queued or running job, as failed (saying C{why}); one that is over stays so."""
        if queued.state in ("queued", "running"):
            queued.cancelled = True
        if queued.state == "queued":
            self._queue.remove(queued)
            _log.info("job {id} ({job}) cancelled before it started", id=queued.id, job=queued.name)
            self._tell_ended(queued, False, why)
            queued.job = None
            shutil.rmtree(self._scripts / str(queued.id), ignore_errors=True)
        elif queued.state == "running" and queued.server is not None:
            queued.server.cancel(why)  # its end comes through _ended

    # Jobs.

    def submit(self, peer: _Peer, submit: messages.Submit) -> None:
        """
        Load the script and queue its job, or refuse it saying why (a
        broken script, a bad option): nothing is queued then.
        """
        try:
            queued = self._load(peer, submit)
        except OctotwistError as e:
            peer.outbox.send(messages.JobRefused(str(e)))
            _log.info("refused a job from {peer}: {error}", peer=peer.channel.peer, error=str(e))
            return
        self.jobs.append(queued)
        self._queue.append(queued)
        ahead = len(self._queue) - 1 + (self._running is not None)
        peer.outbox.send(messages.JobAccepted(queued.id, ahead))
        _log.info(
            "job {id} ({job}) submitted from {peer}{ahead}",
            id=queued.id,
            job=queued.name,
            peer=peer.channel.peer,
            ahead=f"; {ahead} ahead of it" if ahead else "",
        )
        self._next()

    def _load(self, peer: _Peer, submit: messages.Submit) -> ClusterJob:
        if self._stopped:
            raise OctotwistError("the server is stopping")
        shown = submit.name
        base = Path(shown).name
        if not base.endswith(".py") or base in (".py", "..py"):
            raise OctotwistError(f"{shown!r} is not a job script (a .py file)")
        if submit.format not in FORMATS:
            raise OctotwistError(f"format {submit.format!r}: one of {', '.join(FORMATS)}")
        number = next(self._ids)
        path = Path(shown)
        if not (path.is_absolute() and _holds(path, submit.script)):
            # Not on this machine (or not the same file): a copy of it, in a
            # directory of its own.  (Files it finds beside itself, through
            # __file__, are then not there: a shared filesystem keeps them.)
            home = self._scripts / str(number)
            home.mkdir()
            path = home / base
            path.write_bytes(submit.script)
        config = JobConfig(format=submit.format, sort=submit.sort, args=submit.args)
        try:
            job = load_job(path, submit.args)
        except OctotwistError as e:
            shutil.rmtree(self._scripts / str(number), ignore_errors=True)
            # Said as octo run says it, of the submitter's file, not our copy.
            raise OctotwistError(str(e).replace(str(path), shown)) from None
        return ClusterJob(number, job.name, job, config, peer)

    def _next(self) -> None:
        """Start the oldest queued job when none runs."""
        if self._running is not None or not self._queue or self._stopped:
            return
        queued = self._queue.popleft()
        assert queued.job is not None
        output = _Forwarded(queued, self._results / str(queued.id))
        final = queued.job.final
        if final is not None:
            # What final() prints is the job's output: its submitter's, not ours.
            def forwarded(key: Any, value: Any, final: Callable[[Any, Any], Any] = final) -> Any:
                try:
                    with contextlib.redirect_stdout(output.printed):
                        return final(key, value)
                finally:
                    output.send_printed()

            queued.job.final = forwarded
        server = JobServer(
            queued.job,
            self.reactor,
            output=output,
            store=BlobStore(memory_limit=self.memory_limit),
            policy=self.policy,
            sort=queued.config.sort,
            stays=True,
        )
        queued.server, queued.state, self._running = server, "running", queued
        if queued.submitter is not None:
            queued.submitter.outbox.send(messages.JobStarted(queued.id))
        idle, self._idle = self._idle, []
        server.start(workers_coming=bool(idle))
        for peer in idle:
            peer.join(server)
        server.result.addBoth(self._ended, queued)

    def _ended(self, outcome: JobOutcome | Any, queued: ClusterJob) -> None:
        if not isinstance(outcome, JobOutcome):  # a bug of ours: say so, go on
            _log.failure("job {id} ended with an error", outcome, id=queued.id)
            outcome = JobOutcome(False, f"the server failed: {outcome.getErrorMessage()}")
        self._running = None
        queued.results = outcome.results
        self._tell_ended(queued, outcome.ok, outcome.error or "")
        queued.job, queued.server = None, None  # what it held is not needed any more
        shutil.rmtree(self._scripts / str(queued.id), ignore_errors=True)
        self.reactor.callLater(0, self._next)

    def _tell_ended(self, queued: ClusterJob, ok: bool, error: str) -> None:
        state = "done" if ok else "cancelled" if queued.cancelled else "failed"
        queued.state, queued.error = state, error or None
        if queued.submitter is not None:
            queued.submitter.outbox.send(messages.JobEnded(queued.id, ok, error, queued.results))


def _entry(queued: ClusterJob) -> tuple[int, str, str, float, str]:
    return (queued.id, queued.name, queued.state, queued.submitted, queued.error or "")


def _chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    """A file's bytes, C{size} at a time, read as they are sent."""
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def _holds(path: Path, script: bytes) -> bool:
    """Whether C{path} is, here, the very script submitted (a local or shared file)."""
    try:
        return path.is_file() and path.read_bytes() == script
    except OSError:
        return False


class _Forwarded(Results):
    """A job's results, sent to its submitter as they are written (see the module)."""

    early = True  # the submitter keeps them until the job has succeeded

    def __init__(self, queued: ClusterJob, kept: Path) -> None:
        super().__init__(io.StringIO(), format=queued.config.format)
        self._queued = queued
        self._kept_path = kept
        self._kept = kept.open("wb")  # for octo results, and a submitter that detached
        #: Where final() prints (L{ClusterServer._next}); sent in chunks.
        self.printed = io.StringIO()

    def write(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        self._send("".join(self._encode(keys, values)))
        self.send_printed()

    def _send(self, text: str) -> None:
        if not text:
            return
        data = text.encode("utf-8", errors="backslashreplace")
        self._kept.write(data)
        peer = self._queued.submitter
        if peer is not None:  # else detached: octo results fetches them
            peer.outbox.send_blob(data, lambda part, end: messages.ResultText(part))

    def send_printed(self, at_least: int = _CHUNK) -> None:
        """Send what final() printed, once there is C{at_least} of it."""
        if self.printed.tell() >= at_least:
            self._send(self.printed.getvalue())
            self.printed.seek(0)
            self.printed.truncate()

    def commit(self) -> None:
        self.send_printed(1)
        self._kept.close()

    def abort(self) -> None:
        self._kept.close()
        self._kept_path.unlink(missing_ok=True)  # a failed job's are not results


class _Peer:
    """
    One connection to the cluster: a worker or a submitter, as its first
    message says; a worker's messages go to the job it works for.
    """

    def __init__(self, cluster: ClusterServer, channel: MessageChannel) -> None:
        self.cluster = cluster
        self.channel = channel
        self.outbox = Outbox(channel)
        self.hello: messages.Hello | None = None
        self.role: str | None = None
        self._job: ChannelHandler | None = None

    def join(self, server: JobServer) -> None:
        """Work for this job: its server greets us, and hears our Hello."""
        assert self.hello is not None
        self._job = server.accept(self.channel)
        self._job.message_received(self.hello)

    def message_received(self, message: messages.Message) -> None:
        if self._job is not None:
            self._job.message_received(message)
            return
        match message:
            case messages.Hello() if self.role is None:
                self.role, self.hello = "worker", message
                self.cluster.worker_arrived(self)
            case messages.Submit() if self.role is None:
                self.role = "submitter"
                self.cluster.submit(self, message)
            case messages.ListJobs() | messages.CancelJob() | messages.FetchResults() if (
                self.role is None
            ):
                self.role = "asker"
                self.cluster.ask(self, message)
            case _:
                _log.warn(
                    "closing the connection from {peer}: it sent {kind} as a {role}",
                    peer=self.channel.peer,
                    kind=type(message).__name__,
                    role=self.role or "first message",
                )
                self.channel.close()

    def connection_lost(self, reason: str) -> None:
        if self._job is not None:
            self._job.connection_lost(reason)
        self.cluster.peer_gone(self)


class ClusterService(Service):
    """
    C{octo serve}: a L{ClusterServer} on a transport's port, until stopped.

    @ivar listening: fires with the port's address once it listens.
    """

    def __init__(
        self,
        reactor: IReactor,
        cluster: ClusterServer,
        transport: Transport,
        settings: ServerSettings,
    ) -> None:
        self.reactor = reactor
        self.cluster = cluster
        self.transport = transport
        self.settings = settings
        self.task_server = transport.server_class()(reactor, settings, cluster.accept)
        self.listening: Deferred[str] = Deferred()

    def startService(self) -> None:
        super().startService()
        self.task_server.listen().chainDeferred(self.listening)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.cluster.stop()
        return self.task_server.stop()

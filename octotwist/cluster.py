"""
A server that stays: C{octo serve}.  It listens with no job; workers
(C{octo client HOST}) connect and stay, and submitters (C{octo submit},
L{octotwist.Cluster}) send it jobs, which run in the order they came: one
at a time, unless a job asks for at most N workers (C{--max-workers}), when
the next job starts beside it on the workers it leaves.

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
gives, and nothing runs.  A job built in Python comes pickled (it was
loaded by its submitter, as L{octotwist.run} loads one); unpickling it runs
code as loading a script does, which is why a submitter must hold the
cluster's secret.  Results go back to the submitter as they are written
(L{messages.ResultText}, or L{messages.ResultBatch} for a pickled job) and
are kept for C{octo results}; a submitter that disconnects does not stop
its job (C{--detach} semantics).

With a state directory (C{--state-dir}) the queue outlives the server: each
job is kept in the directory's journal (L{Journal.submit}) before it is
accepted, its tasks are journalled as under C{octo server --state-dir}, and
its results are kept there.  A server started again on that directory
takes up the jobs that were queued or running, resuming those that ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import secrets
import shutil
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from octotwist import codec, messages, webport
from octotwist.config import FORMATS, FaultPolicy, JobConfig
from octotwist.endpoints import server_is_local
from octotwist.errors import OctotwistError
from octotwist.job import Job, load_job
from octotwist.journal import Journal, JournalError, Submitted
from octotwist.launcher import HostWorkers, LaunchConfig, LaunchError, bound_port
from octotwist.outbox import Outbox
from octotwist.output import Results
from octotwist.progress import bar_status
from octotwist.server import JobOutcome, JobServer
from octotwist.status import new_token
from octotwist.store import DEFAULT_MEMORY_LIMIT, BlobStore
from octotwist.timeline import Timeline
from octotwist.transport import ChannelHandler, IReactor, MessageChannel, ServerSettings, Transport

_log = Logger()

#: Bytes of what final() printed gathered before they are sent.
_CHUNK = 64 * 1024
#: The largest job a submitter may send: a pickled job carries its source,
#: which a bigger job had better read from files (L{octotwist.sources}).
MAX_SUBMIT = 1024**3
#: The length before each batch of a pickled job's kept results.
_LENGTH = struct.Struct("!Q")
#: Seconds between the L{messages.JobProgress} a submitter asked for.
PROGRESS_INTERVAL = 0.5
#: Finished jobs whose task streams their pages keep showing (the newest).
KEPT_TIMELINES = 20


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
    #: Its results travel pickled (L{messages.ResultBatch}).
    pickled: bool = False
    #: The most workers it takes; 0: as many as come.
    max_workers: int = 0
    state: str = "queued"
    error: str | None = None
    outcome: JobOutcome | None = None
    submitted: float = field(default_factory=time.time)
    server: JobServer | None = None
    #: Its task stream, kept in memory once it is over (not across a
    #: restart of the cluster) for its page.
    timeline: Timeline | None = None
    cancelled: bool = False
    #: The workers working for it now.
    workers: list[_Peer] = field(default_factory=list)
    #: Where its script's copy is, if it runs one (see L{ClusterServer._load}).
    home: Path | None = None
    #: Its submitter wants its progress (L{messages.JobProgress}).
    progress: bool = False
    _progress_loop: LoopingCall | None = None

    def wants_worker(self) -> bool:
        return self.server is not None and (
            self.max_workers == 0 or len(self.workers) < self.max_workers
        )

    def ended_message(self) -> messages.JobEnded:
        """What its submitter is told of how it ended."""
        outcome = self.outcome or JobOutcome(False)
        return messages.JobEnded(
            self.id,
            self.state == "done",
            self.error or "",
            outcome.results,
            outcome.seconds,
            tuple(sorted(outcome.counters.items())),
            json.dumps(outcome.stats, default=str),
        )


class ClusterServer:
    """
    The jobs and peers of one C{octo serve}.  Hand L{accept} to a
    L{octotwist.transport.TaskServer}.

    @param policy: the fault policy of every job.
    @param memory_limit: map output each job keeps in memory before it
        spills to disk.
    @param state_dir: keep the queue, each job's progress and results
        there (see the module); C{None}: in a temporary directory, for as
        long as we run.
    @raise JournalError: the state directory cannot be used, or another
        server holds it.
    """

    def __init__(
        self,
        reactor: IReactor,
        *,
        policy: FaultPolicy | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.policy = policy or FaultPolicy()
        self.memory_limit = memory_limit
        #: Every job submitted, oldest first.
        self.jobs: list[ClusterJob] = []
        self._queue: deque[ClusterJob] = deque()
        #: The running jobs, in the order they started.
        self._running: list[ClusterJob] = []
        self._idle: list[_Peer] = []  # workers waiting for a job
        self._ids = itertools.count(1)
        self.journal = Journal.open(state_dir) if state_dir is not None else None
        if self.journal is not None:
            self._scripts = self.journal.directory / "cluster"
            # Copies of scripts a dead server ran: loaded again as they start.
            shutil.rmtree(self._scripts / "scripts", ignore_errors=True)
        else:
            self._scripts = Path(tempfile.mkdtemp(prefix="octo-serve-"))
        #: Each finished job's results, for octo results.
        self._results = self._scripts / "results"
        self._results.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._stopped = False
        if self.journal is not None:
            self._take_up(self.journal.submissions())

    def accept(self, channel: MessageChannel) -> _Peer:
        """The C{accept} callable handed to a L{TaskServer}."""
        return _Peer(self, channel)

    def stop(self) -> None:
        """
        The server stops: the running jobs are cancelled (their workers
        lose the connection and retry, as when a server dies), queued ones
        go; with a state directory, both stay there for the next server.
        """
        self._stopped = True
        kept = self.journal is not None
        for queued in self._queue:
            if kept:
                self._tell_kept(queued)
            else:
                self._tell_ended(queued, False, "the server was stopped before the job started")
        self._queue.clear()
        for running in list(self._running):
            if running.server is not None:
                running.server.cancel(
                    "the job was cancelled: its server was stopped", resumable=kept
                )
        if self.journal is not None:
            self.journal.close()
        else:
            shutil.rmtree(self._scripts, ignore_errors=True)

    def _tell_kept(self, queued: ClusterJob) -> None:
        """Tell its submitter that the job waits in the state directory for the next server."""
        if queued.submitter is not None:
            queued.submitter.outbox.send(
                messages.JobEnded(
                    queued.id,
                    False,
                    f"the server was stopped; job {queued.id} is kept in its state directory "
                    f"and goes on when octo serve starts again there (octo results "
                    f"{queued.id} fetches its results then)",
                )
            )

    def _take_up(self, kept: list[Submitted]) -> None:
        """
        The jobs a state directory holds, as a server before us left them:
        those that ended are listed, those queued or running run again
        (the running ones resume), in the order they were submitted.
        """
        assert self.journal is not None
        for entry in kept:
            outcome = _outcome(entry.outcome)
            if entry.state not in ("queued", "running"):
                self.jobs.append(
                    ClusterJob(
                        entry.id,
                        entry.name,
                        None,
                        JobConfig(),
                        None,
                        state=entry.state,
                        error=entry.error,
                        outcome=outcome,
                        submitted=entry.submitted,
                        pickled=_request(entry.request).pickled,
                    )
                )
                continue
            try:
                submit = dataclasses.replace(
                    _request(entry.request), script=self.journal.script(entry)
                )
                queued = self._load(None, submit, entry.id)
            except OctotwistError as e:
                failed = ClusterJob(
                    entry.id, entry.name, None, JobConfig(), None, submitted=entry.submitted
                )
                self.jobs.append(failed)
                _log.warn(
                    "job {id} ({job}) cannot run again: {error}",
                    id=entry.id,
                    job=entry.name,
                    error=str(e),
                )
                self._tell_ended(failed, False, f"it cannot run again: {e}")
                continue
            queued.submitted = entry.submitted
            self.jobs.append(queued)
            self._queue.append(queued)
            _log.info(
                "job {id} ({job}) was {state} when the server stopped: it {what}",
                id=entry.id,
                job=entry.name,
                state=entry.state,
                what="resumes" if entry.state == "running" else "is queued again",
            )
        self._next()

    # Peers.

    def worker_arrived(self, peer: _Peer) -> None:
        """
        A worker is here: the oldest running job that wants more workers
        gets it, else the next queued job starts with it, else it waits.
        """
        running = next((j for j in self._running if j.wants_worker()), None)
        if running is not None:
            peer.join(running)
            return
        self._idle.append(peer)
        assert peer.hello is not None
        _log.info(
            "worker {worker} is here from {peer}; {what}",
            worker=peer.hello.name,
            peer=peer.channel.peer,
            what="starting the next job" if self._queue else "waiting for a job",
        )
        self._next()

    def peer_gone(self, peer: _Peer) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(peer)
        if peer.working_for is not None:
            with contextlib.suppress(ValueError):
                peer.working_for.workers.remove(peer)
        for queued in self.jobs:
            if queued.submitter is peer:
                queued.submitter = None  # the job goes on (detached)

    # The status page (octotwist.clusterpage).

    def status(self, limit: int = 200) -> dict[str, Any]:
        """The cluster's workers and its newest C{limit} jobs, JSON-ready (docs/status.md)."""
        return {
            "workers": {
                "working": sum(len(j.workers) for j in self._running),
                "waiting": len(self._idle),
            },
            "jobs": [_summary(j) for j in self.jobs[-limit:]],
        }

    def job_entry(self, number: int) -> dict[str, Any] | None:
        """Job C{number}'s line of L{status}, or C{None}: there is no such job."""
        found = self._find(number)
        return None if found is None else _summary(found)

    def job_status(self, number: int, stream_since: int | None = None) -> dict[str, Any] | None:
        """
        Job C{number}'s own status page's data: live while it runs (with its
        task stream from C{stream_since} if that is given), its last once it
        is over; C{None} while it is queued (or it never started).
        """
        found = self._find(number)
        if found is None:
            return None
        if found.server is not None:
            return found.server.status(stream_since)
        if found.outcome is None or not found.outcome.stats:
            return None
        if stream_since is None or found.timeline is None:
            return found.outcome.stats
        return {**found.outcome.stats, "stream": found.timeline.json(stream_since)}

    def _find(self, number: int) -> ClusterJob | None:
        return next((j for j in self.jobs if j.id == number), None)

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
                found = self._find(number)
                if found is None:
                    peer.outbox.send(messages.JobRefused(f"there is no job {number}"))
                else:
                    self.cancel(
                        found, f"the job was cancelled by octo cancel from {peer.channel.peer}"
                    )
                    peer.outbox.send(messages.JobList((_entry(found),)))

    def _send_results(self, peer: _Peer, number: int) -> None:
        found = self._find(number)
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
                if found.pickled:
                    peer.outbox.send_blobs(_batches(path), messages.ResultBatch)
                else:
                    peer.outbox.send_blobs(
                        _chunks(path), lambda part, end: messages.ResultText(part)
                    )
            peer.outbox.send(found.ended_message())

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
        queued = None
        try:
            queued = self._load(peer, submit)
            queued.id = self._number(queued, submit)
            queued.progress = submit.progress
        except OctotwistError as e:
            if queued is not None and queued.home is not None:
                shutil.rmtree(queued.home, ignore_errors=True)
            peer.outbox.send(messages.JobRefused(str(e)))
            _log.info("refused a job from {peer}: {error}", peer=peer.channel.peer, error=str(e))
            return
        self.jobs.append(queued)
        self._queue.append(queued)
        ahead = len(self._queue) - 1 + len(self._running)
        peer.outbox.send(messages.JobAccepted(queued.id, ahead))
        _log.info(
            "job {id} ({job}) submitted from {peer}{ahead}",
            id=queued.id,
            job=queued.name,
            peer=peer.channel.peer,
            ahead=f"; {ahead} ahead of it" if ahead else "",
        )
        self._next()

    def _send_progress(self, queued: ClusterJob) -> None:
        """Tell a submitter that asked (for its bars) how its job goes."""
        if queued.submitter is None or queued.server is None:
            return  # gone, or over: the loop stops with the job
        status = bar_status(queued.server.status())
        queued.submitter.outbox.send(messages.JobProgress(json.dumps(status)))

    def _number(self, queued: ClusterJob, submit: messages.Submit) -> int:
        """
        The job's ID; with a state directory, once it is kept there.

        @raise JournalError: the state directory cannot take it (a full disk).
        """
        if self.journal is None:
            return next(self._ids)
        request = codec.encode_message(dataclasses.replace(submit, script=b""))
        return self.journal.submit(queued.name, queued.submitted, request, submit.script)

    def _load(self, peer: _Peer | None, submit: messages.Submit, number: int = 0) -> ClusterJob:
        """
        The job C{submit} sends, loaded as C{octo server} loads one, and
        numbered C{number} (0: not yet).

        @raise OctotwistError: it does not load, saying why.
        """
        if self._stopped:
            raise OctotwistError("the server is stopping")
        shown = submit.name
        base = Path(shown).name
        if submit.max_workers < 0 or submit.reduce_tasks < 0:
            raise OctotwistError("max_workers and reduce_tasks must be 0 (unset) or more")
        if not submit.pickled and (not base.endswith(".py") or base in (".py", "..py")):
            raise OctotwistError(f"{shown!r} is not a job script (a .py file)")
        if not submit.pickled and submit.format not in FORMATS:
            raise OctotwistError(f"format {submit.format!r}: one of {', '.join(FORMATS)}")
        config = JobConfig(
            format="tsv" if submit.pickled else submit.format,
            sort=submit.sort,
            args=submit.args,
            reduce_tasks=submit.reduce_tasks or None,
        )
        if submit.pickled:
            job = _unpickled(submit.script, shown)
            return ClusterJob(number, job.name, job, config, peer, True, submit.max_workers)
        path, home = Path(shown), None
        if not (path.is_absolute() and _holds(path, submit.script)):
            # Not on this machine (or not the same file): a copy of it, in a
            # directory of its own.  (Files it finds beside itself, through
            # __file__, are then not there: a shared filesystem keeps them.)
            home = self._scripts / "scripts" / secrets.token_hex(8)
            try:
                home.mkdir(parents=True, mode=0o700)
                path = home / base
                path.write_bytes(submit.script)
            except OSError as e:
                shutil.rmtree(home, ignore_errors=True)
                raise OctotwistError(f"cannot keep a copy of the script in {home}: {e}") from e
        try:
            job = load_job(path, submit.args)
        except OctotwistError as e:
            if home is not None:
                shutil.rmtree(home, ignore_errors=True)
            # Said as octo run says it, of the submitter's file, not our copy.
            raise OctotwistError(str(e).replace(str(path), shown)) from None
        queued = ClusterJob(number, job.name, job, config, peer, False, submit.max_workers)
        queued.home = home
        return queued

    def _next(self) -> None:
        """
        Start the oldest queued job when none runs, or beside those that
        run when they took all the workers they asked for and some wait.
        """
        while self._queue and not self._stopped and (not self._running or self._idle):
            self._start(self._queue.popleft())

    def _start(self, queued: ClusterJob) -> None:
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
            reduce_tasks=queued.config.reduce_tasks,
            output=output,
            store=BlobStore(memory_limit=self.memory_limit),
            policy=self.policy,
            sort=queued.config.sort,
            stays=True,
            journal=self.journal,
            fingerprint=f"cluster job {queued.id}",
        )
        queued.server, queued.state = server, "running"
        self._record(queued)
        self._running.append(queued)
        if queued.submitter is not None:
            queued.submitter.outbox.send(messages.JobStarted(queued.id))
            if queued.progress:
                queued._progress_loop = LoopingCall(self._send_progress, queued)
                queued._progress_loop.clock = self.reactor
                queued._progress_loop.start(PROGRESS_INTERVAL, now=True)
        taken = self._idle if not queued.max_workers else self._idle[: queued.max_workers]
        self._idle = self._idle[len(taken) :]
        server.start(workers_coming=bool(taken))
        if queued.max_workers:
            _log.info(
                "job {id} ({job}) takes at most {n} worker{s}",
                id=queued.id,
                job=queued.name,
                n=queued.max_workers,
                s="" if queued.max_workers == 1 else "s",
            )
        for peer in taken:
            peer.join(queued)
        server.result.addBoth(self._ended, queued)

    def _ended(self, outcome: JobOutcome | Any, queued: ClusterJob) -> None:
        if not isinstance(outcome, JobOutcome):  # a bug of ours: say so, go on
            _log.failure("job {id} ended with an error", outcome, id=queued.id)
            outcome = JobOutcome(False, f"the server failed: {outcome.getErrorMessage()}")
        self._running.remove(queued)
        if queued._progress_loop is not None and queued._progress_loop.running:
            queued._progress_loop.stop()
            if queued.submitter is not None and outcome.stats:
                # The last frame: the bars end where the job did.
                last = json.dumps(bar_status(outcome.stats))
                queued.submitter.outbox.send(messages.JobProgress(last))
        queued.outcome = outcome
        self._tell_ended(queued, outcome.ok, outcome.error or "")
        if queued.server is not None:
            queued.timeline = queued.server.timeline
            kept = [j for j in self.jobs if j.timeline is not None]
            for old in kept[:-KEPT_TIMELINES]:
                old.timeline = None
        queued.job, queued.server = None, None  # what it held is not needed any more
        # (Its workers were told to come back, and will be new peers.)
        for peer in queued.workers:
            peer.working_for = None
        queued.workers.clear()
        if queued.home is not None:
            shutil.rmtree(queued.home, ignore_errors=True)
        self.reactor.callLater(0, self._next)

    def _tell_ended(self, queued: ClusterJob, ok: bool, error: str) -> None:
        if self._stopped and self.journal is not None and not queued.cancelled:
            # Stopped, not over: it is kept for the next server.
            self._tell_kept(queued)
            return
        state = "done" if ok else "cancelled" if queued.cancelled else "failed"
        queued.state, queued.error = state, error or None
        self._record(queued)
        if queued.submitter is not None:
            queued.submitter.outbox.send(queued.ended_message())

    def _record(self, queued: ClusterJob) -> None:
        """Keep the job's state in the state directory, if there is one."""
        if self.journal is None or self._stopped:
            return
        outcome = None
        if queued.outcome is not None:
            o = queued.outcome
            outcome = json.dumps(
                [o.results, o.seconds, sorted(o.counters.items()), o.stats], default=str
            )
        try:
            self.journal.set_state(queued.id, queued.state, queued.error, outcome)
        except JournalError as e:
            _log.warn("{error}", error=str(e))


def _summary(job: ClusterJob) -> dict[str, Any]:
    """A job's line of the cluster's status page."""
    stats: dict[str, Any] = {}
    if job.server is not None:
        stats = job.server.status()
    elif job.outcome is not None:
        stats = job.outcome.stats
    outcome = job.outcome
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "submitted": job.submitted,
        "error": job.error or "",
        "max_workers": job.max_workers,
        "workers": len(job.workers),
        "map": _progress(stats.get("map")),
        "reduce": _progress(stats.get("reduce")),
        "results": outcome.results if outcome is not None else None,
        "seconds": stats.get("elapsed", outcome.seconds if outcome is not None else None),
    }


def _progress(phase: Any) -> dict[str, Any] | None:
    if not isinstance(phase, dict):
        return None
    return {"done": phase.get("done", 0), "total": phase.get("total")}


def _entry(queued: ClusterJob) -> tuple[int, str, str, float, str]:
    return (queued.id, queued.name, queued.state, queued.submitted, queued.error or "")


def _chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    """A file's bytes, C{size} at a time, read as they are sent."""
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def default_state_dir() -> Path:
    """
    C{octo serve}'s state directory unless told: C{$XDG_STATE_HOME/octotwist/serve},
    or C{~/.local/state/octotwist/serve} (the XDG base directory default).
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "octotwist" / "serve"


def _request(header: bytes) -> messages.Submit:
    """A kept job's L{messages.Submit} (without its script), as the journal holds it."""
    submit = codec.decode_message(header)
    assert isinstance(submit, messages.Submit)
    return submit


def _outcome(kept: str | None) -> JobOutcome | None:
    """How a kept job ended, as L{ClusterServer._record} wrote it."""
    if not kept:
        return None
    results, seconds, counters, stats = json.loads(kept)
    return JobOutcome(True, None, results, seconds, stats, dict(counters))


def _batches(path: Path) -> Iterator[bytes]:
    """A pickled job's kept results, a batch at a time, read as they are sent."""
    with path.open("rb") as f:
        while header := f.read(_LENGTH.size):
            (size,) = _LENGTH.unpack(header)
            yield f.read(size)


def _unpickled(data: bytes, shown: str) -> Job:
    """
    The job a submitter loaded and pickled (L{octotwist.Cluster}).

    @raise OctotwistError: it does not unpickle here, saying why.
    """
    try:
        job = codec.load_submitted_job(data)
    except Exception as e:
        raise OctotwistError(
            f"job {shown!r} cannot be loaded on the cluster: {type(e).__name__}: {e} "
            "(a module it uses by name must be installed where octo serve runs, as on "
            "its workers)"
        ) from None
    if not isinstance(job, Job):
        raise OctotwistError(f"job {shown!r}: what was sent is a {type(job).__name__}, not a job")
    return job


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
        self._pickled = queued.pickled
        self._kept_path = kept
        self._kept = kept.open("wb")  # for octo results, and a submitter that detached
        #: Why the results could not be kept (a full disk): the job fails.
        self._broken: OSError | None = None
        #: Where final() prints (L{ClusterServer._next}); sent in chunks.
        self.printed = io.StringIO()

    def write(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        if self._pickled:
            blob = codec.pack((list(keys), list(values)))
            self._keep(_LENGTH.pack(len(blob)) + blob)
            peer = self._queued.submitter
            if peer is not None:
                peer.outbox.send_blob(blob, messages.ResultBatch)
        else:
            self._send("".join(self._encode(keys, values)))
        self.send_printed()

    def _send(self, text: str) -> None:
        if not text:
            return
        data = text.encode("utf-8", errors="backslashreplace")
        self._keep(data)
        peer = self._queued.submitter
        if peer is not None:  # else detached: octo results fetches them
            peer.outbox.send_blob(data, lambda part, end: messages.ResultText(part))

    def send_printed(self, at_least: int = _CHUNK) -> None:
        """Send what final() printed, once there is C{at_least} of it."""
        if self.printed.tell() >= at_least:
            self._send(self.printed.getvalue())
            self.printed.seek(0)
            self.printed.truncate()

    def _keep(self, data: bytes) -> None:
        if self._broken is not None:
            return
        try:
            self._kept.write(data)
        except OSError as e:
            self._broken = e

    def commit(self) -> None:
        """
        @raise OSError: the results could not be kept; the server fails
            the job saying so, as for an output that cannot be written.
        """
        self.send_printed(1)
        try:
            self._kept.close()
        except OSError as e:
            self._broken = self._broken or e
        if self._broken is not None:
            self._kept_path.unlink(missing_ok=True)
            raise OSError(
                self._broken.errno,
                f"cannot keep the results in {self._kept_path.parent}: "
                f"{self._broken.strerror or self._broken}",
            )

    def abort(self) -> None:
        with contextlib.suppress(OSError):
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
        #: The job this worker works for, while it does.
        self.working_for: ClusterJob | None = None
        self._job: ChannelHandler | None = None
        self._parts: list[bytes] = []  # a Submit's script, as it comes
        self._size = 0

    def join(self, job: ClusterJob) -> None:
        """Work for this job: its server greets us, and hears our Hello."""
        assert self.hello is not None and job.server is not None
        self.working_for = job
        job.workers.append(self)
        self._job = job.server.accept(self.channel)
        self._job.message_received(self.hello)

    def message_received(self, message: messages.Message) -> None:
        if self._job is not None:
            self._job.message_received(message)
            return
        match message:
            case messages.Hello() if self.role is None:
                self.role, self.hello = "worker", message
                self.cluster.worker_arrived(self)
            case messages.Submit() if self.role in (None, "submitting"):
                self.role = "submitting"
                self._size += len(message.script)
                if self._size > MAX_SUBMIT:
                    self.outbox.send(
                        messages.JobRefused(
                            f"the job is over {MAX_SUBMIT >> 20} MiB: give it a source that "
                            "reads its data from files (octotwist.sources) rather than "
                            "holding it"
                        )
                    )
                    self.channel.close()
                elif not message.end:
                    self._parts.append(message.script)
                else:
                    script = b"".join([*self._parts, message.script])
                    self._parts = []
                    self.role = "submitter"
                    self.cluster.submit(self, dataclasses.replace(message, script=script))
            case messages.CancelJob(number) if self.role == "submitter":
                # Its submitter gives up on it (interrupted, or its own final() raised).
                own = [j for j in self.cluster.jobs if j.id == number and j.submitter is self]
                for job in own:
                    self.cluster.cancel(job, "the job was cancelled by its submitter")
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
    C{octo serve}: a L{ClusterServer} on a transport's port, and its status
    site (L{octotwist.clusterpage}) on C{web} and on an HTTP transport's
    port, until stopped.

    @param web: the status site's endpoint, its interface filled in
        (L{octotwist.webport.web_endpoint}); C{None}: none of its own.
    @ivar listening: fires with the port's address once it listens.
    """

    def __init__(
        self,
        reactor: IReactor,
        cluster: ClusterServer,
        transport: Transport,
        settings: ServerSettings,
        web: str | None = None,
        hosts: LaunchConfig | None = None,
    ) -> None:
        from octotwist.clusterpage import ClusterPage

        self.reactor = reactor
        self.cluster = cluster
        self.transport = transport
        self.web = web
        #: The status site's token, needed beyond this machine.
        self.token = new_token()
        local = server_is_local(settings.listen)
        self.settings = dataclasses.replace(
            settings, status=ClusterPage(cluster, token=None if local else self.token)
        )
        self.task_server = transport.server_class()(reactor, self.settings, cluster.accept)
        self._web_port: IListeningPort | None = None
        self.listening: Deferred[str] = Deferred()
        #: The workers this cluster starts on hosts over SSH (C{--hosts}).
        self.hosts = (
            # (Every reactor starts processes; IReactor only says timers.)
            HostWorkers(
                reactor,  # type: ignore[arg-type]
                hosts,
                transport.name,
                settings.secret,
            )
            if hosts is not None
            else None
        )

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._listen()).chainDeferred(self.listening)

    async def _listen(self) -> str:
        from octotwist.clusterpage import ClusterPage

        if self.web is not None:
            try:
                self._web_port = await webport.serve_status(
                    self.reactor,
                    lambda token: ClusterPage(self.cluster, token=token),
                    self.web,
                    self.token,
                )
            except Exception as e:
                raise OctotwistError(f"cannot listen on {self.web}: {e}") from e
        try:
            address = await self.task_server.listen()
        except Exception as e:
            raise OctotwistError(f"cannot listen on {self.settings.listen}: {e}") from e
        from octotwist.service import client_hint

        hint = client_hint(address, self.transport, self.settings.listen)
        journal = self.cluster.journal
        _log.info(
            "serving jobs on {address}; start workers with: octo client {hint}; send jobs "
            "with: octo submit JOB.py -c {hint}{kept}",
            address=address,
            hint=hint,
            kept=f"; the queue is kept in {journal.directory}" if journal else "",
        )
        webport.log_transport_page(address, self.settings.listen, self.token, self.transport)
        if self.hosts is not None:
            await self._launch(address)
        return address

    async def _launch(self, address: str) -> None:
        """
        Check the hosts of C{--hosts}, starting a worker on each that can
        work (workers that connect by themselves are welcome as ever).

        @raise LaunchError: one cannot work, and all must.
        """
        assert self.hosts is not None
        refusal = await self.hosts.launch(bound_port(address), others_coming=True)
        if refusal is not None:
            raise LaunchError(f"the cluster cannot start: {refusal}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.cluster.stop()
        if self._web_port is not None:
            self._web_port.stopListening()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """The workers on our hosts exit (their lifelines close), then the port closes."""
        if self.hosts is not None:
            # Told that the cluster stops, its workers would wait for it to
            # come back: their lifelines close at once.
            await self.hosts.stop(self_exit=0)
        await self.task_server.stop()

"""
octotwist from Python, on a cluster that stays (C{octo serve}): the same
job, the same L{JobResult}, as L{octotwist.run}, on the cluster's workers.

    >>> cluster = octotwist.Cluster("10.0.0.5:18125", secret_file="~/.octo/secret")
    >>> counts = cluster.run("examples/wordcount.py")
    >>> counts = cluster.run(octotwist.Job(source=..., mapfn=..., reducefn=...), max_workers=2)

The job is loaded here, exactly as L{octotwist.run} loads it (a script runs
in this process, with its C{args}), then sent pickled, source included:
its functions may be defined anywhere, a notebook cell included.  A source
that reads files (L{octotwist.sources}) names them; they must be where the
workers run, as for C{octo submit}.  The results come back pickled, the
very keys and values the job's C{reducefn} returned (not text), and a
C{final()} runs here, on each as it comes, as under L{octotwist.run}.

The cluster unpickles what it is sent: a submitter runs code there, as a
job script does, which is why it must prove the cluster's secret first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet.defer import CancelledError, Deferred

from octotwist import api, codec, messages
from octotwist.config import DEFAULT_TRANSPORT, JobConfig
from octotwist.errors import OctotwistError, UsageError
from octotwist.output import Collected, Results
from octotwist.server import JobOutcome
from octotwist.submit import Submission, ask, cluster_client, connect
from octotwist.threaded import blocking_call, global_reactor
from octotwist.transport import IReactor, MessageChannel, TaskClient

#: The port C{octo serve} listens on unless told.
DEFAULT_ADDRESS = "localhost:18125"

JobSpec = str | os.PathLike[str] | types.ModuleType | api.Job


class JobInfo(NamedTuple):
    """One of a cluster's jobs, as L{Cluster.jobs} lists them (C{octo jobs})."""

    id: int
    name: str
    state: str  # queued, running, done, failed or cancelled
    submitted: float  # Unix time
    error: str


@dataclass(frozen=True)
class Cluster:
    """
    A cluster (C{octo serve}) to run jobs on.  Nothing connects until a
    job is run: each call is one connection, as each C{octo} command is.

    @param address: the cluster's C{HOST[:PORT]}, or a Twisted client
        endpoint string.
    @param transport: the transport the cluster serves (C{octo transports}).
    @param secret_file: the file holding the cluster's secret (default:
        C{$OCTO_SECRET}, else the local one, as for C{octo submit}).
    @param options: the transport's own client options, by name
        (C{{"known-hosts": "..."}} for ssh), as C{octo client} takes them.
    """

    address: str = DEFAULT_ADDRESS
    transport: str = DEFAULT_TRANSPORT
    secret_file: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def run(
        self,
        job: JobSpec,
        *,
        args: Sequence[str] = (),
        reduce_tasks: int | None = None,
        max_workers: int | None = None,
        sort: bool = True,
        output: str | None = None,
        format: str = "tsv",
    ) -> api.JobResult:
        """
        Run C{job} on the cluster and return its results, once it is done
        (after the jobs queued before it).

        @param job: a job script's path, a module with a job's names, or an
            L{octotwist.Job}.
        @param args: a job script's own arguments (its C{sys.argv[1:]}).
        @param reduce_tasks: reduce partitions (default: the job's, else 8).
        @param max_workers: take at most this many of the cluster's workers,
            so that the next job runs beside this one on the others.
        @param sort: results in key order (else in partition order).
        @param output: write the results to this file instead of returning
            them (replaced only when the job succeeds), in C{format}.
        @raise octotwist.JobFailed: the job failed, or was cancelled.
        @raise OctotwistError: the job, an option or the secret is wrong, or
            the cluster refused the job (saying why).
        @raise ConnectionError: the cluster cannot be reached, or the
            connection was lost before the job ended (it goes on there).
        """
        request = _Request(job, args, reduce_tasks, max_workers, sort, output, format)
        return blocking_call(lambda reactor: self._run(reactor, request))

    def run_deferred(
        self,
        job: JobSpec,
        *,
        reactor: IReactor | None = None,
        **keywords: Any,
    ) -> Deferred[api.JobResult]:
        """
        L{run} for a Twisted program: a L{Deferred} that fires with the
        L{JobResult}.  Cancelling it cancels the job on the cluster.
        """
        try:
            request = _Request(job, **keywords)
        except Exception as e:
            failed: Deferred[api.JobResult] = Deferred()
            failed.errback(e)
            return failed
        return Deferred.fromCoroutine(self._run(reactor or global_reactor(), request))

    def jobs(self, limit: int = 100) -> list[JobInfo]:
        """The cluster's newest C{limit} jobs, oldest first (C{octo jobs})."""
        answer = blocking_call(lambda reactor: ask(self._client(reactor), messages.ListJobs(limit)))
        return [JobInfo(*entry) for entry in getattr(answer, "jobs", ())]

    def cancel(self, job: int) -> JobInfo:
        """
        Cancel a queued or running job (C{octo cancel}): it fails, saying so.

        @raise OctotwistError: the cluster has no such job.
        """
        answer = blocking_call(lambda reactor: ask(self._client(reactor), messages.CancelJob(job)))
        if isinstance(answer, messages.JobRefused):
            raise OctotwistError(answer.error)
        return JobInfo(*answer.jobs[0])

    def _client(self, reactor: IReactor) -> TaskClient:
        from octotwist.hookspecs import get_transport

        transport = get_transport(self.transport)
        own = {o.name: o.default for o in transport.client_options}
        unknown = sorted(set(self.options) - set(own))
        if unknown:
            raise UsageError(
                f"{', '.join(unknown)}: not an option of the {transport.name} transport "
                f"(it takes {', '.join(own) or 'none'})"
            )
        own.update(self.options)
        return cluster_client(reactor, self.transport, self.address, self.secret_file, own)

    async def _run(self, reactor: IReactor, request: _Request) -> api.JobResult:
        client = self._client(reactor)
        received = _Received(request.loaded, request.results())
        sessions: list[Submission] = []

        def accept(channel: MessageChannel) -> Submission:
            sessions.append(Submission(channel, request.message(), received))
            return sessions[-1]

        try:
            await connect(client, accept, "the cluster")
            try:
                ending = await sessions[-1].ended
            except CancelledError:
                sessions[-1].cancel_job()
                raise
        except BaseException:
            received.output.abort()
            raise
        if isinstance(ending, messages.JobRefused):
            received.output.abort()
            raise OctotwistError(ending.error)
        assert isinstance(ending, messages.JobEnded)
        outcome = JobOutcome(
            ending.ok,
            ending.error or None,
            ending.results,
            ending.seconds,
            json.loads(ending.status) if ending.status else {},
            dict(ending.counters),
        )
        if not outcome.ok:
            received.output.abort()
        else:
            received.output.commit()
        return api._result(request.loaded, outcome, received.output)


class _Request:
    """One job to send: loaded here (as octotwist.run loads it), and its options checked."""

    def __init__(
        self,
        job: JobSpec,
        args: Sequence[str] = (),
        reduce_tasks: int | None = None,
        max_workers: int | None = None,
        sort: bool = True,
        output: str | None = None,
        format: str = "tsv",
    ) -> None:
        if max_workers is not None and (type(max_workers) is not int or max_workers < 1):
            raise UsageError(f"max_workers must be a positive int, not {max_workers!r}")
        self.config = JobConfig(
            reduce_tasks=reduce_tasks, output=output, format=format, sort=sort, args=tuple(args)
        )
        self.loaded = api.load(job, self.config.args)
        self.max_workers = max_workers or 0
        # The job travels without its final(), which runs here.
        self.pickled = codec.dump_functions(dataclasses.replace(self.loaded, final=None))
        path = self.loaded.path
        self.name = str(path) if isinstance(path, Path) else f"{self.loaded.name}.py"

    def results(self) -> Results:
        """Where the results go: the returned dict, or C{output}."""
        results = api._output(self.config, self.loaded)
        if results.partitioned or not (results.early or isinstance(results, Collected)):
            results.abort()
            raise UsageError(
                f"Cluster.run writes its results to a file, not to {self.config.output!r}: "
                "give output= a file name (or none, for the returned dict)"
            )
        return results

    def message(self) -> messages.Submit:
        return messages.Submit(
            self.name,
            self.pickled,
            self.config.args,
            "pickle",
            self.config.sort,
            pickled=True,
            reduce_tasks=self.config.reduce_tasks or 0,
            max_workers=self.max_workers,
        )


class _Received:
    """What comes back: each batch to the job's C{final()}, else to the output."""

    def __init__(self, loaded: Any, output: Results) -> None:
        self.name = loaded.name
        self.final = loaded.final
        self.output = output

    def write(self, data: bytes) -> None:
        sys.stdout.write(data.decode("utf-8", "backslashreplace"))

    def batch(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        if self.final is None:
            self.output.write(keys, values)
            return
        for key, value in zip(keys, values, strict=True):
            try:
                self.final(key, value)
            except Exception as e:
                raise api.JobFailed(
                    self.name,
                    JobOutcome(False, f"final() raised at key {key!r}: {type(e).__name__}: {e}"),
                ) from e


__all__ = ["Cluster", "JobInfo"]

"""
C{octo submit}: send a job script to a cluster (C{octo serve}), wait for it,
and write its results, as C{octo run} would.

The results arrive as they are written (L{messages.ResultText}) and are
kept aside, in the temporary file beside C{-o FILE} or in an unnamed one
for standard output, until the cluster says the job succeeded: a job that
fails leaves C{FILE} as it was and prints nothing, as C{octo run} does.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from octotwist import auth, codec, messages
from octotwist.errors import OctotwistError, RemoteProtocolError, UsageError
from octotwist.outbox import Outbox
from octotwist.output import Results, encoder, open_results
from octotwist.transport import Accept, ClientSettings, IReactor, MessageChannel, TaskClient

_log = Logger()

#: How a submission ended: the cluster's word on the job, or its refusal
#: (or, with C{detach}, that it accepted the job).
Ending = messages.JobEnded | messages.JobRefused | messages.JobAccepted


class ResultSink(Protocol):
    """Where a L{Submission} puts what comes back: text, or a pickled job's batches."""

    def write(self, data: bytes) -> None:
        """Results as text (UTF-8), or what the job's C{final()} printed."""

    def batch(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """A pickled job's results, in order."""


class Submission:
    """
    The submitter's side of its one connection: it sends its L{messages.Submit}
    at once, then writes what comes back to C{sink}.

    @ivar ended: fires with the L{messages.JobEnded} or L{messages.JobRefused};
        fails with L{RemoteProtocolError} if the server is not a cluster, or
        with L{ConnectionError} if the connection is lost before the end.
    """

    def __init__(
        self,
        channel: MessageChannel,
        request: messages.Submit | messages.FetchResults,
        sink: ResultSink,
        detach: bool = False,
    ) -> None:
        self.channel = channel
        self.sink = sink
        self.detach = detach
        self.job: int | None = None
        self.ended: Deferred[Ending] = Deferred()
        #: Called with each L{messages.JobProgress}'s status, if set.
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        self._batch: list[bytes] = []
        if isinstance(request, messages.Submit):
            # A pickled job may be large: in parts, as the channel drains.
            Outbox(channel).send_blob(
                request.script,
                lambda part, end: dataclasses.replace(request, script=part, end=end),
            )
        else:
            channel.send(request)

    def message_received(self, message: messages.Message) -> None:
        if self.ended.called:
            return
        try:
            self._handle(message)
        except Exception as e:  # the sink's: a final() of the submitter's raised
            self.cancel_job()
            self._fail(e)

    def cancel_job(self) -> None:
        """Give up on the job: the cluster cancels it (a submitter may cancel its own)."""
        if self.job is not None and not self.ended.called:
            self.channel.send(messages.CancelJob(self.job))

    def _handle(self, message: messages.Message) -> None:
        match message:
            case messages.JobAccepted(job, ahead) if self.detach:
                self.ended.callback(message)
                self.channel.close()
            case messages.JobAccepted(job, ahead):
                self.job = job
                _log.info(
                    "job {job} submitted{ahead}",
                    job=job,
                    ahead=f"; it runs after the {ahead} ahead of it" if ahead else "",
                )
            case messages.JobStarted(job):
                _log.info("job {job} is running", job=job)
            case messages.JobProgress(status):
                if self.on_progress is not None:
                    self.on_progress(json.loads(status))
            case messages.ResultText(data):
                self.sink.write(data)
            case messages.ResultBatch(data, end):
                self._batch.append(data)
                if end:
                    blob, self._batch = b"".join(self._batch), []
                    keys, values = codec.unpack(blob)
                    self.sink.batch(keys, values)
            case messages.JobEnded() | messages.JobRefused():
                self.ended.callback(message)
                self.channel.close()
            case messages.Welcome(job_name=name):
                self._fail(
                    RemoteProtocolError(
                        f"the server at {self.channel.peer} serves one job ({name}: "
                        "octo server), not a queue of them: submit jobs to octo serve"
                    )
                )
            case messages.Shutdown(reason=reason):
                self._fail(ConnectionError(f"the server stopped: {reason}"))
            case _:
                self._fail(
                    RemoteProtocolError(f"unexpected {type(message).__name__} from the server")
                )

    def _fail(self, error: Exception) -> None:
        self.ended.errback(error)
        self.channel.close()

    def connection_lost(self, reason: str) -> None:
        if not self.ended.called:
            detached = (
                f" (job {self.job} goes on there, or, if the server stopped, when it starts "
                f"again on its state directory: `octo results {self.job}` fetches its "
                "results once it is done)"
                if self.job is not None
                else ""
            )
            self.ended.errback(
                ConnectionError(f"lost the connection to the server: {reason}{detached}")
            )


class Question:
    """
    The asker's side of one question (C{octo jobs}, C{octo cancel}): it is
    sent at once; L{answer} fires with the cluster's reply.
    """

    def __init__(self, channel: MessageChannel, question: messages.Message) -> None:
        self.channel = channel
        self.answer: Deferred[messages.JobList | messages.JobRefused] = Deferred()
        channel.send(question)

    def message_received(self, message: messages.Message) -> None:
        if self.answer.called:
            return
        match message:
            case messages.JobList() | messages.JobRefused():
                self.answer.callback(message)
            case messages.Welcome(job_name=name):
                self.answer.errback(
                    RemoteProtocolError(
                        f"the server at {self.channel.peer} serves one job ({name}: "
                        "octo server), not a queue of them: ask octo serve"
                    )
                )
            case _:
                self.answer.errback(
                    RemoteProtocolError(f"unexpected {type(message).__name__} from the server")
                )
        self.channel.close()

    def connection_lost(self, reason: str) -> None:
        if not self.answer.called:
            self.answer.errback(ConnectionError(f"lost the connection to the server: {reason}"))


async def ask(
    client: TaskClient, question: messages.Message
) -> messages.JobList | messages.JobRefused:
    """
    Connect, ask, and return the answer.

    @raise OctotwistError: the server is not a cluster, or the secret is wrong.
    @raise ConnectionError: the server cannot be reached, or hung up.
    """
    asked: list[Question] = []

    def accept(channel: MessageChannel) -> Question:
        asked.append(Question(channel, question))
        return asked[-1]

    await connect(client, accept)
    return await asked[-1].answer


def job_table(jobs: tuple[tuple[int, str, str, float, str], ...]) -> str:
    """What C{octo jobs} prints: a line a job, oldest first."""
    import time

    lines = [f"{'ID':>4}  {'STATE':9} {'SUBMITTED':19}  JOB"]
    for number, name, state, submitted, error in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(submitted))
        why = f"  ({error.splitlines()[0][:120]})" if error else ""
        lines.append(f"{number:>4}  {state:9} {when}  {name}{why}")
    return "\n".join(lines) + "\n"


class Sink:
    """
    Where the results go: kept aside until L{commit}, taken back by L{abort}.

    @param output: C{-o FILE}, or C{None} for standard output.
    """

    def __init__(self, output: str | None, format: str) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._encode = encoder(format)
        self._results: Results | None = None
        self._spool: IO[bytes] | None = None
        if output is None:
            self._spool = tempfile.TemporaryFile()  # noqa: SIM115  (closed by commit or abort)
            return
        try:
            self._results = open_results(output, format)
        except OSError as e:
            raise UsageError(f"cannot write {output!r}: {e.strerror}") from None
        if self._results.partitioned or not self._results.early:
            self._results.abort()
            raise UsageError(
                f"octo submit writes its results to a file (or standard output), not to "
                f"{output!r}: give -o a file name"
            )

    def write(self, data: bytes) -> None:
        if self._spool is not None:
            self._spool.write(data)
        else:
            assert self._results is not None
            self._results.stream.write(self._decoder.decode(data))

    def batch(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """A job submitted from Python: its results, written as lines."""
        self.write("".join(self._encode(keys, values)).encode("utf-8", "backslashreplace"))

    def commit(self) -> None:
        if self._spool is not None:
            self._spool.seek(0)
            sys.stdout.flush()
            shutil.copyfileobj(self._spool, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            self._spool.close()
        else:
            assert self._results is not None
            self._results.stream.write(self._decoder.decode(b"", final=True))
            self._results.commit()

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
        elif self._results is not None:
            self._results.abort()


def cluster_client(
    reactor: IReactor,
    transport_name: str,
    address: str | None,
    secret_file: str | None,
    options: dict[str, Any],
) -> TaskClient:
    """
    A client of C{transport_name} for the cluster at C{address} (default
    C{localhost}), proving the configured secret, else the local one.

    @param options: the transport's own client options, defaults applied.
    @raise UsageError: the transport is unknown, the address is malformed,
        or no secret is found.
    """
    from octotwist.hookspecs import get_transport

    transport = get_transport(transport_name)
    given = address or "localhost"
    try:
        connect = transport.client_class().address_to_endpoint(given)
    except ValueError as e:
        raise UsageError(f"cannot connect to {given!r}: {e}") from None
    configured = auth.configured_secret(secret_file)
    secret = configured if configured is not None else auth.client_secret(None)
    return transport.client_class()(reactor, ClientSettings(connect, secret, options))


def script_message(
    path: str,
    args: tuple[str, ...],
    format: str,
    sort: bool,
    reduce_tasks: int = 0,
    max_workers: int = 0,
) -> messages.Submit:
    """
    The L{messages.Submit} for the job script at C{path}.

    @raise UsageError: it cannot be read.
    """
    try:
        script = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"job script {path!r}: {e.strerror}") from None
    # Its absolute path: a cluster on this machine, or sharing its
    # filesystem, loads the file itself, with what lies beside it.
    return messages.Submit(
        str(Path(path).absolute()),
        script,
        args,
        format,
        sort,
        reduce_tasks=reduce_tasks,
        max_workers=max_workers,
    )


async def submit(
    client: TaskClient,
    submit: messages.Submit | messages.FetchResults,
    sink: ResultSink,
    detach: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Ending:
    """
    Connect, submit (or ask for a finished job's results), and wait for the
    job's end; the results are in C{sink} (neither committed nor aborted:
    the caller decides).  With C{detach}, return once the job is queued.

    @raise OctotwistError: the server is not a cluster, or the secret is wrong.
    @raise ConnectionError: the server cannot be reached, or hung up.
    """
    sessions: list[Submission] = []

    def accept(channel: MessageChannel) -> Submission:
        sessions.append(Submission(channel, submit, sink, detach))
        sessions[-1].on_progress = on_progress
        return sessions[-1]

    await connect(client, accept)
    return await sessions[-1].ended


async def connect(client: TaskClient, accept: Accept, what: str = "the server") -> None:
    """
    Connect C{client}, handing the channel to C{accept}.

    @raise OctotwistError: the secret was refused (not a connection's fault).
    @raise ConnectionError: C{what} cannot be reached.
    """
    try:
        await client.connect(accept)
    except OctotwistError:
        raise
    except Exception as e:
        raise ConnectionError(f"cannot reach {what} at {client.settings.connect}: {e}") from e

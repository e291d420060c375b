"""
The job server as a Twisted service: C{twistd octo --script job.py}.

L{Options} is shared with C{octo server}, so the two take the same flags;
L{makeService} builds the L{JobService} that both run.
"""

from __future__ import annotations

import atexit
import getopt
import os
import sys
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from octotwist import auth
from octotwist.endpoints import server_is_local
from octotwist.errors import OctotwistError, UsageError
from octotwist.hookspecs import get_transport
from octotwist.job import Job, load_job
from octotwist.server import FaultPolicy, JobOutcome, JobServer
from octotwist.transport import ServerSettings, TaskServer, Transport

_log = Logger()


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise ValueError("must be more than 0")
    return x


_DEFAULT_POLICY = FaultPolicy()

#: What to do about failing workers; shared by every command that runs a server.
FAULT_PARAMETERS = [
    [
        "max-attempts",
        None,
        _DEFAULT_POLICY.max_attempts,
        "Attempts a task gets before the job fails.",
        _positive_int,
    ],
    [
        "task-timeout",
        None,
        _DEFAULT_POLICY.task_timeout,
        "Seconds a worker may be silent before its tasks go to others.",
        _positive_float,
    ],
    [
        "heartbeat",
        None,
        _DEFAULT_POLICY.heartbeat,
        "Seconds between a worker's heartbeats.",
        _positive_float,
    ],
    [
        "backup-after",
        None,
        _DEFAULT_POLICY.backup_after,
        "Seconds a task runs before an idle worker gets a backup copy of it (0: never).",
        float,
    ],
]
FAULT_FLAGS = [
    [
        "skip-bad-records",
        None,
        "Complete the job without the keys whose map task failed every attempt "
        "(and name them), instead of failing it.",
    ],
]


def fault_policy(options: usage.Options) -> FaultPolicy:
    """The L{FaultPolicy} the options ask for."""
    return FaultPolicy(
        max_attempts=options["max-attempts"],
        heartbeat=options["heartbeat"],
        task_timeout=options["task-timeout"],
        skip_bad_records=bool(options["skip-bad-records"]),
        backup_after=options["backup-after"] or None,
    )


class InterspersedOptions(usage.Options):
    """
    Options that may come after positional arguments, as in C{octo run job.py
    -w 2} (Twisted's parser stops at the first positional argument).
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        args = sys.argv[1:] if options is None else options
        try:
            opts, positional = getopt.gnu_getopt(args, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        ordered: list[str] = []
        for opt, value in opts:
            if opt.startswith("--"):
                takes_value = f"{opt[2:]}=" in self.longOpt
            else:
                takes_value = f"{opt[1]}:" in self.shortOpt
            ordered += [opt, value] if takes_value else [opt]
        super().parseOptions([*ordered, "--", *positional])

    def opt_version(self) -> None:
        """Display octotwist's version and exit."""
        from octotwist import __version__

        print(f"octotwist {__version__}")
        sys.exit(0)


class Options(InterspersedOptions):
    """Options of the job server (C{octo server}, C{twistd octo})."""

    synopsis = "[options] [SCRIPT]"
    longdesc = (
        "Serve a job script to workers: map tasks first, then reduce tasks, "
        "then final() here. Start workers with `octo client HOST`."
    )
    optParameters = [
        ["script", "s", None, "The job script (may also be given as the argument)."],
        ["transport", "t", "tcp", "Transport to serve on; `octo transports` lists them."],
        [
            "listen",
            "l",
            None,
            "Twisted endpoint to listen on, e.g. tcp:18125:interface=0.0.0.0, "
            "ssl:18125:privateKey=key.pem, unix:/tmp/octo.sock. Default: port 18125 on "
            "every interface with a configured secret, on 127.0.0.1 only without one.",
        ],
        [
            "secret-file",
            None,
            None,
            f"File holding the shared secret (default: ${auth.SECRET_ENV}, else a secret "
            "generated once and kept in ~/.config/octotwist/secret).",
        ],
        [
            "output",
            "o",
            None,
            "Write key<TAB>value results to this file instead of stdout "
            "(for jobs without final()).",
        ],
        [
            "reduce-tasks",
            "r",
            None,
            "Number of reduce partitions (default: the job's reduce_tasks, else 8).",
            _positive_int,
        ],
        *FAULT_PARAMETERS,
    ]
    optFlags = FAULT_FLAGS

    def parseArgs(self, script: str | None = None) -> None:
        if script is not None:
            if self["script"]:
                raise usage.UsageError("give the job script once: as --script or as the argument")
            self["script"] = script

    def postOptions(self) -> None:
        if not self["script"]:
            raise usage.UsageError("no job script: octo server JOB.py (or --script JOB.py)")


def listen_settings(options: Options, transport: Transport) -> tuple[str, bytes]:
    """
    Where to listen and with which secret, applying the rule that a server
    reachable from other machines needs a configured secret.

    @raise UsageError: a non-local endpoint was asked for without one.
    """
    configured = auth.configured_secret(options["secret-file"])
    listen = options["listen"]
    if listen is None:
        listen = transport.default_listen(local_only=configured is None)
    else:
        check_server_endpoint(listen)
    if configured is None and not server_is_local(listen):
        raise UsageError(
            f"refusing to listen on {listen} without a configured secret: any machine "
            f"that can reach it could run code here. Set {auth.SECRET_ENV} or pass "
            "--secret-file PATH (the same on the server and every client), or listen "
            "on 127.0.0.1 only"
        )
    return listen, configured or auth.server_secret(None)


def check_server_endpoint(description: str) -> None:
    """
    @raise UsageError: C{description} is not a server endpoint string.
    """
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise UsageError(
            f"--listen {description}: {e} (examples: tcp:18125:interface=127.0.0.1, "
            "unix:/tmp/octo.sock, ssl:18125:privateKey=key.pem:certKey=cert.pem)"
        ) from None


class JobService(Service):
    """
    Serves one job; when it ends, stops listening and calls C{on_end}.

    @ivar outcome: fires with the L{JobOutcome} after the server stopped
        listening.
    """

    def __init__(
        self, job_server: JobServer, task_server: TaskServer, listen: str, transport_name: str
    ) -> None:
        self.job_server = job_server
        self.task_server = task_server
        self.listen = listen
        self.transport_name = transport_name
        self.address: str | None = None
        self.outcome: Deferred[JobOutcome] = Deferred()
        self.listening: Deferred[str] = Deferred()

    def startService(self) -> None:
        super().startService()
        d = self.task_server.listen()
        d.addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, address: str) -> None:
        self.address = address
        self.job_server.result.addCallback(self._ended)
        _log.info(
            "serving job {job} on {address}; start workers with: octo client {hint}",
            job=self.job_server.job.name,
            address=address,
            hint=_client_hint(address, self.transport_name),
        )
        self.listening.callback(address)
        self.job_server.start()

    def _cannot_listen(self, failure: Any) -> None:
        error = f"cannot listen on {self.listen}: {failure.getErrorMessage()}"
        _log.error("{error}", error=error)
        self.listening.errback(failure)
        self.listening.addErrback(lambda _: None)  # reported above
        self.outcome.callback(JobOutcome(False, error))

    async def _stop_and_report(self, outcome: JobOutcome) -> None:
        await self.task_server.stop()
        self.outcome.callback(outcome)

    def _ended(self, outcome: JobOutcome) -> None:
        Deferred.fromCoroutine(self._stop_and_report(outcome))


def _client_hint(address: str, transport: str) -> str:
    flag = "" if transport == "tcp" else f"--transport {transport} "
    if address.startswith("tcp:"):
        host, port = address[4:].replace("\\:", ":").rsplit(":", 1)
        if host in ("0.0.0.0", "::", ""):
            host = "SERVER_HOST"
        return flag + (f"{host}:{port}" if port != "18125" else host)
    return f"{flag}--connect {address}"


def build_service(options: Options, reactor: Any, output: IO[str] | None = None) -> JobService:
    """
    Load the job and get everything ready to listen; nothing binds yet.

    @raise OctotwistError: the job script, the transport or the options are wrong.
    """
    job = load_job(options["script"])
    transport = get_transport(options["transport"])
    listen, secret = listen_settings(options, transport)
    if output is None:
        output = open_output(options["output"], job)
    job_server = JobServer(
        job,
        reactor,
        reduce_tasks=options["reduce-tasks"],
        output=output,
        policy=fault_policy(options),
    )
    task_server = transport.server(reactor, ServerSettings(listen, secret), job_server.accept)
    return JobService(job_server, task_server, listen, transport.name)


def open_output(path: str | None, job: Job) -> IO[str] | None:
    """
    The file C{--output} names, or C{None} for stdout.  A job with C{final()}
    writes its own results, so C{--output} is ignored there (with a warning),
    rather than leaving an empty file behind.

    @raise UsageError: the file cannot be created.
    """
    if not path:
        return None
    if job.final is not None:
        _log.warn(
            "--output {path} is ignored: job {job} defines final(), which handles the results",
            path=path,
            job=job.name,
        )
        return None
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {path!r}: {e.strerror}") from None


def makeService(options: Options) -> JobService:
    """The twistd entry point: stops the reactor when the job ends."""
    from twisted.internet import reactor

    try:
        service = build_service(options, reactor)
    except OctotwistError as e:
        sys.stderr.write(f"octo: {e}\n")
        raise SystemExit(2) from None
    service.outcome.addCallback(_stop_twistd, reactor)
    return service


def _stop_twistd(outcome: JobOutcome, reactor: Any) -> None:
    if not outcome.ok:
        # twistd has no way to set its exit status; this runs after it has
        # cleaned up (pid file, final log line), as the interpreter exits.
        atexit.register(_exit_failed)
    reactor.stop()


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

"""
The C{octo} command: C{octo run}, C{octo server}, C{octo client}, C{octo
serve}, C{octo submit}, C{octo jobs}, C{octo cancel}, C{octo secret}, C{octo
transports}.

Exit status: 0 the job succeeded (or, for a client, the server said it is
over); 1 the job failed; 2 bad usage, a bad job script or a bad option.
"""

from __future__ import annotations

import bdb
import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater, react
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from twisted.python import usage

from octotwist import allocator, auth, counters, embedded, messages, tap
from octotwist import options as shared
from octotwist.client import IWorkerReactor, run_worker
from octotwist.config import DEFAULT_TRANSPORT
from octotwist.errors import (
    AuthenticationError,
    OctotwistError,
    RemoteProtocolError,
    UsageError,
)
from octotwist.inline import run_inline
from octotwist.job import load_job
from octotwist.progress import LiveProgress, LogSink
from octotwist.server import MAX_SLOTS, JobOutcome, JobServer
from octotwist.service import JobService, local_config, run_here
from octotwist.transport import ClientSettings, TaskClient, Transport

_log = Logger()

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Seconds octo client retries an unreachable server, unless told (--wait).
DEFAULT_WAIT = 120.0
#: ...once it has worked for a job of octo server (see run_worker).
WAIT_AFTER_WORK = 15.0


def _wait(options: usage.Options) -> float:
    return DEFAULT_WAIT if options["wait"] is None else float(options["wait"])


class _Verbosity:
    optFlags: list[list[Any]] = [
        ["quiet", "q", "Log warnings and errors only."],
        ["verbose", "v", "Log more: each task as it starts."],
    ]


class ServerOptions(_Verbosity, tap.Options):
    pass


def _processes(value: str) -> int:
    """
    C{--processes}, C{--workers}: at least 1, at most what a server accepts
    (L{MAX_SLOTS}).
    """
    n = shared._positive_int(value)
    if n > MAX_SLOTS:
        raise ValueError(f"at most {MAX_SLOTS} (a server refuses more)")
    return n


class ClientOptions(_Verbosity, shared.WithTransportOptions):
    synopsis = "[options] [HOST[:PORT]]"
    longdesc = (
        "Work for an octo server: fetch its job, run the tasks it hands out, "
        "exit when it says the job is over."
    )
    optParameters = [
        [
            "transport",
            "t",
            DEFAULT_TRANSPORT,
            "Transport to connect with; `octo transports` lists them.",
        ],
        [
            "connect",
            "c",
            None,
            "Twisted client endpoint, e.g. tcp:host:18125 or unix:/tmp/octo.sock.",
        ],
        ["processes", "p", 1, "Tasks to run at once (one process each).", _processes],
        [
            "secret-file",
            None,
            None,
            f"File holding the shared secret, at least {auth.MIN_SECRET_LENGTH} characters, "
            f"mode 0600 (`octo secret -o FILE` makes one; default: ${auth.SECRET_ENV}, "
            "else the local server's).",
        ],
        ["name", "n", None, "Worker name in the server's logs (default HOST:PID)."],
        [
            "wait",
            None,
            None,
            f"Seconds to keep retrying while the server is unreachable (default "
            f"{DEFAULT_WAIT:g}; once this worker has worked for a job of octo server, "
            f"{WAIT_AFTER_WORK:g}: then the job most likely ended while the server could not "
            "reach it, and the worker exits 0).",
            shared._non_negative_float,
        ],
    ]
    optFlags = [
        [
            "stdin",
            None,
            "Read the secret from standard input's first line, and stop when standard "
            "input closes (how --hosts starts workers over SSH: none outlives its server's "
            "connection).",
        ],
    ]
    transport_side = "client"

    def parseArgs(self, address: str | None = None) -> None:
        if address is not None and self["connect"]:
            raise usage.UsageError("give HOST[:PORT] or --connect, not both")
        self["address"] = address or "localhost"

    def postOptions(self) -> None:
        if self["stdin"] and self["secret-file"]:
            raise usage.UsageError("--stdin and --secret-file: give one")

    def endpoint(self, transport: Transport) -> str:
        """The client endpoint string, checked.

        @raise UsageError: it is malformed.
        """
        given = self["connect"] or self["address"]
        try:
            return transport.client_class().address_to_endpoint(given)
        except ValueError as e:
            raise UsageError(f"cannot connect to {given!r}: {e}") from None


def _workers(value: str) -> int:
    """C{--workers}: 0 (inline) up to what a server accepts."""
    return 0 if value.strip() == "0" else _processes(value)


class RunOptions(_Verbosity, shared.InterspersedOptions):
    synopsis = "[options] SCRIPT [-- JOB ARGUMENTS...]"
    longdesc = (
        "Run a job on this machine: a server and local worker processes, one command. "
        "Arguments after the script are the job's own (its sys.argv[1:]); put -- "
        "before those that start with a dash."
    )
    optParameters = [
        [
            "workers",
            "w",
            None,
            "Worker processes on this machine (default 2, none with --hosts; 0: as --inline, "
            "or with --hosts none here).",
            _workers,
        ],
        [
            "transport",
            "t",
            None,
            "Run the workers over this transport, to try it; `octo transports` lists "
            "them (default: none, the server hands them their messages inside the process; "
            f"{DEFAULT_TRANSPORT} with --hosts).",
        ],
        *shared.HOSTS_PARAMETERS,
        [
            "engine",
            None,
            None,
            "Run the job's tasks on this engine instead of octotwist's own workers; "
            "`octo engines` lists them (dask: a LocalCluster of -w workers, or --scheduler).",
        ],
        [
            "scheduler",
            None,
            None,
            "With --engine: the address of an existing cluster to run on "
            "(for dask: its scheduler, tcp://HOST:8786).",
        ],
        *shared.OUTPUT_PARAMETERS,
        shared.REDUCE_TASKS_PARAMETER,
        shared.WEB_PARAMETER,
        shared.MEMORY_PARAMETER,
        shared.STATE_DIR_PARAMETER,
        *shared.FAULT_PARAMETERS,
    ]
    optFlags = [
        [
            "inline",
            None,
            "Run everything in this process, one record at a time, without pickling: "
            "breakpoint() and pdb work inside mapfn and reducefn.",
        ],
        *shared.OUTPUT_FLAGS,
        *shared.FAULT_FLAGS,
        *shared.HOSTS_FLAGS,
    ]

    # usage.Options calls parseArgs(*positional): its own takes none, each
    # command's takes its own.
    def parseArgs(self, script: str, *args: str) -> None:  # type: ignore[override]
        self["script"] = script
        self["args"] = args

    def postOptions(self) -> None:
        hosts = self["hosts"] is not None or self["hostfile"] is not None
        if hosts and self["inline"]:
            raise usage.UsageError("--inline runs the job in this process: it takes no --hosts")
        if self["scheduler"] and not self["engine"]:
            raise usage.UsageError("--scheduler is an engine's: add --engine NAME")
        if self["engine"]:
            given = [
                f"--{name}"
                for name in ("inline", "transport", "state-dir", "hosts", "hostfile")
                if self[name]
            ]
            if given:
                raise usage.UsageError(
                    f"--engine runs the job's tasks elsewhere than on octotwist's own "
                    f"workers: it takes no {', '.join(given)}"
                )
            if self["workers"] == 0:
                raise usage.UsageError("--engine needs workers: -w 1 or more")
        if self["workers"] is None:
            self["workers"] = 0 if hosts else 2
        elif self["workers"] == 0 and not hosts:
            self["inline"] = True


class ServeOptions(_Verbosity, shared.WithTransportOptions):
    synopsis = "[options]"
    longdesc = (
        "Serve a queue of jobs: workers (`octo client HOST`) connect and stay; "
        "`octo submit JOB.py` sends jobs, which run one after another in the order "
        "they came."
    )
    optParameters = [
        *shared.SERVER_PARAMETERS,
        shared.MEMORY_PARAMETER,
        [
            "state-dir",
            None,
            None,
            "Keep the queue, each job's progress and its results in this directory "
            "(created, yours alone): a server started again on it takes up the jobs that "
            "were queued or running, resuming those that ran. Default: "
            "$XDG_STATE_HOME/octotwist/serve (~/.local/state/octotwist/serve).",
        ],
        [
            "web",
            None,
            None,
            "Serve the cluster's status page (its jobs at /, each job's page at /jobs/ID/, "
            "JSON at /jobs.json) on this endpoint, e.g. tcp:8080. Without interface= it "
            "binds the server's interface; reachable from other machines, it needs the token "
            "in the URL the server logs. The http transport also serves it on its own port.",
        ],
        *shared.FAULT_PARAMETERS,
        *shared.HOSTS_PARAMETERS,
    ]
    optFlags = [shared.NO_STATE_DIR_FLAG, *shared.FAULT_FLAGS, *shared.HOSTS_FLAGS]

    def postOptions(self) -> None:
        if self["no-state-dir"] and self["state-dir"]:
            raise usage.UsageError("--state-dir and --no-state-dir: give one")


class _ClusterOptions(_Verbosity, shared.WithTransportOptions):
    """What every command that talks to a cluster (octo serve) takes."""

    optParameters = [
        [
            "connect",
            "c",
            None,
            "The cluster's address: HOST[:PORT] or a Twisted client endpoint "
            "(default localhost:18125).",
        ],
        [
            "transport",
            "t",
            DEFAULT_TRANSPORT,
            "Transport to connect with; `octo transports` lists them.",
        ],
        [
            "secret-file",
            None,
            None,
            f"File holding the shared secret (default: ${auth.SECRET_ENV}, else the local one).",
        ],
    ]
    transport_side = "client"

    def client(self, reactor: IWorkerReactor) -> TaskClient:
        """
        A client of the chosen transport, for the cluster at C{--connect}.

        @raise UsageError: the address is malformed, or no secret is found.
        """
        from octotwist.hookspecs import get_transport
        from octotwist.submit import cluster_client

        own = shared.transport_options(self, get_transport(self["transport"]), "client")
        return cluster_client(reactor, self["transport"], self["connect"], self["secret-file"], own)


class SubmitOptions(_ClusterOptions):
    synopsis = "[options] SCRIPT [-- JOB ARGUMENTS...]"
    longdesc = (
        "Send a job to a cluster (octo serve), wait for it and write its results, as "
        "octo run does. Arguments after the script are the job's own."
    )
    optParameters = [
        ["output", "o", None, "Write the results to this file (replaced when the job succeeds)."],
        ["format", None, "tsv", "tsv or jsonl.", shared._format],
        shared.REDUCE_TASKS_PARAMETER,
        [
            "max-workers",
            "m",
            None,
            "Take at most this many workers, so that the next job runs beside this one "
            "on the others (default: every worker).",
            shared._positive_int,
        ],
    ]
    optFlags = [
        *shared.OUTPUT_FLAGS,
        [
            "detach",
            "d",
            "Return once the job is queued, printing its ID; octo results ID fetches its "
            "results once it is done.",
        ],
    ]

    def parseArgs(self, script: str, *args: str) -> None:  # type: ignore[override]
        self["script"] = script
        self["args"] = args

    def postOptions(self) -> None:
        if self["detach"] and self["output"]:
            raise usage.UsageError("--detach writes no results: octo results ID -o FILE does")


class ResultsOptions(_ClusterOptions):
    synopsis = "[options] ID"
    longdesc = "Fetch the results of a cluster's job (octo serve) that is done."
    optParameters = [["output", "o", None, "Write them to this file instead of stdout."]]

    def parseArgs(self, job: str) -> None:  # type: ignore[override]
        self["job"] = _job_id(job)


class JobsOptions(_ClusterOptions):
    synopsis = "[options]"
    longdesc = "List a cluster's jobs (octo serve): queued, running, done and failed."


class CancelOptions(_ClusterOptions):
    synopsis = "[options] ID"
    longdesc = "Cancel a cluster's job (octo serve), queued or running: it fails, saying so."

    def parseArgs(self, job: str) -> None:  # type: ignore[override]
        self["job"] = _job_id(job)


def _job_id(given: str) -> int:
    try:
        return shared._positive_int(given)
    except ValueError:
        raise usage.UsageError(
            f"a job ID is a number (octo jobs lists them), not {given!r}"
        ) from None


class TransportsOptions(shared.Versioned):
    synopsis = ""


class EnginesOptions(shared.Versioned):
    synopsis = ""


class VersionOptions(shared.Versioned):
    synopsis = "[--json]"
    longdesc = (
        "Print this octotwist's version, its protocol's and Python's: a worker works "
        "for a server of the same octotwist release on the same Python minor version."
    )
    optFlags = [["json", None, "As JSON, with the CPU cores (what --hosts reads)."]]


class SecretOptions(shared.Versioned):
    synopsis = "[-o FILE]"
    longdesc = (
        "Make a new random shared secret (256 bits, 43 characters) and print it, or "
        "write it to a new file of mode 0600 with -o. Give the same file to the server "
        "and every worker: --secret-file FILE."
    )
    optParameters = [
        [
            "output",
            "o",
            None,
            "Write the secret to this new file, mode 0600, instead of stdout "
            "(an existing file is left alone).",
        ],
    ]


_COMMANDS = "run|server|client|serve|submit|jobs|cancel|results|secret|transports|engines|version"


class Options(shared.Versioned):
    # Subcommands' usage lines read "Usage: octo client [options] ...".
    synopsis = "Usage: octo"
    longdesc = (
        "octotwist: MapReduce for a handful of machines, octo.py's way. "
        f"Commands: octo {_COMMANDS}; octo COMMAND --help for each."
    )
    subCommands = [
        ["run", None, RunOptions, "Run a job here: server plus local workers."],
        ["server", None, ServerOptions, "Serve a job to workers."],
        ["client", None, ClientOptions, "Work for a server."],
        ["serve", None, ServeOptions, "Serve a queue of jobs to workers that stay."],
        ["submit", None, SubmitOptions, "Send a job to octo serve and wait for its results."],
        ["jobs", None, JobsOptions, "List the jobs of octo serve."],
        ["cancel", None, CancelOptions, "Cancel a job of octo serve."],
        ["results", None, ResultsOptions, "Fetch the results of a job of octo serve."],
        [
            "secret",
            None,
            SecretOptions,
            "Make a new shared secret: print it, or -o FILE writes it (mode 0600).",
        ],
        ["transports", None, TransportsOptions, "List the installed transports."],
        ["engines", None, EnginesOptions, "List the installed engines (--engine)."],
        ["version", None, VersionOptions, "Print the versions of octotwist and Python."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(f"which command? octo {_COMMANDS}")


def _start_logging(options: usage.Options, sink: LogSink) -> None:
    level = LogLevel.info
    if options.get("quiet"):
        level = LogLevel.warn
    elif options.get("verbose"):
        level = LogLevel.debug

    def observe(event: dict[str, Any]) -> None:
        # Twisted's own chatter (factories starting, ports closing) is noise
        # to a user; its warnings and errors are not.
        namespace = str(event.get("log_namespace", ""))
        if namespace.startswith(("twisted", "log_legacy")) and (
            event.get("log_level", LogLevel.info) < LogLevel.warn
        ):
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        sink.write(f"octo: {text}")

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    # An ILogObserver is any callable taking an event; a function cannot
    # declare that it provides the interface.
    observer = cast(ILogObserver, observe)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [predicate])], redirectStandardIO=False
    )


#: Where log lines go (through the live progress display while it is up).
_sink = LogSink()


def _show_progress(job_server: JobServer, reactor: IReactorTime, options: usage.Options) -> bool:
    """Start live progress bars when a person is watching; say whether we did."""
    if not LiveProgress.wanted(_sink.stream, bool(options.get("quiet"))):
        return False
    LiveProgress.for_server(job_server, reactor, _sink).start()
    return True


async def _serve(reactor: IWorkerReactor, opts: ServerOptions) -> int:
    service = tap.build_service(opts, reactor)
    return await _wait_for(service, reactor, opts)


async def _wait_for(service: JobService, reactor: IWorkerReactor, opts: usage.Options) -> int:
    """Run the service, with live progress when a person is watching."""
    if _show_progress(service.job_server, reactor, opts):
        service.job_server.log_progress = False
    outcome = await run_here(service)
    return EXIT_OK if outcome.ok else EXIT_FAILED


async def _work(reactor: IWorkerReactor, options: ClientOptions) -> int:
    from octotwist.hookspecs import get_transport

    transport = get_transport(options["transport"])
    connect = options.endpoint(transport)
    transport_options = shared.transport_options(options, transport, "client")
    if options["stdin"]:
        from octotwist import lifeline

        secret = lifeline.read_secret()
    elif transport.client_class().needs_secret(transport_options):
        secret = await _client_secret(reactor, options)
    else:
        secret = _secret_if_any(options)
    client = transport.client_class()(reactor, ClientSettings(connect, secret, transport_options))
    working = Deferred.fromCoroutine(
        run_worker(
            reactor,
            client,
            processes=options["processes"],
            name=options["name"],
            wait=_wait(options),
            wait_after_work=WAIT_AFTER_WORK if options["wait"] is None else None,
        )
    )
    if options["stdin"]:

        def closed() -> None:
            if not working.called:
                _log.info(
                    "standard input closed: whoever started this worker (octo run --hosts) "
                    "is gone or done with it; stopping"
                )
                working.cancel()

        lifeline.watch(reactor, closed)  # type: ignore[arg-type]  # every reactor has FDs
    try:
        shutdown = await working
    except (AuthenticationError, RemoteProtocolError, ConnectionError) as e:
        sys.stderr.write(f"octo: {e}\n")
        return EXIT_FAILED
    return EXIT_OK if shutdown.ok else EXIT_FAILED


async def _serve_cluster(reactor: IWorkerReactor, options: ServeOptions) -> int:
    """C{octo serve}: until interrupted (then exit status 1, as for any server stopped)."""
    from octotwist.journal import JournalError

    try:
        service = tap.build_cluster(options, reactor)
    except JournalError as e:
        sys.stderr.write(f"octo: {e}\n")
        return EXIT_FAILED
    service.startService()
    try:
        await service.listening
    except Exception as e:
        sys.stderr.write(f"octo: {e}\n")
        await service.stopService()
        return EXIT_FAILED
    try:
        await Deferred()  # until the reactor stops (Ctrl-C, SIGTERM)
    finally:
        await service.stopService()
    return EXIT_OK


async def _submit(reactor: IWorkerReactor, options: SubmitOptions) -> int:
    from octotwist.submit import script_message

    message = script_message(
        options["script"],
        tuple(options["args"]),
        options["format"],
        not options["unsorted"],
        reduce_tasks=options["reduce-tasks"] or 0,
        max_workers=options["max-workers"] or 0,
    )
    return await _fetch(reactor, options, message, options["format"], options["detach"])


async def _results(reactor: IWorkerReactor, options: ResultsOptions) -> int:
    # (They come as the job's format made them.)
    return await _fetch(reactor, options, messages.FetchResults(options["job"]), "tsv", False)


async def _fetch(
    reactor: IWorkerReactor,
    options: SubmitOptions | ResultsOptions,
    request: messages.Submit | messages.FetchResults,
    format: str,
    detach: bool,
) -> int:
    """Submit a job (or ask for one's results) and write them: the exit status."""
    from octotwist.submit import Sink, submit

    client = options.client(reactor)
    sink = Sink(options["output"], format)
    bars = _SubmitterBars(reactor, options)
    if isinstance(request, messages.Submit) and bars.wanted and not detach:
        request = dataclasses.replace(request, progress=True)
    try:
        ending = await submit(client, request, sink, detach, bars.update)
    except (OctotwistError, ConnectionError) as e:
        bars.stop()
        sink.abort()
        sys.stderr.write(f"octo: {e}\n")
        return EXIT_FAILED
    except BaseException:
        bars.stop()
        sink.abort()
        raise
    bars.stop()
    if isinstance(ending, messages.JobAccepted):
        sink.abort()
        print(ending.job)
        _log.info(
            "job {job} submitted; `octo jobs` follows it, `octo results {job}` fetches its "
            "results once it is done",
            job=ending.job,
        )
        return EXIT_OK
    if isinstance(ending, messages.JobRefused):
        sink.abort()
        sys.stderr.write(f"octo: {ending.error}\n")
        return EXIT_USAGE
    if not ending.ok:
        sink.abort()
        sys.stderr.write(f"octo: job {ending.job} failed: {ending.error}\n")
        return EXIT_FAILED
    sink.commit()
    _log.info(
        "job {job} finished: {n} result{s}",
        job=ending.job,
        n=ending.results,
        s="" if ending.results == 1 else "s",
    )
    return EXIT_OK


class _SubmitterBars:
    """C{octo submit}'s bars, drawn from the cluster's L{messages.JobProgress}."""

    def __init__(self, reactor: IReactorTime, options: usage.Options) -> None:
        self.reactor = reactor
        self.wanted = LiveProgress.wanted(_sink.stream, bool(options.get("quiet")))
        self._status: dict[str, Any] | None = None
        self._bars: LiveProgress | None = None

    def update(self, status: dict[str, Any]) -> None:
        self._status = status
        if self._bars is None and self.wanted:
            self._bars = LiveProgress(lambda: self._status or status, self.reactor, _sink)
            self._bars.start()

    def stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()


async def _list_jobs(reactor: IWorkerReactor, options: JobsOptions) -> int:
    from octotwist.submit import job_table

    answer = await _ask(options.client(reactor), messages.ListJobs())
    if isinstance(answer, int):
        return answer
    if isinstance(answer, messages.JobList):
        sys.stdout.write(job_table(answer.jobs))
    return EXIT_OK


async def _cancel(reactor: IWorkerReactor, options: CancelOptions) -> int:
    from octotwist.submit import job_table

    answer = await _ask(options.client(reactor), messages.CancelJob(options["job"]))
    if isinstance(answer, int):
        return answer
    if isinstance(answer, messages.JobRefused):
        sys.stderr.write(f"octo: {answer.error}\n")
        return EXIT_USAGE
    sys.stdout.write(job_table(answer.jobs))
    return EXIT_OK


async def _ask(
    client: TaskClient, question: messages.Message
) -> messages.JobList | messages.JobRefused | int:
    """The cluster's answer, or the exit status after saying why there is none."""
    from octotwist.submit import ask

    try:
        return await ask(client, question)
    except (OctotwistError, ConnectionError) as e:
        sys.stderr.write(f"octo: {e}\n")
        return EXIT_FAILED


def _secret_if_any(options: ClientOptions) -> bytes:
    """The configured or local secret, for a client that can do without one."""
    configured = auth.configured_secret(options["secret-file"])  # read once: it may be a pipe
    if configured is not None:
        return configured
    if auth.default_secret_path().exists():
        return auth.client_secret(None)
    return b""


async def _client_secret(reactor: IWorkerReactor, options: ClientOptions) -> bytes:
    """
    The configured secret, or the one a local server generates.  A client
    may start before its server: then wait (up to C{--wait}) for the server
    to create it.
    """
    configured = auth.configured_secret(options["secret-file"])  # read once: it may be a pipe
    if configured is not None:
        return configured
    path = auth.default_secret_path()
    waited = 0.0
    while not _written(path) and waited < _wait(options):
        if waited == 0:
            _log.info(
                "no secret configured and none in {path} yet; waiting for a local "
                "server to create it (or set {env} / --secret-file)",
                path=str(path),
                env=auth.SECRET_ENV,
            )
        await deferLater(reactor, 0.5)
        waited += 0.5
    return auth.client_secret(None)


def _written(path: Path) -> bool:
    """Whether the file is there with something in it (not just created)."""
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


async def _run(reactor: IWorkerReactor, opts: RunOptions) -> int:
    config = shared.job_config(opts)
    hosts = shared.launch_config(opts)
    job = load_job(opts["script"], config.args)
    output = shared.open_output(config, job)
    if opts["transport"] is None and hosts is None:
        transport: Transport = embedded.TRANSPORT
    else:
        from octotwist.hookspecs import get_transport

        transport = get_transport(opts["transport"] or DEFAULT_TRANSPORT)
    service = JobService(
        reactor,
        job,
        config,
        local_config(reactor, transport, opts["workers"], opts["web"], hosts),
        transport,
        output,
    )
    return await _wait_for(service, reactor, opts)


def _run_inline(opts: RunOptions) -> int:
    """
    C{octo run --inline}: the job in this process, outside any reactor, so
    that pdb has the terminal (and Ctrl-C) to itself.
    """
    if opts["transport"] is not None or opts["web"] is not None:
        raise UsageError("--inline runs no server: it takes neither --transport nor --web")
    config = shared.job_config(opts)
    job = load_job(opts["script"], config.args)
    try:
        outcome = run_inline(job, config, shared.open_output(config, job))
    except BrokenPipeError:
        return EXIT_OK  # octo run --inline job.py | head: the reader has what it wanted
    except bdb.BdbQuit:
        sys.stderr.write(f"octo: job {job.name} stopped in the debugger (pdb's quit)\n")
        return EXIT_FAILED
    except Exception as e:
        from octotwist._child import user_traceback

        sys.stderr.write(f"octo: job {job.name} failed (--inline):\n{user_traceback(e)}")
        return EXIT_FAILED
    return _finished(job.name, outcome)


def _finished(job: str, outcome: JobOutcome, where: str = "") -> int:
    """Say that a job run without a server of ours finished, with its counters."""
    _log.info(
        "job {job} finished{where}: {n} result{s} in {t:.2f} s",
        job=job,
        where=where,
        n=outcome.results,
        s="" if outcome.results == 1 else "s",
        t=outcome.seconds,
    )
    if outcome.counters:
        _log.info("counters:\n{table}", table=counters.table(outcome.counters))
    return EXIT_OK


def _run_on_engine(opts: RunOptions) -> int:
    """
    C{octo run --engine NAME}: the job on another engine, outside any
    reactor (the engine's client blocks until the job is over).
    """
    from octotwist.engine import EngineError, run_on_engine
    from octotwist.hookspecs import get_engine
    from octotwist.service import CannotServe

    get_engine(opts["engine"])  # (an unknown one, before the job loads)
    config = shared.job_config(opts)
    job = load_job(opts["script"], config.args)
    # SIGTERM stops the job as Ctrl-C does (its output taken back, the
    # engine's cluster closed), rather than killing us mid-way.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        outcome = run_on_engine(
            opts["engine"],
            job,
            config,
            shared.open_output(config, job),
            workers=opts["workers"],
            scheduler=opts["scheduler"],
            quiet=bool(opts["quiet"]),
            web=opts["web"],
        )
    except BrokenPipeError:
        return EXIT_OK  # octo run --engine dask job.py | head
    except (EngineError, CannotServe) as e:
        sys.stderr.write(f"octo: {e}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("octo: interrupted\n")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not outcome.ok:
        sys.stderr.write(f"octo: job {job.name} failed: {outcome.error}\n")
        return EXIT_FAILED
    return _finished(job.name, outcome, f" on {opts['engine']}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _make_secret(options: SecretOptions) -> int:
    """
    C{octo secret}: print a new secret, or write it to C{-o FILE}, mode 0600.

    @raise UsageError: the file exists already or cannot be created.
    """
    path = options["output"]
    if path is None:
        _warn_if_stdout_is_open()
        print(auth.new_secret())
        return EXIT_OK
    try:
        auth.create_secret_file(Path(path))
    except FileExistsError:
        raise UsageError(
            f"{path} exists already; octo secret does not overwrite a secret that servers "
            "and workers may be using. Remove it first, or choose another file"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot create {path!r}: {e.strerror}") from None
    sys.stderr.write(
        f"octo: wrote a new secret to {path} (mode 0600). Copy it to the server and every "
        f"worker over a channel you trust (scp -p keeps its mode), and pass --secret-file {path}\n"
    )
    return EXIT_OK


def _warn_if_stdout_is_open() -> None:
    """Say so when C{octo secret > FILE} writes to a file that others may read."""
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
        auth.check_file_mode("(standard output)", mode)
    except (OSError, ValueError):
        return  # no file descriptor: nothing to check
    except UsageError:
        sys.stderr.write(
            "octo: standard output is a file that group or others may read; the server "
            "and workers refuse such a secret file: chmod 600 it, or use octo secret -o FILE\n"
        )


def _print_version(options: VersionOptions) -> int:
    from octotwist.version import Installation

    here = Installation.here()
    print(here.to_json() if options["json"] else here.describe())
    return EXIT_OK


def _list_engines() -> int:
    from octotwist.hookspecs import engines

    found = engines()
    for name, e in sorted(found.items()):
        print(f"{name:10} {e.description}")
    if not found:
        print("(none installed: pip install 'octotwist[dask]' adds dask)")
    return EXIT_OK


def _list_transports() -> int:
    from octotwist.hookspecs import transports

    for name, t in sorted(transports().items()):
        print(f"{name:10} {t.description}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Entry point of the C{octo} console script."""
    try:
        _main(argv)
    except BrokenPipeError:
        # Our output went to a pipe that closed (octo server --help | head):
        # not an error of ours.
        _quiet_stdout()
        sys.exit(EXIT_OK)
    finally:
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # octo run job.py | head
            _quiet_stdout()


def _quiet_stdout() -> None:
    """Keep Python from complaining, as it exits, that stdout's pipe is closed."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _main(argv: list[str] | None) -> None:
    shared.ignore_twisted_reserved_descriptor()
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(
            f"{options}\nocto: {shared.usage_message(e)}\n"
            if not str(e).startswith("which")
            else f"{options}\n"
        )
        sys.exit(EXIT_USAGE)
    command, sub = options.subCommand, options.subOptions
    try:
        if command == "transports":
            sys.exit(_list_transports())
        if command == "secret":
            sys.exit(_make_secret(sub))
        if command == "version":
            sys.exit(_print_version(sub))
        if command == "engines":
            sys.exit(_list_engines())
        _start_logging(sub, _sink)
        if command == "run" and sub["inline"]:
            sys.exit(_run_inline(sub))
        if command == "run" and sub["engine"]:
            sys.exit(_run_on_engine(sub))
        allocator.tune()
        assert command is not None  # postOptions refuses no command
        action = {
            "run": _run,
            "server": _serve,
            "client": _work,
            "serve": _serve_cluster,
            "submit": _submit,
            "jobs": _list_jobs,
            "cancel": _cancel,
            "results": _results,
        }[command]
        try:
            react(_guarded, (action, sub))
        except SystemExit:
            # react() exits 0 when the reactor stopped first: not for us.
            if _interrupted:
                sys.exit(EXIT_FAILED)
            raise
    except OctotwistError as e:
        sys.stderr.write(f"octo: {e}\n")
        sys.exit(EXIT_USAGE)


#: Set when the reactor stopped before the command finished (Ctrl-C, SIGTERM).
_interrupted: list[bool] = []


def _guarded(
    reactor: IWorkerReactor,
    action: Callable[[IWorkerReactor, Any], Coroutine[Any, Any, int]],
    options: usage.Options,
) -> Deferred[None]:
    """Run C{action} and turn its result or error into the exit status."""

    async def go() -> None:
        # react() calls us before the reactor runs, that is, before it
        # handles SIGTERM and SIGINT: a signal then would kill us outright,
        # leaving a .partial output behind.  Nothing starts before they are.
        running: Deferred[None] = Deferred()
        reactor.callWhenRunning(running.callback, None)
        await running
        try:
            code = await action(reactor, options)
        except OctotwistError as e:
            sys.stderr.write(f"octo: {e}\n")
            code = EXIT_USAGE
        except CancelledError:
            code = EXIT_FAILED  # interrupted, see below
        if code:
            raise SystemExit(code)

    done = ensureDeferred(go())

    def interrupted() -> Deferred[None] | None:
        # The reactor is stopping before the command finished (SIGTERM,
        # Ctrl-C): say so, stop the job (its workers hear why, its task
        # processes end) before the reactor does, and exit non-zero.
        if done.called:
            return None
        sys.stderr.write("octo: interrupted\n")
        _interrupted.append(True)
        stopped: Deferred[None] = Deferred()

        def finished(result: object) -> object:
            stopped.callback(None)
            return result

        done.addBoth(finished)
        done.cancel()
        return stopped

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    return done

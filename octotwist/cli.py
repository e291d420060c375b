"""
The C{octo} command: C{octo run}, C{octo server}, C{octo client},
C{octo secret}, C{octo transports}.

Exit status: 0 the job succeeded (or, for a client, the server said it is
over); 1 the job failed; 2 bad usage, a bad job script or a bad option.
"""

from __future__ import annotations

import os
import sys
import tempfile
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

from octotwist import allocator, auth, embedded, tap
from octotwist.client import IWorkerReactor, run_worker
from octotwist.errors import (
    AuthenticationError,
    OctotwistError,
    RemoteProtocolError,
    UsageError,
)
from octotwist.hookspecs import get_transport, transports
from octotwist.job import load_job
from octotwist.progress import LiveProgress, LogSink
from octotwist.server import MAX_SLOTS, JobServer
from octotwist.status import StatusPage, new_token
from octotwist.transport import ClientSettings, ServerSettings, Transport

_log = Logger()

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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
    n = tap._positive_int(value)
    if n > MAX_SLOTS:
        raise ValueError(f"at most {MAX_SLOTS} (a server refuses more)")
    return n


class ClientOptions(_Verbosity, tap.InterspersedOptions):
    synopsis = "[options] [HOST[:PORT]]"
    longdesc = (
        "Work for an octo server: fetch its job, run the tasks it hands out, "
        "exit when it says the job is over."
    )
    optParameters = [
        ["transport", "t", "tcp", "Transport to connect with; `octo transports` lists them."],
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
            120.0,
            "Seconds to keep retrying while the server is unreachable.",
            tap._non_negative_float,
        ],
    ]
    _transport_parameters, _transport_flags = tap.transport_parameters(
        "client", tap.own_option_names(optParameters, []) | {"quiet", "verbose"}
    )
    optParameters += _transport_parameters
    optFlags = _transport_flags

    def parseArgs(self, address: str | None = None) -> None:
        if address is not None and self["connect"]:
            raise usage.UsageError("give HOST[:PORT] or --connect, not both")
        self["address"] = address or "localhost"

    def endpoint(self, transport: Transport) -> str:
        """The client endpoint string, checked.

        @raise UsageError: it is malformed.
        """
        given = self["connect"] or self["address"]
        try:
            return transport.client_class().address_to_endpoint(given)
        except ValueError as e:
            raise UsageError(f"cannot connect to {given!r}: {e}") from None


class RunOptions(_Verbosity, tap.InterspersedOptions):
    synopsis = "[options] SCRIPT"
    longdesc = "Run a job on this machine: a server and local worker processes, one command."
    optParameters = [
        ["workers", "w", 2, "Worker processes.", _processes],
        [
            "transport",
            "t",
            None,
            "Run the workers over this transport, to try it; `octo transports` lists "
            "them (default: none, the server hands them their messages inside the process).",
        ],
        [
            "output",
            "o",
            None,
            "Write key<TAB>value results here instead of stdout (for jobs without final()).",
        ],
        ["reduce-tasks", "r", None, "Number of reduce partitions.", tap._positive_int],
        tap.WEB_PARAMETER,
        tap.MEMORY_PARAMETER,
        *tap.FAULT_PARAMETERS,
    ]
    optFlags = tap.FAULT_FLAGS

    # usage.Options calls parseArgs(*positional): its own takes none, each
    # command's takes its own.
    def parseArgs(self, script: str) -> None:  # type: ignore[override]
        self["script"] = script


class TransportsOptions(tap.Versioned):
    synopsis = ""


class SecretOptions(tap.Versioned):
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


class Options(tap.Versioned):
    # Subcommands' usage lines read "Usage: octo client [options] ...".
    synopsis = "Usage: octo"
    longdesc = (
        "octotwist: MapReduce for a handful of machines, octo.py's way. "
        "Commands: octo run|server|client|secret|transports; octo COMMAND --help for each."
    )
    subCommands = [
        ["run", None, RunOptions, "Run a job here: server plus local workers."],
        ["server", None, ServerOptions, "Serve a job to workers."],
        ["client", None, ClientOptions, "Work for a server."],
        [
            "secret",
            None,
            SecretOptions,
            "Make a new shared secret: print it, or -o FILE writes it (mode 0600).",
        ],
        ["transports", None, TransportsOptions, "List the installed transports."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("which command? octo run|server|client|secret|transports")


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
    LiveProgress(job_server, reactor, _sink).start()
    return True


async def _serve(reactor: IWorkerReactor, options: ServerOptions) -> int:
    service = tap.build_service(options, reactor)
    if _show_progress(service.job_server, reactor, options):
        service.job_server.log_progress = False
    service.startService()
    outcome = await service.outcome
    return EXIT_OK if outcome.ok else EXIT_FAILED


async def _work(reactor: IWorkerReactor, options: ClientOptions) -> int:
    transport = get_transport(options["transport"])
    connect = options.endpoint(transport)
    transport_options = tap.transport_options(options, transport, "client")
    if transport.client_class().needs_secret(transport_options):
        secret = await _client_secret(reactor, options)
    else:
        secret = _secret_if_any(options)
    client = transport.client_class()(reactor, ClientSettings(connect, secret, transport_options))
    try:
        shutdown = await run_worker(
            reactor,
            client,
            processes=options["processes"],
            name=options["name"],
            wait=options["wait"],
        )
    except (AuthenticationError, RemoteProtocolError, ConnectionError) as e:
        sys.stderr.write(f"octo: {e}\n")
        return EXIT_FAILED
    return EXIT_OK if shutdown.ok else EXIT_FAILED


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
    while not _written(path) and waited < options["wait"]:
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


async def _run(reactor: IWorkerReactor, options: RunOptions) -> int:
    job = load_job(options["script"])
    if options["transport"] is None:
        transport: Transport = embedded.TRANSPORT
    else:
        transport = get_transport(options["transport"])
    # Server and workers share a fresh secret that never touches disk, on a
    # loopback port the kernel picks.
    secret = auth.new_secret().encode()
    job_server = tap.make_job_server(job, reactor, options, tap.open_output(options["output"], job))
    # Stopped before the job ended (Ctrl-C): no partial results file.
    reactor.addSystemEventTrigger("before", "shutdown", job_server.output.abort)
    try:
        return await _serve_locally(reactor, options, job_server, transport, secret)
    finally:
        job_server.output.abort()  # nothing to take back if it was committed


async def _serve_locally(
    reactor: IWorkerReactor,
    options: RunOptions,
    job_server: JobServer,
    transport: Transport,
    secret: bytes,
) -> int:
    """The rest of L{_run}: a server on a private address, and the local workers."""
    private = tempfile.TemporaryDirectory(prefix="octo-run-")
    task_server = transport.server_class()(
        reactor,
        ServerSettings(
            transport.local_listen(Path(private.name)),
            secret,
            tap.transport_options(usage.Options(), transport, "server"),
            # Only this machine's workers can reach this server: no token.
            status=StatusPage(job_server.status, token=None),
        ),
        job_server.accept,
    )
    web_port = None
    if options["web"] is not None:
        tap.check_server_endpoint(options["web"], "--web")
        # The server is local, so is the page, unless --web names an interface.
        web = tap.web_endpoint(options["web"], "127.0.0.1")
        web_port = await tap.serve_status(job_server, web, new_token())
    if _show_progress(job_server, reactor, options):
        job_server.log_progress = False
    address = await task_server.listen()
    client = transport.client_class()(
        reactor,
        ClientSettings(
            address, secret, tap.transport_options(usage.Options(), transport, "client")
        ),
    )
    worker = ensureDeferred(
        run_worker(
            reactor,
            client,
            processes=options["workers"],
            name="local",
            wait=10.0,
            task_lines=False,  # the server's progress says it all; -v shows them
        )
    )
    job_server.start(workers_coming=True)
    outcome = await job_server.result
    await worker
    await task_server.stop()
    if web_port is not None:
        await tap.stop_status(web_port, reactor)
    private.cleanup()
    return EXIT_OK if outcome.ok else EXIT_FAILED


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


def _list_transports() -> int:
    for name, t in sorted(transports().items()):
        print(f"{name:10} {t.description}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Entry point of the C{octo} console script."""
    try:
        _main(argv)
    except BrokenPipeError:
        # Our output went to a pipe that closed (octo server --help | head):
        # not an error of ours.  Keep Python from complaining as it exits.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_OK)


def _main(argv: list[str] | None) -> None:
    tap.ignore_twisted_reserved_descriptor()
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(
            f"{options}\nocto: {tap.usage_message(e)}\n"
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
        _start_logging(sub, _sink)
        allocator.tune()
        assert command is not None  # postOptions refuses no command
        action = {"run": _run, "server": _serve, "client": _work}[command]
        react(_guarded, (action, sub))
    except OctotwistError as e:
        sys.stderr.write(f"octo: {e}\n")
        sys.exit(EXIT_USAGE)


def _guarded(
    reactor: IWorkerReactor,
    action: Callable[[IWorkerReactor, Any], Coroutine[Any, Any, int]],
    options: usage.Options,
) -> Deferred[None]:
    """Run C{action} and turn its result or error into the exit status."""

    async def go() -> None:
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

    def interrupted() -> None:
        # The reactor is stopping before the command finished (SIGTERM,
        # Ctrl-C): say so, and exit non-zero rather than 0.
        if not done.called:
            sys.stderr.write("octo: interrupted\n")
            done.cancel()

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    return done

"""
The C{octo} command: C{octo run}, C{octo server}, C{octo client},
C{octo transports}.

Exit status: 0 the job succeeded (or, for a client, the server said it is
over); 1 the job failed; 2 bad usage, a bad job script or a bad option.
"""

from __future__ import annotations

import getopt
import secrets
import sys
from typing import Any, TextIO

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from twisted.python import usage

from octotwist import auth, tap
from octotwist.client import run_worker
from octotwist.errors import AuthenticationError, OctotwistError, RemoteProtocolError
from octotwist.hookspecs import get_transport, transports
from octotwist.job import load_job
from octotwist.server import JobServer
from octotwist.transport import ClientSettings, ServerSettings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Verbosity:
    """Adds -q/-v, and lets options follow positional arguments (C{octo run job.py -w 2})."""

    optFlags = [
        ["quiet", "q", "Log warnings and errors only."],
        ["verbose", "v", "Log every task."],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        args = sys.argv[1:] if options is None else options
        try:
            opts, positional = getopt.gnu_getopt(args, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        ordered: list[str] = []
        for opt, value in opts:
            takes_value = (
                f"{opt[2:]}=" in self.longOpt
                if opt.startswith("--")
                else f"{opt[1]}:" in self.shortOpt
            )
            ordered += [opt, value] if takes_value else [opt]
        super().parseOptions([*ordered, "--", *positional])  # type: ignore[misc]


class ServerOptions(_Verbosity, tap.Options):
    pass


class ClientOptions(_Verbosity, usage.Options):
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
        ["processes", "p", 1, "Tasks to run at once (one process each).", tap._positive_int],
        [
            "secret-file",
            None,
            None,
            f"File holding the shared secret (default: ${auth.SECRET_ENV}, "
            "else the local server's).",
        ],
        ["name", "n", None, "Worker name in the server's logs (default HOST:PID)."],
        ["wait", "w", 120.0, "Seconds to keep retrying while the server is unreachable.", float],
    ]

    def parseArgs(self, address: str | None = None) -> None:
        if address is not None and self["connect"]:
            raise usage.UsageError("give HOST[:PORT] or --connect, not both")
        self["address"] = address or "localhost"


class RunOptions(_Verbosity, usage.Options):
    synopsis = "[options] SCRIPT"
    longdesc = "Run a job on this machine: a server and local worker processes, one command."
    optParameters = [
        ["workers", "w", 2, "Worker processes.", tap._positive_int],
        ["transport", "t", "tcp", "Transport between the server and the workers."],
        ["output", "o", None, "Write key<TAB>value results here instead of stdout."],
        ["reduce-tasks", "r", None, "Number of reduce partitions.", tap._positive_int],
    ]

    def parseArgs(self, script: str) -> None:
        self["script"] = script


class TransportsOptions(usage.Options):
    synopsis = ""


class Options(usage.Options):
    synopsis = "octo run|server|client|transports [options]"
    longdesc = "octotwist: MapReduce for a handful of machines, octo.py's way."
    subCommands = [
        ["run", None, RunOptions, "Run a job here: server plus local workers."],
        ["server", None, ServerOptions, "Serve a job to workers."],
        ["client", None, ClientOptions, "Work for a server."],
        ["transports", None, TransportsOptions, "List the installed transports."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("which command? octo run|server|client|transports")


def _start_logging(options: usage.Options, stream: TextIO = sys.stderr) -> None:
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
        stream.write(f"octo: {text}\n")
        stream.flush()

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observe, [predicate])], redirectStandardIO=False
    )


async def _serve(reactor: Any, options: ServerOptions) -> int:
    service = tap.build_service(options, reactor)
    service.startService()
    outcome = await service.outcome
    return EXIT_OK if outcome.ok else EXIT_FAILED


async def _work(reactor: Any, options: ClientOptions) -> int:
    transport = get_transport(options["transport"])
    secret = auth.client_secret(options["secret-file"])
    connect = options["connect"] or transport.client.address_to_endpoint(options["address"])
    client = transport.client(reactor, ClientSettings(connect, secret))
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


async def _run(reactor: Any, options: RunOptions) -> int:
    job = load_job(options["script"])
    transport = get_transport(options["transport"])
    # Server and workers share a fresh secret that never touches disk, on a
    # loopback port the kernel picks.
    secret = secrets.token_urlsafe(32).encode()
    output = None
    if options["output"]:
        output = open(options["output"], "w", encoding="utf-8")  # noqa: SIM115
    job_server = JobServer(job, reactor, reduce_tasks=options["reduce-tasks"], output=output)
    task_server = transport.server(
        reactor, ServerSettings("tcp:0:interface=127.0.0.1", secret), job_server.accept
    )
    address = await task_server.listen()
    client = transport.client(reactor, ClientSettings(address, secret))
    worker = ensureDeferred(
        run_worker(reactor, client, processes=options["workers"], name="local", wait=10.0)
    )
    job_server.start()
    outcome = await job_server.result
    await worker
    await task_server.stop()
    if output is not None:
        output.close()
    return EXIT_OK if outcome.ok else EXIT_FAILED


def _list_transports() -> int:
    for name, t in sorted(transports().items()):
        print(f"{name:10} {t.description}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Entry point of the C{octo} console script."""
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(
            f"{options}\nocto: {e}\n" if not str(e).startswith("which") else f"{options}\n"
        )
        sys.exit(EXIT_USAGE)
    command, sub = options.subCommand, options.subOptions
    try:
        if command == "transports":
            sys.exit(_list_transports())
        _start_logging(sub)
        action = {"run": _run, "server": _serve, "client": _work}[command]
        react(_guarded, (action, sub))
    except OctotwistError as e:
        sys.stderr.write(f"octo: {e}\n")
        sys.exit(EXIT_USAGE)


def _guarded(reactor: Any, action: Any, options: usage.Options) -> Deferred[None]:
    """Run C{action} and turn its result or error into the exit status."""

    async def go() -> None:
        try:
            code = await action(reactor, options)
        except OctotwistError as e:
            sys.stderr.write(f"octo: {e}\n")
            code = EXIT_USAGE
        if code:
            raise SystemExit(code)

    return ensureDeferred(go())

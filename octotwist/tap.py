"""
The job server as a Twisted service: C{twistd octo --script job.py}.

L{Options} is shared with C{octo server}, so the two take the same flags;
L{makeService} builds the L{JobService} that both run.
"""

from __future__ import annotations

import atexit
import getopt
import ipaddress
import math
import os
import shlex
import socket
import sys
import warnings
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import _parse, serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from octotwist import allocator, auth, limits
from octotwist.endpoints import server_is_local
from octotwist.errors import OctotwistError, UsageError
from octotwist.hookspecs import get_transport, transports
from octotwist.job import Job, load_job
from octotwist.output import Results, open_results
from octotwist.server import FaultPolicy, JobOutcome, JobServer
from octotwist.status import StatusPage, new_token
from octotwist.store import DEFAULT_MEMORY_LIMIT, BlobStore
from octotwist.transport import IReactor, Option, ServerSettings, TaskServer, Transport

_log = Logger()


def _number(value: str, kind: type[int] | type[float]) -> Any:
    """C{value} as an C{int} or a finite C{float}, or a C{ValueError} that says so."""
    try:
        x = kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"must be {what}") from None
    if not math.isfinite(x):
        raise ValueError("must be a finite number")
    return x


def _positive_int(value: str) -> int:
    n = _number(value, int)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _positive_float(value: str) -> float:
    x = _number(value, float)
    if x <= 0:
        raise ValueError("must be more than 0")
    return x


def _non_negative_float(value: str) -> float:
    x = _number(value, float)
    if x < 0:
        raise ValueError("must be 0 or more")
    return x


class _Named:
    """
    An option's coercion whose C{ValueError} names the option and the value
    given (C{--wait -1: must be 0 or more}): Twisted's message names neither.
    """

    def __init__(self, name: str, coerce: Any) -> None:
        self.name = name
        self.coerce = coerce
        self.coerceDoc = getattr(coerce, "coerceDoc", "")

    def __call__(self, value: str) -> Any:
        try:
            return self.coerce(value)
        except ValueError as e:
            raise ValueError(f"--{self.name} {value}: {e}") from None


#: What Twisted puts before a coercion's message.
_COERCION_FAILED = "Parameter type enforcement failed: "


def usage_message(error: usage.UsageError) -> str:
    """The text of a usage error, without Twisted's prefix for a refused value."""
    return str(error).removeprefix(_COERCION_FAILED)


_DEFAULT_POLICY = FaultPolicy()

#: What to do about failing workers; shared by every command that runs a server.
FAULT_PARAMETERS: list[list[Any]] = [
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
        _non_negative_float,
    ],
]
FAULT_FLAGS: list[list[Any]] = [
    [
        "skip-bad-records",
        None,
        "Complete the job without the keys whose map task failed every attempt "
        "(and name them), instead of failing it.",
    ],
]


def _installed_options(side: str) -> dict[str, tuple[Option, list[str]]]:
    """Every installed transport's options for C{side}, by name, with their owners."""
    try:
        available = transports()
    except OctotwistError:
        return {}  # reported when the transport is looked up
    found: dict[str, tuple[Option, list[str]]] = {}
    for name, t in sorted(available.items()):
        for option in t.server_options if side == "server" else t.client_options:
            found.setdefault(option.name, (option, []))[1].append(name)
    return found


def transport_parameters(side: str, taken: set[str]) -> tuple[list[list], list[list]]:
    """
    The C{optParameters} and C{optFlags} that the installed transports add
    to a command, C{side} being C{"server"} or C{"client"}; names in
    C{taken} (the command's own options) are left out.

    Every transport's options are declared, so that C{--help} lists them
    all; L{transport_options} then rejects those the chosen transport does
    not have.  Their defaults are applied there too, so that C{None} here
    means "not given".
    """
    parameters: list[list] = []
    flags: list[list] = []
    for name, (option, owners) in _installed_options(side).items():
        if name in taken:
            continue
        help = f"{option.help} [{', '.join(owners)}]"
        if option.flag:
            flags.append([name, None, help])
        else:
            parameters.append([name, None, None, help, option.coerce])
    return parameters, flags


def transport_options(options: usage.Options, transport: Transport, side: str) -> dict[str, Any]:
    """
    The values of C{transport}'s own options, defaults applied, for its
    L{ServerSettings} or L{ClientSettings}.

    @raise UsageError: an option of another transport was given.
    """
    own = {
        o.name: o
        for o in (transport.server_options if side == "server" else transport.client_options)
    }
    values: dict[str, Any] = {}
    for name, (_, owners) in _installed_options(side).items():
        given = options.get(name)
        if name in own:
            option = own[name]
            values[name] = (
                bool(given) if option.flag else (option.default if given is None else given)
            )
        elif given:
            raise UsageError(
                f"--{name} is an option of the {' and '.join(owners)} transport"
                f"{'s' if len(owners) > 1 else ''}, not of {transport.name} "
                f"(choose it with --transport {owners[0]})"
            )
    for name, option in own.items():
        values.setdefault(name, option.default)
    return values


def own_option_names(parameters: list[list], flags: list[list]) -> set[str]:
    """The long names a command's own options take (a transport cannot take them)."""
    return {p[0] for p in parameters} | {f[0] for f in flags} | {"help", "version"}


#: The status page, shared by every command that runs a server.
WEB_PARAMETER: list[Any] = [
    "web",
    None,
    None,
    "Serve the live status page (HTML at /, JSON at /status.json) on this endpoint, "
    "e.g. tcp:8080. Without interface= it binds the server's interface (127.0.0.1 for "
    "octo run); reachable from other machines, it needs the token in the URL the server "
    "logs. The http transport also serves it on its own port.",
]


#: How much map output the server holds in memory; shared like WEB_PARAMETER.
MEMORY_PARAMETER: list[Any] = [
    "memory-limit",
    None,
    DEFAULT_MEMORY_LIMIT >> 20,
    "MiB of map output the server keeps in memory; the rest waits in an unlinked "
    "temporary file in $TMPDIR until its reduce task.",
    _non_negative_float,
]


def blob_store(options: usage.Options) -> BlobStore:
    """The L{BlobStore} the options ask for."""
    return BlobStore(memory_limit=int(options["memory-limit"] * 2**20))


def fault_policy(options: usage.Options) -> FaultPolicy:
    """The L{FaultPolicy} the options ask for."""
    return FaultPolicy(
        max_attempts=options["max-attempts"],
        heartbeat=options["heartbeat"],
        task_timeout=options["task-timeout"],
        skip_bad_records=bool(options["skip-bad-records"]),
        backup_after=options["backup-after"] or None,
    )


def ignore_twisted_reserved_descriptor() -> None:
    """
    Keep quiet about the descriptor Twisted's TCP ports hold open for the
    life of the process (C{/dev/null}, read when C{accept} runs out of
    descriptors: twisted#11842, by design).  Under C{PYTHONWARNINGS=default}
    every server would otherwise end its log with a C{ResourceWarning} for it.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"unclosed file <_io\.TextIOWrapper name='/dev/null' mode='r'",
        category=ResourceWarning,
    )


class Versioned(usage.Options):
    """
    Options whose C{--version} is octotwist's: L{usage.Options} prints
    Twisted's, which would tell a user nothing about what they run.
    """

    # What usage.Options reads from each class (declared for mypy only: an
    # entry mixes names, defaults, descriptions and coercions).
    optParameters: list[list[Any]]
    optFlags: list[list[Any]]

    def opt_version(self) -> None:
        """Display octotwist's version and exit."""
        from octotwist import __version__

        print(f"octotwist {__version__}")
        sys.exit(0)


class InterspersedOptions(Versioned):
    """
    Options that may come after positional arguments, as in C{octo run job.py
    -w 2} (Twisted's parser stops at the first positional argument).

    A value an option refuses is reported with the option's name and the
    value (L{_Named}).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("optParameters")
        if own is not None:
            cls.optParameters = [_named(p) for p in own]

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


def _named(parameter: list) -> list:
    """An C{optParameters} entry whose coercion (if any) names the option."""
    if len(parameter) < 5 or parameter[4] is None or isinstance(parameter[4], _Named):
        return parameter
    return [*parameter[:4], _Named(parameter[0], parameter[4]), *parameter[5:]]


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
            f"File holding the shared secret, at least {auth.MIN_SECRET_LENGTH} characters, "
            "mode 0600 (`octo secret -o FILE` makes one; default: "
            f"${auth.SECRET_ENV}, else a secret generated once and kept in "
            "~/.config/octotwist/secret).",
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
        WEB_PARAMETER,
        MEMORY_PARAMETER,
        *FAULT_PARAMETERS,
    ]
    optFlags = FAULT_FLAGS
    _transport_parameters, _transport_flags = transport_parameters(
        "server", own_option_names(optParameters, optFlags) | {"quiet", "verbose", "web"}
    )
    optParameters += _transport_parameters
    optFlags = optFlags + _transport_flags

    def parseArgs(self, script: str | None = None) -> None:
        if script is not None:
            if self["script"]:
                raise usage.UsageError("give the job script once: as --script or as the argument")
            self["script"] = script

    def postOptions(self) -> None:
        if not self["script"]:
            raise usage.UsageError("no job script: octo server JOB.py (or --script JOB.py)")

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if not _under_twistd(self):
                raise  # octo reports it (exit status 2)
            # twistd would exit with 1, as for a job that failed.
            sys.stderr.write(f"{self}\nocto: {usage_message(e)}\n")
            raise SystemExit(2) from None


def _under_twistd(options: usage.Options) -> bool:
    """Whether C{options} are those of C{twistd octo} (rather than of C{octo server})."""
    from twisted.application.app import ServerOptions

    return isinstance(getattr(options, "parent", None), ServerOptions)


def listen_settings(options: Options, transport: Transport) -> tuple[str, bytes]:
    """
    Where to listen and with which secret, applying the rule that a server
    reachable from other machines needs a configured secret.

    @raise UsageError: a non-local endpoint was asked for without one.
    """
    configured = auth.configured_secret(options["secret-file"])
    # Without a configured secret, only a server whose peers prove
    # themselves otherwise (keys) may be reachable from other machines.
    guarded = configured is not None or not transport.server_class().needs_secret(
        transport_options(options, transport, "server")
    )
    listen = options["listen"]
    if listen is None:
        listen = transport.default_listen(local_only=not guarded)
        if not server_is_local(listen):
            _log.info(
                "listening on {listen}, every interface, since a secret is configured "
                "(--listen {local} keeps to this machine)",
                listen=listen,
                local=transport.default_listen(local_only=True),
            )
    else:
        check_server_endpoint(listen)
    if not guarded and not server_is_local(listen):
        raise UsageError(
            f"refusing to listen on {listen} without a configured secret: any machine "
            f"that can reach it could run code here. Set {auth.SECRET_ENV} or pass "
            "--secret-file PATH (the same on the server and every client), or listen "
            "on 127.0.0.1 only"
        )
    return listen, configured or auth.server_secret(None)


def check_server_endpoint(description: str, option: str = "--listen") -> None:
    """
    @raise UsageError: C{description} is not a server endpoint string.
    """
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise UsageError(
            f"{option} {description}: {e} (examples: tcp:18125:interface=127.0.0.1, "
            "unix:/tmp/octo.sock, ssl:18125:privateKey=key.pem:certKey=cert.pem)"
        ) from None


class JobService(Service):
    """
    Serves one job; when it ends, stops listening and calls C{on_end}.

    @ivar outcome: fires with the L{JobOutcome} after the server stopped
        listening.
    """

    def __init__(
        self,
        job_server: JobServer,
        task_server: TaskServer,
        listen: str,
        transport_name: str,
        web: str | None = None,
        status_token: str | None = None,
    ) -> None:
        self.job_server = job_server
        self.task_server = task_server
        self.listen = listen
        self.transport_name = transport_name
        self.web = web
        #: The status pages' token (L{octotwist.status.new_token}), needed
        #: by those reachable from other machines.
        self.status_token = status_token or new_token()
        self.address: str | None = None
        self._web_port: Any = None
        self.outcome: Deferred[JobOutcome] = Deferred()
        self.listening: Deferred[str] = Deferred()

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self.web is not None:
            try:
                self._web_port = await serve_status(self.job_server, self.web, self.status_token)
            except Exception as e:
                self._cannot_listen(Failure(e), self.web)
                return
        d = self.task_server.listen()
        d.addCallbacks(self._listening, self._cannot_listen, errbackArgs=(self.listen,))

    def _listening(self, address: str) -> None:
        self.address = address
        self.job_server.result.addCallback(self._ended)
        _log.info(
            "serving job {job} on {address}; start workers with: octo client {hint}",
            job=self.job_server.job.name,
            address=address,
            hint=_client_hint(address, self.transport_name),
        )
        self._log_transport_page(address)
        self.listening.callback(address)
        self.job_server.start()

    def _log_transport_page(self, address: str) -> None:
        """
        Where the transport serves the status page on its own port (an
        HTTP transport, whose address is a URL), when that page needs the
        token: the "serving job" line does not show it.
        """
        if not address.startswith(("http://", "https://")) or server_is_local(self.listen):
            return
        url = _everywhere_to_hostname(address)
        _log.info(
            "status page at {url}?token={token} (on the {transport} transport's port; "
            "the token is required)",
            url=url if url.endswith("/") else url + "/",
            token=self.status_token,
            transport=self.transport_name,
        )

    def _cannot_listen(self, failure: Any, where: str) -> None:
        error = f"cannot listen on {where}: {failure.getErrorMessage()}"
        _log.error("{error}", error=error)
        self.listening.errback(failure)
        self.listening.addErrback(lambda _: None)  # reported above
        self.job_server.output.abort()
        if self._web_port is not None:
            self._web_port.stopListening()
        self.outcome.callback(JobOutcome(False, error))

    async def _stop_and_report(self, outcome: JobOutcome) -> None:
        await self.task_server.stop()
        if self._web_port is not None:
            await stop_status(self._web_port, self.job_server.reactor)
        self.outcome.callback(outcome)

    def _ended(self, outcome: JobOutcome) -> None:
        Deferred.fromCoroutine(self._stop_and_report(outcome))


def _client_hint(address: str, transport: str) -> str:
    """What a worker types to reach a server that listens on C{address}."""
    flag = "" if transport == "tcp" else f"--transport {transport} "
    if address.startswith("tcp:"):
        host, port = address[4:].replace("\\:", ":").rsplit(":", 1)
        if host in ("0.0.0.0", "::", ""):
            host = "SERVER_HOST"
        return flag + (f"{host}:{port}" if port != "18125" else host)
    for anywhere in ("//0.0.0.0:", "//[::]:"):  # a URL bound to every interface
        address = address.replace(anywhere, "//SERVER_HOST:")
    try:
        get_transport(transport).client_class().address_to_endpoint(address)
    except (ValueError, OctotwistError):
        # Not an address a client connects to (a socket behind a proxy, say).
        return f"{flag}ADDRESS (this server listens on {address})"
    return flag + shlex.quote(address)


def make_job_server(
    job: Job, reactor: IReactorTime, options: usage.Options, output: Results | None
) -> JobServer:
    """
    The L{JobServer} the options of C{octo server}, C{octo run} or C{twistd
    octo} ask for.  If they are wrong, C{output} is taken back (no
    temporary results file is left) before the error goes up.

    @raise UsageError: the options do not go together.
    """
    try:
        return JobServer(
            job,
            reactor,
            reduce_tasks=options["reduce-tasks"],
            output=output,
            store=blob_store(options),
            policy=fault_policy(options),
        )
    except BaseException:
        if output is not None:
            output.abort()
        raise


def build_service(options: Options, reactor: IReactor, output: Results | None = None) -> JobService:
    """
    Load the job and get everything ready to listen; nothing binds yet.

    @raise OctotwistError: the job script, the transport or the options are wrong.
    """
    job = load_job(options["script"])
    transport = get_transport(options["transport"])
    listen, secret = listen_settings(options, transport)
    before, after = limits.raise_open_file_limit()  # strangers may connect: room for them
    if after != before:
        _log.debug(
            "open files: soft limit raised from {before} to {after}", before=before, after=after
        )
    web = options["web"]
    if web is not None:
        check_server_endpoint(web, "--web")
        web = web_endpoint(web, listen_interface(listen))
    if output is None:
        output = open_output(options["output"], job)
    job_server = make_job_server(job, reactor, options, output)
    token = new_token()
    try:
        settings = ServerSettings(
            listen,
            secret,
            transport_options(options, transport, "server"),
            # The same guard wherever the page is served: on the transport's
            # port, the token unless that port is this machine's only.
            status=StatusPage(job_server.status, token=None if server_is_local(listen) else token),
        )
        task_server = transport.server_class()(reactor, settings, job_server.accept)
    except BaseException:
        job_server.output.abort()  # no results file for a server that never started
        raise
    # Stopped before the job ended (Ctrl-C, SIGTERM): no partial results file.
    reactor.addSystemEventTrigger("before", "shutdown", job_server.output.abort)
    return JobService(job_server, task_server, listen, transport.name, web, token)


#: Where the interface sits among an endpoint's positional arguments, by
#: prefix (C{tcp:8080:127.0.0.1}); it is usually given as C{interface=}.
_INTERFACE_ARGUMENT = {"tcp": 2, "tcp6": 3, "ssl": 5, "tls": 4}


def _interface_of(description: str) -> str | None:
    """
    The interface a TCP-based server endpoint string binds (C{""}: every
    interface), or C{None} if it is no such endpoint (C{unix:}, a plugin's).
    """
    args, kwargs = _parse(description)
    prefix = str(args[0]).lower() if args else ""
    if prefix not in _INTERFACE_ARGUMENT:
        return None
    if "interface" in kwargs:
        return str(kwargs["interface"])
    index = _INTERFACE_ARGUMENT[prefix]
    return str(args[index]) if len(args) > index else ""


def listen_interface(listen: str) -> str:
    """
    The interface the task server's endpoint binds, for C{--web} to follow:
    its own for a TCP port (C{""} for every interface), 127.0.0.1 for a
    Unix socket or an endpoint whose interface cannot be told (safe: a
    page there still answers from this machine).
    """
    interface = _interface_of(listen)
    return "127.0.0.1" if interface is None else interface


def web_endpoint(web: str, interface: str) -> str:
    """
    C{--web} bound to C{interface} (L{listen_interface}) when it names none,
    so that a server kept to loopback does not show its status page to the
    network: C{tcp:8080} becomes C{tcp:8080:interface=127.0.0.1}.
    """
    args, kwargs = _parse(web)
    prefix = str(args[0]).lower() if args else ""
    if prefix not in _INTERFACE_ARGUMENT:
        return web  # a Unix socket (local), or an endpoint we cannot read
    if "interface" in kwargs or len(args) > _INTERFACE_ARGUMENT[prefix]:
        return web  # the user chose
    if interface in ("", "0.0.0.0", "::"):
        return web
    if prefix in ("tcp6", "tls") and not _is_ipv6(interface):
        if not _is_loopback_address(interface):
            return web  # an IPv6 endpoint cannot bind that IPv4 address
        interface = "::1"
    return f"{web}:interface={interface.replace(':', chr(92) + ':')}"


def _is_ipv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return False


def _is_loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address.lower() == "localhost"


async def serve_status(job_server: JobServer, endpoint: str, token: str) -> IListeningPort:
    """
    Serve C{job_server}'s status page on C{endpoint} (C{--web}, with its
    interface filled in by L{web_endpoint}), and log its URL: with the
    token when the page is reachable from other machines, which then
    refuses requests without it.
    """
    from twisted.internet import reactor
    from twisted.web.server import Site

    local = server_is_local(endpoint)
    site = Site(StatusPage(job_server.status, token=None if local else token))
    site.noisy = False
    site.displayTracebacks = False
    port = await serverFromString(reactor, endpoint).listen(site)
    bound = port.getHost()
    _log.info(
        "status page at {url} (listening on {bound}{scope})",
        url=_status_url(bound, endpoint, None if local else token),
        bound=_bound(bound),
        scope="; this machine only" if local else "; the token is required",
    )
    return port


#: Seconds the status page stays up after the job, so that an open page
#: fetches how it ended.
STATUS_LINGER = 3.0


async def stop_status(port: IListeningPort, reactor: IReactorTime) -> None:
    """Stop serving the status page, a moment after the job ended."""
    await deferLater(reactor, STATUS_LINGER)
    stopped = port.stopListening()
    assert stopped is not None  # a listening port's stopListening returns a Deferred
    await stopped


def _status_url(bound: Any, endpoint: str, token: str | None) -> str:
    """
    The URL to open: the bound address, or this machine's name when it is
    bound to every interface, with C{?token=} when the page needs it.
    """
    if not hasattr(bound, "port"):  # a Unix socket: there is no URL
        return endpoint
    scheme = "https" if endpoint.split(":", 1)[0].lower() in ("ssl", "tls") else "http"
    name = bound.host if bound.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    host = f"[{name}]" if ":" in name else name
    return f"{scheme}://{host}:{bound.port}/" + (f"?token={token}" if token else "")


def _bound(bound: Any) -> str:
    """C{127.0.0.1:8080}, C{every interface, 0.0.0.0:8080}, a socket's path."""
    if not hasattr(bound, "port"):
        name = getattr(bound, "name", bound)
        return name.decode() if isinstance(name, bytes) else str(name)
    host = f"[{bound.host}]" if ":" in bound.host else bound.host
    every = "every interface, " if bound.host in ("0.0.0.0", "::", "") else ""
    return f"{every}{host}:{bound.port}"


def _everywhere_to_hostname(url: str) -> str:
    """A URL on 0.0.0.0 or [::] with this machine's name instead, to be clicked."""
    for anywhere in ("//0.0.0.0:", "//[::]:"):
        url = url.replace(anywhere, f"//{socket.gethostname()}:")
    return url


def open_output(path: str | None, job: Job) -> Results | None:
    """
    Where C{--output} sends the results (L{octotwist.output}), or C{None}
    for stdout.  A job with C{final()} writes its own results, so
    C{--output} is ignored there (with a warning), rather than leaving an
    empty file behind.

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
        return open_results(path)
    except OSError as e:
        raise UsageError(f"cannot write {path!r}: {e.strerror}") from None


def makeService(options: Options) -> JobService:
    """The twistd entry point: stops the reactor when the job ends."""
    ignore_twisted_reserved_descriptor()
    from twisted.internet import reactor as installed

    reactor = cast(IReactor, installed)  # a module to mypy; the reactor twistd installed
    allocator.tune()
    try:
        service = build_service(options, reactor)
    except OctotwistError as e:
        sys.stderr.write(f"octo: {e}\n")
        raise SystemExit(2) from None
    service.outcome.addCallback(_stop_twistd, reactor)
    return service


def _stop_twistd(outcome: JobOutcome, reactor: IReactorCore) -> None:
    if not outcome.ok:
        # twistd has no way to set its exit status; this runs after it has
        # cleaned up (pid file, final log line), as the interpreter exits.
        atexit.register(_exit_failed)
    reactor.stop()


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

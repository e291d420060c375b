"""
What every command's options share: coercions that name the option, the
fault, memory and status page options, the installed transports' own
options, and the step from parsed options to one L{JobConfig}.

A transport's options join a command's when its options are first parsed
(L{WithTransportOptions}), not when this module is imported: importing
octotwist loads no plugin.
"""

from __future__ import annotations

import getopt
import math
import sys
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.logger import Logger
from twisted.python import usage
from twisted.python.reflect import accumulateClassList

from octotwist import auth
from octotwist.config import DEFAULT_TRANSPORT, FORMATS, FaultPolicy, JobConfig
from octotwist.endpoints import check_server_endpoint, server_is_local
from octotwist.errors import OctotwistError, UsageError
from octotwist.job import Job
from octotwist.output import Results, open_results, stdout
from octotwist.store import DEFAULT_MEMORY_LIMIT
from octotwist.transport import IReactor, Option, Transport

if TYPE_CHECKING:
    from octotwist.launcher import LaunchConfig

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
    from octotwist.hookspecs import transports

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


#: Where and how a server listens: C{octo server}, C{octo serve}, C{twistd octo}.
SERVER_PARAMETERS: list[list[Any]] = [
    [
        "transport",
        "t",
        DEFAULT_TRANSPORT,
        "Transport to serve on; `octo transports` lists them.",
    ],
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
]

#: A cluster's state directory (C{octo serve}, C{twistd octo} without a script).
NO_STATE_DIR_FLAG: list[Any] = [
    "no-state-dir",
    None,
    "Keep nothing: the queue and the results last as long as this server "
    "(a cluster: octo serve, twistd octo without a script).",
]

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


#: Workers started over SSH (L{octotwist.launcher}): octo run and octo serve.
HOSTS_PARAMETERS: list[list[Any]] = [
    [
        "hosts",
        None,
        None,
        "Start a worker on each of these hosts over SSH, with your ~/.ssh/config, agent and "
        "known_hosts: [user@]host[:port],... Each runs as many tasks at once as it has cores.",
    ],
    [
        "hostfile",
        None,
        None,
        "As --hosts, one host a line in this file, each optionally followed by "
        "processes=N and python=PATH; # starts a comment.",
    ],
    [
        "advertise",
        None,
        None,
        "HOST[:PORT] at which the hosts' workers reach this server (default: the address "
        "each host's SSH connection comes from, and the port the server listens on).",
    ],
    [
        "remote-python",
        None,
        None,
        "Run octotwist on the hosts as PATH -m octotwist (default: octo on their PATH).",
    ],
    [
        "ssh-command",
        None,
        "ssh",
        "The ssh client and options of its own to start the workers with, e.g. "
        '"ssh -F ssh_config", or conch for Twisted Conch (the default where there is no '
        "ssh; host keys are always checked, nothing is ever asked).",
    ],
]
HOSTS_FLAGS: list[list[Any]] = [
    [
        "require-all-hosts",
        None,
        "Fail when any host cannot work (default: go on with those that can, saying why "
        "the others cannot).",
    ],
]


def launch_config(options: usage.Options) -> LaunchConfig | None:
    """
    The L{octotwist.launcher.LaunchConfig} that L{HOSTS_PARAMETERS} ask
    for, or C{None} when they name no host.

    @raise UsageError: both --hosts and --hostfile, or a bad host, or no ssh.
    """
    from octotwist.hosts import parse_hosts, read_hostfile
    from octotwist.launcher import LaunchConfig

    given, path = options.get("hosts"), options.get("hostfile")
    if given is not None and path is not None:
        raise UsageError("--hosts and --hostfile: give one")
    if given is None and path is None:
        for name in ("advertise", "remote-python", "require-all-hosts"):
            if options.get(name):
                raise UsageError(f"--{name} is for starting workers on hosts: add --hosts")
        return None
    hosts = parse_hosts(given) if given is not None else read_hostfile(str(path))
    return LaunchConfig.from_command(
        hosts,
        options["ssh-command"],
        remote_python=options["remote-python"] or None,
        advertise=options["advertise"],
        require_all=bool(options["require-all-hosts"]),
    )


#: A job's reduce partitions; every command that runs or sends a job takes it.
REDUCE_TASKS_PARAMETER: list[Any] = [
    "reduce-tasks",
    "r",
    None,
    "Number of reduce partitions (default: the job's reduce_tasks, else 8).",
    _positive_int,
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


#: Where the server journals a job, to resume it after a crash; shared
#: like WEB_PARAMETER.
STATE_DIR_PARAMETER: list[Any] = [
    "state-dir",
    None,
    None,
    "Keep the job's progress in this directory (created, yours alone): a server that "
    "dies or is stopped resumes it when the same command runs again, without running "
    "the tasks that finished. Each finished task's output is written there and fsynced.",
]


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


class WithTransportOptions(InterspersedOptions):
    """
    Options that also take every installed transport's own options for
    C{transport_side} (so that C{--help} lists them all; L{transport_options}
    refuses those of another transport than the one chosen).

    The plugins are looked up when the class is first instantiated, as a
    subclass made once per class, rather than in the class body: importing
    a command's options must not import every transport.
    """

    transport_side: ClassVar[str] = "server"
    #: Names a transport may not take although the class does not (yet) have them.
    reserved_names: ClassVar[frozenset[str]] = frozenset({"quiet", "verbose", "web"})

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(_with_transport_options(cls))


#: Each L{WithTransportOptions} class, and its subclass with the transports' options.
_COMPLETED: dict[type, type] = {}


def _with_transport_options(cls: type[WithTransportOptions]) -> type:
    if cls.__dict__.get("_transports_added"):
        return cls
    completed = _COMPLETED.get(cls)
    if completed is None:
        own: list[list[Any]] = []
        flags: list[list[Any]] = []
        accumulateClassList(cls, "optParameters", own)
        accumulateClassList(cls, "optFlags", flags)
        parameters, transport_flags = transport_parameters(
            cls.transport_side, own_option_names(own, flags) | cls.reserved_names
        )
        namespace = {
            "optParameters": parameters,
            "optFlags": transport_flags,
            "_transports_added": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        completed = _COMPLETED[cls] = type(cls.__name__, (cls,), namespace)
    return completed


def fault_policy(options: usage.Options) -> FaultPolicy:
    """The L{FaultPolicy} that L{FAULT_PARAMETERS} and L{FAULT_FLAGS} ask for."""
    return FaultPolicy(
        max_attempts=options["max-attempts"],
        heartbeat=options["heartbeat"],
        task_timeout=options["task-timeout"],
        skip_bad_records=bool(options["skip-bad-records"]),
        backup_after=options["backup-after"] or None,
    )


def job_config(options: usage.Options) -> JobConfig:
    """
    The L{JobConfig} the options of C{octo run}, C{octo server} or C{twistd
    octo} ask for.

    @raise UsageError: the options do not go together.
    """
    return JobConfig(
        reduce_tasks=options["reduce-tasks"],
        policy=fault_policy(options),
        memory_limit=int(options["memory-limit"] * 2**20),
        output=options.get("output"),
        format=options.get("format") or "tsv",
        sort=not options.get("unsorted"),
        args=tuple(options.get("args") or ()),
        state_dir=options.get("state-dir"),
    )


def listen_settings(
    reactor: IReactor, options: usage.Options, transport: Transport, hosts: bool = False
) -> tuple[str, bytes]:
    """
    Where to listen and with which secret, applying the rule that a server
    reachable from other machines needs a configured secret.

    @param hosts: the server starts its workers on hosts over SSH, which
        hands them the secret (the generated one is good for that).
    @raise UsageError: a non-local endpoint was asked for without one.
    """
    configured = auth.configured_secret(options["secret-file"])
    # Without a configured secret, only a server whose peers prove
    # themselves otherwise (keys), or get it from us, may be reachable
    # from other machines.
    guarded = (
        hosts
        or configured is not None
        or not transport.server_class().needs_secret(
            transport_options(options, transport, "server")
        )
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
        check_server_endpoint(reactor, listen)
    if not guarded and not server_is_local(listen):
        raise UsageError(
            f"refusing to listen on {listen} without a configured secret: any machine "
            f"that can reach it could run code here. Set {auth.SECRET_ENV} or pass "
            "--secret-file PATH (the same on the server and every client), or listen "
            "on 127.0.0.1 only"
        )
    return listen, configured or auth.server_secret(None)


def open_output(config: JobConfig, job: Job) -> Results:
    """
    Where C{--output} sends the results (L{octotwist.output}), standard
    output without it.  A job with C{final()} writes its own results, so
    C{--output} is ignored there (with a warning), rather than leaving an
    empty file behind.

    @raise UsageError: the file cannot be created.
    """
    path = config.output
    if path and job.final is not None:
        _log.warn(
            "--output {path} is ignored: job {job} defines final(), which handles the results",
            path=path,
            job=job.name,
        )
        path = None
    if not path:
        return stdout(config.format)
    try:
        return open_results(path, config.format)
    except OSError as e:
        raise UsageError(f"cannot write {path!r}: {e.strerror}") from None


def _format(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"must be one of {', '.join(FORMATS)}")
    return value


#: How results are written; shared by every command that runs a job.
OUTPUT_PARAMETERS: list[list[Any]] = [
    [
        "output",
        "o",
        None,
        "Write the results to this file instead of stdout (for jobs without final()); "
        "DIR/ writes a part file per partition, a URL (s3://...) writes through fsspec; "
        "replaced only when the job succeeds.",
    ],
    [
        "format",
        None,
        "tsv",
        "How results are written: tsv (key<TAB>value, tabs, newlines and backslashes "
        "escaped, strings bare, other keys as their repr) or jsonl (one [key, value] "
        "JSON array a line).",
        _format,
    ],
]
OUTPUT_FLAGS: list[list[Any]] = [
    [
        "unsorted",
        None,
        "Hand final() and the output the results partition by partition, as each "
        "reduce task ends, instead of in sorted key order.",
    ],
]

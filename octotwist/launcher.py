"""
Workers started over SSH on the hosts of C{--hosts} and C{--hostfile}.

For each host, with the OpenSSH client and the user's own setup (its
C{~/.ssh/config}, agent and known hosts):

 1. B{check}: C{ssh HOST octo version --json}.  The host must answer, as
    an octotwist that can work for this server (L{octotwist.version}); a
    host that does not is named with the reason (an unknown host key with its
    fingerprint, no octotwist there, another version) and left out, or
    fails the job with C{--require-all-hosts}.  The answer also says at which
    address the host sees us (C{$SSH_CONNECTION}), which is where its worker
    connects unless C{--advertise} says otherwise.
 2. B{start}: C{ssh HOST octo client ADDRESS --stdin ...}.  The secret is
    the first line written to that ssh's standard input: it is never on a
    command line or in an environment, where a process listing shows it.
    Standard input then stays open: it is the worker's lifeline.  When it
    closes (we closed it, or we died, or the SSH connection broke), the
    worker stops at once, its task processes with it.
 3. B{stop}, when the job ends, fails or is interrupted: close every
    lifeline, wait a little for the workers to exit, then end the ssh
    processes that are left.  Nothing stays running on any host.

A worker that dies mid-job (its host lost) is the ordinary worker-death
path of the server: its tasks run again elsewhere; the log says which host.

Host keys are always checked (C{StrictHostKeyChecking=yes}) and nothing is
ever asked (C{BatchMode=yes}): no host key is accepted unseen, and no
password prompt stops a job halfway.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from octotwist.errors import OctotwistError, UsageError
from octotwist.hosts import Host, parse_host
from octotwist.version import MAX_ANSWER, Installation

_log = Logger()

#: What every ssh we start is told, whatever the user's configuration says
#: (options on the command line win over the configuration file's).
SSH_OPTIONS = (
    "-T",
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=yes",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
)

#: C{--ssh-command conch}: reach the hosts with Twisted Conch (what happens
#: where no ssh program is installed).
CONCH = "conch"
#: Seconds a host has to answer the check.
CHECK_TIMEOUT = 30.0
#: Seconds the workers have to exit by themselves once the job is over
#: (they heard so from the server) before their lifelines close.
SELF_EXIT = 2.0
#: Seconds they have after that before their ssh is ended.
STOP_GRACE = 10.0
#: Seconds a worker started over SSH keeps trying to reach the server.
WORKER_WAIT = 60.0
#: Bytes of a worker's standard error kept to say why it ended.
KEEP_ERRORS = 8192


class ILaunchReactor(IReactorProcess, IReactorTime):
    """What starting workers over SSH takes of a reactor: processes and timers."""


class LaunchError(OctotwistError):
    """The hosts cannot run the job (none can, or one cannot and all must)."""


@dataclass(frozen=True)
class LaunchConfig:
    """
    Where and how to start workers over SSH.

    @ivar hosts: the hosts, each with its own settings.
    @ivar ssh_command: the ssh client and its own options (C{--ssh-command
        "ssh -F my_config"}).
    @ivar remote_python: the Python to run octotwist with on a host that
        names none (C{PATH -m octotwist}); C{None}: C{octo} on its C{PATH}.
    @ivar advertise: C{HOST[:PORT]} where the workers reach the server;
        C{None}: the address each host's SSH connection came from, and the
        port the server listens on.
    @ivar require_all: fail the job when any host cannot work for it.
    @ivar check_timeout: seconds each host has to answer the check.
    """

    hosts: tuple[Host, ...]
    ssh_command: tuple[str, ...] = ("ssh",)
    remote_python: str | None = None
    advertise: str | None = None
    require_all: bool = False
    check_timeout: float = CHECK_TIMEOUT

    @property
    def conch(self) -> bool:
        """Whether hosts are reached with Twisted Conch rather than an ssh program."""
        return self.ssh_command == (CONCH,)

    def __post_init__(self) -> None:
        if not self.hosts:
            raise UsageError("no hosts to start workers on")
        if not self.ssh_command:
            raise UsageError("--ssh-command is empty: give the ssh client to run")
        if self.advertise is not None:
            advertised(self.advertise)  # refuse a bad one now

    @classmethod
    def from_command(
        cls,
        hosts: tuple[Host, ...],
        ssh_command: str = "ssh",
        **settings: Any,
    ) -> LaunchConfig:
        """
        From what a command line gives: C{ssh_command} as a shell would split it.

        @raise UsageError: the ssh client is not installed, or a setting is wrong.
        """
        try:
            words = shlex.split(ssh_command)
        except ValueError as e:
            raise UsageError(f"--ssh-command {ssh_command!r}: {e}") from None
        if words and words != [CONCH] and shutil.which(words[0]) is None:
            if ssh_command != "ssh":
                raise UsageError(
                    f"no ssh client {words[0]!r} on this machine: install OpenSSH's "
                    "(apt install openssh-client, dnf install openssh-clients), or give "
                    f"--ssh-command {CONCH} (Twisted Conch, in this process)"
                )
            _log.info(
                "no ssh program here: reaching the hosts with Twisted Conch (your agent or "
                "unencrypted keys in ~/.ssh, ~/.ssh/known_hosts; ~/.ssh/config is not read)"
            )
            words = [CONCH]
        return cls(hosts, tuple(words), **settings)

    def octo(self, host: Host) -> list[str]:
        """The command that runs octotwist on C{host}."""
        python = host.python or self.remote_python
        return [python, "-m", "octotwist"] if python else ["octo"]


def advertised(text: str) -> tuple[str, int | None]:
    """
    C{--advertise HOST[:PORT]}.

    @raise UsageError: it is not that.
    """
    try:
        host = parse_host(text)
    except ValueError:
        raise UsageError(
            f"--advertise {text!r}: give HOST[:PORT], an IPv6 address in brackets ([fd00::1]:9000)"
        ) from None
    if host.user is not None:
        raise UsageError(f"--advertise {text!r}: give HOST[:PORT], no user")
    return host.host, host.port


def bound_port(address: str) -> int | None:
    """The port in a task server's address (C{tcp:0.0.0.0:40123}, C{http://[::]:80/})."""
    ports = re.findall(r":(\d{1,5})(?=/|\?|$)", address)
    return int(ports[-1]) if ports else None


@dataclass(frozen=True)
class Ready:
    """A host that passed its check."""

    host: Host
    installation: Installation


class _SSH(ProcessProtocol):
    """One ssh process: what it printed, and how it ended."""

    def __init__(self, on_line: Any = None) -> None:
        self.out = bytearray()
        self.err = bytearray()
        #: Fires with how it ended (a Failure is not a result a Deferred can carry).
        self.ended: Deferred[BaseException] = Deferred()
        self.reason: Failure | None = None
        self._on_line = on_line
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        if len(self.out) <= MAX_ANSWER:
            self.out += data[: MAX_ANSWER + 1 - len(self.out)]

    def errReceived(self, data: bytes) -> None:
        self.err += data
        del self.err[:-KEEP_ERRORS]
        if self._on_line is not None:
            *lines, self._partial = (self._partial + data).split(b"\n")
            self._partial = self._partial[-KEEP_ERRORS:]
            for line in lines:
                self._on_line(line.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(reason.value)

    @property
    def running(self) -> bool:
        return self.reason is None

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def closeStdin(self) -> None:
        if self.transport is not None:
            self.transport.closeStdin()

    def end(self, signal: str) -> None:
        if self.running and self.transport is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess(signal)


class HostWorkers:
    """
    The workers on a job's (or a cluster's) hosts: checked, started, stopped.

    @param transport: the transport's name (C{octo client -t NAME}).
    @param secret: what each worker proves it knows (sent on its standard input).
    """

    def __init__(
        self,
        reactor: ILaunchReactor,
        config: LaunchConfig,
        transport: str,
        secret: bytes,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.transport = transport
        self._secret = secret
        self._checks: list[_SSH] = []
        self._workers: dict[str, _SSH] = {}
        self._stopping = False
        #: Where the workers connect: the host (C{None}: each its own), the port.
        self._address: tuple[str | None, int] = (None, 0)

    # 1. The check, and 2. the workers.

    async def launch(self, port: int | None, others_coming: bool) -> str | None:
        """
        Check every host at once, and start a worker on each as soon as its
        own check passed (with C{--require-all-hosts}, on all of them once
        every check passed): a host slow to answer holds up no other.

        @param port: the port this server listens on (unless C{--advertise}
            names one), where the workers connect.
        @param others_coming: workers other than these hosts' are on their way.
        @return: why the job cannot go on with the hosts that can work (each
            named with why not), or C{None}.
        @raise LaunchError: there is no port a host could connect to.
        """
        self._address = self._where(port)
        hosts = self.config.hosts
        _log.info(
            "checking {n} over SSH: {hosts}",
            n=_count(len(hosts), "host"),
            hosts=", ".join(map(str, hosts)),
        )
        results = await DeferredList(
            [Deferred.fromCoroutine(self._check_and_start(host)) for host in hosts],
            consumeErrors=True,
        )
        ready: list[Ready] = []
        reasons: dict[str, str] = {}
        for host, (ok, result) in zip(hosts, results, strict=True):
            if not ok:  # (a bug of ours: say so rather than hang)
                result = f"the check failed: {cast(Failure, result).getErrorMessage()}"
                _log.error("host {host} cannot work for this server: {why}", host=host, why=result)
            if isinstance(result, Ready):
                ready.append(result)
            else:
                reasons[str(host)] = result
        if self._stopping:
            return None
        refusal = self.refusal(ready, reasons, others_coming)
        if refusal is None and self.config.require_all:
            for r in ready:
                self._start(r)
        return refusal

    def refusal(
        self, ready: list[Ready], reasons: dict[str, str], others_coming: bool
    ) -> str | None:
        """
        Why the job cannot go on with the hosts that are C{ready} (the
        others having failed for C{reasons}), or C{None}.
        """
        why = "; ".join(f"host {host}: {reason}" for host, reason in reasons.items())
        if reasons and self.config.require_all:
            return (
                f"{_count(len(reasons), 'host')} of {len(self.config.hosts)} cannot work for it "
                f"and --require-all-hosts is given ({why})"
            )
        if not ready and not others_coming:
            return f"no host can work for it ({why})"
        return None

    async def _check_and_start(self, host: Host) -> Ready | str:
        result = await self._check(host)
        if not isinstance(result, Installation):
            if not self._stopping:
                _log.error("host {host} cannot work for this server: {why}", host=host, why=result)
            return result
        ready = Ready(host, result)
        if not self.config.require_all:
            self._start(ready)
        return ready

    async def _check(self, host: Host) -> Installation | str:
        log_fd, log_name = tempfile.mkstemp(prefix="octo-ssh-", suffix=".log")
        os.close(log_fd)
        try:
            command = [*self.config.octo(host), "version", "--json"]
            ssh = self._spawn(host, command, log=log_name)
            self._checks.append(ssh)
            timer = self.reactor.callLater(self.config.check_timeout, ssh.end, "KILL")
            try:
                reason = await ssh.ended
            finally:
                timed_out = not timer.active()
                if not timed_out:
                    timer.cancel()
            with open(log_name, "rb") as f:
                log = f.read(KEEP_ERRORS * 8)
            if self.config.conch:  # (its words stand for ssh's; no standard error)
                log, ssh.err = bytes(ssh.err), bytearray()
        finally:
            os.unlink(log_name)
        if self._stopping:
            return "stopped"
        if timed_out and not isinstance(reason, ProcessDone):
            return (
                f"no answer within {self.config.check_timeout:g} s "
                f"({_last(_said(log)) if _said(log) else 'ssh said nothing'})"
            )
        return explain_check(
            host, self.config, _exit_code(reason), bytes(ssh.out), bytes(ssh.err), log
        )

    def _where(self, port: int | None) -> tuple[str | None, int]:
        """The host (C{None}: each its own) and port the workers connect to."""
        host_given, port_given = (
            advertised(self.config.advertise) if self.config.advertise else (None, None)
        )
        port = port_given or port
        if port is None:
            raise LaunchError("the server listens on no port a host could connect to")
        return host_given, port

    def _start(self, r: Ready) -> None:
        """Start a worker on a host that passed its check."""
        if self._stopping:
            return
        host_given, port = self._address
        where = host_given or r.installation.ssh_client or socket.getfqdn()
        address = f"[{where}]:{port}" if ":" in where else f"{where}:{port}"
        processes = r.host.processes or r.installation.cpus
        command = [
            *self.config.octo(r.host),
            "client",
            address,
            "--transport",
            self.transport,
            "--processes",
            str(processes),
            "--name",
            str(r.host),
            "--stdin",
            "--quiet",
            # A host that cannot reach us says so (its worker gives up)
            # within a minute, not the two of a client started by hand.
            "--wait",
            f"{WORKER_WAIT:g}",
        ]
        name = str(r.host)
        ssh = self._spawn(r.host, command, on_line=lambda line: _relay(name, line))
        ssh.write(self._secret + b"\n")
        self._workers[name] = ssh
        ssh.ended.addCallback(self._worker_ended, name)
        _log.info(
            "host {host}: starting a worker of {n} process{es}, connecting to {address}",
            host=name,
            n=processes,
            es="" if processes == 1 else "es",
            address=address,
        )

    def _worker_ended(self, reason: BaseException, name: str) -> None:
        if self._stopping:
            return
        ssh = self._workers[name]
        code = _exit_code(reason)
        if code == 0:
            _log.debug("host {host}: its worker exited", host=name)
            return
        # (ssh says 255 both when it lost the connection and when the
        # remote command was killed by a signal.)
        how = "it was killed, or its SSH connection was lost" if code == 255 else _how(reason)
        _log.warn(
            "host {host}: its worker ended ({how}){last}; its tasks go to the other workers",
            host=name,
            how=how,
            last=f": {_last(_said(ssh.err)).removeprefix('octo: ')}" if _said(ssh.err) else "",
        )

    # 3. The end.

    async def stop(self, grace: float = STOP_GRACE, self_exit: float = SELF_EXIT) -> None:
        """
        End every worker: those that heard the job's end exit by themselves
        (for up to C{self_exit} seconds); the lifelines of the others are
        closed, and they get C{grace} seconds more; then their ssh
        processes are ended.  Checks still running are ended at once.
        """
        self._stopping = True
        for check in self._checks:
            check.end("KILL")
        workers = [s for s in self._workers.values() if s.running]
        await self._until_ended(workers, self_exit)
        for ssh in workers:
            if ssh.running:
                ssh.closeStdin()
        await self._until_ended(workers, grace)
        for signal in ("TERM", "KILL"):
            for ssh in (*self._checks, *workers):
                ssh.end(signal)
            await self._until_ended([*self._checks, *workers], 2.0)

    async def _until_ended(self, processes: list[_SSH], seconds: float) -> None:
        deadline = self.reactor.seconds() + seconds
        while any(p.running for p in processes) and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05)

    def _spawn(
        self, host: Host, command: list[str], *, log: str | None = None, on_line: Any = None
    ) -> _SSH:
        """
        Run C{command} on C{host}.  With C{log} (a check), ssh logs verbosely
        into that file (C{-v -E}), which then says the host key it was shown,
        and standard error holds the command's own complaints only; its
        standard input is closed at once.
        """
        if self.config.conch:
            from octotwist import conch_command

            remote = "exec " + shlex.join(command)
            session = conch_command.run(
                self.reactor, host.host, host.user, host.port, remote, self.config.check_timeout
            )
            return session  # type: ignore[return-value]  # (what the launcher reads of an _SSH)
        ssh = _SSH(on_line)
        args = [
            *self.config.ssh_command,
            *SSH_OPTIONS,
            "-o",
            f"ConnectTimeout={max(1, int(self.config.check_timeout))}",
            *(["-v", "-E", log] if log else []),
            *host.ssh_arguments(),
            "exec " + shlex.join(command),
        ]
        # In a session of its own (setsid, where there is one), ssh does not
        # get the terminal's Ctrl-C: we stop it, after the job says why.
        setsid = shutil.which("setsid")
        argv = [setsid, *args] if setsid else args
        process: IProcessTransport = self.reactor.spawnProcess(
            ssh, argv[0], argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"}
        )
        if log:
            process.closeStdin()  # the check reads nothing
        return ssh


def explain_check(
    host: Host, config: LaunchConfig, code: int | None, out: bytes, err: bytes, log: bytes = b""
) -> Installation | str:
    """
    What a host's answer to C{octo version --json} means: its installation,
    or why it cannot work (what went wrong, and what to do).

    @param code: ssh's exit status (C{None}: killed by a signal).
    @param out: what the command printed; C{err}: what it wrote to standard
        error; C{log}: what ssh itself said (C{-v -E}).
    """
    octo = config.octo(host)
    named = octo != ["octo"]
    if code == 255:
        return _ssh_failure(host, config, log)
    said = _said(err)
    here = Installation.here().octotwist
    if code == 0:
        try:
            theirs = Installation.from_json(out.decode("utf-8", "replace").strip())
        except ValueError as e:
            return f"`{shlex.join(octo)} version --json` answered something else: {e}"
        problem = Installation.here().incompatibility(theirs)
        if problem is None:
            return theirs
        return f"{problem}; install octotwist {here} there"
    if code == 127:  # the shell's "command not found"
        if named:
            return (
                f"{octo[0]} does not exist there ({_last(said)}): check python=PATH in the "
                "host file, or --remote-python"
            )
        return (
            "there is no octo on its PATH (for commands run over ssh): install octotwist "
            f"there (pip install octotwist=={here}), or pass --remote-python PATH "
            "(python=PATH in a host file) naming the Python that has it"
        )
    if any("No module named octotwist" in line for line in said):
        return (
            f"{octo[0]} has no octotwist: install it there (pip install octotwist=={here}), "
            "or name another Python (python=PATH in a host file, or --remote-python)"
        )
    if code == 2 and any("octo" in line for line in said):
        return (
            f"`{shlex.join(octo)} version --json` is not understood there: an octotwist "
            f"older than this one ({here})? ({_last(said)})"
        )
    return f"`{shlex.join(octo)} version --json` exited with status {code}: {_last(said)}"


#: What ssh -v says that is never why it failed.
_NOISE = ("debug", "OpenSSH_", "Authenticated to", "Transferred:", "Bytes per second:")


def _said(text: bytes | bytearray) -> list[str]:
    """The lines of C{text} that say something (ssh's verbose chatter left out)."""
    lines = bytes(text).decode("utf-8", "replace").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(_NOISE)]


def _ssh_failure(host: Host, config: LaunchConfig, log: bytes) -> str:
    """Why ssh itself failed (its exit status 255), and what to do."""
    lines = log.decode("utf-8", "replace").splitlines()
    said = _said(log)
    text = "\n".join(said)
    shown = "Server host key: "  # what ssh -v says of the key it was offered
    key = next((ln.split(shown, 1)[1] for ln in lines if shown in ln), None)
    fingerprint = f" ({key})" if key else ""
    again = shlex.join([*config.ssh_command, *(a for a in host.ssh_arguments() if a != "--")])
    if "IDENTIFICATION HAS CHANGED" in text or "has changed" in text:
        return (
            f"its SSH host key{fingerprint} is not the one known_hosts holds for it: someone "
            "may be in the middle, or the host was reinstalled. octo refuses it; once you know "
            "the new key is the host's, remove the old one (ssh-keygen -R) and connect once "
            f"with `{again}`"
        )
    if "Host key verification failed" in text:
        return (
            f"its SSH host key{fingerprint} is not in known_hosts, and octo accepts no host "
            "key unseen. Check that fingerprint with the host's owner (ssh-keygen -lf "
            f"/etc/ssh/ssh_host_*_key.pub there), then connect once with `{again}` and "
            "answer yes"
        )
    if "Permission denied" in text:
        return (
            f"SSH refused our keys ({_last(said)}). octo asks for no password: add your "
            "key to ssh-agent (ssh-add) or name it in ~/.ssh/config (IdentityFile), and "
            "check that the host has its public key in ~/.ssh/authorized_keys"
        )
    return f"ssh cannot reach it: {_last(said)}"


def _relay(host: str, line: str) -> None:
    """A line a remote worker logged (it runs with -q: warnings and errors)."""
    if line.strip():
        _log.warn("host {host}: {line}", host=host, line=line.removeprefix("octo: "))


def _exit_code(reason: BaseException) -> int | None:
    return getattr(reason, "exitCode", None)


def _how(reason: BaseException) -> str:
    signal = getattr(reason, "signal", None)
    return f"killed by signal {signal}" if signal else f"exit status {_exit_code(reason)}"


def _last(said: list[str]) -> str:
    return said[-1] if said else "it said nothing"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"

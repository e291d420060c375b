"""
A command on a host over Twisted Conch: how C{--hosts} reaches hosts where
no OpenSSH client is installed (a slim container, say), or with
C{--ssh-command conch}.

It does what the launcher asks of C{ssh -T -o BatchMode=yes -o
StrictHostKeyChecking=yes}: your keys (C{SSH_AUTH_SOCK}'s agent, else the
unencrypted C{~/.ssh/id_ed25519}, C{id_ecdsa}, C{id_rsa}), the host's key
checked against C{~/.ssh/known_hosts} (read only, as OpenSSH reads it:
C{[host]:port} for a port other than 22; an unknown or changed key is
refused, never added), nothing ever asked.  What it does not do: read
C{~/.ssh/config} (aliases, C{ProxyJump}); the launcher says so when it falls
back to it.  Conch gives a command's standard output and exit status, not
its standard error: a failure is reported by its status.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any, cast

from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.error import ConchError, HostKeyChanged, UserRejectedKey
from twisted.conch.ssh.keys import BadKeyError, EncryptedKeyError, FingerprintFormats, Key
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

#: The identities tried, in ~/.ssh, when there is no agent.
IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
#: Bytes of standard output kept (a check's answer is small).
MAX_OUTPUT = 64 * 1024


class _Refusing:
    """The "user interface" of an endpoint that asks nothing: every question is no."""

    def prompt(self, text: bytes) -> Deferred[bool]:
        return fail(UserRejectedKey())

    def warn(self, text: bytes) -> None:
        pass


class _KnownHosts(KnownHostsFile):
    """
    C{~/.ssh/known_hosts}, read only, with the host's port as OpenSSH writes
    it (C{[host]:2222}); Conch's own would look up the bare name and add
    keys it had not seen once a user said yes.
    """

    port: int = 22
    shown: str = ""

    def verifyHostKey(self, ui: Any, hostname: bytes, ip: bytes, key: Key) -> Deferred[bool]:
        names = [hostname, ip]
        if self.port != 22:
            names = [b"[%s]:%d" % (name, self.port) for name in names]
        kind = "ECDSA" if key.type() == "EC" else key.type()
        self.shown = f"{kind} SHA256:{key.fingerprint(format=FingerprintFormats.SHA256_BASE64)}"
        try:
            if any(self.hasHostKey(name, key) for name in names):
                return Deferred.fromCoroutine(_true())
        except HostKeyChanged as e:
            return fail(e)
        return fail(UserRejectedKey())


async def _true() -> bool:
    return True


class ConchCommand(Protocol):
    """
    One command's session, with what the launcher reads of an ssh process:
    C{out}, C{err} (what went wrong before the command ran, as ssh would
    say it), C{ended} (fires with how it ended), C{write}, C{closeStdin},
    C{end}.
    """

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[BaseException] = Deferred()
        self.reason: BaseException | None = None
        # What is written before the command runs (the secret), and
        # whether its input is to be closed then.
        self._pending = bytearray()
        self._eof = False

    @property
    def running(self) -> bool:
        return self.reason is None

    def connectionMade(self) -> None:
        if self._pending:
            self.write(bytes(self._pending))
            self._pending.clear()
        if self._eof:
            self.closeStdin()

    def dataReceived(self, data: bytes) -> None:
        if len(self.out) <= MAX_OUTPUT:
            self.out += data[: MAX_OUTPUT + 1 - len(self.out)]

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        value = reason.value
        self._end(ProcessDone(0) if isinstance(value, ConnectionDone) else value)

    def failed(self, why: str) -> None:
        """It never ran: say why as ssh would (its status 255)."""
        self.err += why.encode() + b"\n"
        self._end(ProcessTerminated(255, None, None))

    def _end(self, reason: BaseException) -> None:
        if self.reason is None:
            self.reason = reason
            self.ended.callback(reason)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
        else:
            self._pending += data

    def closeStdin(self) -> None:
        channel: Any = self.transport
        if channel is not None:
            channel.conn.sendEOF(channel)
        else:
            self._eof = True

    def end(self, signal: str = "TERM") -> None:
        """Close the session (the host's sshd then ends the command's input)."""
        if self.transport is not None:
            self.transport.loseConnection()
        elif self.running:
            self.failed("stopped before it connected")


def run(
    reactor: Any, host: str, user: str | None, port: int | None, command: str, timeout: float
) -> ConchCommand:
    """Start C{command} on C{host}; its L{ConchCommand} reports how it goes."""
    # (Imported here: importing it installs the default reactor, and a
    # library module takes the reactor it is given.)
    from twisted.conch.endpoints import SSHCommandClientEndpoint

    session = ConchCommand()
    path = FilePath(os.path.expanduser("~/.ssh/known_hosts"))
    known = cast(_KnownHosts, _KnownHosts.fromPath(path))  # (fromPath makes a cls)
    known.port = port or 22
    agent_socket = os.environ.get("SSH_AUTH_SOCK")
    endpoint = SSHCommandClientEndpoint.newConnection(
        reactor,
        command.encode(),
        (user or getpass.getuser()).encode(),
        host.encode(),
        port or 22,
        keys=None if agent_socket else _identities(),
        agentEndpoint=UNIXClientEndpoint(reactor, agent_socket) if agent_socket else None,
        knownHosts=known,  # type: ignore[arg-type]  # (a KnownHostsFile is what it uses)
        ui=_Refusing(),  # type: ignore[arg-type]
    )
    connecting = connectProtocol(endpoint, session)
    timer = reactor.callLater(timeout, connecting.cancel)

    def connected(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    def refused(failure: Failure) -> None:
        session.failed(_why(failure, known.shown))

    connecting.addBoth(connected).addErrback(refused)
    return session


def _why(failure: Failure, shown: str) -> str:
    """What ssh would have said (the launcher reads it as ssh's own words)."""
    if failure.check(UserRejectedKey):
        return f"Server host key: {shown}\nHost key verification failed."
    if failure.check(HostKeyChanged):
        return f"Server host key: {shown}\nREMOTE HOST IDENTIFICATION HAS CHANGED"
    if failure.check(ConchError):
        return f"Permission denied ({failure.getErrorMessage()})"
    return f"ssh: connect: {failure.getErrorMessage()}"


def _identities() -> list[Key]:
    """The unencrypted private keys in ~/.ssh (an encrypted one needs the agent)."""
    keys = []
    for name in IDENTITIES:
        path = Path(os.path.expanduser("~/.ssh")) / name
        try:
            keys.append(Key.fromFile(str(path)))
        except (OSError, BadKeyError, EncryptedKeyError):
            continue
    return keys

"""
The SSH transport's client: connect, check the server's host key, log in,
open the C{octo} subsystem.

Addresses (what C{octo client -t ssh ADDRESS} and C{--connect} take)::

    HOST  HOST:PORT  [IPV6]:PORT  USER@HOST:PORT
    ssh://[USER@]HOST[:PORT][?host-key-fingerprint=SHA256:...]
    tcp:HOST:PORT  unix:/PATH            (any Twisted client endpoint)

The user is C{octo} unless given.  The C{ssh://} form with a fingerprint is
what the server's C{listen()} reports, so C{octo run -t ssh} pins the host
key it just created without any option.

Trusting the host key, in this order:

  1. fingerprints (C{--host-key-fingerprint}, or in the address): the key
     must have one of them;
  2. C{--known-hosts PATH}: the key must be listed for C{[HOST]:PORT} (or
     plain C{HOST}); an unlisted or different key is refused;
  3. neither: the server must prove, in its first frame, that it knows our
     shared secret for this very session (as the TCP transport's server
     does).  A server that cannot is refused with its fingerprint and the
     flag to trust it.

Logging in: with C{--identity KEY} (ed25519, RSA, ECDSA; a protected key
opens with C{--identity-passphrase-file} or through an ssh-agent), and with
the shared secret (a session-bound password, see L{octotwist_ssh.server})
when the server offers that.  Without C{--identity}, the keys of a running
ssh-agent (C{SSH_AUTH_SOCK}) are offered.
"""

from __future__ import annotations

import hmac
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from twisted.conch.ssh import common
from twisted.conch.ssh.agent import SSHAgentClient
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.transport import (
    DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    SSHClientTransport,
)
from twisted.conch.ssh.userauth import SSHUserAuthClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString, connectProtocol
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from octotwist.endpoints import split_host_port
from octotwist.errors import AuthenticationError, RemoteProtocolError, UsageError
from octotwist.transport import (
    Accept,
    ClientSettings,
    IReactor,
    MessageChannel,
    TaskClient,
    no_delay,
)
from octotwist_ssh import DEFAULT_PORT, keys
from octotwist_ssh.channel import (
    MACS,
    MAGIC,
    PROOF_SIZE,
    SUBSYSTEM,
    ConchLogging,
    FramedChannel,
    State,
    client_password,
    session_proof,
)

DEFAULT_USER = "octo"
_ENDPOINT_PREFIXES = ("tcp", "tcp6", "unix", "host")

_log = Logger()


# Addresses


@dataclass(frozen=True)
class SSHAddress:
    """
    A parsed client address.

    @ivar endpoint: the Twisted client endpoint string to connect with.
    @ivar host: the host name, for known_hosts and messages.
    @ivar port: the port (C{None} for a Unix socket).
    @ivar user: the SSH user name.
    @ivar fingerprints: host key fingerprints pinned by the address.
    """

    endpoint: str
    host: str
    port: int | None
    user: str = DEFAULT_USER
    fingerprints: tuple[str, ...] = ()


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> SSHAddress:
    """
    @raise ValueError: C{text} is none of the forms in the module docstring;
        the message says which part is wrong.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("ssh://"):
        return _parse_url(text[len("ssh://") :], default_port)
    prefix = text.split(":", 1)[0]
    if prefix in _ENDPOINT_PREFIXES and ":" in text:
        return _parse_endpoint(text)
    user = DEFAULT_USER
    if "@" in text:
        user, text = text.rsplit("@", 1)
        if not user:
            raise ValueError("empty user name before '@'")
    return _short(text, user, default_port, ())


def _parse_url(rest: str, default_port: int) -> SSHAddress:
    rest, _, query = rest.partition("?")
    rest = rest.rstrip("/")
    user = DEFAULT_USER
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        user = unquote(user)
    fingerprints: list[str] = []
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        if name != "host-key-fingerprint":
            raise ValueError(f"unknown parameter {name!r} (only host-key-fingerprint)")
        fingerprints.append(keys.normalize_fingerprint(unquote(value)))
    return _short(rest, user, default_port, tuple(fingerprints))


def _short(hostport: str, user: str, default_port: int, pins: tuple[str, ...]) -> SSHAddress:
    if hostport.count(":") > 1 and not hostport.startswith("["):
        hostport = f"[{hostport}]"  # a bare IPv6 address
    try:
        host, port = split_host_port(hostport, default_port)
    except ValueError:
        raise ValueError(f"bad port in {hostport!r}") from None
    if not host or any(c in host for c in " /@?"):
        raise ValueError(f"bad host {host!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    escaped = host.replace(":", "\\:")
    return SSHAddress(f"tcp:{escaped}:{port}", host, port, user, pins)


def _parse_endpoint(text: str) -> SSHAddress:
    from twisted.internet.endpoints import _parse

    args, kwargs = _parse(text)
    prefix = str(args[0])
    if prefix == "unix":
        path = kwargs.get("path") or (args[1] if len(args) > 1 else "")
        return SSHAddress(text, str(path), None)
    host = str(kwargs.get("host") or (args[1] if len(args) > 1 else ""))
    port = kwargs.get("port") or (args[2] if len(args) > 2 else "")
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"no port number in {text!r}") from None
    return SSHAddress(text, host, port_number)


# The client's SSH machinery


@dataclass
class _Context:
    """Everything one connection attempt needs, shared by its parts."""

    reactor: IReactor
    address: SSHAddress
    secret: bytes
    identity: keys.Identity | None
    known_hosts: str | None
    fingerprints: tuple[str, ...]
    accept: Accept
    agent_socket: str | None


class _ClientTransport(ConchLogging, SSHClientTransport):
    """Checks the host key, then starts user authentication."""

    supportedMACs = MACS
    context: _Context
    #: The connection's (TCP or Unix socket), set before anything here runs.
    transport: ITCPTransport

    def connectionMade(self) -> None:
        # Cancelled (the worker stops, or its attempt timed out), the
        # connection goes too: a subsystem opened later would otherwise
        # start a session nobody waits for.
        self.ready: Deferred[MessageChannel] = Deferred(lambda _: self.transport.abortConnection())
        self.error: Exception | None = None
        self.host_verified = False
        self.host_key: Key | None = None
        self.remote_reason = ""
        no_delay(self.transport)
        super().connectionMade()

    def verifyHostKey(self, blob: bytes, _md5: bytes) -> Deferred[bool]:
        context = self.context
        where = context.address
        key = self.host_key = Key.fromString(blob)
        try:
            if context.fingerprints:
                keys.check_fingerprints(context.fingerprints, where.host, where.port, key)
                self.host_verified = True
            elif context.known_hosts:
                keys.check_known_hosts(context.known_hosts, where.host, where.port or 22, key)
                self.host_verified = True
            elif not context.secret:
                raise keys.HostKeyError(_untrusted(where, key, "no shared secret to check"))
        except keys.HostKeyError as e:
            self.error = AuthenticationError(str(e))
            return fail(e)
        except UsageError as e:  # known_hosts unreadable: retrying will not help
            self.error = AuthenticationError(str(e))
            return fail(e)
        return succeed(True)

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if reason == DISCONNECT_HOST_KEY_NOT_VERIFIABLE:
            desc = b"host key not trusted by the client"  # Conch would send a traceback
        super().sendDisconnect(reason, desc)

    def connectionSecure(self) -> None:
        connection = _ClientConnection(self.context)
        self.requestService(_UserAuthClient(self.context.address.user.encode(), connection))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.remote_reason = description.decode("utf-8", "replace")

    def fail_ready(self, error: Exception) -> None:
        """Give up on this connection with C{error}."""
        if self.error is None:
            self.error = error
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if not self.ready.called:
            error = self.error
            if error is None:
                why = self.remote_reason or (reason.getErrorMessage() if reason else "")
                error = ConnectionError(
                    f"SSH connection closed before the octo subsystem opened: {why}"
                )
            self.ready.errback(error)


def _untrusted(address: SSHAddress, key: Key, why: str) -> str:
    fp = keys.fingerprint(key)
    where = f"{address.host}:{address.port}" if address.port else address.host
    return (
        f"the host key of {where} ({fp}) is not trusted ({why}); refusing to connect. "
        f"If that is the server's key (the server logs it when it starts), pass "
        f"--host-key-fingerprint {fp}, or --known-hosts FILE with the line:\n    "
        f"{keys.known_host_names(address.host, address.port or 22)[0]} {keys.public_line(key)}"
    )


class _UserAuthClient(ConchLogging, SSHUserAuthClient):
    """Offers the identity (or the agent's keys), then the session-bound secret."""

    preferredOrder = [b"publickey", b"password"]
    #: Set when the service starts, before anything here runs.
    transport: _ClientTransport

    def __init__(self, user: bytes, instance: _ClientConnection) -> None:
        super().__init__(user, instance)
        self.context = instance.context
        self.offered: list[bytes] = []
        self.refused_keys: list[Key] = []
        self.tried_password = False
        self._candidates: list[Key] | None = None
        self._agent: SSHAgentClient | None = None

    def serviceStopped(self) -> None:
        if self._agent is not None and self._agent.transport is not None:
            self._agent.transport.loseConnection()
        super().serviceStopped()

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        methods, _ = common.getNS(packet)
        self.offered = methods.split(b",")
        key = self.lastPublicKey if self.lastAuth == b"publickey" else None
        if key is not None and key not in self.refused_keys:
            self.refused_keys.append(key)
        return super().ssh_USERAUTH_FAILURE(packet)

    def ssh_USERAUTH_SUCCESS(self, packet: bytes) -> None:
        if self._agent is not None and self._agent.transport is not None:
            self._agent.transport.loseConnection()
        super().ssh_USERAUTH_SUCCESS(packet)

    def _cbUserauthFailure(self, result: Any, iterator: Any) -> Any:
        if result:
            return None
        try:
            method = next(iterator)
        except StopIteration:
            self.transport.error = AuthenticationError(self._explain())
            self.transport.sendDisconnect(
                DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"no more authentication methods"
            )
            return None
        return super()._cbUserauthFailure(None, itertools.chain([method], iterator))

    def _explain(self) -> str:
        context = self.context
        address = context.address
        server = f"{address.host}:{address.port}" if address.port else address.host
        as_user = f"as user {address.user!r}"
        identity = context.identity
        if self.refused_keys:
            fps = ", ".join(keys.fingerprint(k) for k in self.refused_keys)
            which = f" ({identity.path})" if identity is not None else " (from ssh-agent)"
            pub = f"{identity.path}.pub" if identity is not None else "its public key"
            return (
                f"the SSH server {server} refused the key {fps}{which} {as_user}: add {pub} "
                "to the file the server was given with --authorized-keys (the server "
                "accepts the users 'octo' and the account it runs as)"
            )
        if self.tried_password:
            return (
                f"the SSH server {server} rejected our shared secret {as_user}: give the "
                "client the server's secret (OCTO_SECRET or --secret-file), or log in with "
                "a key (--identity)"
            )
        if b"publickey" in self.offered:
            return (
                f"the SSH server {server} accepts keys only: pass --identity KEY (whose .pub "
                "is in the server's --authorized-keys file) or load the key into ssh-agent"
            )
        offered = b",".join(self.offered).decode("ascii", "replace") or "nothing"
        return f"the SSH server {server} offers {offered}, and this client has none of them"

    # publickey

    # Conch declares a Key or None, and calls it through maybeDeferred: a
    # Deferred (of the agent's first key) works as well.
    def getPublicKey(self) -> Key | Deferred[Key | None] | None:  # type: ignore[override]
        if self._candidates is None:
            identity = self.context.identity
            if identity is not None:
                self._candidates = [identity.public]
                if identity.private is None:
                    return self._connect_agent().addCallback(lambda _: self._next_key())
            else:
                self._candidates = []
                if self.context.agent_socket:
                    return self._connect_agent().addCallback(self._agent_keys)
        return self._next_key()

    def _next_key(self) -> Key | None:
        assert self._candidates is not None
        return self._candidates.pop(0) if self._candidates else None

    def _connect_agent(self) -> Deferred[SSHAgentClient | None]:
        socket_path = self.context.agent_socket
        if not socket_path:
            return succeed(None)
        endpoint = UNIXClientEndpoint(self.context.reactor, socket_path, timeout=5)
        d = connectProtocol(endpoint, SSHAgentClient())

        def connected(agent: SSHAgentClient) -> SSHAgentClient:
            self._agent = agent
            return agent

        def failed(failure: Failure) -> None:
            _log.warn(
                "cannot use the ssh-agent at {path} ({why})",
                path=socket_path,
                why=failure.getErrorMessage(),
            )

        return d.addCallbacks(connected, failed)

    def _agent_keys(self, agent: SSHAgentClient | None) -> Deferred[Key | None] | None:
        if agent is None:
            return None

        def listed(identities: list[tuple[bytes, bytes]]) -> Key | None:
            assert self._candidates is not None
            for blob, _comment in identities:
                try:
                    self._candidates.append(Key.fromString(blob))
                except Exception:
                    continue  # a key type Conch does not know (sk-*, certificates)
            return self._next_key()

        return agent.requestIdentities().addCallbacks(listed, lambda _: None)

    def signData(self, publicKey: Key, signData: bytes) -> Deferred[bytes] | None:
        identity = self.context.identity
        if identity is not None and identity.private is not None and publicKey == identity.public:
            return succeed(identity.private.sign(signData))
        if self._agent is not None:
            return self._agent.signData(publicKey.blob(), signData)
        return None

    # password: the session-bound proof of the shared secret

    def getPassword(self, prompt: bytes | None = None) -> Deferred[bytes] | None:
        if not self.context.secret or self.tried_password:
            return None
        self.tried_password = True
        assert self.transport.sessionID is not None  # set by the key exchange
        return succeed(client_password(self.context.secret, self.transport.sessionID))

    def getGenericAnswers(self, name: bytes, instruction: bytes, prompts: list) -> Deferred:
        return fail(NotImplementedError("no keyboard-interactive logins"))


class _ClientConnection(ConchLogging, SSHConnection):
    #: Set when the service starts, before anything here runs.
    transport: _ClientTransport

    def __init__(self, context: _Context) -> None:
        super().__init__()
        self.context = context

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.openChannel(ClientChannel(conn=self))


class ClientChannel(FramedChannel):
    """Asks for the C{octo} subsystem and waits for the server's hello."""

    name = b"session"
    conn: _ClientConnection

    def channelOpen(self, specificData: bytes) -> None:
        self._user = self.conn.context.address.user
        d = self.conn.sendRequest(self, b"subsystem", common.NS(SUBSYSTEM), wantReply=True)
        d.addErrback(self._refused)

    def _refused(self, failure: Failure) -> None:
        self.conn.transport.fail_ready(
            RemoteProtocolError(
                f"the SSH server at {self.peer_name} refused the {SUBSYSTEM.decode()!r} "
                "subsystem: it is not an octotwist server"
            )
        )

    def openFailed(self, reason: Any) -> None:
        super().openFailed(reason)
        self.conn.transport.fail_ready(
            RemoteProtocolError(f"the SSH server at {self.peer_name} refused a session: {reason}")
        )

    def request_exit_status(self, data: bytes) -> int:
        return 1  # the server ends the stream as it would for OpenSSH

    def pending_frame(self, frame: bytes) -> None:
        """The hello: check it, then hand the channel to the core."""
        transport: _ClientTransport = self.conn.transport
        if not frame.startswith(MAGIC) or len(frame) != len(MAGIC) + PROOF_SIZE:
            self.fail(RemoteProtocolError("the SSH server does not speak the octotwist protocol"))
            return
        if not transport.host_verified:
            assert transport.sessionID is not None  # set by the key exchange
            expected = session_proof(self.conn.context.secret, b"server", transport.sessionID)
            if not hmac.compare_digest(frame[len(MAGIC) :], expected):
                assert transport.host_key is not None
                self.fail(
                    AuthenticationError(
                        _untrusted(
                            self.conn.context.address,
                            transport.host_key,
                            "it is in no --known-hosts file nor --host-key-fingerprint, and "
                            "the server did not prove it knows our shared secret",
                        )
                    )
                )
                return
        self.open_messages(self.conn.context.accept)
        transport.ready.callback(self.messages)

    def fail(self, error: Exception) -> None:
        self.state = State.CLOSED
        self.conn.transport.fail_ready(error)

    def channel_closed(self) -> None:
        # One channel per connection: when it is gone, hang up.
        self.conn.transport.transport.loseConnection()


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, context: _Context) -> None:
        self.context = context

    def buildProtocol(self, addr: Any) -> _ClientTransport:
        protocol = _ClientTransport()
        protocol.factory = self
        protocol.context = self.context
        return protocol


# The TaskClient


class SSHTaskClient(TaskClient):
    """
    Connects to C{settings.connect} (an address as in the module docstring).
    Options (C{settings.options}): C{identity}, C{identity-passphrase-file},
    C{known-hosts}, C{host-key-fingerprint}.

    @raise UsageError: (from the constructor) an option is wrong: a missing
        or unreadable key or file, a bad fingerprint, a bad address.
    """

    default_port = DEFAULT_PORT

    def __init__(self, reactor: IReactor, settings: ClientSettings) -> None:
        super().__init__(reactor, settings)
        options = dict(settings.options)
        try:
            self.address = parse_address(settings.connect, self.default_port)
        except ValueError as e:
            raise UsageError(f"bad SSH address {settings.connect!r}: {e}") from None
        pins = list(self.address.fingerprints)
        for text in (options.get("host-key-fingerprint") or "").split(","):
            if text.strip():
                try:
                    pins.append(keys.normalize_fingerprint(text))
                except ValueError as e:
                    raise UsageError(f"--host-key-fingerprint: {e}") from None
        self.fingerprints = tuple(pins)
        self.known_hosts = options.get("known-hosts")
        if self.known_hosts and not Path(self.known_hosts).expanduser().is_file():
            raise UsageError(
                f"--known-hosts {self.known_hosts}: no such file (create it with the "
                "server's line, or use --host-key-fingerprint)"
            )
        self.agent_socket = os.environ.get("SSH_AUTH_SOCK") or None
        identity = options.get("identity")
        self.identity = (
            keys.load_identity(
                identity, options.get("identity-passphrase-file"), self.agent_socket is not None
            )
            if identity
            else None
        )
        if options.get("identity-passphrase-file") and not identity:
            raise UsageError("--identity-passphrase-file needs --identity")

    @classmethod
    def needs_secret(cls, options: Mapping[str, Any]) -> bool:
        """
        Whether this client cannot work without the shared secret.  With
        C{--identity} it can: the secret, if there is one, is still offered
        to a server without C{--authorized-keys}.  (For the CLI, once the
        core asks; see docs/ssh.md.)
        """
        return not options.get("identity")

    @classmethod
    def address_to_endpoint(cls, address: str) -> str:
        """
        Check an address (see the module docstring) and return it in the form
        L{SSHTaskClient} connects to.

        @raise ValueError: it is malformed; the message says how.
        """
        parsed = parse_address(address, cls.default_port)
        if address.startswith("ssh://") or parsed.endpoint == address.strip():
            return address.strip()
        host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
        user = "" if parsed.user == DEFAULT_USER else f"{parsed.user}@"
        return f"ssh://{user}{host}:{parsed.port}"

    def connect(self, accept: Accept) -> Deferred[MessageChannel]:
        context = _Context(
            reactor=self.reactor,
            address=self.address,
            secret=self.settings.secret or b"",
            identity=self.identity,
            known_hosts=self.known_hosts,
            fingerprints=self.fingerprints,
            accept=accept,
            agent_socket=self.agent_socket,
        )
        try:
            endpoint = clientFromString(self.reactor, self.address.endpoint)
        except Exception as e:
            return fail(e)
        d = endpoint.connect(_ClientFactory(context))

        def connected(protocol: _ClientTransport) -> Deferred[MessageChannel]:
            return protocol.ready

        return d.addCallback(connected)

"""
The SSH transport's server: a Conch SSH server whose only service is the
C{octo} subsystem.

Who may log in (SSH user authentication, before anything is decoded):

  - with C{--authorized-keys PATH}: exactly the keys in that OpenSSH
    authorized_keys file (re-read when it changes), nothing else;
  - without it: a client that proves the shared secret, by sending as its
    SSH password C{HMAC-SHA256(secret, "octo-ssh client" || session id)}
    (L{octotwist_ssh.channel.client_password}).  The password is bound to
    this SSH session, so a recorded one is useless elsewhere.  This is what
    makes C{octo run -t ssh} and a no-flags C{octo server}/C{octo client} on
    one machine work.

User names: C{octo} (what C{octo client} sends unless the address says
C{USER@HOST}) and the name of the account running the server (what
C{ssh HOST} sends by default).  Any other user is refused.

Shells, commands, port forwarding and every other subsystem are refused.

A refused peer (a bad key, a wrong secret, garbage where the key exchange
should be, no login in time) gets one log line, without a traceback; and
refusals are rate-limited together (L{RefusalLog}): a flood of bad
connections writes a few lines, then one that counts the rest.
"""

from __future__ import annotations

import contextlib
import getpass
import hmac
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from twisted.conch import error as conch_error
from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import common
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_OPEN_FAILURE,
    OPEN_UNKNOWN_CHANNEL_TYPE,
    SSHConnection,
)
from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.conch.ssh.transport import (
    DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    DISCONNECT_PROTOCOL_ERROR,
    SSHServerTransport,
)
from twisted.conch.ssh.userauth import SSHUserAuthServer
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, ITCPTransport
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from octotwist import limits
from octotwist.endpoints import with_backlog
from octotwist.limits import RefusalLog
from octotwist.streams import stop_serving
from octotwist.transport import Accept, IReactor, ServerSettings, TaskServer, no_delay
from octotwist_ssh import keys
from octotwist_ssh.channel import (
    MACS,
    SUBSYSTEM,
    ConchLogging,
    FramedChannel,
    State,
    client_password,
    hello_frame,
)

#: Seconds a connection may take to authenticate (Conch's default is 10 hours).
LOGIN_TIMEOUT = 30.0
#: The user name C{octo client} logs in as.
DEFAULT_USER = "octo"

_log = Logger()


def allowed_users() -> frozenset[str]:
    """C{octo} and the account running the server."""
    users = {DEFAULT_USER}
    with contextlib.suppress(KeyError, OSError):  # no login name (some containers)
        users.add(getpass.getuser())
    return frozenset(users)


def _check_user(username: bytes, users: frozenset[str]) -> str:
    name = username.decode("utf-8", "replace")
    if name not in users:
        raise UnauthorizedLogin(
            f"unknown user {name!r} (this server accepts {', '.join(sorted(users))})"
        )
    return name


class _LimitedConchLogging(ConchLogging):
    """
    L{ConchLogging}, with Conch's warnings and errors about the peer ("other
    side unimplemented packet", "Unsupported key type") going through the
    server's L{RefusalLog}: a peer can make Conch say them once per packet.
    """

    def _refusals(self) -> RefusalLog | None:
        raise NotImplementedError

    if TYPE_CHECKING:
        _log: Logger  # as ConchLogging's
    else:

        @property
        def _log(self) -> Logger:
            refusals = self._refusals()
            return Logger(
                namespace=f"twisted.conch.{type(self).__name__}",
                source=self,
                # An ILogObserver is any callable taking an event; a method
                # cannot declare that it provides the interface.
                observer=None if refusals is None else cast(ILogObserver, refusals.observer),
            )


# Credentials


class ISessionProof(ICredentials):
    """A password that must equal L{client_password} for this SSH session."""


@implementer(ISessionProof)
class SessionProof:
    def __init__(self, username: bytes, password: bytes, session_id: bytes) -> None:
        self.username = username
        self.password = password
        self.session_id = session_id


@implementer(ICredentialsChecker)
class SecretChecker:
    """Accepts a client that proves the shared secret for its session."""

    credentialInterfaces = (ISessionProof,)

    def __init__(self, secret: bytes, users: frozenset[str]) -> None:
        self._secret = secret
        self._users = users

    # Portal.login calls checkers through maybeDeferred: an avatar ID returned
    # (or an error raised) at once is what it expects as well as a Deferred;
    # ours are str, what _Realm takes.
    def requestAvatarId(self, credentials: SessionProof) -> str:  # type: ignore[override]
        user = _check_user(credentials.username, self._users)
        expected = client_password(self._secret, credentials.session_id)
        if not hmac.compare_digest(expected, credentials.password):
            raise UnauthorizedLogin(
                "wrong shared secret (the client's OCTO_SECRET / --secret-file differs "
                "from the server's)"
            )
        return user


@implementer(ICredentialsChecker)
class KeyChecker:
    """Accepts the keys of an authorized_keys file, for the allowed users."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, authorized: keys.AuthorizedKeys, users: frozenset[str]) -> None:
        self._authorized = authorized
        self._users = users

    def requestAvatarId(self, credentials: Any) -> str:  # type: ignore[override]  # as above
        user = _check_user(credentials.username, self._users)
        try:
            key = Key.fromString(credentials.blob)
        except (BadKeyError, ValueError):
            raise UnauthorizedLogin("unreadable public key") from None
        fp = keys.fingerprint(key)
        if key not in self._authorized:
            raise UnauthorizedLogin(f"key {fp} is not in {self._authorized.path}")
        if not credentials.signature:
            raise conch_error.ValidPublicKey()  # "yes, prove you hold it"
        if not key.verify(credentials.signature, credentials.sigData):
            raise UnauthorizedLogin(f"bad signature for key {fp}")
        return user


# Avatar and channel


@implementer(IRealm)
class _Realm:
    def __init__(self, server: SSHTaskServer) -> None:
        self.server = server

    # The avatar IDs are our checkers' (str), not the bytes IRealm declares.
    def requestAvatar(self, avatar_id: str, mind: Any, *interfaces: Any) -> tuple:  # type: ignore[override]
        if IConchUser not in interfaces:
            raise NotImplementedError("only SSH users log in here")
        return IConchUser, _Avatar(avatar_id, self.server), lambda: None


class _Avatar(ConchUser):
    """A logged-in worker: it may open session channels, nothing else."""

    def __init__(self, username: str, server: SSHTaskServer) -> None:
        super().__init__()
        self.username = username
        self.server = server
        self.channelLookup[b"session"] = ServerChannel

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        return 0  # no port forwarding, no keepalive tricks


class ServerChannel(FramedChannel):
    """A session channel that only opens the C{octo} subsystem."""

    avatar: _Avatar
    conn: _Connection
    _eof_early = False

    def request_subsystem(self, data: bytes) -> int:
        name, _ = common.getNS(data)
        if name != SUBSYSTEM or self.state is not State.PENDING:
            _log.warn(
                "refused subsystem {name!r} from {peer} (only {ours!r} is served)",
                name=name.decode("utf-8", "replace"),
                peer=self.peer_name,
                ours=SUBSYSTEM.decode(),
            )
            return 0
        self._user = self.avatar.username
        # Start after the reply to this request has gone out, so the
        # hello is the first thing the client sees on the channel.
        self.avatar.server.reactor.callLater(0, self._start)
        return 1

    def _start(self) -> None:
        if self.state is not State.PENDING:
            return
        server = self.avatar.server
        session_id = self.conn.transport.sessionID
        assert session_id is not None  # the key exchange set it, before any channel
        self.send_frame(hello_frame(server.settings.secret, session_id))
        if self._eof_early:
            # `ssh -s HOST octo < /dev/null`, a user checking access: the
            # hello is all there is to say.
            self.close_gracefully()
            return
        _log.debug("{peer} opened the octo subsystem", peer=self.peer_name)
        self.open_messages(server.accept)

    def eofReceived(self) -> None:
        if self.state is State.PENDING and self._user:
            self._eof_early = True  # _start sends the hello, then closes
            return
        super().eofReceived()

    def request_exec(self, data: bytes) -> int:
        return self._refuse("a command")

    def request_shell(self, data: bytes) -> int:
        return self._refuse("a shell")

    def _refuse(self, what: str) -> int:
        _log.warn(
            "refused {what} to {peer}: this server only runs the octo subsystem (ssh -s)",
            what=what,
            peer=self.peer_name,
        )
        return 0

    def end_stream(self) -> None:
        # An exit status before EOF lets OpenSSH exit 0 rather than 255.
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", 0))


# Transport and factory


class _UserAuthServer(_LimitedConchLogging, SSHUserAuthServer):
    """Conch's user authentication, plus the session-bound secret and logging."""

    #: Set when the service starts, before anything here runs.
    transport: _ServerTransport
    loginTimeout = LOGIN_TIMEOUT  # type: ignore[assignment]  # Conch infers int; seconds do
    interfaceToMethod = {
        ISSHPrivateKey: b"publickey",
        ISessionProof: b"password",
    }

    def _refusals(self) -> RefusalLog | None:
        transport = getattr(self, "transport", None)
        return None if transport is None else transport.factory.refusals

    def serviceStarted(self) -> None:
        self.clock = self.transport.factory.reactor
        super().serviceStarted()

    def auth_password(self, packet: bytes) -> Deferred:
        password = common.getNS(packet[1:])[0]
        assert self.transport.sessionID is not None  # set by the key exchange
        credentials = SessionProof(self.user, password, self.transport.sessionID)
        d = self.portal.login(credentials, None, IConchUser)
        return d.addErrback(self._ebPassword)

    def _ebBadAuth(self, reason: Failure) -> None:
        if self.method != b"none" and reason.check(UnauthorizedLogin, conch_error.ConchError):
            self.transport.refused(
                "refused SSH login from {peer} as {user!r} ({method}): {why}",
                user=(self.user or b"").decode("utf-8", "replace"),
                method=self.method.decode("ascii", "replace"),
                why=reason.getErrorMessage(),
            )
        super()._ebBadAuth(reason)


class _ServerTransport(_LimitedConchLogging, SSHServerTransport):
    supportedMACs = MACS
    factory: _Factory
    #: The connection's (TCP or Unix socket), set before anything here runs.
    transport: ITCPTransport
    #: Our place among the connections that have not logged in yet.
    slot: limits.Slot | None = None
    #: A line about refusing this peer was logged (or counted): one is enough.
    _refusal_said = False
    #: We hung up on the peer; what still arrives is not read.
    _hung_up = False

    def _refusals(self) -> RefusalLog | None:
        factory = getattr(self, "factory", None)
        return None if factory is None else factory.refusals

    @property
    def authenticated(self) -> bool:
        """Whether the peer has logged in (Conch sets C{avatar} then)."""
        return getattr(self, "avatar", None) is not None

    @property
    def serving(self) -> bool:
        """Whether the core holds one of its octo channels (L{stop_serving})."""
        return any(c.handler is not None for c in self.channels())

    def close(self) -> None:
        """Close its channels once what they queued is sent, then the connection."""
        for channel in self.channels():
            channel.close_gracefully()
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

    def refused(self, format: str, level: LogLevel = LogLevel.warn, **fields: Any) -> None:
        """Log (within the server's L{RefusalLog}) why this peer is refused."""
        self._refusal_said = True
        self.factory.refusals.emit(level, format, peer=self.peer_name, **fields)

    def dataReceived(self, data: bytes) -> None:
        if self._hung_up:
            return
        try:
            super().dataReceived(data)
        except Exception:
            # Conch parses packets with struct and slicing: a malformed one
            # raises from deep inside (struct.error, IndexError...).  That is
            # the peer's doing, not a bug worth a traceback per connection.
            self._malformed(Failure())

    def _malformed(self, failure: Failure) -> None:
        self._hung_up = True
        kind = failure.type.__name__
        if failure.type.__module__ not in ("builtins", "exceptions"):
            kind = f"{failure.type.__module__}.{kind}"  # struct.error, not error
        why = f"malformed SSH packet ({kind}: {failure.getErrorMessage()})"
        self.refused("closing SSH connection from {peer}: {why}", why=why[:300])
        _log.failure("{why}", failure, level=LogLevel.debug, why=why)
        try:
            # Conch's own, not ours: this peer's line is logged already.
            SSHServerTransport.sendDisconnect(self, DISCONNECT_PROTOCOL_ERROR, b"malformed packet")
        except Exception:
            self.transport.abortConnection()

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        # Conch refuses a peer this way (a bad packet length, a bad MAC, no
        # common algorithm) and logs it only where users do not look.
        if not self.authenticated and not self._refusal_said:
            self.refused(
                "refused SSH connection from {peer}: {why}",
                why=desc.decode("utf-8", "replace")[:200],
            )
        self._hung_up = True
        super().sendDisconnect(reason, desc)

    def receiveUnimplemented(self, seqnum: int) -> None:
        # Conch warns once per such packet, which a peer sends at will.
        _log.debug("{peer} did not understand our packet #{n}", peer=self.peer_name, n=seqnum)

    def connectionMade(self) -> None:
        self.closed: Deferred[None] = Deferred()
        self.factory.connections.add(self)
        # Conch times out user authentication, but not a peer that never
        # finishes the key exchange: bound the whole login here.
        self._login_timer = self.factory.reactor.callLater(LOGIN_TIMEOUT, self._login_timeout)
        no_delay(self.transport)
        super().connectionMade()

    def _login_timeout(self) -> None:
        if not self.authenticated:
            self.refused(
                "dropping SSH connection from {peer}: no login within {seconds:.0f} s",
                seconds=LOGIN_TIMEOUT,
            )
            self._hung_up = True
            self.transport.abortConnection()

    @property
    def peer_name(self) -> str:
        addr: Any = self.transport.getPeer()  # an IPv4/IPv6Address, or a UNIXAddress
        host = getattr(addr, "host", None)
        return f"{host}:{addr.port}" if host is not None else "unix"

    def channels(self) -> list[FramedChannel]:
        service = self.service
        if isinstance(service, SSHConnection):
            return [c for c in service.channels.values() if isinstance(c, FramedChannel)]
        return []

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        refused = reasonCode in (
            DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
            DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
        )
        level = LogLevel.warn if refused else LogLevel.info
        why = description.decode("utf-8", "replace")[:200]
        if self.authenticated:
            _log.emit(level, "SSH client {peer} disconnected: {why}", peer=self.peer_name, why=why)
        elif not self._refusal_said:  # anyone can connect and say this, often
            self.refused("SSH client {peer} disconnected: {why}", level=level, why=why)

    def setService(self, service: Any) -> None:
        super().setService(service)
        if isinstance(service, _Connection) and self.slot is not None:
            self.slot.release()  # logged in: no longer counts against the limit

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.slot is not None:
            self.slot.release()
        self.factory.connections.discard(self)
        if self._login_timer.active():
            self._login_timer.cancel()
        try:
            super().connectionLost(reason)
        finally:
            self.closed.callback(None)


class _Connection(ConchLogging, SSHConnection):
    #: Set when the service starts, before anything here runs.
    transport: _ServerTransport

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        """
        Refuse any channel but a session in one line (Conch would log the
        refusal as a failure, with a traceback, for each C{ssh -W} or
        forwarding attempt).
        """
        kind, rest = common.getNS(packet)
        if kind == b"session" or len(rest) < 12:
            super().ssh_CHANNEL_OPEN(packet)
            return
        (sender,) = struct.unpack(">L", rest[:4])
        _log.warn(
            "refused a {kind!r} channel to {peer}: this server only runs the octo "
            "subsystem (ssh -s)",
            kind=kind.decode("ascii", "replace")[:40],
            peer=self.transport.peer_name,
        )
        self.transport.sendPacket(
            MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, OPEN_UNKNOWN_CHANNEL_TYPE)
            + common.NS(b"unknown channel")
            + common.NS(b""),
        )


class _Factory(limits.SlottedFactory, ConchLogging, SSHFactory):
    protocol = _ServerTransport
    services = {b"ssh-userauth": _UserAuthServer, b"ssh-connection": _Connection}
    noisy = False

    def __init__(self, reactor: IReactor, host_key: Key, portal: Portal) -> None:
        self.reactor = reactor
        self.portal = portal
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.privateKeys = {host_key.sshType(): host_key}
        self.primes = None  # fixed DH groups and curve25519 only: no moduli file needed
        self.connections: set[_ServerTransport] = set()
        self.refusals = RefusalLog(reactor)
        self.pending = limits.PreAuthLimit(self.refusals)


# The TaskServer


class SSHTaskServer(TaskServer):
    """
    Listens on C{settings.listen} (any stream server endpoint string) and
    speaks SSH there.  Options (C{settings.options}): C{host-key},
    C{authorized-keys}; see the module docstring and docs/ssh.md.
    """

    _port: IListeningPort | None = None
    _factory: _Factory | None = None
    _flush_trigger: Any = None

    @classmethod
    def needs_secret(cls, options: Mapping[str, Any]) -> bool:
        """
        Whether peers authenticate with the shared secret: not when the
        server has C{--authorized-keys}, so such a server may listen beyond
        loopback without a configured secret.  (For the CLI, once the core
        asks; see docs/ssh.md.)
        """
        return not options.get("authorized-keys")

    def __init__(self, reactor: IReactor, settings: ServerSettings, accept: Accept) -> None:
        """
        Read the keys now, so that a key file that cannot be read is the
        usage error it is (C{octo server} exits 2 naming it), before
        anything listens, rather than a failure to listen.
        """
        super().__init__(reactor, settings, accept)
        self._factory = self._make_factory()

    def listen(self) -> Deferred[str]:
        try:
            endpoint = serverFromString(self.reactor, with_backlog(self.settings.listen))
        except Exception as e:
            return fail(e)
        assert self._factory is not None
        d = endpoint.listen(self._factory)
        d.addCallback(self._listening)
        return d

    def _make_factory(self) -> _Factory:
        options = dict(self.settings.options)
        host_key, key_path = keys.load_host_key(options.get("host-key"))
        self.host_key_fingerprint = keys.fingerprint(host_key)
        users = allowed_users()
        authorized_path = options.get("authorized-keys")
        checker: KeyChecker | SecretChecker
        if authorized_path:
            authorized = keys.AuthorizedKeys(authorized_path)
            checker = KeyChecker(authorized, users)
            how = f"keys in {authorized.path}"
        else:
            checker = SecretChecker(self.settings.secret, users)
            how = "the shared secret (no --authorized-keys given)"
        portal = Portal(_Realm(self), [checker])
        _log.info(
            "SSH host key {fingerprint} ({path}); clients log in as {users} with {how}",
            fingerprint=self.host_key_fingerprint,
            path=str(key_path),
            users=" or ".join(sorted(users)),
            how=how,
        )
        return _Factory(self.reactor, host_key, portal)

    def _listening(self, port: IListeningPort) -> str:
        self._port = port
        # The count of unlogged refusals, also when the reactor stops early
        # (SIGTERM) rather than through stop().
        assert self._factory is not None
        self._flush_trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._factory.refusals.flush
        )
        addr = port.getHost()
        pin = f"?host-key-fingerprint={self.host_key_fingerprint}"
        if isinstance(addr, IPv6Address):
            address = f"ssh://[{addr.host}]:{addr.port}{pin}"
        elif isinstance(addr, IPv4Address):
            address = f"ssh://{addr.host}:{addr.port}{pin}"
        elif isinstance(addr, UNIXAddress):
            name = addr.name.decode() if isinstance(addr.name, bytes) else addr.name
            address = f"unix:{name}"
        else:
            address = str(addr)
        _log.info(
            "workers trust this server with: --host-key-fingerprint {fingerprint}",
            fingerprint=self.host_key_fingerprint,
        )
        return address

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Stop listening, and close every connection gracefully (L{stop_serving})."""
        port, self._port = self._port, None
        if self._factory is not None:
            await stop_serving(self.reactor, port, self._factory.connections)
            self._factory.refusals.flush()
        elif port is not None:
            await maybeDeferred(port.stopListening)
        if self._flush_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._flush_trigger)
            self._flush_trigger = None

"""
The classes a transport subclasses: L{TaskServer} and L{TaskClient} (octo.py's
names), the L{MessageChannel} they hand the core for each authenticated
connection, and the L{Transport} record a plugin returns from its hook.

The division of labour:

  - a transport listens or connects, authenticates the peer, frames and
    moves L{octotwist.messages} objects (encoded with L{octotwist.codec}),
    and says when a connection is lost;
  - the core decides everything else: what to send, to whom, and when.

A transport never decodes a byte from a peer that has not authenticated,
never makes a scheduling decision, and keeps only connection state.

Life of a connection, server side: the transport accepts and authenticates
a connection, wraps it in a L{MessageChannel}, and calls the C{accept}
callable it was given with it.  C{accept} returns a L{ChannelHandler}; the
transport then calls C{handler.message_received(msg)} for each message and
C{handler.connection_lost(reason)} once at the end.  The client side is the
same, started by L{TaskClient.connect}.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTime,
)
from zope.interface import implementer

from octotwist.endpoints import split_host_port
from octotwist.errors import PluginError
from octotwist.messages import Message

if TYPE_CHECKING:
    from twisted.web.resource import IResource


class MessageChannel(ABC):
    """One authenticated connection, as the core sees it."""

    @property
    @abstractmethod
    def peer(self) -> str:
        """A readable name of the other end, for logs (C{"tcp:10.0.0.5:51234"})."""

    @property
    def peer_address(self) -> IAddress | None:
        """
        The other end's address as this side's socket sees it (an
        L{IPv4Address}, L{IPv6Address} or L{UNIXAddress}), or C{None} where
        the transport has none to give.  The server compresses a worker's
        inputs unless this says the worker is on its own machine
        (L{octotwist.machine.local_address}); C{None} leaves that to the
        machine id the worker sends.
        """
        return None

    @abstractmethod
    def send(self, message: Message) -> None:
        """
        Queue C{message} for the peer.  Messages arrive in the order sent.
        Never raises for a lost connection: the handler hears of it through
        C{connection_lost}.
        """

    @abstractmethod
    def close(self) -> None:
        """Close the connection after what was sent has been written."""

    def abort(self) -> None:
        """
        Drop the connection now, with what is queued unsent: for a peer
        that cannot be reached (silent, its link down), which would never
        read it, so that stopping need not wait for it.  By default
        L{close}; a transport that can do better overrides it.
        """
        self.close()

    def writable(self) -> Deferred[None]:
        """
        Backpressure: fires once what was sent so far is on its way (the
        transport's own buffer is below its high-water mark), or at once if
        the connection is gone.  The core waits on it between the parts of a
        large blob, so that a 200 MB blob never sits whole in a transport's
        buffer, and memory stays bounded by a few parts per connection.

        The default fires at once: no flow control.  A transport over a
        Twisted stream transport implements it with a push producer (see
        the TCP plugin's C{_Flow}).
        """
        return succeed(None)


def no_delay(transport: object) -> None:
    """
    Turn off Nagle's algorithm on C{transport} if it is a TCP connection
    (anything else is left alone).  The core's control messages are small
    and answer each other (C{TaskDone}, then the next C{Assign}); with
    Nagle's algorithm each may wait for the ACK of the one before, which
    made a 150 MB word count over TCP 1.6 times as slow.  Call it from the
    protocol's C{connectionMade}.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    get_host = getattr(transport, "getHost", None)
    # Twisted's Unix sockets inherit setTcpNoDelay, which fails on them
    # (EOPNOTSUPP) before Twisted 24.11: only TCP connections are touched.
    if set_no_delay is None or get_host is None:
        return
    if isinstance(get_host(), (IPv4Address, IPv6Address)):
        with contextlib.suppress(OSError):
            set_no_delay(True)


class ChannelHandler(Protocol):
    """What the core attaches to each channel (implemented by the core)."""

    def message_received(self, message: Message) -> None:
        """A message arrived from the peer."""

    def connection_lost(self, reason: str) -> None:
        """The connection is gone; called exactly once, last."""


Accept = Callable[[MessageChannel], ChannelHandler]


@dataclass(frozen=True)
class ServerSettings:
    """
    What a L{TaskServer} is told.

    @ivar listen: a Twisted server endpoint string (C{"tcp:18125"}).
    @ivar secret: the shared secret peers must prove they know.
    @ivar options: the values of the transport's L{Transport.server_options},
        by option name (C{"host-key"}); an option not given has its default.
    @ivar status: the live status page, a C{twisted.web} resource whose
        children are C{b""} (the HTML page) and C{b"status.json"}.  A
        transport that speaks HTTP serves it on its own port for every path
        that is not its own; others ignore it.
    """

    listen: str
    secret: bytes
    options: Mapping[str, Any] = field(default_factory=dict)
    status: IResource | None = None


@dataclass(frozen=True)
class ClientSettings:
    """
    What a L{TaskClient} is told.

    @ivar connect: what L{TaskClient.address_to_endpoint} returned for the
        address the user gave, or what the server's L{TaskServer.listen}
        returned (C{octo run}): a Twisted client endpoint string for the
        built-in transports, the transport's own form for others.
    @ivar secret: the shared secret to prove.
    @ivar options: the values of the transport's L{Transport.client_options},
        by option name; an option not given has its default.
    """

    connect: str
    secret: bytes
    options: Mapping[str, Any] = field(default_factory=dict)


class IReactor(IReactorCore, IReactorTime):
    """
    The reactor a transport is given: its system event triggers and its
    timers.  Every Twisted reactor provides both interfaces; this one only
    says, for type checking, that the one given has both (as treq's
    C{_ITreqReactor} does).  A transport that needs more (C{IReactorTCP},
    say) says so in its own annotations.
    """


class TaskServer(ABC):
    """
    The listening side of a transport.

    @param reactor: the reactor to listen with (never imported globally).
    @param settings: where to listen and how to authenticate.
    @param accept: called with a L{MessageChannel} for each peer once it has
        authenticated; returns the handler for that channel's messages.
    """

    def __init__(self, reactor: IReactor, settings: ServerSettings, accept: Accept) -> None:
        self.reactor = reactor
        self.settings = settings
        self.accept = accept

    @classmethod
    def needs_secret(cls, options: Mapping[str, Any]) -> bool:
        """
        Whether peers prove themselves with the shared secret, given this
        transport's server options.  A server that authenticates them
        otherwise (SSH keys, say) returns C{False}: it may then listen
        beyond loopback without a configured secret.
        """
        return True

    @abstractmethod
    def listen(self) -> Deferred[str]:
        """
        Start listening.

        @return: fires with a description of the address actually bound, in
            the form a client accepts (C{"tcp:127.0.0.1:41234"}), or fails
            (port in use, bad endpoint string).
        """

    @abstractmethod
    def stop(self) -> Deferred[None]:
        """
        Stop listening and close every connection; fires when done.  Peers
        that were sent a L{messages.Shutdown} hang up by themselves: give them
        a few seconds to, so that the Shutdown is never lost to a reset.
        """


class TaskClient(ABC):
    """
    The connecting side of a transport.

    @param reactor: the reactor to connect with.
    @param settings: where to connect and how to authenticate.
    """

    #: Port used by L{address_to_endpoint} when the short form has none.
    default_port: int = 18125

    def __init__(self, reactor: IReactor, settings: ClientSettings) -> None:
        self.reactor = reactor
        self.settings = settings

    @classmethod
    def needs_secret(cls, options: Mapping[str, Any]) -> bool:
        """
        Whether this client cannot work without the shared secret, given
        this transport's client options.  When it can (it has a key to log
        in with, say), C{octo client} does not wait for a secret to appear.
        """
        return True

    @classmethod
    def address_to_endpoint(cls, address: str) -> str:
        """
        Turn what a user typed (C{octo client HOST[:PORT]}, or C{--connect
        ENDPOINT}) into the L{ClientSettings.connect} string.

        This default turns C{HOST[:PORT]} into C{tcp:HOST:PORT} and passes
        strings that already name an endpoint type (contain C{"="} or start
        with a known prefix) through, after checking them with
        C{clientFromString}.  Override it for other address forms (URLs).

        @raise ValueError: the address is malformed; the message says why.
        """
        from twisted.internet.endpoints import clientFromString

        try:
            if address.split(":", 1)[0] in ("tcp", "tls", "ssl", "unix") or "=" in address:
                endpoint = address
            else:
                host, port = split_host_port(address, cls.default_port)
                endpoint = f"tcp:{_escape(host)}:{port}"
            clientFromString(_CHECKING_ONLY, endpoint)
        except ValueError as e:
            raise ValueError(
                f"{e} (give HOST, HOST:PORT, or an endpoint such as tcp:HOST:"
                f"{cls.default_port} or unix:/tmp/octo.sock)"
            ) from None
        except OSError as e:
            # A file the endpoint names (tls: trustRoots, a certificate)
            # cannot be read.  Twisted's UnlistableError carries no message
            # of its own, only the error underneath.
            cause = getattr(e, "originalException", e)
            raise ValueError(
                f"cannot read {cause.filename or 'a file it names'}: {cause.strerror or cause}"
            ) from None
        except Exception as e:  # a certificate that does not parse (OpenSSL's errors), say
            raise ValueError(f"{type(e).__name__}: {e}") from None
        return endpoint

    @abstractmethod
    def connect(self, accept: Accept) -> Deferred[MessageChannel]:
        """
        Connect and authenticate once; C{accept} is called with the channel
        before any message is delivered.

        @return: fires with the channel, or fails with
            L{octotwist.errors.AuthenticationError} or a connection error.
        """


@implementer(IReactorPluggableNameResolver)
class _CheckingOnly:
    """
    What an endpoint built only to check its string is given for a reactor:
    it is never connected, and library code takes the reactor it is handed
    rather than importing the global one.  (C{tls:} endpoints want a name
    resolver, and warn without one.)
    """

    nameResolver: Any = None

    def installNameResolver(self, resolver: Any) -> Any:
        raise NotImplementedError("an endpoint built to check its string only")


_CHECKING_ONLY: Any = _CheckingOnly()


def _escape(host: str) -> str:
    return host.replace(":", "\\:")


@dataclass(frozen=True)
class Option:
    """
    A command-line option a transport adds to C{octo server} / C{twistd
    octo} (in L{Transport.server_options}) or to C{octo client} (in
    L{Transport.client_options}): C{--NAME VALUE}, or C{--NAME} for a flag.

    Its value reaches the transport as C{settings.options[name]}.

    @ivar name: the long option name without dashes (C{"host-key"}).
    @ivar help: one line for C{--help}.
    @ivar default: the value when the option is not given.
    @ivar coerce: turns the string typed into the value (C{int}, say); it
        raises C{ValueError} for a bad one.
    @ivar flag: the option takes no value; its value is C{True} when given.
    """

    name: str
    help: str
    default: Any = None
    coerce: Callable[[str], Any] | None = None
    flag: bool = False


@dataclass
class TestSetup:
    """
    What the conformance kit (L{octotwist.testing}) needs to run a
    transport's server and clients as real processes.  A plugin returns one
    from its C{octotwist_test_setup} hook; every field has a default that
    suits a transport on TCP authenticated by the shared secret.

    @ivar server_args: appended to C{octo server} / C{twistd octo}.
    @ivar client_args: appended to C{octo client}.
    @ivar env: added to the environment of both.
    @ivar listen: the C{--listen} endpoint, C{{port}} standing for a free port.
    @ivar address: the address C{octo client} is given, likewise.
    @ivar refused_client_args: arguments with which a client presents
        credentials the server must refuse (besides a wrong shared secret,
        which the kit always tries).
    @ivar refused_server_args: arguments with which the server must refuse
        the client's usual credentials.
    @ivar uses_secret: whether a client with the wrong shared secret (and
        its usual arguments otherwise) must be refused.
    """

    __test__ = False  # not a pytest test class

    server_args: list[str] = field(default_factory=list)
    client_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    listen: str = "tcp:{port}:interface=127.0.0.1"
    address: str = "127.0.0.1:{port}"
    refused_client_args: list[str] = field(default_factory=list)
    refused_server_args: list[str] = field(default_factory=list)
    uses_secret: bool = True


@dataclass(frozen=True)
class Transport:
    """
    What a plugin's C{octotwist_transports} hook returns, one per transport.

    @ivar name: what users pass to C{--transport}.
    @ivar description: one line for C{octo transports}.
    @ivar server: the L{TaskServer} subclass, or where to import it from as
        C{"package.module:Class"}: then its module is imported only when
        this transport is used (L{server_class}), as Twisted's
        C{ServiceMaker} takes a module name, so that every command does not
        pay for every installed transport's imports.
    @ivar client: the L{TaskClient} subclass, or C{"package.module:Class"}.
    @ivar default_port: the port C{octo server} listens on by default.
    @ivar server_options: options this transport adds to C{octo server}.
    @ivar client_options: options this transport adds to C{octo client}.
    """

    name: str
    description: str
    server: type[TaskServer] | str
    client: type[TaskClient] | str
    default_port: int = 18125
    server_options: Sequence[Option] = ()
    client_options: Sequence[Option] = ()

    def server_class(self) -> type[TaskServer]:
        """
        The L{TaskServer} subclass, imported if need be.

        @raise PluginError: it cannot be imported, or is not a complete
            L{TaskServer}.
        """
        return _load(self.name, "server", self.server, TaskServer)

    def client_class(self) -> type[TaskClient]:
        """The L{TaskClient} subclass, imported if need be (see L{server_class})."""
        return _load(self.name, "client", self.client, TaskClient)

    def default_listen(self, local_only: bool) -> str:
        """
        Where C{octo server} listens without C{--listen}: C{default_port} on
        every interface, or on 127.0.0.1 only when C{local_only} (no secret
        is configured).  A transport that does not listen on TCP overrides
        this in a subclass of L{Transport}.
        """
        interface = ":interface=127.0.0.1" if local_only else ""
        return f"tcp:{self.default_port}{interface}"

    def local_listen(self, directory: Path) -> str:
        """
        Where C{octo run} listens, for workers on this machine only: a port
        the kernel picks on 127.0.0.1.  C{directory} is private to the run
        and removed after it (for a Unix socket, say).
        """
        return "tcp:0:interface=127.0.0.1"


def _load(name: str, role: str, ref: type | str, base: type) -> Any:
    """Resolve and check a L{Transport}'s C{server} or C{client}."""
    cls: Any = ref
    if isinstance(ref, str):
        module, _, attr = ref.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except Exception as e:
            raise PluginError(
                f"transport {name!r}: its {role} {ref!r} failed to import: {type(e).__name__}: {e}"
            ) from e
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"transport {name!r}: {role} is not a {base.__name__}")
    abstract = sorted(getattr(cls, "__abstractmethods__", ()))
    if abstract:
        raise PluginError(
            f"transport {name!r}: {cls.__name__} does not implement " + ", ".join(abstract)
        )
    return cls

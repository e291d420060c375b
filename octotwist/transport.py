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

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore

from octotwist.endpoints import split_host_port
from octotwist.messages import Message


class MessageChannel(ABC):
    """One authenticated connection, as the core sees it."""

    @property
    @abstractmethod
    def peer(self) -> str:
        """A readable name of the other end, for logs (C{"tcp:10.0.0.5:51234"})."""

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
    @ivar options: transport-specific options, by name.
    """

    listen: str
    secret: bytes
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientSettings:
    """
    What a L{TaskClient} is told.

    @ivar connect: a Twisted client endpoint string (C{"tcp:host:18125"}).
    @ivar secret: the shared secret to prove.
    @ivar options: transport-specific options, by name.
    """

    connect: str
    secret: bytes
    options: Mapping[str, Any] = field(default_factory=dict)


class TaskServer(ABC):
    """
    The listening side of a transport.

    @param reactor: the reactor to listen with (never imported globally).
    @param settings: where to listen and how to authenticate.
    @param accept: called with a L{MessageChannel} for each peer once it has
        authenticated; returns the handler for that channel's messages.
    """

    def __init__(self, reactor: IReactorCore, settings: ServerSettings, accept: Accept) -> None:
        self.reactor = reactor
        self.settings = settings
        self.accept = accept

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

    def __init__(self, reactor: IReactorCore, settings: ClientSettings) -> None:
        self.reactor = reactor
        self.settings = settings

    @classmethod
    def address_to_endpoint(cls, address: str) -> str:
        """
        Turn the short form a user types (C{octo client HOST[:PORT]}) into a
        client endpoint string.  Strings that already name an endpoint
        type (contain C{"="} or start with a known prefix) pass unchanged.
        """
        if address.split(":", 1)[0] in ("tcp", "tls", "ssl", "unix") or "=" in address:
            return address
        host, port = split_host_port(address, cls.default_port)
        return f"tcp:{_escape(host)}:{port}"

    @abstractmethod
    def connect(self, accept: Accept) -> Deferred[MessageChannel]:
        """
        Connect and authenticate once; C{accept} is called with the channel
        before any message is delivered.

        @return: fires with the channel, or fails with
            L{octotwist.errors.AuthenticationError} or a connection error.
        """


def _escape(host: str) -> str:
    return host.replace(":", "\\:")


@dataclass(frozen=True)
class Transport:
    """
    What a plugin's C{octotwist_transports} hook returns, one per transport.

    @ivar name: what users pass to C{--transport}.
    @ivar description: one line for C{octo transports}.
    @ivar server: the L{TaskServer} subclass.
    @ivar client: the L{TaskClient} subclass.
    @ivar default_port: the port C{octo server} listens on by default.
    """

    name: str
    description: str
    server: type[TaskServer]
    client: type[TaskClient]
    default_port: int = 18125

    def default_listen(self, local_only: bool) -> str:
        interface = ":interface=127.0.0.1" if local_only else ""
        return f"tcp:{self.default_port}{interface}"

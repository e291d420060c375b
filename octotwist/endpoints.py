"""
Small facts about Twisted endpoint strings that the core needs without
knowing any transport: whether a server endpoint only accepts local
connections, and the C{HOST[:PORT]} short form of a client endpoint.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from twisted.internet.endpoints import (
    _parse,  # the tokenizer behind serverFromString
    serverFromString,
)

from octotwist.errors import UsageError

if TYPE_CHECKING:
    from octotwist.transport import IReactor

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_is_local(description: str) -> bool:
    """
    Whether a server endpoint string accepts connections from this machine
    only: a Unix socket, or a TCP/TLS port bound to a loopback interface.
    A port with no C{interface=} listens on every interface: not local.
    """
    args, kwargs = _parse(description)
    prefix = str(args[0]).lower() if args else ""
    if prefix == "unix":
        return True
    if prefix in ("tcp", "tcp6", "ssl"):
        interface = kwargs.get("interface") or (args[2] if len(args) > 2 else "")
        return bool(interface) and is_loopback_host(interface)
    return False


#: The listen backlog a server asks for unless its endpoint string says
#: (Twisted's default is 50): a burst of connections (a stranger's flood, a
#: hundred workers starting at once) then waits in the kernel's queue
#: instead of being dropped, so a worker's connection is not lost among them.
#: The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """
    C{description} (a server endpoint string) with C{backlog=} added, for
    the stream types that take it, unless it already has one.
    """
    args, kwargs = _parse(description)
    prefix = str(args[0]).lower() if args else ""
    if prefix not in ("tcp", "tcp6", "ssl", "unix") or "backlog" in kwargs:
        return description
    return f"{description}:backlog={backlog}"


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """C{"host"}, C{"host:port"}, C{"[::1]:port"} -> C{(host, port)}."""
    host, port = address, default_port
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif address.count(":") == 1:
        host, _, p = address.partition(":")
        port = int(p)
    return host, port


def check_server_endpoint(reactor: IReactor, description: str, option: str = "--listen") -> None:
    """
    @raise UsageError: C{description} is not a server endpoint string.
    """
    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise UsageError(
            f"{option} {description}: {e} (examples: tcp:18125:interface=127.0.0.1, "
            "unix:/tmp/octo.sock, ssl:18125:privateKey=key.pem:certKey=cert.pem)"
        ) from None

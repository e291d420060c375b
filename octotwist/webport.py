"""
The status page's own port (C{--web}): where it binds, its URL, its end.

The page is served beside the task server, on the interface the task
server binds unless C{--web} names one, so that a server kept to loopback
never shows its page to the network; reachable from elsewhere, it needs the
token in the URL it logs.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import _parse, serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import IResource

from octotwist.endpoints import server_is_local
from octotwist.transport import IReactor, Transport

_log = Logger()


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


async def serve_status(
    reactor: IReactor, site_root: Callable[[str | None], IResource], endpoint: str, token: str
) -> IListeningPort:
    """
    Serve a status site on C{endpoint} (C{--web}, its interface filled in
    by L{web_endpoint}), and log its URL: with the token when the page is
    reachable from other machines, which then refuses requests without it.

    @param site_root: makes the site's root resource, a
        L{octotwist.status.GuardedRoot}, given the token it must ask for
        (C{None}: none, the page is this machine's only).
    """
    from twisted.web.server import Site

    local = server_is_local(endpoint)
    site = Site(site_root(None if local else token))
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


async def stop_status(
    port: IListeningPort, reactor: IReactorTime, linger: float = STATUS_LINGER
) -> None:
    """Stop serving the status page, C{linger} seconds after the job ended."""
    if linger:
        await deferLater(reactor, linger)
    stopped = port.stopListening()
    assert stopped is not None  # a listening port's stopListening returns a Deferred
    await stopped


def log_transport_page(address: str, listen: str, token: str, transport: Transport) -> None:
    """
    Where the transport serves the status page on its own port (an HTTP
    transport, whose address is a URL), when that page needs the token:
    the "serving" line does not show it.
    """
    if not address.startswith(("http://", "https://")) or server_is_local(listen):
        return
    url = everywhere_to_hostname(address)
    _log.info(
        "status page at {url}?token={token} (on the {transport} transport's port; "
        "the token is required)",
        url=url if url.endswith("/") else url + "/",
        token=token,
        transport=transport.name,
    )


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


def everywhere_to_hostname(url: str) -> str:
    """A URL on 0.0.0.0 or [::] with this machine's name instead, to be clicked."""
    for anywhere in ("//0.0.0.0:", "//[::]:"):
        url = url.replace(anywhere, f"//{socket.gethostname()}:")
    return url

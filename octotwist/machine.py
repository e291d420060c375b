"""
Whether two processes share a machine, so that bytes between them need not
be compressed.

Compressing a map task's input costs the server about 3 ns a byte (zstd
level 1, ~320 MB/s); over a network that buys three times fewer bytes, but
between processes on one machine the bytes cost less to copy than to
compress.  The worker says which machine it is on (L{machine_id}) and the
server compares it with its own; and, since every container and network
namespace on a host shares that id, also looks at the address the worker's
connection comes from (L{local_address}): one in another namespace, behind
a bridge or a slow link, is treated as another machine.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress

#: Linux's identifier of the running kernel: equal for every process, network
#: namespace and container on one machine until it reboots.
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@functools.cache
def machine_id() -> str | None:
    """An identifier of this machine, or C{None} where we have none."""
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


def same_machine(other: str | None) -> bool:
    """Whether C{other} (a peer's L{machine_id}) is this machine's."""
    return other is not None and other == machine_id()


def local_address(address: IAddress | None) -> bool | None:
    """
    Whether a connection from C{address} comes from this machine's own
    network stack: a Unix socket, a loopback address, or an address of
    one of this namespace's interfaces.  C{None}: no address to tell by
    (a pipe, or a transport that gives none).
    """
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, (IPv4Address, IPv6Address)):
        return _own_ip(address.host)
    return None


@functools.lru_cache(maxsize=256)
def _own_ip(host: str) -> bool:
    """Whether C{host} is one of ours: only our own addresses can be bound (nothing is sent)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True

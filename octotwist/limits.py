"""
Limits that hold before a peer has authenticated, so that strangers cannot
lock the workers out: how many connections may be waiting to authenticate,
in all and from one address, and enough file descriptors to serve them.

A server cannot tell an attacker's idle connection from a slow worker's
until the handshake is over, but it can bound what unauthenticated
connections take together.  L{PreAuthLimit} gives each new connection a
L{Slot} or refuses it at once (before any byte is read), and the slot is
given back when the connection authenticates or closes.  Per-address caps
keep one attacking address from filling the total; a worker from any other
address always finds room.  Handshake deadlines (each transport has its
own) make the slots turn over.

Every transport's server uses one L{PreAuthLimit}: the TCP transport in its
factory's C{buildProtocol}, the HTTP transport in its site's (a connection
counts as authenticated once it carried an authenticated request), the SSH
transport in its factory until user authentication succeeds.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger

#: Unauthenticated connections a server holds at once, from all addresses.
MAX_PENDING = 256
#: ... and from any one address.
MAX_PENDING_PER_ADDRESS = 32
#: At most one "refusing connections from ..." line per address this often.
LOG_INTERVAL = 10.0

_log = Logger()


def raise_open_file_limit() -> tuple[int, int]:
    """
    Raise this process's soft limit on open files to its hard limit, as
    servers do at start-up (the common soft limit, 1024, is too few for a
    server that many peers connect to; the hard limit is what the
    administrator allows).

    @return: the soft limit before and after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # some systems cap below the hard limit
        return soft, soft
    return soft, target


def address_key(address: IAddress | None) -> str:
    """Which address a connection counts against: its IP, or C{"local"} (Unix sockets)."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return "local"


class Slot:
    """One unauthenticated connection's place; L{release} it once (more is harmless)."""

    def __init__(self, limit: PreAuthLimit, key: str) -> None:
        self._limit = limit
        self.key = key
        self.released = False

    def release(self) -> None:
        """The connection authenticated, or closed: it no longer counts."""
        if not self.released:
            self.released = True
            self._limit._give_back(self.key)


@dataclass
class PreAuthLimit:
    """
    At most C{total} connections waiting to authenticate, at most
    C{per_address} of them from one address.

    @param clock: returns the time, for rate-limiting the log
        (C{reactor.seconds}).
    """

    total: int = MAX_PENDING
    per_address: int = MAX_PENDING_PER_ADDRESS
    clock: Callable[[], float] = time.monotonic
    pending: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    _logged: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.pending.values())

    def take(self, address: IAddress | None) -> Slot | None:
        """
        A slot for a new connection from C{address}, or C{None}: refuse it
        now (close it without reading from it).
        """
        key = address_key(address)
        if self.pending[key] >= self.per_address or self.count >= self.total:
            self.refused[key] += 1
            self._log_refusal(key)
            return None
        self.pending[key] += 1
        return Slot(self, key)

    def _give_back(self, key: str) -> None:
        self.pending[key] -= 1
        if self.pending[key] <= 0:
            del self.pending[key]

    def _log_refusal(self, key: str) -> None:
        now = self.clock()
        last = self._logged.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            return
        self._logged[key] = now
        why = (
            f"{self.pending[key]} unauthenticated connections from it already"
            if self.pending[key] >= self.per_address
            else f"{self.count} unauthenticated connections already"
        )
        _log.warn(
            "refusing connections from {address}: {why} ({n} refused so far; "
            "at most one such line per {interval:g} s)",
            address=key,
            why=why,
            n=self.refused[key],
            interval=LOG_INTERVAL,
        )

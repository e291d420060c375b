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
transport in its factory until user authentication succeeds.  And one
L{RefusalLog}, so that a flood of refused peers writes a few lines, not one
per connection.
"""

from __future__ import annotations

import resource
from collections import Counter
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel, globalLogPublisher

#: Unauthenticated connections a server holds at once, from all addresses.
MAX_PENDING = 256
#: ... and from any one address.
MAX_PENDING_PER_ADDRESS = 32
#: At most this many lines about refused peers per L{REFUSAL_WINDOW}
#: seconds; past that, refusals are counted, and one line at the end of the
#: window says how many went unlogged.
REFUSALS_LOGGED = 10
REFUSAL_WINDOW = 10.0

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


class RefusalLog:
    """
    Lines about refused peers, at most C{limit} per C{window} seconds in all.

    Anyone who can reach the port can be refused, as often as he likes: 25 000
    garbage connections in 4 s used to write 64 000 lines.  Past the limit,
    refusals are only counted; when the window ends, one line says how many
    there were, so nothing goes unnoticed and the log stays readable.  Every
    transport's server keeps one, and logs each refusal of a peer that has
    not authenticated through it.

    @param clock: for the time and the end-of-window line.
    """

    def __init__(
        self, clock: IReactorTime, limit: int = REFUSALS_LOGGED, window: float = REFUSAL_WINDOW
    ) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.suppressed = 0
        self._started: float | None = None
        self._logged = 0
        self._report: IDelayedCall | None = None

    def admit(self) -> bool:
        """Whether the next refusal line may be logged (else it is counted)."""
        now = self.clock.seconds()
        if self._started is None or now - self._started >= self.window:
            self.flush()
            self._started, self._logged = now, 0
        if self._logged < self.limit:
            self._logged += 1
            return True
        self.suppressed += 1
        if self._report is None:
            self._report = self.clock.callLater(self._started + self.window - now, self._ended)
        return False

    def emit(self, level: LogLevel, format: str, **fields: Any) -> None:
        """Log one refusal line, unless the window's lines are used up."""
        if self.admit():
            _log.emit(level, format, **fields)

    def observer(self, event: dict[str, Any]) -> None:
        """
        A log observer for a library's own warnings and errors about a peer
        (Conch's, say): counted with the refusals, and dropped past the
        limit; everything else passes.
        """
        if event.get("log_level", LogLevel.info) < LogLevel.warn or self.admit():
            globalLogPublisher(event)

    def _ended(self) -> None:
        self._report = None
        self._started = None
        self.flush()

    def flush(self) -> None:
        """Say how many refusals went unlogged, if any (also when the server stops)."""
        if self._report is not None:
            if self._report.active():
                self._report.cancel()
            self._report = None
        if self.suppressed:
            n, self.suppressed = self.suppressed, 0
            _log.warn(
                "{n} more line{s} about refused peers not logged (at most {limit} "
                "per {window:g} s)",
                n=n,
                s="" if n == 1 else "s",
                limit=self.limit,
                window=self.window,
            )


class PreAuthLimit:
    """
    At most C{total} connections waiting to authenticate, at most
    C{per_address} of them from one address.

    @param refusals: where to say that a connection was refused.
    """

    def __init__(
        self,
        refusals: RefusalLog,
        total: int = MAX_PENDING,
        per_address: int = MAX_PENDING_PER_ADDRESS,
    ) -> None:
        self.refusals = refusals
        self.total = total
        self.per_address = per_address
        self.pending: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.pending.values())

    def take(self, address: IAddress | None) -> Slot | None:
        """
        A slot for a new connection from C{address}, or C{None}: refuse it
        now (close it without reading from it).
        """
        key = address_key(address)
        if self.pending[key] >= self.per_address:
            why = f"{self.pending[key]} unauthenticated connections from it already"
        elif self.count >= self.total:
            why = f"{self.count} unauthenticated connections already"
        else:
            self.pending[key] += 1
            return Slot(self, key)
        self.refused[key] += 1
        self.refusals.emit(
            LogLevel.warn,
            "refusing connections from {address}: {why} ({n} refused so far)",
            address=key,
            why=why,
            n=self.refused[key],
        )
        return None

    def _give_back(self, key: str) -> None:
        self.pending[key] -= 1
        if self.pending[key] <= 0:
            del self.pending[key]


class SlottedFactory(Factory):
    """
    A base for a server's protocol factory (first in its bases, before
    C{Factory}, Conch's C{SSHFactory} or C{Site}): each new connection takes a slot
    of C{self.pending} or is refused at once (C{buildProtocol} returns
    C{None}, and Twisted closes it), and its protocol gets the slot as
    C{slot}, to release when the peer authenticates or goes.
    """

    pending: PreAuthLimit

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """
        A protocol for a new connection, or C{None} when too many wait.
        (Typed C{Any}: Twisted's factories type theirs differently, and
        this serves them all.)
        """
        slot = self.pending.take(addr)
        if slot is None:
            return None
        protocol = super().buildProtocol(addr)
        if protocol is None:
            slot.release()
            return None
        protocol.slot = slot  # type: ignore[attr-defined]  # (the protocol declares it)
        return protocol

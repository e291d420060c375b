"""
A worker's side of L{octotwist.launcher}: C{octo client --stdin}.

Its secret is the first line of standard input, so that it appears on no
command line and in no environment (a process listing shows both, to
every user of the host).  Standard input then stays open for as long as
the worker should live: it closes when whoever started the worker closes
it, dies, or loses the SSH connection it came over, and the worker then
stops at once, with its task processes, rather than outliving its server.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.python.failure import Failure

from octotwist import auth
from octotwist.errors import UsageError

#: Longest first line read as a secret.
MAX_SECRET_LINE = 4096


def read_secret(fd: int = 0) -> bytes:
    """
    The secret: standard input's first line, read a byte at a time so that
    nothing after it is taken from the descriptor the lifeline then watches.

    @raise UsageError: it is missing, too long or too short.
    """
    line = bytearray()
    while len(line) <= MAX_SECRET_LINE:
        byte = os.read(fd, 1)
        if not byte or byte == b"\n":
            break
        line += byte
    else:
        raise UsageError(f"--stdin: the first line is longer than {MAX_SECRET_LINE} bytes")
    secret = bytes(line).strip()
    if not secret:
        raise UsageError("--stdin: standard input's first line, the secret, is empty")
    return auth.check_secret(secret, "the secret on standard input (--stdin)")


class _Lifeline(Protocol):
    def __init__(self, closed: Callable[[], None]) -> None:
        self._closed = closed

    def dataReceived(self, data: bytes) -> None:
        pass  # nothing more is said on it

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed()


def watch(reactor: IReactorFDSet, closed: Callable[[], None], fd: int = 0) -> None:
    """Call C{closed} once standard input (C{fd}) reaches its end."""
    # StandardIO also writes: give it a descriptor where nothing is lost.
    devnull = os.open(os.devnull, os.O_WRONLY)
    # (mypy reads Windows' StandardIO, which has neither keyword.)
    StandardIO(_Lifeline(closed), stdin=fd, stdout=devnull, reactor=reactor)  # type: ignore[call-arg]

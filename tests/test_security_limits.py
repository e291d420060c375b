"""
L{octotwist.limits.PreAuthLimit} refuses, exactly at its caps, and a real
TCP server applies it: strangers who hold connections open without
authenticating get at most their share, the rest are closed unread, and
someone from another address still gets in.  (C{test_limits.py} has the
full attack, thousands of sockets against every transport; these are the
quick tests that kill the mutant of C{tests/mutation.py} that never
refuses.)
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from conftest import finish, free_port, start, wait_for_log, wait_for_port
from test_mitm import JOB
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock

from octotwist.handshake import MAGIC
from octotwist.limits import MAX_PENDING_PER_ADDRESS, PreAuthLimit, RefusalLog

SECRET = "limits-security-secret-0123456789"


def address(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def test_the_caps_refuse_exactly_past_them() -> None:
    limit = PreAuthLimit(RefusalLog(Clock()), total=5, per_address=3)
    slots = [limit.take(address("10.0.0.1")) for _ in range(3)]
    assert all(slots)
    assert limit.take(address("10.0.0.1")) is None  # its share is used up
    assert limit.refused["10.0.0.1"] == 1
    other = [limit.take(address("10.0.0.2")), limit.take(UNIXAddress(None))]
    assert all(other)  # others still get in ...
    assert limit.count == 5
    assert limit.take(address("10.0.0.3")) is None  # ... until the total is reached
    slots[0].release()
    slots[0].release()  # twice: harmless, counted once
    assert limit.count == 4
    assert limit.take(address("10.0.0.1")) is not None  # a slot given back is free again
    assert limit.take(address("10.0.0.1")) is None


def greeted(s: socket.socket, timeout: float = 20) -> bool:
    """Whether the server sent its challenge (True) or closed unread (False)."""
    s.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while len(data) < 4 + len(MAGIC):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data[4:].startswith(MAGIC)


@contextlib.contextmanager
def connections(port: int, n: int, source: str) -> Iterator[list[socket.socket]]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            sockets.append(s)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def test_a_tcp_server_holds_only_its_share_of_unauthenticated_connections(
    env: dict, tmp_path: Path
) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    port = free_port()
    server = start(
        "server", str(script), "--transport", "tcp",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        env={**env, "OCTO_SECRET": SECRET},
    )  # fmt: skip
    wait_for_port(port, server)
    extra = 8
    with connections(port, MAX_PENDING_PER_ADDRESS + extra, "127.0.0.2") as strangers:
        answers = [greeted(s) for s in strangers]
        # Each of the first MAX_PENDING_PER_ADDRESS got a challenge; the rest
        # were closed without a byte.  (The probe of wait_for_port may still
        # hold one slot of 127.0.0.1, not of this address.)
        assert answers.count(True) == MAX_PENDING_PER_ADDRESS, answers
        assert answers[-extra:] == [False] * extra
        with connections(port, 1, "127.0.0.3") as (other,):
            assert greeted(other), "a peer from another address was locked out"
        log = wait_for_log(server, ["refusing connections from 127.0.0.2"])
    server.terminate()
    _, _, err = finish(server)
    assert "Traceback" not in log + err

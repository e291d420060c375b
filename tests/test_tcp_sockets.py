"""
What tests/test_tcp_protocol.py checks in memory, checked again over a real
socket: a real C{octo server} (tcp, on 127.0.0.1) and a raw client that
speaks the protocol with the core's own sans-IO handshake and channel
(L{octotwist.handshake}, L{octotwist.secure}), honestly or not.  Each time
the server must do to the socket what the in-memory test says the protocol
does (hang up, or not; send nothing more), log one line naming the reason
for that very connection, stay up, and then a real C{octo client} finishes
the job with the exact result (a Counter over the input).

In memory (test_tcp_protocol.py)                     over a real socket
--------------------------------------------------   --------------------------------------------
server_accepts_a_correct_proof_and_proves_itself     test_a_correct_proof_is_accepted_...
wrong_secret_is_dropped_before_anything_is_decoded   test_a_wrong_secret_is_refused_...
anything_but_a_proof_before_auth_is_dropped          test_anything_but_a_proof_before_auth_...
big_frame_before_auth_is_refused_without_buffering   test_a_big_frame_before_auth_is_refused_...
handshake_times_out                                  test_a_silent_peer_is_dropped_...
malformed_and_oversized_frames_after_auth_close...   test_a_malformed_message_after_auth_...,
                                                     test_an_oversized_frame_after_auth_...
client_and_server_authenticate_each_other_and_talk   every real job (and the first test here)
client_with_the_wrong_secret_gets_an_auth...error    test_cli_options.py (a real client, a real
                                                     server, "it does not have the same secret")
client_refuses_a_server_that_fails_its_proof...      test_security_tcp_client.py (a real client,
client_answers_nothing_but_a_challenge               fake servers on real sockets)

Not parametrized by transport: this is the tcp transport's own protocol, and
tests/conftest.py runs the file once, in the tcp env of the tox matrix.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import parse_tsv
from test_robustness import EXPECTED, WORDS, Frames, RawWorker, hello

from octotwist import codec, handshake
from octotwist.secure import OVERHEAD
from octotwist.testing.harness import SECRET, Octo, Server, hung_up, send_regardless, wait_for_text
from octotwist.testing.relay import evil_pickle
from octotwist_tcp.protocol import CONTEXT, HANDSHAKE_MAX_FRAME, HANDSHAKE_TIMEOUT, MAGIC, MAX_FRAME


@pytest.fixture
def tcp(tmp_path: Path) -> Iterator[Octo]:
    """Real octo processes over tcp, whatever OCTO_TRANSPORT says."""
    runner = Octo("tcp", tmp_path)
    try:
        yield runner
    finally:
        runner.close()


def serve(octo: Octo) -> tuple[Server, int, Path]:
    """A server for WORDS, listening; its port and its output file."""
    script = octo.directory / "job.py"
    script.write_text(WORDS)
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out))
    return server, int(server.listen.split(":")[1]), out


def connect(port: int) -> tuple[socket.socket, Frames, int]:
    """A raw connection; its frames and our port (which the server's log names)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    return sock, Frames(sock), sock.getsockname()[1]


def challenge(frames: Frames) -> bytes:
    """The server's first frame, which must be a challenge."""
    first = frames.read()
    assert first is not None and first.startswith(MAGIC), first
    return first


def frame(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


def refused_line(server: Server, our_port: int, why: str) -> str:
    """Wait for the server's line about our connection, which must give C{why}."""
    line = f"closing connection from tcp:127.0.0.1:{our_port}: {why}"
    wait_for_text(server, f"closing connection from tcp:127.0.0.1:{our_port}:")
    assert line in server.err(), server.err()
    return line


def honest_job_finishes(octo: Octo, server: Server, out: Path) -> str:
    """A real client does the whole job; the result is exact.  Returns the server's log."""
    client = octo.client(server, "--name", "honest")
    assert client.wait() == 0, client.err()
    assert server.wait() == 0, server.err()
    assert parse_tsv(out.read_text()) == EXPECTED
    err = server.err()
    assert "Traceback" not in err and "Unhandled" not in err, err
    assert "worker honest joined" in err
    return err


def test_a_correct_proof_is_accepted_and_the_server_proves_itself(tcp: Octo) -> None:
    server, port, out = serve(tcp)
    # RawWorker checks the server's proof (confirm raises unless it is right)
    # and decodes the Welcome through the channel both ends derived.
    raw = RawWorker(port, SECRET)
    raw.send(hello("raw"))
    wait_for_text(server, "worker raw joined")
    raw.close()
    wait_for_text(server, "worker raw left")
    err = honest_job_finishes(tcp, server, out)
    assert "closing connection" not in err, err


def test_a_wrong_secret_is_refused_before_anything_is_decoded(tcp: Octo) -> None:
    server, port, out = serve(tcp)
    sock, frames, ours = connect(port)
    with sock:
        impostor = handshake.ClientHandshake(b"not-the-" + SECRET.encode(), CONTEXT)
        # The wrong proof alone: with nothing of ours left unread, the server
        # hangs up with a FIN, not a reset, so that we do see all it sent.
        send_regardless(sock, frame(impostor.respond(challenge(frames))))
        after = hung_up(sock)
    assert after == b"", f"the server answered an impostor with {after[:100]!r}"  # no proof
    line = refused_line(server, ours, "authentication failed (wrong secret)")
    err = honest_job_finishes(tcp, server, out)
    assert err.count(line) == 1 and "worker raw joined" not in err


FIRST_FRAMES = {
    "a Hello in the clear": lambda marker: codec.encode_message(hello()),
    "ten bytes of junk": lambda marker: b"x" * 10,
    "an evil pickle": evil_pickle,
}


@pytest.mark.parametrize("first", sorted(FIRST_FRAMES))
def test_anything_but_a_proof_before_auth_is_dropped(tcp: Octo, tmp_path: Path, first: str) -> None:
    marker = tmp_path / "pwned"
    server, port, out = serve(tcp)
    sock, frames, ours = connect(port)
    with sock:
        challenge(frames)
        send_regardless(sock, frame(FIRST_FRAMES[first](marker)))
        after = hung_up(sock)
    assert after == b""
    line = refused_line(server, ours, "malformed authentication response")
    err = honest_job_finishes(tcp, server, out)
    assert err.count(line) == 1 and "worker raw joined" not in err
    assert not marker.exists()


def test_a_big_frame_before_auth_is_refused_without_waiting_for_it(tcp: Octo) -> None:
    server, port, out = serve(tcp)
    sock, frames, ours = connect(port)
    with sock:
        challenge(frames)
        # 50 MB announced, 100 bytes sent: the server must hang up on the
        # prefix alone, neither waiting for nor keeping the rest.
        send_regardless(sock, struct.pack("!I", 50_000_000) + b"x" * 100)
        assert hung_up(sock) == b""
    why = f"frame of 50000000 bytes is over the limit of {HANDSHAKE_MAX_FRAME}"
    line = refused_line(server, ours, why)
    assert honest_job_finishes(tcp, server, out).count(line) == 1


@pytest.mark.slow
def test_a_silent_peer_is_dropped_after_the_handshake_timeout(tcp: Octo) -> None:
    server, port, out = serve(tcp)
    sock, frames, ours = connect(port)
    with sock:
        connected = time.monotonic()
        challenge(frames)
        assert hung_up(sock, timeout=HANDSHAKE_TIMEOUT + 60) == b""
        waited = time.monotonic() - connected
    # The server's timer starts once it has accepted, after our connect returned.
    assert waited >= HANDSHAKE_TIMEOUT - 0.5, f"dropped after {waited:.1f} s"
    line = refused_line(server, ours, f"no authentication within {HANDSHAKE_TIMEOUT:.0f} s")
    assert honest_job_finishes(tcp, server, out).count(line) == 1


def test_a_malformed_message_after_auth_closes_that_connection(tcp: Octo) -> None:
    server, port, out = serve(tcp)
    raw = RawWorker(port, SECRET)
    ours = raw.frames.sock.getsockname()[1]
    raw.send(b"not a message")  # sealed right, but no message
    assert raw.frames.closed_by_peer(), "the server kept the connection open"
    raw.close()
    line = refused_line(server, ours, "malformed message: ")
    assert honest_job_finishes(tcp, server, out).count(line) == 1


def test_an_oversized_frame_after_auth_closes_that_connection(tcp: Octo) -> None:
    server, port, out = serve(tcp)
    raw = RawWorker(port, SECRET)
    ours = raw.frames.sock.getsockname()[1]
    limit = MAX_FRAME + OVERHEAD
    # One byte over the limit announced, a few sent: refused on the prefix.
    send_regardless(raw.frames.sock, struct.pack("!I", limit + 1) + b"x" * 100)
    assert raw.frames.closed_by_peer(), "the server waited for the oversized frame"
    raw.close()
    line = refused_line(server, ours, f"frame of {limit + 1} bytes is over the limit of {limit}")
    assert honest_job_finishes(tcp, server, out).count(line) == 1

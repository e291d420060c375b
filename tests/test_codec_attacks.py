"""
What an authenticated peer can put in a control message, against a real
server: a pickle that would run a command, a 9-byte pickle that allocated
gigabytes (a memo index), msgpack that claims huge or deep structures.  The
codec is data only: each frame closes that one connection, nothing runs,
the server's memory stays where it was, and an honest worker then finishes
the job exactly.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import msgpack
import pytest
from conftest import finish, free_port, parse_tsv, start, wait_for_port
from test_end_to_end import job
from test_robustness import EXPECTED, SECRET, WORDS, RawWorker

from octotwist import codec
from octotwist.errors import RemoteProtocolError
from octotwist.testing.relay import evil_pickle

#: The review's 9 bytes: PROTO 5, NONE, a memo fetch of index 10**8, STOP.
MEMO_BOMB = b"\x80\x05N r\x00\xe1\xf5\x05."

HOSTILE = {
    "memo bomb": MEMO_BOMB,
    "array of 2**32 - 1": b"\xdd\xff\xff\xff\xff",
    "map of 2**32 - 1": b"\xdf\xff\xff\xff\xff",
    "bin of 4 GiB": b"\xc6\xff\xff\xff\xff",
    "nested 100 000 deep": b"\x91" * 100_000,
    "a Hello as a map": msgpack.packb({"name": "Hello"}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_headers_are_refused_without_allocating(name: str) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.process_time()
    with pytest.raises(RemoteProtocolError):
        codec.message_from_parts(HOSTILE[name], b"")
    assert time.process_time() - started < 0.5
    # ru_maxrss is in KiB: the peak grew by less than 50 MiB (the pickle grew 1.6 GB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024


def test_an_evil_pickle_from_an_authenticated_peer_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(RemoteProtocolError):
        codec.message_from_parts(evil_pickle(marker), b"")
    with pytest.raises(RemoteProtocolError):
        codec.decode_message(evil_pickle(marker))
    assert not marker.exists()


def peak_rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    assert match is not None
    return int(match.group(1)) * 1024


def test_hostile_frames_close_the_connection_and_cost_the_server_nothing(
    env: dict, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    env = {**env, "OCTO_SECRET": SECRET}
    port = free_port()
    out = tmp_path / "out.tsv"
    server = start(
        "server", str(job(tmp_path, WORDS)), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "-o", str(out), env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    RawWorker(port).close()  # the server has done its first handshake
    before = peak_rss(server.pid)
    for header in [*HOSTILE.values(), evil_pickle(marker)]:
        raw = RawWorker(port)
        raw.send(header)
        assert raw.frames.closed_by_peer(), f"the server kept the connection open: {header[:20]!r}"
        raw.close()
    assert peak_rss(server.pid) - before < 50 * 2**20
    assert not marker.exists(), "the attacker's code ran on the server"
    worker = start("client", f"127.0.0.1:{port}", "-p", "2", env=env)
    code, _, err = finish(server)
    assert finish(worker)[0] == 0
    assert code == 0, err
    assert parse_tsv(out.read_text()) == EXPECTED
    assert err.count("malformed message") >= len(HOSTILE)
    assert "Traceback" not in err

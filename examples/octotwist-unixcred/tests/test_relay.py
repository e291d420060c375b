"""
The core's channel layer on this transport: a relay on the path (another
Unix socket that forwards to the server's, run by an allowed user, so the
kernel vouches for it at both ends) that rewrites what the server sends
cannot make the worker run anything.  The worker closes the connection with
an integrity error, reconnects (the relay passes the next connection
through), and the job's result is exact.

    pytest examples/octotwist-unixcred/tests --octo-transport unixcred
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from octotwist.testing.harness import Octo, wait_for_text
from octotwist.testing.relay import Editor, Frames, Relay, evil_welcome, flip, pass_through

JOB = """
source = {i: " ".join(f"w{(i * 5 + j) % 11}" for j in range(30 + i)) for i in range(8)}
def mapfn(key, value):
    for word in value.split():
        yield word, 1
def reducefn(key, values):
    return key, sum(values)
reduce_tasks = 2
"""


def expected() -> dict[str, int]:
    counts: Counter[str] = Counter()
    for i in range(8):
        counts.update(f"w{(i * 5 + j) % 11}" for j in range(30 + i))
    return dict(counts)


def results(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.rsplit("\t", 1) for line in path.read_text().splitlines())}


# Server -> client frames: 0 the key exchange, 1 the Welcome, 2... task inputs.
ATTACKS = {
    "welcome replaced": lambda marker: lambda i, f: [evil_welcome(marker)] if i == 1 else [f],
    "welcome bit flipped": lambda marker: lambda i, f: [flip(f)] if i == 1 else [f],
    "frame dropped": lambda marker: lambda i, f: [] if i == 2 else [f],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_relay_that_rewrites_frames_runs_nothing(
    octo: Octo, octo_transport: str, tmp_path: Path, attack: str
) -> None:
    if octo_transport != "unixcred":
        pytest.skip("this transport's own test")
    marker = tmp_path / "pwned"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = tmp_path / "out.tsv"
    server = octo.server(script, "-o", str(out))
    upstream = server.listen.removeprefix("unix:")
    edit = ATTACKS[attack](marker)
    relay = Relay(upstream, lambda n: (Editor(), Frames(edit)) if n == 0 else pass_through(n))
    try:
        client = octo.start("client", f"unix:{relay.path}", "--transport", octo_transport)
        assert client.wait() == 0, client.err()
        assert server.wait() == 0, server.err()
    finally:
        relay.close()
    assert "integrity check failed" in client.err()
    assert not marker.exists(), "the attacker's code ran"
    assert relay.connections >= 2
    assert results(out) == expected()
    wait_for_text(server, "finished")

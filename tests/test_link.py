"""
Workers across real links (issue 17): a worker whose traffic crosses an
emulated link (L{octotwist.testing.link.SlowLink}: delay, loss, an outage)
gets exact results over every transport, and a worker cut off for a while
is said to be silent, gets no new task, and is said to be back.

The timings of these links (the map phase on a 50 ms link against the LAN)
are measured by benchmarks/links.py, not here.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import finish, free_port, parse_tsv, start, wait_for_log, wait_for_port
from test_end_to_end import job

from octotwist.testing.link import SlowLink

N = 40
WORDS = f"""
import time
source = {{i: " ".join(f"w{{(i * j) % 13}}" for j in range(1, 9)) for i in range({N})}}
def mapfn(key, value):
    time.sleep(PAUSE)
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
reduce_tasks = 4
"""
EXPECTED = Counter(f"w{(i * j) % 13}" for i in range(N) for j in range(1, 9))


def serve(transport: str, env: dict, tmp_path: Path, pause: float, *extra: str):
    port, out = free_port(), tmp_path / "out.tsv"
    server = start(
        "server", str(job(tmp_path, WORDS.replace("PAUSE", str(pause)))), "--transport", transport,
        "--listen", f"tcp:{port}:interface=127.0.0.1", "-o", str(out), *extra, env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    return server, port, out


def worker(transport: str, env: dict, port: int, name: str, *extra: str):
    return start(
        "client", f"127.0.0.1:{port}", "--transport", transport, "-n", name, *extra, env=env
    )


@pytest.mark.parametrize(("delay", "loss"), [(0.05, 0.0), (0.02, 0.02)], ids=["50ms", "2%loss"])
def test_a_job_over_a_slow_or_lossy_link_is_exact(
    transport: str, env: dict, tmp_path: Path, delay: float, loss: float
) -> None:
    server, port, out = serve(transport, env, tmp_path, 0.0)
    link = SlowLink(port, delay=delay, loss=loss, seed=7)
    try:
        far = worker(transport, env, link.port, "far", "-p", "2")
        code, _, err = finish(server)
        assert code == 0, err
        assert finish(far)[0] == 0
    finally:
        link.close()
    assert parse_tsv(out.read_text()) == EXPECTED
    assert loss == 0 or link.stalls > 0  # the losses happened


@pytest.mark.slow  # a 12 s outage
def test_an_outage_mid_job_silences_the_worker_and_the_job_stays_exact(
    transport: str, env: dict, tmp_path: Path
) -> None:
    """
    w2's link goes down for 12 s mid-job: it is suspect after 2.5 beats (no
    new task for it), loses its tasks at its 8 s lease, and is back when
    the link is; w1 finishes the job, exact.
    """
    server, port, out = serve(
        transport, env, tmp_path, 0.15, "--heartbeat", "0.5", "--task-timeout", "8"
    )
    link = SlowLink(port)
    try:
        near = worker(transport, env, port, "w1", "-p", "1")
        far = worker(transport, env, link.port, "w2", "-p", "1")
        log = wait_for_log(server, ["worker w1 joined", "worker w2 joined"])
        time.sleep(1.0)
        link.down()
        down = time.monotonic()
        log += wait_for_log(server, ["worker w2 silent for"], timeout=30)
        assert time.monotonic() - down < 6, "not suspect within a few heartbeats"
        time.sleep(max(0.0, 12 - (time.monotonic() - down)))
        link.up()
        code, _, err = finish(server)
        log += err
        assert code == 0, log
        for w in (near, far):
            assert finish(w)[0] == 0
    finally:
        link.close()
    assert parse_tsv(out.read_text()) == EXPECTED
    assert log.count("worker w2 silent for") == 1, log
    silent = log.index("worker w2 silent for")
    # Once silent, nothing new for it: no backup copy was sent its way.
    assert "backup copy on w2" not in log[silent:], log

"""
A worker cut off from the server by the network (its link brought down),
not by a crash: the server only notices its silence.  Two network namespaces
made here stand for two hosts; nothing leaves them.  Skipped where namespaces
cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import finish, parse_tsv, start
from test_faults import EXPECTED, gated_slowish, wait_for_line


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _namespaces_work() -> bool:
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = f"octoprobe{os.getpid()}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    _ip("netns", "del", probe, check=False)
    return True


pytestmark = pytest.mark.skipif(
    not _namespaces_work(), reason="needs root and iproute2 to make network namespaces"
)

SERVER_ADDRESS = "10.231.77.1"
WORKER_ADDRESS = "10.231.77.2"


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Namespaces C{server} and C{worker}, joined by a veth pair."""
    tag = f"{os.getpid() % 100000}"
    server_ns, worker_ns = f"octo-s{tag}", f"octo-w{tag}"
    server_if, worker_if = f"os{tag}", f"ow{tag}"
    try:
        _ip("netns", "add", server_ns)
        _ip("netns", "add", worker_ns)
        _ip("link", "add", server_if, "type", "veth", "peer", "name", worker_if)
        _ip("link", "set", server_if, "netns", server_ns)
        _ip("link", "set", worker_if, "netns", worker_ns)
        for ns, dev, addr in (
            (server_ns, server_if, SERVER_ADDRESS),
            (worker_ns, worker_if, WORKER_ADDRESS),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield server_ns, worker_ns, worker_if
    finally:
        _ip("netns", "del", server_ns, check=False)
        _ip("netns", "del", worker_ns, check=False)


def in_ns(ns: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return start(
        "netns", "exec", ns, sys.executable, "-m", "octotwist", *args, env=env, program="ip"
    )


@pytest.mark.slow  # waits out a 2 s lease
def test_a_worker_cut_off_by_the_network_loses_its_tasks_after_the_lease(
    two_hosts: tuple[str, str, str], env: dict, tmp_path: Path
) -> None:
    server_ns, worker_ns, worker_if = two_hosts
    env = dict(env, OCTO_SECRET="partition-test-secret")
    out = tmp_path / "out.tsv"
    port = "18125"
    script, gate_file = gated_slowish(tmp_path, "map")
    server = in_ns(
        server_ns, "server", str(script), "-o", str(out),
        "--listen", f"tcp:{port}:interface={SERVER_ADDRESS}",
        "--heartbeat", "0.3", "--task-timeout", "2", env=env,
    )  # fmt: skip
    wait_for_line(server, "serving job")
    remote = in_ns(worker_ns, "client", f"{SERVER_ADDRESS}:{port}", "-p", "2", "-v", env=env)
    try:
        # Its map tasks wait at the gate: when the cable is cut it holds
        # tasks that only the lease's end can give to another worker.
        wait_for_line(remote, "running map ")
        _ip("-n", worker_ns, "link", "set", worker_if, "down")  # the cable is cut
        cut = time.monotonic()
        gate_file.touch()
        local = in_ns(server_ns, "client", f"{SERVER_ADDRESS}:{port}", env=env)
        code, _, err = finish(server)
        assert code == 0, err
        assert "worker silent for over 2 s" in err
        assert time.monotonic() - cut < 60
        assert finish(local)[0] == 0
        assert parse_tsv(out.read_text()) == EXPECTED
        # Both share the kernel (one boot id); only the worker in the
        # server's own namespace counts as on its machine (plain inputs).
        joins = [line for line in err.splitlines() if "joined from" in line]
        assert any(
            f"joined from tcp:{WORKER_ADDRESS}:" in j and "this machine" not in j for j in joins
        )
        assert any(
            f"joined from tcp:{SERVER_ADDRESS}:" in j and j.endswith(", on this machine)")
            for j in joins
        ), joins
    finally:
        remote.kill()
        remote.wait()

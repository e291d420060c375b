"""
Limits before authentication, against real servers: strangers holding
thousands of idle connections (reopened as they close) must not lock the
workers out, and a client that trickles an HTTP request head is cut off.
"""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import finish, free_port, parse_tsv, start, wait_for_port
from test_mitm import JOB, expected

from octotwist.limits import raise_open_file_limit

SECRET = "limits-test-secret-of-some-length"
#: The attacker's own address: 127.0.0.0/8 is all loopback on Linux.
ATTACKER = "127.0.0.2"
IDLE_SOCKETS = 2000


class Flood:
    """
    Keeps C{count} idle connections from C{source} to a port open, opening
    a new one whenever the server closes one, until stopped.
    """

    def __init__(self, port: int, count: int, source: str = ATTACKER) -> None:
        self.port, self.count, self.source = port, count, source
        self.opened = 0
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self, selector: selectors.BaseSelector) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.bind((self.source, 0))
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", self.port))
        selector.register(s, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            for _ in range(self.count):
                self._open(selector)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.1):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        data = s.recv(4096)  # an SSH server greets first: ignore it
                    except OSError:
                        data = b""
                    if data:
                        continue
                    selector.unregister(s)
                    s.close()
                    self.closed_by_server += 1
                    self._open(selector)
                    time.sleep(0.0005)  # a storm, but one that leaves the test machine usable
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            selector.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@contextlib.contextmanager
def soft_file_limit(n: int) -> Iterator[None]:
    """Processes started inside get a soft limit of C{n} open files (the common 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def gated(gate: Path) -> str:
    """JOB, with map tasks that wait for C{gate}: both workers join before any task ends."""
    return f"import os, time\nGATE = {str(gate)!r}\n" + JOB.replace(
        "def mapfn(key, value):\n",
        "def mapfn(key, value):\n    while not os.path.exists(GATE):\n        time.sleep(0.05)\n",
    )


def workers_joined(web: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/status.json", timeout=10) as r:
        return len(json.load(r)["workers"])


def soft_open_files_limit(pid: int) -> int:
    """What /proc says a process's soft limit on open files is."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit in /proc")


def open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def wait_for_attack(flood: Flood, pid: int) -> None:
    """
    Until the flood is fully open and the server has taken what it will of
    it (its count of open files has stopped growing for a second): only
    then do the workers come, as they would in the middle of an attack.
    """
    deadline = time.monotonic() + 60
    last, steady_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        files = open_files(pid)
        if files != last:
            last, steady_since = files, time.monotonic()
        elif flood.opened >= IDLE_SOCKETS and time.monotonic() - steady_since > 1.0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the attack never settled ({flood.opened} opened, {last} files)")


def test_idle_strangers_cannot_lock_the_workers_out(
    transport: str, env: dict, tmp_path: Path
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < IDLE_SOCKETS + 200:
        pytest.skip(f"the hard limit on open files ({hard}) leaves no room for the attacker")
    raise_open_file_limit()  # this process holds the attacker's sockets
    script = tmp_path / "job.py"
    gate = tmp_path / "gate"
    script.write_text(gated(gate))
    out = tmp_path / "out.tsv"
    port, web = free_port(), free_port()
    env = dict(env, OCTO_SECRET=SECRET)
    with soft_file_limit(1024):
        server = start(
            "server",
            str(script),
            "--transport",
            transport,
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--web",
            f"tcp:{web}:interface=127.0.0.1",
            "-o",
            str(out),
            env=env,
        )
    wait_for_port(port, server)
    # The server raised the soft limit it was started with to the hard one.
    assert soft_open_files_limit(server.pid) == min(hard, 2**20) or hard <= 1024
    flood = Flood(port, IDLE_SOCKETS)
    try:
        wait_for_attack(flood, server.pid)
        address = f"http://127.0.0.1:{port}/" if transport == "http" else f"127.0.0.1:{port}"
        workers = [
            start("client", address, "--transport", transport, "--wait", "60", env=env)
            for _ in range(2)
        ]
        deadline = time.monotonic() + 60
        while workers_joined(web) < 2:
            assert time.monotonic() < deadline, "the workers did not both get in"
            assert all(w.poll() is None for w in workers), "a worker gave up"
            time.sleep(0.1)
        gate.touch()
        for worker in workers:
            code, _, worker_err = finish(worker, timeout=90)
            if code != 0:
                server.kill()
                _, _, err = finish(server)
                raise AssertionError(f"a worker failed:\n{worker_err}\nthe server said:\n{err}")
        code, _, err = finish(server, timeout=30)
    finally:
        flood.stop()
    assert code == 0, err
    assert parse_tsv(out.read_text()) == expected()
    # The excess was refused at once, and said so (not once per connection).
    assert flood.closed_by_server > 0
    assert f"refusing connections from {ATTACKER}" in err
    assert err.count("refusing connections from") <= 20  # rate-limited, not one per connection


@pytest.mark.slow
def test_a_trickled_http_request_head_is_cut_off(env: dict, tmp_path: Path) -> None:
    from octotwist_http.server import HEAD_TIMEOUT

    script = tmp_path / "job.py"
    script.write_text(JOB)
    port = free_port()
    server = start(
        "server",
        str(script),
        "--transport",
        "http",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "-o",
        str(tmp_path / "out.tsv"),
        env=dict(env, OCTO_SECRET=SECRET),
    )
    wait_for_port(port, server)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        # One header line a second: twisted.web's idle timeout never fires.
        while time.monotonic() - started < HEAD_TIMEOUT + 20:
            try:
                s.sendall(b"X-Slow: a\r\n")
                s.settimeout(1.0)
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:  # reset: closed too
                closed = True
                break
        assert closed, "the server kept a trickling request head open"
        assert time.monotonic() - started >= HEAD_TIMEOUT - 1
    server.kill()
    _, _, err = finish(server)
    assert f"request head not complete within {HEAD_TIMEOUT:g} s" in err

"""
The one service behind octo run, octo server and twistd octo: a port that is
taken, Ctrl-C, a server stopped under its workers.  Real processes, real
sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import finish, free_port, start, wait_for_log, wait_for_port

SLOW_JOB = """
import time
source = {i: i for i in range(40)}
def mapfn(key, value):
    time.sleep(0.3)
    for i in range(2000):
        yield i % 50, 1
def reducefn(key, values):
    return key, sum(values)
"""


@pytest.fixture
def slow_job(tmp_path: Path) -> Path:
    path = tmp_path / "slow.py"
    path.write_text(textwrap.dedent(SLOW_JOB))
    return path


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


#: The twistd beside this interpreter (the one this octotwist is installed for).
TWISTD = shutil.which("twistd", path=str(Path(sys.executable).parent)) or "twistd"


def twistd(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_twistd_on_a_taken_port_exits_1_and_leaves_no_process(
    env: dict, tmp_path: Path, slow_job: Path, taken_port: int
) -> None:
    listen = f"tcp:{taken_port}:interface=127.0.0.1"
    r = twistd("-n", "--pidfile=", "octo", "--script", str(slow_job), "--listen", listen,
               env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot listen on {listen}: Address already in use" in r.stdout + r.stderr
    # As a daemon: the command that starts it fails, and the daemon is gone
    # with its pid file.
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    r = twistd(f"--pidfile={pidfile}", f"--logfile={logfile}", "octo", "--script",
               str(slow_job), "--listen", listen, env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot listen on" in r.stdout + r.stderr
    assert not pidfile.exists()
    # The daemon may still be writing its last lines after the command exits.
    deadline = time.monotonic() + 30
    while "CannotServe: cannot listen on" not in logfile.read_text():
        assert time.monotonic() < deadline, logfile.read_text()
        time.sleep(0.1)


@pytest.mark.parametrize("command", ["server", "run"])
def test_a_taken_web_port_is_one_line_and_exit_1(
    env: dict, tmp_path: Path, slow_job: Path, taken_port: int, command: str
) -> None:
    args = [command, str(slow_job), "--web", f"tcp:{taken_port}:interface=127.0.0.1"]
    if command == "server":
        args += ["--listen", f"tcp:{free_port()}:interface=127.0.0.1"]
    code, _, err = finish(start(*args, env=env), timeout=60)
    assert code == 1, err
    assert err.endswith(
        f"octo: cannot listen on tcp:{taken_port}:interface=127.0.0.1: Address already in use\n"
    )
    assert "Traceback" not in err


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_on_octo_run_says_interrupted_exits_1_and_leaves_nothing(
    env: dict, tmp_path: Path, slow_job: Path, how: signal.Signals
) -> None:
    """
    Ctrl-C reaches the whole process group (the task processes too): no
    traceback from any of them, no results file, exit status 1.
    """
    out = tmp_path / "out.tsv"
    proc = subprocess.Popen(
        [sys.executable, "-m", "octotwist", "run", str(slow_job), "-w", "2", "-o", str(out)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
    )
    try:
        wait_for_log(proc, ["worker local joined"], timeout=60)
        time.sleep(1.0)  # tasks are running in the task processes
        os.killpg(proc.pid, how)
        code, _, err = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 1, err
    assert "octo: interrupted\n" in err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.py"]  # no out.tsv, no .partial


@pytest.mark.parametrize("front", ["octo", "twistd"])
def test_a_stopped_server_tells_its_workers_the_job_was_cancelled(
    env: dict, tmp_path: Path, slow_job: Path, front: str
) -> None:
    port = free_port()
    listen = f"tcp:{port}:interface=127.0.0.1"
    if front == "octo":
        server = start("server", str(slow_job), "--listen", listen, env=env, cwd=tmp_path)
    else:
        server = start("-n", "--pidfile=", "octo", "--script", str(slow_job), "--listen", listen,
                       env=env, cwd=tmp_path, program=TWISTD)  # fmt: skip
    wait_for_port(port, server)
    client = start("client", f"127.0.0.1:{port}", "--wait", "120", env=env, cwd=tmp_path)
    wait_for_log(client, ["map "], timeout=60)  # it is working
    server.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code, _, err = finish(client, timeout=60)
    took = time.monotonic() - started
    assert code == 1, err
    assert "the job was cancelled: its server was stopped" in err
    assert took < 30, f"the worker took {took:.0f} s to give up (its --wait is 120 s)"
    finish(server, timeout=60)


def test_importing_octotwist_loads_no_plugin_and_no_reactor(env: dict) -> None:
    """Library code takes the reactor it is given; plugins load when a transport is chosen."""
    code = (
        "import pkgutil, importlib, sys, octotwist\n"
        "for m in pkgutil.walk_packages(octotwist.__path__, 'octotwist.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('octotwist_')),\n"
        "      'twisted.internet.reactor' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "False"]


def test_octo_run_logs_each_failure_once_and_no_empty_traceback(env: dict, tmp_path: Path) -> None:
    """The server says it; its own workers do not say it again."""
    raising = tmp_path / "raising.py"
    raising.write_text(
        "source = {i: i for i in range(4)}\n"
        "def mapfn(key, value):\n"
        "    if key == 2:\n"
        "        raise ValueError('bad record')\n"
        "    yield key, value\n"
        "def reducefn(key, values):\n"
        "    return key, sum(values)\n"
    )
    code, _, err = finish(start("run", str(raising), "--max-attempts", "2", env=env))
    assert code == 1, err
    attempts = [line for line in err.splitlines() if "at key 2: ValueError: bad record" in line]
    assert attempts == [
        "octo: map 2 attempt 1 failed on worker local at key 2: ValueError: bad record",
        "octo: map 2 attempt 2 failed on worker local at key 2: ValueError: bad record",
    ], err
    assert err.count("Traceback (most recent call last):") == 1, err
    assert "the server says" not in err
    # An error of the framework's making (mapfn returned None): the message,
    # with its hint, and no traceback header with nothing under it.
    none = tmp_path / "none.py"
    none.write_text(raising.read_text().replace("    yield key, value\n", "    value += 1\n"))
    code, _, err = finish(start("run", str(none), "--max-attempts", "1", env=env))
    assert code == 1, err
    assert "mapfn returned None; it must yield key, value pairs" in err
    assert "Traceback" not in err, err

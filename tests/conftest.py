"""
Shared fixtures: the transport under test, an isolated environment for the
C{octo} commands, and helpers to run them as real processes.

C{OCTO_TRANSPORT} picks the transport (the tox matrix sets it); when it is
unset, transport-dependent tests run once per installed transport.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from octotwist.hookspecs import transports

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BOOKS = EXAMPLES / "books"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transport" in metafunc.fixturenames:
        chosen = os.environ.get("OCTO_TRANSPORT")
        names = [chosen] if chosen else sorted(transports())
        metafunc.parametrize("transport", names)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment for octo commands: a private config dir, no secret."""
    e = dict(os.environ)
    e.pop("OCTO_SECRET", None)
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def octo(
    *args: str, env: dict[str, str], cwd: Path | str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run C{octo ARGS...} to completion."""
    return subprocess.run(
        [sys.executable, "-m", "octotwist", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    """Kill whatever a test started and left running (say, after it failed)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def start(
    *args: str, env: dict[str, str], cwd: Path | str | None = None, program: str | None = None
) -> subprocess.Popen[str]:
    """Start C{octo ARGS...} (or another program) in the background."""
    argv = [program, *args] if program else [sys.executable, "-m", "octotwist", *args]
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _started.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} did not finish in {timeout} s:\n{err}") from None
    return proc.returncode, out, err


def wait_for_port(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Wait until something listens on 127.0.0.1:PORT (or C{proc} died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}):\n{proc.stderr.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def word_count(files: list[Path]) -> Counter[str]:
    """The seed's word count, computed independently with a Counter."""
    counts: Counter[str] = Counter()
    for f in files:
        for word in f.read_text().split():
            counts[word.lower()] += 1
    return counts


def parse_tsv(text: str) -> dict[str, int]:
    result = {}
    for line in text.splitlines():
        key, value = line.rsplit("\t", 1)
        assert key not in result, f"key {key!r} output twice"
        result[key] = int(value)
    return result


def parse_spaced(text: str) -> dict[str, int]:
    """Lines printed by the seed's C{final}: C{print(key, value)}."""
    result = {}
    for line in text.splitlines():
        key, value = line.rsplit(" ", 1)
        assert key not in result, f"key {key!r} output twice"
        result[key] = int(value)
    return result


@pytest.fixture(scope="session")
def expected_books() -> Counter[str]:
    return word_count(sorted(BOOKS.glob("*.txt")))

"""
Shared fixtures: the transport under test, an isolated environment for the
C{octo} commands, and helpers to run them as real processes.

C{OCTO_TRANSPORT} picks the transport (the tox matrix sets it); when it is
unset, transport-dependent tests run once per built-in transport.

A transport may need more than the shared secret (SSH keys, say): its
plugin's C{octotwist_test_setup} hook prepares them, and L{octo} and L{start}
append the arguments it returned to every C{server} or C{client} command
that names that transport with C{--transport}.
"""

from __future__ import annotations

import ast
import os
import select
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from octotwist.hookspecs import conformance_setup, transports
from octotwist.transport import TestSetup

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BOOKS = EXAMPLES / "books"
BUILT_IN = {"tcp", "http", "ssh"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transport" in metafunc.fixturenames:
        chosen = os.environ.get("OCTO_TRANSPORT")
        # Unset: the built-in transports (others face the conformance kit).
        names = [chosen] if chosen else sorted(BUILT_IN & set(transports()))
        metafunc.parametrize("transport", names)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment for octo commands: private config and state dirs, no secret."""
    e = dict(os.environ)
    e.pop("OCTO_SECRET", None)
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e["XDG_STATE_HOME"] = str(tmp_path / "state")  # octo serve's queue, each test its own
    e["PYTHONUNBUFFERED"] = "1"
    return e


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """
    Under C{OCTO_TRANSPORT=NAME} (one env of the tox matrix), run what
    concerns that transport: the tests that take C{transport}, the
    conformance kit, and C{test_NAME.py}.  Tests that do not depend on the
    transport run once, in the tcp env (or when C{OCTO_TRANSPORT} is unset).
    """
    chosen = os.environ.get("OCTO_TRANSPORT")
    if not chosen:
        return
    names = set(transports())
    keep, drop = [], []
    for item in items:
        file = item.path.name
        own = file.removeprefix("test_").removesuffix(".py")
        if own in names:
            wanted = own == chosen
        else:
            wanted = (
                chosen == "tcp" or "transport" in item.fixturenames or file == "test_conformance.py"
            )
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_setups: dict[str, TestSetup] = {}


@pytest.fixture(autouse=True)
def peers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestSetup | None]:
    """The current transport's L{TestSetup} (for tests that take C{transport})."""
    if "transport" not in request.fixturenames:
        yield None
        return
    name = request.getfixturevalue("transport")
    directory = tmp_path / "peers"
    directory.mkdir()
    _setups[name] = setup = conformance_setup(name, directory)
    try:
        yield setup
    finally:
        _setups.clear()


def _with_peer_args(args: tuple[str, ...], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """C{args} plus what the named transport's test setup asks for."""
    if "--transport" not in args:
        return list(args), env
    setup = _setups.get(args[args.index("--transport") + 1])
    if setup is None:
        return list(args), env
    if args[0] in ("client", "submit"):
        extra = setup.client_args
    elif args[0] in ("server", "serve") or "octo" in args:  # octo server|serve, twistd ... octo
        extra = setup.server_args
    else:
        extra = []
    return [*args, *extra], {**env, **setup.env}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def octo(
    *args: str, env: dict[str, str], cwd: Path | str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run C{octo ARGS...} to completion."""
    argv, env = _with_peer_args(args, env)
    return subprocess.run(
        [sys.executable, "-m", "octotwist", *argv],
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
    args_, env = _with_peer_args(args, env)
    argv = [program, *args_] if program else [sys.executable, "-m", "octotwist", *args_]
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


def wait_for_log(
    proc: subprocess.Popen[str], needles: list[str], timeout: float = 60, count: int = 1
) -> str:
    """
    Read C{proc}'s stderr until every needle has appeared (C{count} times
    each); return what was read.

    Tests wait for what they assert (a worker joined, a lease expired) instead
    of sleeping for a time that a loaded machine may not honour.  Read through
    the file descriptor, not C{proc.stderr}'s buffer, so that L{finish} still
    gets the rest: add what this returned to what L{finish} returns.
    """
    seen = ""
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    while not all(seen.count(n) >= count for n in needles):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"never logged {needles} in {timeout} s:\n{seen}")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"exited before logging {needles}:\n{seen}")
            seen += chunk.decode(errors="replace")
    return seen


def gate(path: Path) -> str:
    """
    Job-script lines defining C{_gate()}, which returns once C{path} exists.

    A task that calls it cannot finish before the test creates the file: the
    test decides when the job may go on (both workers joined, a worker killed
    while it holds tasks) rather than hoping the job is still running.
    """
    return (
        "import os as _gate_os, time as _gate_time\n"
        "def _gate():\n"
        f"    while not _gate_os.path.exists({str(path)!r}):\n"
        "        _gate_time.sleep(0.02)\n"
    )


def python(
    code: str, env: dict[str, str] | None = None, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run C{code}, dedented, in a fresh Python (where octotwist.run() may wait)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


def word_count(files: list[Path]) -> Counter[str]:
    """The seed's word count, computed independently with a Counter."""
    counts: Counter[str] = Counter()
    for f in files:
        for word in f.read_text().split():
            counts[word.lower()] += 1
    return counts


def tsv_field(text: str) -> Any:
    """
    One field of octo's TSV output, read back as docs/guide.md says: the
    Python literal it spells when it parses as one, else the string itself.
    """
    if text in ("inf", "-inf", "nan"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_tsv(text: str) -> dict[Any, Any]:
    result = {}
    lines = text.split("\n")
    assert lines.pop() == "", "the last line does not end with a newline"
    for line in lines:
        assert line.count("\t") == 1, f"not one key<TAB>value: {line!r}"
        key, value = map(tsv_field, line.split("\t"))
        assert key not in result, f"key {key!r} output twice"
        result[key] = value
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


def parents() -> dict[int, int]:
    """Each live process's parent (zombies left out), from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # (the command may hold spaces and parentheses: split after the last ')')
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                found[int(entry)] = int(fields[1])
    return found


def descendants(pid: int) -> set[int]:
    """The live processes descending from C{pid}."""
    family = parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in family.items() if parent in frontier} - found
        found |= frontier
    return found

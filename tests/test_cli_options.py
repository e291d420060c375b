"""
Command-line options that the subprocess coverage run (C{tox -e coverage})
found untested, each through real C{octo} processes on 127.0.0.1, with exact
outputs and results checked against an independent computation:
C{--version}, C{octo transports}, C{-q}, C{--secret-file}, C{--memory-limit},
and a job whose C{source[key]} raises.

(An authenticated worker that breaks the protocol is
tests/test_robustness.py's
C{test_authenticated_nonsense_closes_that_connection_and_the_job_finishes}.)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import finish, free_port, octo, parse_tsv, start, wait_for_port
from test_end_to_end import job

import octotwist
import octotwist_http
import octotwist_ssh
import octotwist_tcp
from octotwist.hookspecs import transports

DEADLINE = 60


def wait_until(predicate: Any, what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not in {timeout} s: {what}")


# --version ---------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["server"],
        ["client"],
        ["secret"],
        ["transports"],
    ],
    ids=lambda c: " ".join(["octo", *c]),
)
def test_version_is_octotwists_for_octo_and_every_command(env: dict, command: list[str]) -> None:
    r = octo(*command, "--version", env=env, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"octotwist {octotwist.__version__}\n", "")
    assert importlib.metadata.version("octotwist") == octotwist.__version__  # what pip installed


# octo transports ---------------------------------------------------------


def test_octo_transports_lists_the_installed_transports_with_their_descriptions(
    env: dict,
) -> None:
    r = octo("transports", env=env, timeout=30)
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    # One line per installed transport, by name: the name padded to 10, then
    # the description.
    assert [line.split()[0] for line in lines] == sorted(transports())
    for name, plugin in (("http", octotwist_http), ("ssh", octotwist_ssh), ("tcp", octotwist_tcp)):
        assert f"{name:10} {plugin.TRANSPORT.description}" in lines
    assert "tcp        length-prefixed frames over any stream endpoint (tcp:, tls:, unix:)" in (
        r.stdout
    )


# -q ----------------------------------------------------------------------

# Key 4 fails (once: --max-attempts 1) and is skipped: an error and a warning.
ONE_BAD_KEY = """
source = {i: "w%d x" % i for i in range(6)}
def mapfn(key, value):
    if key == 4:
        raise RuntimeError("bad record four")
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, sum(values)
"""
ONE_BAD_KEY_RESULT = {f"w{i}": 1 for i in range(6) if i != 4} | {"x": 5}

SERVER_PROBLEMS = [
    "octo: map 4 attempt 1 failed on worker w1 at key 4: RuntimeError: bad record four",
    re.compile(
        r"octo: skipped map 4 \(key 4\): it failed 1 attempts?; "
        r"last error: RuntimeError: bad record four"
    ),
]
CLIENT_PROBLEMS = ["octo: map 4 failed at key 4: RuntimeError: bad record four"]


def _server_and_client(
    tmp_path: Path, env: dict, *extra: str
) -> tuple[tuple[int, str, str], tuple[int, str, str], Path]:
    port, out = free_port(), tmp_path / "out.tsv"
    server = start(
        "server", str(job(tmp_path, ONE_BAD_KEY)), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "-o", str(out), "--skip-bad-records", "--max-attempts", "1", *extra, env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    client = start("client", f"127.0.0.1:{port}", "-n", "w1", *extra, env=env)
    return finish(server), finish(client), out


def _matches(lines: list[str], expected: list[str | re.Pattern[str]]) -> bool:
    return len(lines) == len(expected) and all(
        e.fullmatch(line) if isinstance(e, re.Pattern) else e == line
        for line, e in zip(lines, expected, strict=True)
    )


def test_quiet_server_and_client_print_only_warnings_and_errors(env: dict, tmp_path: Path) -> None:
    (tmp_path / "q").mkdir()
    (tmp_path / "loud").mkdir()
    (code, _, err), (wcode, wout, werr), out = _server_and_client(tmp_path / "q", env, "-q")
    assert code == 0 and wcode == 0, err + werr
    assert _matches(err.splitlines(), SERVER_PROBLEMS), err
    assert werr.splitlines() == CLIENT_PROBLEMS and wout == ""
    assert parse_tsv(out.read_text()) == ONE_BAD_KEY_RESULT

    # The same run, not quiet: the same problems, among the lines -q hid.
    (code, _, err), (wcode, _, werr), out = _server_and_client(tmp_path / "loud", env)
    assert code == 0 and wcode == 0, err + werr
    problems = [line for line in err.splitlines() if "bad record four" in line]
    assert _matches(problems, SERVER_PROBLEMS), err
    assert re.search(
        r"^octo: worker w1 joined from tcp:127\.0\.0\.1:\d+ \(1 process, on this machine\)$",
        err,
        re.M,
    ), err
    assert re.search(r"^octo: job job finished: 6 results in [\d.]+ s$", err, re.M), err
    assert [line for line in werr.splitlines() if "bad record four" in line] == CLIENT_PROBLEMS
    assert "octo: running job job with 1 process" in werr
    assert "octo: the server says the job is over; exiting" in werr
    assert parse_tsv(out.read_text()) == ONE_BAD_KEY_RESULT


def test_quiet_octo_run_prints_the_results_and_nothing_else(env: dict, tmp_path: Path) -> None:
    script = job(tmp_path, ONE_BAD_KEY.replace("    if key == 4:\n", "    if key == 99:\n"))
    r = octo("run", str(script), "-q", "-w", "2", env=env)
    assert (r.returncode, r.stderr) == (0, "")
    assert parse_tsv(r.stdout) == {f"w{i}": 1 for i in range(6)} | {"x": 6}


# --secret-file -----------------------------------------------------------


def test_a_job_runs_with_the_secret_only_in_a_file_on_each_side(env: dict, tmp_path: Path) -> None:
    """
    Server and worker as on two machines: each its own copy of the secret
    file (mode 0600), its own config directory, no $OCTO_SECRET.  A worker
    whose file holds another secret is refused.
    """
    server_side, client_side = tmp_path / "server", tmp_path / "client"
    for side in (server_side, client_side):
        side.mkdir()
    made = octo("secret", "-o", str(server_side / "secret"), env=env, timeout=30)
    assert made.returncode == 0, made.stderr
    shutil.copy2(server_side / "secret", client_side / "secret")
    assert octo("secret", "-o", str(client_side / "other"), env=env, timeout=30).returncode == 0
    for f in (server_side / "secret", client_side / "secret", client_side / "other"):
        assert f.stat().st_mode & 0o777 == 0o600
    assert "OCTO_SECRET" not in env
    server_env = {**env, "XDG_CONFIG_HOME": str(server_side / "config")}
    client_env = {**env, "XDG_CONFIG_HOME": str(client_side / "config")}

    port, out = free_port(), tmp_path / "out.tsv"
    source = {f"doc{i}": f"alpha beta w{i % 3}" for i in range(9)}
    script = job(
        tmp_path,
        f"source = {source!r}\n"
        "def mapfn(key, value):\n    for w in value.split():\n        yield w, 1\n"
        "def reducefn(key, values):\n    return key, sum(values)\n",
    )
    server = start(
        "server", str(script), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--secret-file", str(server_side / "secret"), "-o", str(out), env=server_env,
    )  # fmt: skip
    wait_for_port(port, server)
    refused = octo(
        "client", f"127.0.0.1:{port}", "--secret-file", str(client_side / "other"),
        "--wait", "5", env=client_env,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "it does not have the same secret (check --secret-file / OCTO_SECRET)" in (
        refused.stderr
    )
    worker = octo(
        "client", f"127.0.0.1:{port}", "-n", "w1", "--secret-file", str(client_side / "secret"),
        env=client_env,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    code, _, err = finish(server)
    assert code == 0, err
    assert "closing connection from tcp:127.0.0.1:" in err and "(wrong secret)" in err
    assert parse_tsv(out.read_text()) == Counter(w for v in source.values() for w in v.split())
    # Neither side fell back on a generated secret.
    assert not (server_side / "config").exists() and not (client_side / "config").exists()


# --memory-limit ----------------------------------------------------------

# Eight map tasks of 2000 distinct words each; the reduce tasks wait for a
# gate, so that the server is looked at with every map output stored.
STORED = """
import os, time
GATE = {gate!r}
source = {{i: " ".join("w%d_%d" % (i, j) for j in range(2000)) for i in range(8)}}
def mapfn(key, value):
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    while not os.path.exists(GATE):
        time.sleep(0.05)
    return key, sum(values)
"""


def _spill_files(pid: int, directory: Path) -> list[int]:
    """The sizes of the files that process C{pid} has open in C{directory}."""
    sizes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(f"{directory}/"):
                sizes.append(os.stat(fd).st_size)
        except OSError:
            continue  # closed meanwhile
    return sizes


@pytest.mark.parametrize("limit", ["0", None], ids=["memory-limit-0", "default-limit"])
def test_memory_limit_0_spills_every_map_output_and_the_result_is_exact(
    env: dict, tmp_path: Path, limit: str | None
) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to see the server's open files")
    spill, gate = tmp_path / "spill", tmp_path / "gate"
    spill.mkdir()
    port, web, out = free_port(), free_port(), tmp_path / "out.tsv"
    server = start(
        "server", str(job(tmp_path, STORED.format(gate=str(gate)))),
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--web", f"tcp:{web}:interface=127.0.0.1",
        "-o", str(out), *(["--memory-limit", limit] if limit else []),
        env={**env, "TMPDIR": str(spill)},
    )  # fmt: skip
    wait_for_port(port, server)
    worker = start("client", f"127.0.0.1:{port}", "-p", "2", env=env)

    def maps_done() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/status.json", timeout=10) as r:
            status = json.loads(r.read())
        return status["map"]["done"] == 8 and status["phase"] == "reducing"

    wait_until(maps_done, "every map task done")
    if limit == "0":
        sizes = wait_until(lambda: _spill_files(server.pid, spill), "a spill file in TMPDIR")
        assert len(sizes) == 1 and sizes[0] > 8 * 2000, sizes  # zstd: > 1 byte a word
    else:  # 64 MiB by default: all in memory
        assert _spill_files(server.pid, spill) == []
    gate.touch()
    code, _, err = finish(server)
    assert code == 0, err
    assert finish(worker)[0] == 0
    assert parse_tsv(out.read_text()) == {f"w{i}_{j}": 1 for i in range(8) for j in range(2000)}
    assert list(spill.iterdir()) == []  # the spill file was never linked


# A source whose [key] raises --------------------------------------------

BROKEN_SOURCE = """
class Source:
    def __iter__(self):
        return iter(["doc%d" % i for i in range(10)])
    def __len__(self):
        return 10
    def __getitem__(self, key):
        if key == "doc6":
            raise LookupError("record 6 is gone")
        return "a b c"
source = Source()
def mapfn(key, value):
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, sum(values)
"""


def test_a_source_that_raises_fails_the_job_naming_the_key_and_the_error(
    env: dict, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    out = results / "out.tsv"
    port = free_port()
    server = start(
        "server", str(job(tmp_path, BROKEN_SOURCE)),
        "--listen", f"tcp:{port}:interface=127.0.0.1", "-o", str(out), env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    worker = octo("client", f"127.0.0.1:{port}", "-n", "w1", env=env)
    code, _, err = finish(server)
    why = "reading source['doc6'] raised LookupError: record 6 is gone"
    assert code == 1, err
    assert f"octo: job job failed: {why}\n" in err
    # The user's traceback follows, without octotwist's frames.
    assert err.count(why) == 1 and 'job.py", line 9, in __getitem__' in err, err
    assert "octotwist/" not in err, err
    assert worker.returncode == 1
    assert f"the server says the job is over (it failed: {why}); exiting" in worker.stderr
    assert list(results.iterdir()) == []  # no results file, no partial one

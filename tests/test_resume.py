"""
A server killed with C{kill -9} (or stopped) resumes its job when the same
command runs again with the same C{--state-dir} (issue 16): the tasks its
journal holds are not run again, the workers reconnect by themselves, and
the output is exact, written once.

Real processes on 127.0.0.1.  The job writes a line to a file each time its
C{mapfn} or C{reducefn} is called (C{O_APPEND}, so processes do not mix
their lines), and the journal (SQLite) is read to learn what the dead
server had finished: the second run must call neither function on any of
that, and must call them on all the rest.  The kill lands while the job is
known to be in the phase the trial is about: the tasks past a point wait at
a gate file the test creates after the kill, and the test waits until the
journal shows finished tasks of that phase.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    finish,
    free_port,
    gate,
    octo,
    parse_tsv,
    python,
    start,
    wait_for_log,
    wait_for_port,
)
from test_end_to_end import job
from test_service import TWISTD

from octotwist import codec

N = 30
REDUCE_TASKS = 4
#: The reduce task gated in a reduce-phase trial: the partition of "w3".
GATED_WORD = "w3"


def script(tmp_path: Path, phase: str) -> Path:
    """
    The job: C{N} lines of seven words, counted; C{partitionfn} puts C{wK}
    in partition C{K % 4}, so that the test knows each reduce task's words.
    The second half of the map tasks (C{phase} "map"), or the reduce task
    of L{GATED_WORD} ("reduce"), wait for C{tmp_path/gate}.
    """
    calls = tmp_path / "calls"
    waits = {
        "map": ("    if key >= N // 2:\n        _gate()\n", ""),
        "reduce": ("", f"    if key == {GATED_WORD!r}:\n        _gate()\n"),
        "none": ("", ""),
    }[phase]
    text = (
        gate(tmp_path / "gate")
        + f"""
import os, time
N = {N}
source = {{i: " ".join(f"w{{(i * j) % 11}}" for j in range(1, 8)) for i in range(N)}}
reduce_tasks = {REDUCE_TASKS}

def _called(what):
    fd = os.open({str(calls)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (what + "\\n").encode())
    finally:
        os.close(fd)

def mapfn(key, value):
    _called(f"map {{key}}")
    time.sleep(0.03)
{waits[0]}    for w in value.split():
        yield w, 1

def partitionfn(key, n):
    return int(key[1:]) % n

def reducefn(key, values):
    _called(f"reduce {{key}}")
    time.sleep(0.05)
{waits[1]}    return key, len(values)
"""
    )
    return job(tmp_path, text)


EXPECTED = Counter(f"w{(i * j) % 11}" for i in range(N) for j in range(1, 8))


def journaled(state: Path) -> tuple[set[int], set[int]]:
    """
    What the journal in C{state} says is done: the source keys of finished
    map tasks, and the partitions of finished reduce tasks.
    """
    path = state / "journal.sqlite3"
    if not path.exists():
        return set(), set()
    db = sqlite3.connect(path, timeout=10)
    try:
        rows = db.execute(
            "SELECT t.kind, t.ident FROM tasks t JOIN jobs j ON t.job = j.id "
            "WHERE j.state = 'running'"
        ).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return set(), set()
    finally:
        db.close()
    keys: set[int] = set()
    partitions: set[int] = set()
    for kind, ident in rows:
        tag, *rest = codec.unpack(ident)
        if kind == "map":
            assert tag == "keys"
            keys.update(rest[0])
        else:
            assert tag == "reduce" and rest[0] == 0
            partitions.add(rest[1])
    return keys, partitions


def wait_until_journaled(
    state: Path, proc: subprocess.Popen[str], phase: str, timeout: float = 60
) -> tuple[set[int], set[int]]:
    """Wait until the journal holds a finished task of C{phase} (while C{proc} runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited early ({proc.returncode})"
        keys, partitions = journaled(state)
        if keys if phase == "map" else partitions:
            return keys, partitions
        time.sleep(0.05)
    raise AssertionError(f"the journal in {state} never held a finished {phase} task")


def calls(path: Path) -> Counter[str]:
    return Counter(path.read_text().splitlines()) if path.exists() else Counter()


def check_resumed(tmp_path: Path, done: tuple[set[int], set[int]], second: Counter[str]) -> None:
    """
    The second run called nothing the journal held, and everything else:
    C{done} is what the journal held when the first server died.
    """
    keys, partitions = done
    mapped = {int(c.split()[1]) for c in second if c.startswith("map ")}
    reduced = {c.split()[1] for c in second if c.startswith("reduce ")}
    assert not mapped & keys, f"map tasks run again: {sorted(mapped & keys)}"
    assert mapped == set(range(N)) - keys
    words = {w for w in EXPECTED if int(w[1:]) % REDUCE_TASKS not in partitions}
    assert reduced == words, (reduced, partitions)
    assert parse_tsv((tmp_path / "out.tsv").read_text()) == EXPECTED
    assert not list(tmp_path.glob(".out.tsv.*.partial")), "a stale .partial was left"


@pytest.mark.parametrize("phase", ["map", "reduce"])
def test_kill_9_the_server_and_run_the_same_command_again(
    transport: str, env: dict, tmp_path: Path, phase: str
) -> None:
    kill_9_and_resume(transport, env, tmp_path, phase, 0)


@pytest.mark.slow
@pytest.mark.parametrize("trial", [1, 2])
@pytest.mark.parametrize("phase", ["map", "reduce"])
def test_kill_9_the_server_at_other_moments(
    env: dict, tmp_path: Path, phase: str, trial: int
) -> None:
    """More kill times, on one transport: the journal knows none."""
    kill_9_and_resume("tcp", env, tmp_path, phase, trial)


def kill_9_and_resume(transport: str, env: dict, tmp_path: Path, phase: str, trial: int) -> None:
    path = script(tmp_path, phase)
    port, state = free_port(), tmp_path / "state"
    command = [
        "server", str(path), "--transport", transport, "-o", str(tmp_path / "out.tsv"),
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(state),
        "--backup-after", "0",  # no backup copies: each task runs once in each run
    ]  # fmt: skip
    server = start(*command, env=env)
    wait_for_port(port, server)
    worker = start(
        "client", f"127.0.0.1:{port}", "--transport", transport, "-p", "2", "--wait", "120",
        env=env,
    )  # fmt: skip
    wait_until_journaled(state, server, phase)
    time.sleep(random.Random(trial).uniform(0, 0.3))
    server.kill()
    server.wait()
    done = journaled(state)  # what the dead server had finished
    (tmp_path / "calls").rename(tmp_path / "calls.first")
    assert list(tmp_path.glob(".out.tsv.*.partial")), "the dead server's .partial"

    again = start(*command, env=env)
    seen = wait_for_log(again, ["resuming job job"])
    (tmp_path / "gate").touch()
    assert finish(worker)[0] == 0
    code, _, err = finish(again)
    err = seen + err
    assert code == 0, err
    maps, reduces = len(done[0]), len(done[1])
    assert f"{reduces} reduce task" in err, err
    check_resumed(tmp_path, done, calls(tmp_path / "calls"))
    assert maps > 0 if phase == "map" else maps == N


@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_octo_run_resumes_from_its_state_dir(env: dict, tmp_path: Path, how: str) -> None:
    """
    C{octo run --state-dir} killed with C{kill -9}, or stopped with Ctrl-C
    (which says the progress is kept), resumes the same way.
    """
    path = script(tmp_path, "map")
    state, out = tmp_path / "state", tmp_path / "out.tsv"
    command = ["run", str(path), "-w", "2", "-o", str(out), "--state-dir", str(state)]
    first = start(*command, env=env)
    wait_until_journaled(state, first, "map")
    if how == "kill":
        first.kill()
        first.wait()
    else:
        first.send_signal(signal.SIGINT)
        code, _, err = finish(first)
        assert code != 0
        assert "is kept in" in err and "run the same command to resume it" in err, err
        assert not list(tmp_path.glob(".out.tsv.*.partial")), "Ctrl-C takes its .partial back"
    done = journaled(state)
    (tmp_path / "calls").rename(tmp_path / "calls.first")
    (tmp_path / "gate").touch()
    result = octo(*command, env=env)
    assert result.returncode == 0, result.stderr
    assert "resuming job job from" in result.stderr, result.stderr
    check_resumed(tmp_path, done, calls(tmp_path / "calls"))
    # The job is over: a third run is a new job, which runs everything.
    (tmp_path / "calls").unlink()
    result = octo(*command, env=env)
    assert result.returncode == 0 and "resuming" not in result.stderr, result.stderr
    assert sum(1 for c in calls(tmp_path / "calls").elements() if c.startswith("map ")) == N


def test_twistd_stopped_with_sigterm_resumes(env: dict, tmp_path: Path) -> None:
    """SIGTERM is how twistd is stopped: the job's progress stays for the next start."""
    path = script(tmp_path, "map")
    port, state, out = free_port(), tmp_path / "state", tmp_path / "out.tsv"
    command = [
        "--nodaemon", "--pidfile=", "octo", "--script", str(path), "-o", str(out),
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(state),
        "--backup-after", "0",
    ]  # fmt: skip
    server = start(*command, env=env, program=TWISTD, cwd=tmp_path)
    wait_for_port(port, server)
    worker = start("client", f"127.0.0.1:{port}", "-p", "2", "--wait", "120", env=env)
    wait_until_journaled(state, server, "map")
    server.send_signal(signal.SIGTERM)
    code, stdout, err = finish(server)
    assert "run the same command to resume it" in stdout + err, stdout + err
    done = journaled(state)
    (tmp_path / "calls").rename(tmp_path / "calls.first")
    again = start(*command, env=env, program=TWISTD, cwd=tmp_path)
    (tmp_path / "gate").touch()
    assert finish(worker)[0] == 0
    code, stdout, err = finish(again)
    assert code == 0, stdout + err
    assert "resuming job job from" in stdout + err, stdout + err
    check_resumed(tmp_path, done, calls(tmp_path / "calls"))


def interrupted(env: dict, tmp_path: Path) -> tuple[list[str], tuple[set[int], set[int]]]:
    """An C{octo run --state-dir} killed mid-map: its command, and what it finished."""
    path = script(tmp_path, "map")
    state, out = tmp_path / "state", tmp_path / "out.tsv"
    command = ["run", str(path), "-w", "2", "-o", str(out), "--state-dir", str(state)]
    first = start(*command, env=env)
    wait_until_journaled(state, first, "map")
    first.kill()
    first.wait()
    (tmp_path / "calls").rename(tmp_path / "calls.first")
    (tmp_path / "gate").touch()
    return command, journaled(state)


def test_a_damaged_blob_is_dropped_and_its_task_runs_again(env: dict, tmp_path: Path) -> None:
    command, (keys, _) = interrupted(env, tmp_path)
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    ident, name = db.execute(
        "SELECT ident, path FROM blobs WHERE kind = 'map' ORDER BY rowid LIMIT 1"
    ).fetchone()
    db.close()
    damaged = set(codec.unpack(ident)[1])
    blob = tmp_path / "state" / "blobs" / name
    blob.write_bytes(blob.read_bytes()[:-1])  # a torn write
    result = octo(*command, env=env)
    assert result.returncode == 0, result.stderr
    assert "a map task of step 1 runs again" in result.stderr, result.stderr
    assert name in result.stderr, result.stderr
    check_resumed(tmp_path, (keys - damaged, set()), calls(tmp_path / "calls"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_broken_journal_is_set_aside_and_the_job_starts_again(
    env: dict, tmp_path: Path, damage: str
) -> None:
    command, _ = interrupted(env, tmp_path)
    database = tmp_path / "state" / "journal.sqlite3"
    # Fold the write-ahead log in first, so that the damage is to what counts.
    db = sqlite3.connect(database)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = database.read_bytes()
    database.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    result = octo(*command, env=env)
    assert result.returncode == 0, result.stderr
    assert "could not be read" in result.stderr and "broken-" in result.stderr, result.stderr
    assert list((tmp_path / "state").glob("journal.sqlite3.broken-*"))
    check_resumed(tmp_path, (set(), set()), calls(tmp_path / "calls"))


def test_a_second_server_on_one_state_dir_names_the_first(env: dict, tmp_path: Path) -> None:
    path = script(tmp_path, "none")
    state, port = tmp_path / "state", free_port()
    first = start(
        "server", str(path), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--state-dir", str(state), env=env,
    )  # fmt: skip
    wait_for_port(port, first)
    for argv in (
        ["server", str(path), "--listen", f"tcp:{free_port()}:interface=127.0.0.1"],
        ["run", str(path)],
    ):
        result = octo(*argv, "--state-dir", str(state), env=env)
        assert result.returncode != 0
        assert f"in use by another server (pid {first.pid})" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert first.poll() is None  # and the first goes on


def test_a_state_dir_others_may_write_is_refused(env: dict, tmp_path: Path) -> None:
    path = script(tmp_path, "none")
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    result = octo("run", str(path), "--state-dir", str(state), env=env)
    assert result.returncode != 0
    assert str(state) in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "calls").exists()  # refused before anything ran


def test_a_full_state_disk_fails_the_job_naming_the_directory(env: dict, tmp_path: Path) -> None:
    """
    A disk that fills (here: the server's file size limit, which makes a
    write fail as a full disk does) fails the job with the path and the
    reason; the output is not written.
    """
    big = job(
        tmp_path,
        """
        import random
        source = {i: i for i in range(4)}
        def mapfn(key, value):
            yield key, random.Random(key).randbytes(300_000)  # more than the limit, compressed
        def reducefn(key, values):
            return key, len(values[0])
        """,
    )
    import resource

    state, out, port = tmp_path / "state", tmp_path / "out.tsv", free_port()

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    server = subprocess.Popen(
        [sys.executable, "-m", "octotwist", "server", str(big), "-o", str(out),
         "--state-dir", str(state), "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=small_files,
    )  # fmt: skip
    try:
        wait_for_port(port, server)
        worker = start("client", f"127.0.0.1:{port}", env=env)
        code, _, err = finish(server)
        finish(worker)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert code != 0
    assert f"cannot record a finished task in {state}" in err, err
    assert "File too large" in err and "--state-dir" in err, err
    assert not out.exists()


def test_octotwist_run_takes_a_state_dir(tmp_path: Path) -> None:
    """The Python API: the same keyword; and an inline run, which has no server, refuses it."""
    path = script(tmp_path, "none")
    (tmp_path / "gate").touch()
    state = tmp_path / "state"
    result = python(
        f"""
        import octotwist
        from octotwist.errors import UsageError
        result = octotwist.run({str(path)!r}, state_dir={str(state)!r})
        print(dict(result))
        try:
            octotwist.run({str(path)!r}, workers=0, state_dir={str(state)!r})
        except UsageError as e:
            print("refused:", e)
        """
    )
    assert result.returncode == 0, result.stderr
    first, refusal = result.stdout.splitlines()
    assert eval(first) == EXPECTED
    assert refusal.startswith("refused: --state-dir keeps a server's progress"), refusal
    db = sqlite3.connect(state / "journal.sqlite3")
    assert db.execute("SELECT name, state FROM jobs").fetchall() == [("job", "done")]
    assert db.execute("SELECT count(*) FROM blobs").fetchone() == (0,)  # an ended job's go
    db.close()
    assert list((state / "blobs").iterdir()) == []

"""
Workers die, stall, or fail, and the job still finishes with the exact answer
(or fails after exactly --max-attempts attempts, saying where and why).
Real processes on 127.0.0.1; each trial varies its timing.

A fault is injected while the job is known to be in the state the trial is
about (a worker holding tasks, a lease expired), never after a guessed sleep:
gated tasks wait for a file the test creates, and the tests wait for the log
line that says the state was reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    finish,
    free_port,
    gate,
    parse_tsv,
    start,
    wait_for_log,
    wait_for_port,
)
from test_end_to_end import job

from octotwist.testing.harness import tasks_taken_from

N = 24

# Map tasks take a while, and so do reduce tasks, so that a kill can land in
# either phase.  The words and their counts are known in advance.
SLOWISH = f"""
import time
source = {{i: " ".join(f"w{{(i * j) % 11}}" for j in range(1, 8)) for i in range({N})}}
def mapfn(key, value):
    time.sleep(0.08)
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    time.sleep(0.12)
    return key, len(values)
reduce_tasks = 4
"""
EXPECTED = Counter(f"w{(i * j) % 11}" for i in range(N) for j in range(1, 8))

FAST_LEASE = ["--heartbeat", "0.3", "--task-timeout", "2"]

#: The first trial of each repeated fault runs in the quick subset
#: (pytest -m "not slow"); the others vary the timing in the full suite.
TRIALS = [pytest.param(t, marks=[pytest.mark.slow] if t else []) for t in range(5)]


def gated_slowish(tmp_path: Path, phase: str) -> tuple[Path, Path]:
    """
    SLOWISH whose C{phase} tasks (map or reduce) wait for a gate file after
    their work: whoever runs them holds them until the test creates the
    file.  Returns the job script and the gate file (not yet created).
    """
    gate_file = tmp_path / "gate"
    pause = {"map": "    time.sleep(0.08)\n", "reduce": "    time.sleep(0.12)\n"}[phase]
    assert SLOWISH.count(pause) == 1
    text = gate(gate_file) + SLOWISH.replace(pause, pause + "    _gate()\n")
    return job(tmp_path, text), gate_file


def serve(transport: str, env: dict, tmp_path: Path, script: Path, *extra: str):
    port = free_port()
    out = tmp_path / "out.tsv"
    server = start(
        "server", str(script), "--transport", transport, "-o", str(out),
        "--listen", f"tcp:{port}:interface=127.0.0.1", *FAST_LEASE, *extra, env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    return server, port, out


def client(transport: str, env: dict, port: int, *extra: str):
    return start("client", f"127.0.0.1:{port}", "--transport", transport, *extra, env=env)


def wait_for_line(
    proc: subprocess.Popen[str], needle: str, timeout: float = 60, times: int = 1
) -> None:
    """Read C{proc}'s stderr line by line until C{needle} was in C{times} lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if needle in line:
            times -= 1
            if times <= 0:
                return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never saw {needle!r}")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("phase", ["map", "reduce"])
def test_kill_9_a_worker_client(
    transport: str, env: dict, tmp_path: Path, phase: str, trial: int
) -> None:
    script, gate_file = gated_slowish(tmp_path, phase)
    server, port, out = serve(transport, env, tmp_path, script)
    victim = client(transport, env, port, "-p", "2", "-v", "--name", "victim")
    # Both its processes hold a task of this phase, which cannot finish
    # before the gate opens: the kill always takes two running tasks away.
    wait_for_line(victim, f"running {phase} ", times=2)
    # The random delay only moves the kill within those tasks (their work,
    # or their wait at the gate); the assertions hold wherever it lands.
    time.sleep(random.Random(trial).uniform(0, 0.15))
    victim.kill()
    victim.wait()
    gate_file.touch()
    survivor = client(transport, env, port, "-p", "2")
    assert finish(survivor)[0] == 0
    code, _, err = finish(server)
    assert code == 0, err
    # The two it was seen running at least (and any it had been sent ahead).
    assert tasks_taken_from("victim", err) >= 2, err
    assert parse_tsv(out.read_text()) == EXPECTED


@pytest.mark.parametrize(
    "trial", [pytest.param(t, marks=[pytest.mark.slow] if t > 1 else []) for t in range(5)]
)
def test_kill_9_a_task_process(transport: str, env: dict, tmp_path: Path, trial: int) -> None:
    # The process running user code dies: that attempt fails, the task is
    # retried, the worker replaces the process and carries on.  (Trials 0
    # and 1, one per phase, are in the quick subset.)
    phase = ("map", "reduce")[trial % 2]
    script, gate_file = gated_slowish(tmp_path, phase)
    server, port, out = serve(transport, env, tmp_path, script)
    worker = client(transport, env, port, "-p", "2", "-v")
    # Both task processes hold a gated task of this phase: whichever is
    # killed was running one (a process killed while idle would test nothing).
    wait_for_line(worker, f"running {phase} ", times=2)
    # The random delay only moves the kill within that task (its work, or
    # its wait at the gate); the assertions hold wherever it lands.
    time.sleep(random.Random(trial).uniform(0, 0.1))
    processes = children(worker.pid)
    assert len(processes) == 2, processes
    os.kill(processes[trial % 2], signal.SIGKILL)
    gate_file.touch()
    assert finish(worker)[0] == 0
    code, _, err = finish(server)
    assert code == 0, err
    assert "the worker process running the task died (killed by signal 9)" in err
    assert parse_tsv(out.read_text()) == EXPECTED


@pytest.mark.slow  # waits out a 2 s lease
def test_a_stalled_worker_loses_its_tasks_and_its_late_results_do_not_count(
    transport: str, env: dict, tmp_path: Path
) -> None:
    server, port, out = serve(transport, env, tmp_path, job(tmp_path, SLOWISH))
    stalled = client(transport, env, port, "-p", "2", "-v")
    wait_for_line(stalled, "running map ")
    frozen = [stalled.pid, *children(stalled.pid)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    survivor = client(transport, env, port)
    # The job cannot end without the stalled worker's tasks, so the lease
    # runs out first; wait for the server to say so.
    log = wait_for_log(server, ["worker silent for over 2 s"])
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):  # a task process may be gone
            os.kill(pid, signal.SIGCONT)  # its stale results now arrive
    assert finish(survivor)[0] == 0
    code, _, err = finish(server)
    err = log + err
    assert code == 0, err
    assert finish(stalled)[0] == 0
    assert parse_tsv(out.read_text()) == EXPECTED


def test_a_silent_worker_is_said_to_be_silent_and_back(
    transport: str, env: dict, tmp_path: Path
) -> None:
    """
    Frozen for less than its lease, a worker is suspect (logged once, shown
    on the status page) and keeps its tasks; heard again, it is said to be
    back, and the job comes out exact.
    """
    web = free_port()
    held, gate_file = gated_slowish(tmp_path, "map")
    server, port, out = serve(
        transport, env, tmp_path, held, "--task-timeout", "60", "--web", f"tcp:{web}"
    )
    quiet = client(transport, env, port, "-n", "w2", "-p", "1", "-v")
    wait_for_line(quiet, "running map ")  # it holds a task that waits for the gate
    frozen = [quiet.pid, *children(quiet.pid)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    other = client(transport, env, port, "-n", "w1")
    log = wait_for_log(server, ["worker w2 silent for"])
    assert "no new task for it until it is heard from" in log, log
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/status.json", timeout=10) as r:
        workers = {w["name"]: w for w in json.load(r)["workers"]}
    assert workers["w2"]["suspect"] is True and workers["w2"]["running"], workers
    assert "cancelled" not in log  # its tasks keep their lease
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    log += wait_for_log(server, ["worker w2 is back, after"])
    gate_file.touch()
    code, _, err = finish(server)
    log += err
    assert code == 0, log
    assert log.count("worker w2 silent for") == 1, log
    assert parse_tsv(out.read_text()) == EXPECTED
    for worker in (quiet, other):
        assert finish(worker)[0] == 0


def test_a_silent_workers_task_is_copied_at_once_and_the_end_does_not_wait_for_it(
    transport: str, env: dict, tmp_path: Path
) -> None:
    """
    w2 freezes holding a task: once nothing else is left, w1 runs a copy of
    it (not after --backup-after, nor the 60 s lease), and the job ends
    exact while w2 is still frozen; the server drops w2 instead of waiting
    for it to hang up.
    """
    held, gate_file = gated_slowish(tmp_path, "map")
    server, port, out = serve(
        transport, env, tmp_path, held, "--task-timeout", "60", "--backup-after", "600"
    )
    quiet = client(transport, env, port, "-n", "w2", "-p", "1", "-v")
    wait_for_line(quiet, "running map ")  # it holds a task that waits for the gate
    frozen = [quiet.pid, *children(quiet.pid)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        other = client(transport, env, port, "-n", "w1")
        log = wait_for_log(server, ["worker w2 silent for"])
        gate_file.touch()
        log += wait_for_log(server, ["on silent worker w2; running a backup copy on w1"])
        log += wait_for_log(server, ["dropping silent worker w2: the job is over"])
        dropped = time.monotonic()
        code, _, err = finish(server)
        log += err
        assert code == 0, log
        assert time.monotonic() - dropped < 4, "the server waited for the silent worker"
        assert parse_tsv(out.read_text()) == EXPECTED
        assert finish(other)[0] == 0
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        quiet.kill()
        quiet.wait()


@pytest.mark.slow  # waits out the worker's 15 s
def test_a_worker_whose_server_vanished_after_its_work_exits_0_soon(
    env: dict, tmp_path: Path
) -> None:
    """
    No Shutdown reached it (the link went down at the end, or the server
    died): once it worked for the job, it takes the job for over after 15 s,
    not its 120 s --wait, and says why.
    """
    held, gate_file = gated_slowish(tmp_path, "reduce")
    server, port, _ = serve("tcp", env, tmp_path, held)
    worker = client("tcp", env, port, "-p", "2")
    wait_for_line(worker, "done in")  # it finished a task: it worked for the job
    server.kill()
    server.wait()
    started = time.monotonic()
    code, _, err = finish(worker, timeout=60)
    assert code == 0, err
    assert "the server of job job has been gone for 15 s since this worker worked for it" in err
    assert time.monotonic() - started < 40
    gate_file.touch()


BAD_KEY = """
source = {f"doc{i}": f"a b doc{i}" for i in range(6)}
def mapfn(key, value):
    if key == "doc4":
        raise ValueError("doc4 is unreadable")
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
"""


def test_a_failing_map_fails_the_job_after_exactly_max_attempts(
    transport: str, env: dict, tmp_path: Path
) -> None:
    server, port, _ = serve(transport, env, tmp_path, job(tmp_path, BAD_KEY), "--max-attempts", "3")
    # A worker that starts after the job has failed gives up after --wait.
    workers = [client(transport, env, port, "--name", f"w{i}", "--wait", "3") for i in range(2)]
    code, _, err = finish(server)
    assert code == 1
    assert err.count("ValueError: doc4 is unreadable") >= 3
    assert len([line for line in err.splitlines() if "map 4 attempt" in line]) == 3
    assert "map 4 (key 'doc4') failed on worker" in err and "after 3 attempts (on w" in err
    for w in workers:
        assert finish(w)[0] == 1  # told the job failed (or gave up, if it came late)


def test_skip_bad_records_completes_and_names_the_key(
    transport: str, env: dict, tmp_path: Path
) -> None:
    server, port, out = serve(
        transport,
        env,
        tmp_path,
        job(tmp_path, BAD_KEY),
        "--max-attempts",
        "2",
        "--skip-bad-records",
    )
    w = client(transport, env, port, "-p", "2")
    code, _, err = finish(server)
    assert code == 0, err
    assert finish(w)[0] == 0
    assert "skipped map 4 (key 'doc4'): it failed 2 attempts" in err
    expected = Counter(w for i in range(6) if i != 4 for w in ("a", "b", f"doc{i}"))
    assert parse_tsv(out.read_text()) == expected


def test_a_record_that_kills_its_process_is_blamed_after_the_cap(
    transport: str, env: dict, tmp_path: Path
) -> None:
    script = job(
        tmp_path,
        BAD_KEY.replace('raise ValueError("doc4 is unreadable")', "import os; os._exit(1)"),
    )
    server, port, out = serve(
        transport, env, tmp_path, script, "--max-attempts", "3", "--skip-bad-records"
    )
    workers = [client(transport, env, port, "-p", "2") for _ in range(2)]
    code, _, err = finish(server)
    assert code == 0, err
    assert "skipped map 4 (key 'doc4'): it failed 3 attempts" in err
    assert "died (exit code 1)" in err
    for w in workers:  # the workers survived their crashing processes
        assert finish(w)[0] == 0
    expected = Counter(w for i in range(6) if i != 4 for w in ("a", "b", f"doc{i}"))
    assert parse_tsv(out.read_text()) == expected


def test_backup_tasks_overtake_a_slow_worker(transport: str, env: dict, tmp_path: Path) -> None:
    script = job(
        tmp_path,
        """
        import os, time
        source = {i: f"x y{i % 2}" for i in range(6)}  # as backup_source below
        def mapfn(key, value):
            # The slow worker would take a minute per task.
            time.sleep(60 if os.environ.get("SLOW_WORKER") else 0.05)
            for w in value.split():
                yield w, 1
        def reducefn(key, values):
            return key, len(values)
        """,
    )
    server, port, out = serve(transport, env, tmp_path, script, "--backup-after", "0.5")
    slow = client(transport, dict(env, SLOW_WORKER="1"), port, "-v")
    wait_for_line(slow, "running map 0")
    fast = client(transport, env, port)
    code, _, err = finish(server, timeout=40)  # far less than the slow worker's minute
    assert code == 0, err
    assert "map 0 is slow; running a backup copy on" in err
    assert "cancelled map 0 attempt 1" in err
    backup_source = {i: f"x y{i % 2}" for i in range(6)}
    assert parse_tsv(out.read_text()) == Counter(" ".join(backup_source.values()).split())
    assert finish(fast)[0] == 0 and finish(slow)[0] == 0


BLOCKING_SOURCE = """
import time
class Slow(dict):
    def __getitem__(self, key):
        if key == 5:
            time.sleep(3.5)  # blocks the server's reactor past --task-timeout 2
        return dict.__getitem__(self, key)
source = Slow({i: "a b" for i in range(8)})  # as BLOCKING_EXPECTED says
def mapfn(key, value):
    time.sleep(0.3)
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
"""


BLOCKING_EXPECTED = Counter(w for _ in range(8) for w in ("a", "b"))


@pytest.mark.slow  # blocks the server past a 2 s lease
def test_a_blocked_server_does_not_blame_its_workers(
    transport: str, env: dict, tmp_path: Path
) -> None:
    """Heartbeats that sat unread while the server was blocked still count."""
    server, port, out = serve(transport, env, tmp_path, job(tmp_path, BLOCKING_SOURCE))
    worker = client(transport, env, port, "-p", "2")
    code, _, err = finish(server)
    assert code == 0, err
    assert "the server was busy" in err
    assert "worker silent" not in err and "left" not in err
    assert finish(worker)[0] == 0
    assert parse_tsv(out.read_text()) == BLOCKING_EXPECTED

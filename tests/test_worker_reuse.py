"""
Workers that stay across a cluster's jobs keep their task processes (issue
16): the same pids run each job, each job's functions loaded into them in
turn, and nothing of a job (its helper modules, its C{setupfn}'s effect)
leaks into the next.  Real C{octo serve}, C{octo client} and C{octo submit}
processes on 127.0.0.1, and a L{ProcessPool} on a real reactor.

Each job reports the pid of the process that ran it: its C{mapfn} yields
C{os.getpid()} under a key of its own.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import finish, free_port, parse_tsv, start, wait_for_port
from test_cluster import submit
from test_end_to_end import job
from twisted.internet.defer import Deferred

from octotwist import codec
from octotwist.job import JobFunctions, Step
from octotwist.messages import TaskId, TaskKind
from octotwist.worker import Crashed, Finished, Outcome, ProcessPool

#: A job of squares times FACTOR; each record also counts one for its process.
SQUARES = """
import os, time
FACTOR = {factor}
source = {{i: i for i in range(24)}}
def mapfn(key, value):
    time.sleep(0.01)  # (long enough for every process to get some of it)
    yield ("pid", os.getpid()), 1
    yield ("sum", key % 4), value * value * FACTOR
def reducefn(key, values):
    return key, sum(values)
reduce_tasks = 2
"""


def squares(factor: int) -> dict[Any, int]:
    """What SQUARES computes, but its pids: computed here, independently."""
    sums: Counter[Any] = Counter()
    for i in range(24):
        sums["sum", i % 4] += i * i * factor
    return dict(sums)


def split_pids(results: dict[Any, Any]) -> tuple[dict[Any, Any], dict[int, int]]:
    """A job's results, and apart from them the records each process mapped."""
    pids = {key[1]: n for key, n in results.items() if key[0] == "pid"}
    return {key: v for key, v in results.items() if key[0] != "pid"}, pids


def children(parents: set[int]) -> set[int]:
    """The live processes whose parent is one of C{parents} (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat.rpartition(")")[2].split()  # state, ppid, ...
        if fields[0] != "Z" and int(fields[1]) in parents:
            found.add(int(entry.name))
    return found


def cluster(transport: str, env: dict[str, str], cwd: Path, clients: int, processes: int):
    """C{octo serve} (no backup tasks: none is cancelled) and its workers."""
    port = free_port()
    listen = f"tcp:{port}:interface=127.0.0.1"
    server = start(
        "serve", "--transport", transport, "--listen", listen, "--backup-after", "0", env=env
    )
    wait_for_port(port, server)
    address = f"127.0.0.1:{port}"
    workers = [
        start("client", address, "--transport", transport, "-p", str(processes), env=env, cwd=cwd)
        for _ in range(clients)
    ]
    return server, address, workers


def submitted(transport: str, env: dict[str, str], address: str, script: Path) -> dict[Any, Any]:
    result = submit(transport, env, address, str(script))
    assert result.returncode == 0, result.stderr
    return parse_tsv(result.stdout)


def stop(server: subprocess.Popen[str], workers: list[subprocess.Popen[str]]) -> None:
    # (Killed: stopped with SIGINT, octo serve waits 5 s for its workers.)
    for proc in (server, *workers):
        assert proc.poll() is None, finish(proc)
        proc.kill()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_three_jobs_run_in_the_same_task_processes(
    transport: str, env: dict[str, str], tmp_path: Path
) -> None:
    server, address, workers = cluster(transport, env, tmp_path, clients=2, processes=2)
    seen: set[int] = set()
    for factor in (1, 2, 3):
        script = job(tmp_path, SQUARES.format(factor=factor), f"squares{factor}.py")
        results, pids = split_pids(submitted(transport, env, address, script))
        assert results == squares(factor)
        assert sum(pids.values()) == 24, pids  # each record mapped once, by some process
        seen |= set(pids)
    # The processes that ran the three jobs are the workers' task processes
    # of now: none of them was replaced between jobs.
    live = children({w.pid for w in workers})
    assert len(live) == 4, live
    assert seen <= live, (seen, live)
    assert all(w.poll() is None for w in workers)
    stop(server, workers)


def test_each_job_imports_its_own_helper_of_the_same_name(
    env: dict[str, str], tmp_path: Path
) -> None:
    server, address, workers = cluster("tcp", env, tmp_path, clients=1, processes=1)
    ran: list[dict[int, int]] = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "helper.py").write_text(f"TAG = 'helper of {folder}'\n")
        script = job(
            tmp_path / folder,
            """
            import os
            source = {i: i for i in range(5)}
            def mapfn(key, value):
                from helper import TAG  # run on the worker: the shipped helper
                yield ("pid", os.getpid()), 1
                yield ("tag", TAG), 1
            def reducefn(key, values):
                return key, len(values)
            """,
            f"job_{folder}.py",
        )
        results, pids = split_pids(submitted("tcp", env, address, script))
        assert results == {("tag", f"helper of {folder}"): 5}
        ran.append(pids)
    assert ran[0].keys() == ran[1].keys() and len(ran[0]) == 1, ran  # one process, both jobs
    stop(server, workers)


#: setupfn counts its runs in the job's globals (new for each job) and in the
#: process (builtins, which no job's loading undoes).
SETUP = """
import builtins, os
source = {i: i for i in range(6)}
RUNS = 0
def setupfn():
    global RUNS
    RUNS += 1
    builtins.octo_setups = getattr(builtins, "octo_setups", 0) + 1
def mapfn(key, value):
    yield "seen", (os.getpid(), RUNS, builtins.octo_setups)
def reducefn(key, values):
    return key, sorted(set(values))
"""


def test_setupfn_runs_again_for_each_job_in_a_kept_process(
    env: dict[str, str], tmp_path: Path
) -> None:
    server, address, workers = cluster("tcp", env, tmp_path, clients=1, processes=1)
    script = job(tmp_path, SETUP, "setup.py")
    [(pid, runs, setups)] = submitted("tcp", env, address, script)["seen"]
    assert (runs, setups) == (1, 1)
    # The same script again: a new job all the same, set up afresh, in the
    # same process (its second setupfn run), with the job's own globals.
    assert submitted("tcp", env, address, script)["seen"] == [(pid, 1, 2)]
    stop(server, workers)


def _functions(code: str, tag: str) -> bytes:
    """
    JobFunctions of C{code}'s C{mapfn} (a map-only step's) and C{setupfn},
    if any, with C{TAG = tag}, pickled by value.
    """
    namespace: dict[str, Any] = {"__name__": "reuse_job", "TAG": tag}  # no such module
    exec(code, namespace)
    step = Step(namespace["mapfn"])
    return codec.dump_functions(JobFunctions((step,), namespace.get("setupfn")))


#: Yields (its job's TAG, the pid); a key of "hang" hangs.
MAPFN = """
import os, time
def mapfn(key, value):
    if key == "hang":
        time.sleep(60)
    yield TAG, os.getpid()
"""


def _map(pool: ProcessPool, key: Any) -> Deferred[tuple[Outcome, list[Any]]]:
    """Run a map-only task of one item in C{pool}: its outcome and output pairs."""
    outputs: list[bytes] = []
    d, _ = pool.run(
        TaskId(TaskKind.MAP, 0),
        0,
        [codec.pack(([key], [None]))],
        lambda _partition, blob: outputs.append(blob),
    )

    def pairs(outcome: Outcome) -> tuple[Outcome, list[Any]]:
        found: list[Any] = []
        for blob in outputs:
            keys, values = codec.unpack(blob)
            found += zip(keys, values, strict=True)
        return outcome, found

    return d.addCallback(pairs)


@pytest.fixture
def real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_load_keeps_the_processes_and_a_job_that_fails_to_load_is_not_the_last(
    real_reactor: Any,
) -> None:
    pool = ProcessPool(real_reactor, _functions(MAPFN, "first"), 1)
    try:
        done, [(tag, pid)] = await _map(pool, 1)
        assert isinstance(done, Finished) and tag == "first"
        pool.load(b"not the pickle of any functions")
        for key in (2, 3):  # every task of that job says why
            failed, pairs = await _map(pool, key)
            assert isinstance(failed, Crashed) and pairs == []
            assert failed.error.startswith("the job's functions cannot be loaded on this worker")
        pool.load(_functions(MAPFN, "third"))
        done, pairs = await _map(pool, 4)
        assert isinstance(done, Finished) and pairs == [("third", pid)]
        assert pool.pids == [pid] and os.getpid() != pid
    finally:
        await pool.stop()


@pytest_twisted.ensureDeferred
async def test_a_process_that_replaces_a_killed_one_loads_the_current_job(
    real_reactor: Any,
) -> None:
    pool = ProcessPool(real_reactor, _functions(MAPFN, "first"), 1)
    try:
        _, [(_, pid)] = await _map(pool, 1)
        hung = _map(pool, "hang")
        pool.cancel_all()  # the job is over: its task is killed, its process replaced
        pool.load(_functions(MAPFN, "second"))
        (crashed, _), (done, pairs) = await hung, await _map(pool, 2)
        assert isinstance(crashed, Crashed) and "died" in crashed.error
        assert isinstance(done, Finished) and pairs == [("second", pool.pids[0])]
        assert pool.pids[0] != pid and len(pool.pids) == 1
    finally:
        await pool.stop()


#: Each job's setupfn makes a cycle that only its globals reach; mapfn says
#: how many such cycles, of every job so far, are alive.
HOLDS_A_CYCLE = """
import builtins, weakref
class Held:
    pass
def setupfn():
    global HELD
    HELD = Held()
    HELD.cycle, HELD.setupfn = HELD, setupfn  # (setupfn's globals hold HELD)
    builtins.octo_held = [*getattr(builtins, "octo_held", []), weakref.ref(HELD)]
def mapfn(key, value):
    yield TAG, sum(ref() is not None for ref in builtins.octo_held)
"""


@pytest_twisted.ensureDeferred
async def test_a_job_before_is_garbage_collected_when_the_next_loads(
    real_reactor: Any,
) -> None:
    """
    A job's functions are frozen out of the collector (gc.freeze(), for
    speed); the next job unfreezes them, or each job would stay in memory.
    """
    pool = ProcessPool(real_reactor, _functions(HOLDS_A_CYCLE, "job 1"), 1)
    try:
        alive = []
        for n in (1, 2, 3):
            if n > 1:
                pool.load(_functions(HOLDS_A_CYCLE, f"job {n}"))
            done, pairs = await _map(pool, n)
            assert isinstance(done, Finished), done
            alive += pairs
        assert alive == [("job 1", 1), ("job 2", 1), ("job 3", 1)]
    finally:
        await pool.stop()

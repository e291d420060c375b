"""
A cluster's queue outlives its server (issue 16): C{octo serve --state-dir}
keeps each job, its progress and its results in the state directory; killed
with C{kill -9} and started again there, it takes up the jobs that were
queued or running, resuming those that ran.  Real processes on 127.0.0.1;
each result is checked against one computed here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import finish, free_port, octo, parse_tsv, start, wait_for_log, wait_for_port
from test_cluster import WORDS, words
from test_end_to_end import job
from test_service import TWISTD

#: 30 keys, one map task each; keys from 15 on wait for the gate file, and
#: every execution of a map task appends its key to a log, so that the test
#: counts what ran twice.
COUNTED = """
import os, time
GATE, RAN = {gate!r}, {ran!r}
source = {{i: i for i in range(30)}}
def mapfn(key, value):
    with open(RAN, "a") as f:
        f.write(f"{{key}}\\n")
    while key >= 15 and not os.path.exists(GATE):
        time.sleep(0.02)
    yield key % 7, key
def reducefn(key, values):
    return key, sorted(values)
reduce_tasks = 3
"""


def serve(env: dict, port: int, state: Path) -> object:
    server = start(
        "serve", "--listen", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(state), env=env
    )
    wait_for_port(port, server)
    return server


def test_killed_and_started_again_it_resumes_the_running_job_and_the_queue(
    env: dict, tmp_path: Path
) -> None:
    port, state = free_port(), tmp_path / "state-dir"
    address = f"127.0.0.1:{port}"
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    counted = job(tmp_path, COUNTED.format(gate=str(gate), ran=str(ran)), "counted.py")
    queued = job(tmp_path, WORDS.format(mod=6), "after.py")
    server = serve(env, port, state)
    worker = start("client", address, "-p", "2", "--wait", "120", env=env)
    for script in (counted, queued):
        detached = octo("submit", "--detach", "-c", address, str(script), env=env)
        assert detached.returncode == 0, detached.stderr
    # The ungated half is done (and journalled) while the rest waits.
    deadline = time.monotonic() + 60
    while (not ran.exists() or len(set(ran.read_text().split())) < 17) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    time.sleep(1.0)
    server.send_signal(signal.SIGKILL)
    server.wait()
    before = len(ran.read_text().split())
    server = serve(env, port, state)
    seen = wait_for_log(server, ["job 1 (counted) was running when the server stopped: it resumes"])
    assert "job 2 (after) was queued when the server stopped: it is queued again" in seen, seen
    gate.touch()
    seen += wait_for_log(server, ["job after finished"], timeout=120)
    assert "resuming job counted from" in seen, seen
    for number, expected in ((1, None), (2, words(6))):
        fetched = octo("results", str(number), "-c", address, env=env)
        assert fetched.returncode == 0, fetched.stderr
        if expected is None:
            lines = [line.split("\t") for line in fetched.stdout.splitlines()]
            want = {k: sorted(v for v in range(30) if v % 7 == k) for k in range(7)}
            assert {int(k): eval(v) for k, v in lines} == want
        else:
            assert parse_tsv(fetched.stdout) == expected
    executions = len(ran.read_text().split())
    print(f"map executions: {before} before the kill, {executions} in all, for 30 tasks")
    # Each of the 30 map tasks ran; those done before the kill did not run again.
    assert executions < 1.5 * 30, (before, executions)
    listed = octo("jobs", "-c", address, env=env)
    states = [line.split()[:2] for line in listed.stdout.splitlines()[1:]]
    assert states == [["1", "done"], ["2", "done"]], listed.stdout
    # And once more: a server started again lists what is over, and fetches it.
    server.send_signal(signal.SIGINT)
    finish(server)
    server = serve(env, port, state)
    fetched = octo("results", "2", "-c", address, env=env)
    assert fetched.returncode == 0 and parse_tsv(fetched.stdout) == words(6), fetched.stderr
    third = octo("submit", "-c", address, str(job(tmp_path, WORDS.format(mod=4), "c.py")), env=env)
    assert third.returncode == 0 and parse_tsv(third.stdout) == words(4), third.stderr
    assert "job 3 finished" in third.stderr, third.stderr
    server.kill()
    worker.kill()


#: Seven reduce tasks, a key each; reduce tasks of keys from 3 on wait for
#: the gate; every call logs itself.
REDUCED = """
import os, time
GATE, RAN = {gate!r}, {ran!r}
source = {{i: i for i in range(30)}}
def log(what):
    with open(RAN, "a") as f:
        f.write(what + "\\n")
def mapfn(key, value):
    log(f"map {{key}}")
    yield key % 7, key
def partitionfn(key, n):
    return key % n
def reducefn(key, values):
    log(f"reduce {{key}}")
    while key >= 3 and not os.path.exists(GATE):
        time.sleep(0.02)
    return key, sorted(values)
reduce_tasks = 7
"""


def test_killed_mid_reduce_the_finished_reduce_tasks_do_not_run_again(
    env: dict, tmp_path: Path
) -> None:
    port, state = free_port(), tmp_path / "state-dir"
    address = f"127.0.0.1:{port}"
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    script = job(tmp_path, REDUCED.format(gate=str(gate), ran=str(ran)), "reduced.py")
    server = serve(env, port, state)
    worker = start("client", address, "-p", "2", "--wait", "120", env=env)
    assert octo("submit", "--detach", "-c", address, str(script), env=env).returncode == 0
    wait_for_log(server, ["worker "])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        ran.exists() and {"reduce 0", "reduce 1", "reduce 2"} <= set(ran.read_text().splitlines())
    ):
        time.sleep(0.05)
    time.sleep(1.0)  # their outputs journalled
    server.send_signal(signal.SIGKILL)
    server.wait()
    server = serve(env, port, state)
    gate.touch()
    seen = wait_for_log(server, ["job reduced finished"], timeout=120)
    assert "resuming job reduced from" in seen and "and 3 reduce tasks finished" in seen, seen
    fetched = octo("results", "1", "-c", address, env=env)
    assert fetched.returncode == 0, fetched.stderr
    lines = [line.split("\t") for line in fetched.stdout.splitlines()]
    assert {int(k): eval(v) for k, v in lines} == {
        k: sorted(v for v in range(30) if v % 7 == k) for k in range(7)
    }
    calls = ran.read_text().splitlines()
    assert sorted(c for c in calls if c.startswith("map ")) == sorted(
        f"map {k}" for k in range(30)
    ), "a map task ran again"
    for key in range(3):  # done before the kill: not again
        assert calls.count(f"reduce {key}") == 1, calls
    print(f"reduce calls: {sum(c.startswith('reduce ') for c in calls)} for 7 tasks")
    server.kill()
    worker.kill()


def test_a_second_server_on_the_state_dir_refuses_naming_the_first(
    env: dict, tmp_path: Path
) -> None:
    state = tmp_path / "state-dir"
    first = serve(env, free_port(), state)
    listen = f"tcp:{free_port()}:interface=127.0.0.1"
    second = start("serve", "--listen", listen, "--state-dir", str(state), env=env)
    code, _, err = finish(second, timeout=60)
    assert code == 1, err
    assert f"in use by another server (pid {first.pid})" in err, err
    first.kill()


def test_a_lost_script_fails_its_job_alone(env: dict, tmp_path: Path) -> None:
    """A kept job whose file was truncated is failed, saying so; the next one runs."""
    port, state = free_port(), tmp_path / "state-dir"
    address = f"127.0.0.1:{port}"
    server = serve(env, port, state)
    for mod in (3, 5):
        script = job(tmp_path, WORDS.format(mod=mod), f"j{mod}.py")
        assert octo("submit", "--detach", "-c", address, str(script), env=env).returncode == 0
    server.send_signal(signal.SIGKILL)
    server.wait()
    kept = sorted((state / "submitted").iterdir(), key=os.path.getmtime)
    assert len(kept) == 2
    with kept[0].open("r+b") as f:
        f.truncate(10)
    server = serve(env, port, state)
    worker = start("client", address, env=env)
    wait_for_log(server, ["job j5 finished"])
    listed = octo("jobs", "-c", address, env=env)
    lines = listed.stdout.splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [["1", "failed"], ["2", "done"]], lines
    assert "script is lost from the state directory" in lines[0], lines
    fetched = octo("results", "2", "-c", address, env=env)
    assert parse_tsv(fetched.stdout) == words(5)
    server.kill()
    worker.kill()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, for a state directory that fills (it needs root to mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full disk: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_state_disk_fails_that_job_and_the_next_runs(
    env: dict, tmp_path: Path, small_disk: Path
) -> None:
    port, state = free_port(), small_disk / "state"
    address = f"127.0.0.1:{port}"
    server = serve(env, port, state)
    worker = start("client", address, "-p", "2", env=env)
    big = job(
        tmp_path,
        """
        import os
        source = {i: i for i in range(20)}
        def mapfn(key, value):
            yield key, os.urandom(400_000)   # 8 MB of map output, which zstd cannot shrink
        def reducefn(key, values):
            return key, len(values[0])
        """,
        "big.py",
    )
    failed = octo("submit", "-c", address, str(big), env=env)
    assert failed.returncode == 1, failed.stderr
    assert f"cannot record a finished task in {state}: No space left on device" in (
        failed.stderr
    ), failed.stderr
    after = octo("submit", "-c", address, str(job(tmp_path, WORDS.format(mod=5), "ok.py")), env=env)
    assert after.returncode == 0, after.stderr
    assert parse_tsv(after.stdout) == words(5)
    listed = octo("jobs", "-c", address, env=env)
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [
        ["1", "failed"],
        ["2", "done"],
    ]
    server.kill()
    worker.kill()


def test_twistd_octo_without_a_script_is_a_cluster_that_keeps_its_queue(
    env: dict, tmp_path: Path
) -> None:
    """twistd octo with no --script serves a queue, as octo serve; SIGTERM keeps it."""
    port, state = free_port(), tmp_path / "state-dir"
    address = f"127.0.0.1:{port}"
    command = [
        "--nodaemon", "--pidfile=", "octo",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(state),
    ]  # fmt: skip
    server = start(*command, env=env, program=TWISTD, cwd=tmp_path)
    wait_for_port(port, server)
    first = octo(
        "submit", "-c", address, "--detach", str(job(tmp_path, WORDS.format(mod=3))), env=env
    )
    assert first.returncode == 0, first.stderr
    server.send_signal(signal.SIGTERM)
    code, stdout, err = finish(server)
    assert "serving jobs on" in stdout + err, stdout + err
    # Started again: the job that waited (there was no worker) runs now.
    server = start(*command, env=env, program=TWISTD, cwd=tmp_path)
    wait_for_port(port, server)
    worker = start("client", address, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fetched = octo("results", "1", "-c", address, env=env)
        if fetched.returncode == 0:
            break
        time.sleep(0.2)
    assert fetched.returncode == 0, fetched.stderr
    assert parse_tsv(fetched.stdout) == words(3)
    server.send_signal(signal.SIGTERM)
    finish(server)
    worker.kill()
    # A job's own options make no sense without a job.
    refused = start(
        "--nodaemon", "--pidfile=", "octo", "-o", "x.tsv", env=env, program=TWISTD, cwd=tmp_path
    )
    code, stdout, err = finish(refused)
    assert code == 2 and "--output without a script" in stdout + err, stdout + err


def test_a_job_sent_from_python_is_kept_and_fetched_as_text(env: dict, tmp_path: Path) -> None:
    """octotwist.Cluster's pickled job survives a kill -9; octo results writes it as TSV."""
    port, state = free_port(), tmp_path / "state-dir"
    address = f"127.0.0.1:{port}"
    server = serve(env, port, state)
    submitter = start(
        "-c",
        f"""
import octotwist
job = octotwist.Job(source={{i: i for i in range(20)}}, reduce_tasks=2,
                    mapfn=lambda k, v: [(v % 3, (v, str(v)))],
                    reducefn=lambda k, vs: (k, sorted(vs)))
octotwist.Cluster({address!r}).run(job)
""",
        env=env,
        program=sys.executable,
    )
    seen = wait_for_log(server, ["job 1 (job) submitted"])
    server.send_signal(signal.SIGKILL)  # no worker yet: it was queued, now it is kept
    server.wait()
    code, _, err = finish(submitter)
    assert code == 1 and "ConnectionError: lost the connection" in err, err
    server = serve(env, port, state)
    worker = start("client", address, env=env)
    seen += wait_for_log(server, ["job job finished"])
    assert "job 1 (job) was " in seen and "when the server stopped" in seen, seen
    fetched = octo("results", "1", "-c", address, env=env)
    assert fetched.returncode == 0, fetched.stderr
    expected = {k: sorted((v, str(v)) for v in range(20) if v % 3 == k) for k in range(3)}
    got = {
        int(k): [tuple(p) for p in eval(v)]
        for k, v in (line.split("\t") for line in fetched.stdout.splitlines())
    }
    assert got == expected
    server.kill()
    worker.kill()

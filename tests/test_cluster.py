"""
A cluster that stays (issue 16, part 1): C{octo serve} with workers that
stay across jobs, and C{octo submit}, whose results are exactly those of
C{octo run}.  Real processes on 127.0.0.1, over every transport.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path

from conftest import (
    EXAMPLES,
    finish,
    free_port,
    gate,
    octo,
    parse_tsv,
    start,
    wait_for_log,
    wait_for_port,
)
from test_end_to_end import job

WORDS = """
source = {{i: " ".join(f"w{{(i * j) % {mod}}}" for j in range(1, 8)) for i in range(30)}}
def mapfn(key, value):
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
reduce_tasks = 3
"""


def words(mod: int) -> Counter[str]:
    return Counter(f"w{(i * j) % mod}" for i in range(30) for j in range(1, 8))


def held_job(tmp_path: Path) -> tuple[Path, Path]:
    """WORDS (mod 5), whose map tasks wait for the gate file (returned, not yet made)."""
    gate_file = tmp_path / "gate"
    text = gate(gate_file) + WORDS.format(mod=5).replace(
        "    for w in", "    _gate()\n    for w in"
    )
    return job(tmp_path, text, "held.py"), gate_file


def serve(transport: str, env: dict):
    port = free_port()
    server = start(
        "serve", "--transport", transport, "--listen", f"tcp:{port}:interface=127.0.0.1", env=env
    )
    wait_for_port(port, server)
    return server, f"127.0.0.1:{port}"


def submit(transport: str, env: dict, address: str, *args: str):
    return octo("submit", "--transport", transport, "-c", address, *args, env=env)


def test_jobs_run_in_order_on_workers_that_stay(transport: str, env: dict, tmp_path: Path) -> None:
    server, address = serve(transport, env)
    worker = start("client", address, "--transport", transport, "-p", "2", env=env)
    first, second = (
        job(tmp_path, WORDS.format(mod=11), "a.py"),
        job(tmp_path, WORDS.format(mod=7), "b.py"),
    )
    out = tmp_path / "a.tsv"
    result = submit(transport, env, address, str(first), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert parse_tsv(out.read_text()) == words(11)
    assert result.stdout == ""
    # The same worker process serves the next job, on standard output.
    assert worker.poll() is None
    result = submit(transport, env, address, str(second))
    assert result.returncode == 0, result.stderr
    assert parse_tsv(result.stdout) == words(7)
    assert "job 2 finished: 7 results" in result.stderr, result.stderr
    server.send_signal(signal.SIGINT)
    _, _, log = finish(server)
    assert log.count("worker ") >= 2 and "job 1 (a) submitted" in log and "job 2 (b)" in log, log
    worker.kill()


def test_jobs_submitted_together_queue_and_all_come_out_exact(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    held, gate_file = held_job(tmp_path)
    first = start("submit", "-c", address, str(held), env=env)
    wait_for_log(server, ["job 1 (held) submitted"])
    others, seen = [], ""
    for n, mod in enumerate((3, 4), start=2):
        script = str(job(tmp_path, WORDS.format(mod=mod), f"m{mod}.py"))
        others.append(start("submit", "-c", address, script, env=env))
        seen += wait_for_log(server, [f"job {n} (m{mod}) submitted from"])
    assert "1 ahead of it" in seen and "2 ahead of it" in seen, seen
    worker = start("client", address, "-p", "2", env=env)
    gate_file.touch()
    for proc, mod in zip([first, *others], (5, 3, 4), strict=True):
        code, out, err = finish(proc)
        assert code == 0, err
        assert parse_tsv(out) == words(mod)
    server.send_signal(signal.SIGINT)
    _, _, log = finish(server)
    log = seen + log
    # In the order submitted: each job starts after the one before it finished.
    order = [log.index(f"job {name}: ") for name in ("held", "m3", "m4")]
    assert order == sorted(order), log
    worker.kill()


def test_final_prints_reach_the_submitter_as_octo_run_prints_them(
    env: dict, tmp_path: Path
) -> None:
    server, address = serve("tcp", env)
    worker = start("client", address, "-p", "2", env=env)
    script = str(EXAMPLES / "wordcount.py")  # final() prints "word count"
    submitted = submit("tcp", env, address, script)
    assert submitted.returncode == 0, submitted.stderr
    ran = octo("run", script, "-q", env=env)
    assert ran.returncode == 0, ran.stderr
    assert submitted.stdout == ran.stdout and len(submitted.stdout.splitlines()) > 30_000
    server.kill()
    worker.kill()


def test_a_failing_job_fails_alone_and_the_next_runs(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    worker = start("client", address, "-p", "2", env=env)
    bad = job(
        tmp_path,
        """
        source = {1: 1, 2: 2}
        def mapfn(key, value):
            raise ValueError(f"record {key} is bad")
        def reducefn(key, values):
            return key, values
        """,
        "bad.py",
    )
    out = tmp_path / "out.tsv"
    out.write_text("previous\t1\n")
    result = submit("tcp", env, address, str(bad), "-o", str(out))
    assert result.returncode == 1
    assert "job 1 failed" in result.stderr and "ValueError: record" in result.stderr
    assert out.read_text() == "previous\t1\n"  # left as it was
    assert not list(tmp_path.glob(".out.tsv.*"))
    result = submit("tcp", env, address, str(job(tmp_path, WORDS.format(mod=9), "ok.py")))
    assert result.returncode == 0, result.stderr
    assert parse_tsv(result.stdout) == words(9)
    assert worker.poll() is None
    server.kill()
    worker.kill()


def test_a_broken_script_is_refused_with_octo_runs_message(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    broken = job(tmp_path, "source = {1: 1}\ndef mapfn(k, v):\n    yield k, v\n", "broken.py")
    result = submit("tcp", env, address, str(broken))
    ran = octo("run", str(broken), env=env)
    assert result.returncode == ran.returncode == 2
    assert result.stderr.splitlines()[-1] == ran.stderr.splitlines()[-1], (result, ran)
    assert "does not define reducefn" in result.stderr
    # Nothing was queued: the next job is the next to run.
    worker = start("client", address, env=env)
    result = submit("tcp", env, address, str(job(tmp_path, WORDS.format(mod=2), "ok.py")))
    assert result.returncode == 0 and parse_tsv(result.stdout) == words(2), result.stderr
    server.kill()
    worker.kill()


def test_a_submitter_that_goes_away_does_not_stop_its_job(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    held, gate_file = held_job(tmp_path)
    worker = start("client", address, "-p", "2", env=env)
    gone = start("submit", "-c", address, str(held), env=env)
    wait_for_log(gone, ["job 1 is running"])
    gone.kill()
    gone.wait()
    gate_file.touch()
    result = submit("tcp", env, address, str(job(tmp_path, WORDS.format(mod=6), "next.py")))
    assert result.returncode == 0 and parse_tsv(result.stdout) == words(6), result.stderr
    server.send_signal(signal.SIGINT)
    _, _, log = finish(server)
    assert "job held finished: 5 results" in log, log
    worker.kill()


def test_the_wrong_secret_and_the_wrong_server_are_refused(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    script = str(job(tmp_path, WORDS.format(mod=3)))
    wrong = submit("tcp", dict(env, OCTO_SECRET="not-the-secret-0123456789"), address, script)
    assert wrong.returncode == 1 and "secret" in wrong.stderr, wrong.stderr
    server.kill()
    port = free_port()
    one_job = start("server", script, "--listen", f"tcp:{port}:interface=127.0.0.1", env=env)
    wait_for_port(port, one_job)
    result = submit("tcp", env, f"127.0.0.1:{port}", script)
    assert result.returncode == 1
    assert "serves one job" in result.stderr and "octo serve" in result.stderr, result.stderr
    one_job.kill()


def test_octo_jobs_lists_them_and_octo_cancel_ends_one(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    held, gate_file = held_job(tmp_path)
    running = start("submit", "-c", address, str(held), env=env)
    wait_for_log(server, ["job 1 (held) submitted"])
    queued = start(
        "submit", "-c", address, str(job(tmp_path, WORDS.format(mod=4), "q.py")), env=env
    )
    wait_for_log(server, ["job 2 (q) submitted"])
    listed = octo("jobs", "-c", address, env=env)
    assert listed.returncode == 0, listed.stderr
    states = [line.split()[:2] for line in listed.stdout.splitlines()[1:]]
    assert states == [["1", "running"], ["2", "queued"]], listed.stdout
    for number, proc in ((2, queued), (1, running)):
        cancelled = octo("cancel", str(number), "-c", address, env=env)
        assert cancelled.returncode == 0, cancelled.stderr
        code, out, err = finish(proc)
        assert code == 1 and out == "", err
        assert f"job {number} failed: the job was cancelled by octo cancel" in err, err
    unknown = octo("cancel", "9", "-c", address, env=env)
    assert unknown.returncode == 2 and "there is no job 9" in unknown.stderr
    listed = octo("jobs", "-c", address, env=env)
    states = [line.split()[:2] for line in listed.stdout.splitlines()[1:]]
    assert states == [["1", "cancelled"], ["2", "cancelled"]], listed.stdout
    # The cluster goes on: the next job runs, on a worker that joins now.
    gate_file.touch()
    worker = start("client", address, env=env)
    result = submit("tcp", env, address, str(job(tmp_path, WORDS.format(mod=8), "after.py")))
    assert result.returncode == 0 and parse_tsv(result.stdout) == words(8), result.stderr
    listed = octo("jobs", "-c", address, env=env)
    assert listed.stdout.splitlines()[-1].split()[:2] == ["3", "done"], listed.stdout
    server.kill()
    worker.kill()


def test_submit_detach_and_octo_results(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    held, gate_file = held_job(tmp_path)
    detached = octo("submit", "--detach", "-c", address, str(held), env=env)
    assert detached.returncode == 0, detached.stderr
    assert detached.stdout == "1\n" and "octo results 1" in detached.stderr
    early = octo("results", "1", "-c", address, env=env)
    assert early.returncode == 2 and "job 1 is running" in early.stderr, early.stderr
    worker = start("client", address, "-p", "2", env=env)
    gate_file.touch()
    wait_for_log(server, ["job held finished"])
    out = tmp_path / "fetched.tsv"
    fetched = octo("results", "1", "-c", address, "-o", str(out), env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert parse_tsv(out.read_text()) == words(5)
    again = octo("results", "1", "-c", address, env=env)  # as often as asked
    assert again.returncode == 0 and parse_tsv(again.stdout) == words(5)
    assert out.read_text() == again.stdout
    server.kill()
    worker.kill()


def test_each_job_loaded_by_the_server_imports_its_own_helper(env: dict, tmp_path: Path) -> None:
    """Two scripts whose top-level `import helper` names different files: each gets its own."""
    server, address = serve("tcp", env)
    worker = start("client", address, env=env)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "helper.py").write_text(f"TAG = 'tag-{folder}'\n")
        script = job(
            tmp_path / folder,
            """
            import helper
            source = {1: "x"}
            def mapfn(key, value):
                yield helper.TAG, 1          # on the worker
            def reducefn(key, values):
                return key, len(values)
            def final(key, value):
                print(key, value, helper.TAG)  # on the server
            """,
            f"job_{folder}.py",
        )
        result = submit("tcp", env, address, str(script))
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"tag-{folder} 1 tag-{folder}\n"
    server.kill()
    worker.kill()


def on_a_terminal(args: list[str], env: dict) -> tuple[int, str, str]:
    """Run C{octo ARGS} with its stderr on a pseudo-terminal (120 columns): code, out, terminal."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "octotwist", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    screen: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                return
            if not data:
                return
            screen.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=120)
    reader.join(10)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(screen).decode(errors="replace")


def test_octo_submit_draws_progress_bars_on_a_terminal(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    worker = start("client", address, "-p", "2", env=env)
    slow = job(
        tmp_path,
        WORDS.format(mod=5).replace(
            "    for w in", "    import time; time.sleep(0.05)\n    for w in"
        ),
        "slow.py",
    )
    code, out, screen = on_a_terminal(["submit", "-c", address, str(slow)], env)
    assert code == 0, screen
    assert parse_tsv(out) == words(5)
    assert "\x1b[" in screen  # drawn, in place: control sequences
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    # The last frame is where the job ended: every task done.
    assert "30/30" in plain.rsplit("map ", 1)[-1].splitlines()[0], plain
    assert "3/3" in plain.rsplit("reduce ", 1)[-1].splitlines()[0], plain
    # Not on a pipe: plain log lines only.
    piped = submit("tcp", env, address, str(slow))
    assert piped.returncode == 0 and "\x1b[" not in piped.stderr and "30/30" not in piped.stderr
    server.kill()
    worker.kill()

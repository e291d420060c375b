"""
C{octo run --hosts} and C{octo serve --hosts} against real OpenSSH servers
(L{openssh}): one sshd on 127.0.0.1 and one on 127.0.0.2, keys generated
here, the OpenSSH client with a configuration that knows them.

Every "host" is this machine, so what runs on a host is what descends from
its sshd: the tests check that nothing does once a job is over or
interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BOOKS,
    descendants,
    finish,
    gate,
    octo,
    parents,
    parse_spaced,
    python,
    start,
    wait_for_log,
    word_count,
)
from openssh import Hosts, start_hosts

EXPECTED_SCRIPT = "examples/wordcount.py"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    running = start_hosts(tmp_path_factory.mktemp("hosts"), ["127.0.0.1", "127.0.0.2"])
    yield running
    running.stop()


def on_host(pid: int) -> set[int]:
    """The live processes descending from C{pid} (a host's sshd)."""
    return descendants(pid)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _settle(hosts: Hosts, timeout: float = 15) -> dict[str, set[str]]:
    """
    What is left on each host once it had C{timeout} seconds to end: each
    process as its pid and command line, for a failure to show.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = {h.name: on_host(h.process.pid) for h in hosts.hosts}
        if not any(left.values()) or time.monotonic() > deadline:
            return {
                name: {f"{p} {_cmdline(p).strip()}" for p in pids if _alive(p)}
                for name, pids in left.items()
            }
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def _clean_hosts(hosts: Hosts) -> Iterator[None]:
    """
    Kill what a test left on the hosts (it failed), so that the tests
    after it, which check that nothing is left, test only themselves.
    """
    yield
    for pid in {p for h in hosts.hosts for p in on_host(h.process.pid)}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _gated_wordcount(tmp_path: Path) -> tuple[Path, Path]:
    """
    The seed's word count, whose map tasks wait for a file the test creates
    (C{gate}); each first leaves a mark saying on which host it runs (the
    address its worker's SSH connection came to: C{ran-127.0.0.2}).
    """
    opened = tmp_path / "gate"
    script = tmp_path / "gated.py"
    seed = (ROOT / EXPECTED_SCRIPT).read_text()
    script.write_text(
        seed.replace("def mapfn(key, value):", "def _mapfn(key, value):")
        + "\n"
        + gate(opened)
        + "def mapfn(key, value):\n"
        + "    host = _gate_os.environ.get('SSH_CONNECTION', '? ? here ?').split()[2]\n"
        + f"    open(_gate_os.path.join({str(tmp_path)!r}, 'ran-' + host), 'w').close()\n"
        + "    _gate()\n"
        + "    yield from _mapfn(key, value)\n"
    )
    (tmp_path / "books").symlink_to(BOOKS)
    return script, opened


def _run_on_both(
    hosts: Hosts, script: Path, env: dict[str, str], cwd: Path
) -> subprocess.Popen[str]:
    """C{octo run SCRIPT} with a worker on each host, in the background."""
    names = ",".join(h.name for h in hosts.hosts)
    ssh = hosts.ssh_command()
    return start(
        "run", str(script), "--hosts", names, "--remote-python", sys.executable,
        "--ssh-command", ssh, env=env, cwd=cwd,
    )  # fmt: skip


def _wait_for_marks(tmp_path: Path, hosts: Hosts, timeout: float = 60) -> None:
    """Until a map task runs on every host (see L{_gated_wordcount})."""
    deadline = time.monotonic() + timeout
    marks = [tmp_path / f"ran-{h.address}" for h in hosts.hosts]
    while not all(m.exists() for m in marks):
        assert time.monotonic() < deadline, f"no task ran on {[m for m in marks if not m.exists()]}"
        time.sleep(0.05)


def test_the_word_count_runs_on_two_hosts(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    Both hosts get a worker that does tasks (the map tasks wait until both
    joined), one found as C{octo} on its PATH, one as C{PYTHON -m octotwist}
    from a host file; the counts are exact, and nothing is left running.
    """
    script, opened = _gated_wordcount(tmp_path)
    a, b = hosts.hosts
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(
        f"# the test's two hosts\n{a.name}   processes=2\n\n"
        f"{b.name} processes=1 python={sys.executable}\n"
    )
    proc = start(
        "run",
        str(script),
        "--hostfile",
        str(hostfile),
        "--ssh-command",
        hosts.ssh_command(),
        "-v",
        env=env,
        cwd=tmp_path,
    )
    seen = wait_for_log(proc, [f"worker {a.name} joined", f"worker {b.name} joined"], timeout=60)
    assert f"host {a.name}: starting a worker of 2 processes" in seen
    assert f"host {b.name}: starting a worker of 1 process," in seen
    _wait_for_marks(tmp_path, hosts)  # both hosts run map tasks
    opened.touch()
    code, out, err = finish(proc)
    err = seen + err
    assert code == 0, err
    assert parse_spaced(out) == word_count(sorted(BOOKS.glob("*.txt")))
    assert not (tmp_path / "ran-here").exists()  # no task ran outside the hosts
    assert _settle(hosts) == {a.name: set(), b.name: set()}


def test_octotwist_run_takes_hosts(hosts: Hosts, env: dict[str, str]) -> None:
    """The API's run(hosts=...) is octo run --hosts: exact, and nothing left behind."""
    a, b = hosts.hosts
    done = python(
        f"""
        import json, octotwist
        from pathlib import Path
        from octotwist.hosts import parse_hosts
        from octotwist.launcher import LaunchConfig

        hosts = LaunchConfig.from_command(
            parse_hosts({a.name + "," + b.name!r}),
            {hosts.ssh_command()!r},
            remote_python={sys.executable!r},
        )
        def mapfn(path, _):
            for word in open(path, encoding="utf-8").read().split():
                yield word.lower(), 1

        def reducefn(word, counts):
            return word, sum(counts)

        books = {{str(p): None for p in sorted(Path({str(BOOKS)!r}).glob("*.txt"))}}
        job = octotwist.Job(source=books, mapfn=mapfn, reducefn=reducefn)
        print(json.dumps(octotwist.run(job, hosts=hosts)))
        """,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == word_count(sorted(BOOKS.glob("*.txt")))
    assert _settle(hosts) == {a.name: set(), b.name: set()}


def test_the_secret_is_on_no_command_line_and_in_no_environment(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    octo serve --hosts with a secret of its own: while the workers run, no
    process on the machine shows it in its command line or environment; a
    job submitted runs on both hosts; stopping the server leaves nothing.
    """
    secret_file = tmp_path / "secret"
    assert octo("secret", "-o", str(secret_file), env=env).returncode == 0
    secret = secret_file.read_text().strip()
    a, b = hosts.hosts
    port = _port()
    serve = start(
        "serve",
        "--no-state-dir",
        "--secret-file",
        str(secret_file),
        "--listen",
        f"tcp:{port}",
        "--hosts",
        f"{a.name},{b.name}",
        "--remote-python",
        sys.executable,
        "--ssh-command",
        hosts.ssh_command(),
        env=env,
    )
    seen = wait_for_log(serve, [f"worker {a.name} is here", f"worker {b.name} is here"])
    workers = on_host(a.process.pid) | on_host(b.process.pid)
    assert any("--stdin" in _cmdline(p) for p in workers), [_cmdline(p) for p in workers]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for what in ("cmdline", "environ"):
                try:
                    text = Path(f"/proc/{pid}/{what}").read_bytes()
                except OSError:
                    continue
                assert secret.encode() not in text, f"process {pid}'s {what} holds the secret"
    submitted = octo(
        "submit",
        EXPECTED_SCRIPT,
        "-c",
        f"127.0.0.1:{port}",
        "--secret-file",
        str(secret_file),
        env=env,
        cwd=ROOT,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert parse_spaced(submitted.stdout) == word_count(sorted(BOOKS.glob("*.txt")))
    serve.send_signal(signal.SIGINT)
    code, _, err = finish(serve)
    assert code == 1, err  # (a server stopped)
    assert "Traceback" not in seen + err
    assert _settle(hosts) == {a.name: set(), b.name: set()}


def _port() -> int:
    from conftest import free_port

    return free_port()


@pytest.mark.slow
def test_ctrl_c_leaves_no_process_on_any_host(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    Interrupted while both hosts' task processes are busy: octo run exits
    1, and every process it had started on either host (the workers and
    their task processes) is gone.
    """
    script, _ = _gated_wordcount(tmp_path)  # never opened
    a, b = hosts.hosts
    proc = _run_on_both(hosts, script, env, tmp_path)
    wait_for_log(proc, [f"worker {a.name} joined", f"worker {b.name} joined"])
    _wait_for_marks(tmp_path, hosts)  # task processes busy in mapfn on both
    running = on_host(a.process.pid) | on_host(b.process.pid)
    tasks = [p for p in running if "octotwist._child" in _cmdline(p)]
    assert len(tasks) >= 2, [_cmdline(p) for p in running]
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, timeout=60)
    assert code == 1, err
    assert "interrupted" in err
    assert _settle(hosts) == {a.name: set(), b.name: set()}
    assert [p for p in running if _alive(p)] == []


@pytest.mark.slow
def test_a_launcher_killed_outright_leaves_nothing_on_its_hosts(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    octo run killed with SIGKILL (no chance to stop anything): each
    worker's lifeline, its SSH session's standard input, closes, and the
    workers stop by themselves, with their task processes.
    """
    script, _ = _gated_wordcount(tmp_path)  # never opened
    a, b = hosts.hosts
    proc = _run_on_both(hosts, script, env, tmp_path)
    wait_for_log(proc, [f"worker {a.name} joined", f"worker {b.name} joined"])
    _wait_for_marks(tmp_path, hosts)
    running = on_host(a.process.pid) | on_host(b.process.pid)
    proc.kill()
    proc.wait()
    assert _settle(hosts) == {a.name: set(), b.name: set()}
    assert [p for p in running if _alive(p)] == []


@pytest.mark.slow
def test_a_worker_whose_ssh_session_breaks_stops(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    The ssh process of one host killed: its session closes, and with it the
    worker's standard input, so that worker stops at once, although it still
    reaches the server (nothing could stop it later); the job finishes on
    the other host, exactly.
    """
    script, opened = _gated_wordcount(tmp_path)
    a, b = hosts.hosts
    proc = _run_on_both(hosts, script, env, tmp_path)
    seen = wait_for_log(proc, [f"worker {a.name} joined", f"worker {b.name} joined"])
    _wait_for_marks(tmp_path, hosts)
    on_b = on_host(b.process.pid)
    ssh = next(
        p
        for p, parent in parents().items()
        if parent == proc.pid and f"-p {b.port} -- {b.address}" in _cmdline(p)
    )
    os.kill(ssh, signal.SIGKILL)
    seen += wait_for_log(proc, [f"worker {b.name} left"], timeout=30)
    assert _settle(hosts, timeout=10)[b.name] == set()
    assert [p for p in on_b if _alive(p)] == []
    opened.touch()
    code, out, err = finish(proc)
    assert code == 0, seen + err
    assert parse_spaced(out) == word_count(sorted(BOOKS.glob("*.txt")))
    assert _settle(hosts) == {a.name: set(), b.name: set()}


@pytest.mark.slow
def test_a_host_lost_mid_job_has_its_tasks_run_again(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """Killing one host's worker (its sshd's child) mid-job: the other finishes, exactly."""
    script, opened = _gated_wordcount(tmp_path)
    a, b = hosts.hosts
    proc = _run_on_both(hosts, script, env, tmp_path)
    seen = wait_for_log(proc, [f"worker {a.name} joined", f"worker {b.name} joined"])
    worker = next(
        p for p in on_host(b.process.pid) if " client " in _cmdline(p) and "--stdin" in _cmdline(p)
    )
    os.kill(worker, signal.SIGKILL)
    seen += wait_for_log(proc, [f"host {b.name}: its worker ended"])
    opened.touch()
    code, out, err = finish(proc)
    err = seen + err
    assert code == 0, err
    assert parse_spaced(out) == word_count(sorted(BOOKS.glob("*.txt")))
    assert "it was killed, or its SSH connection was lost" in err
    assert _settle(hosts) == {a.name: set(), b.name: set()}  # its task processes too


def test_a_host_slow_to_answer_holds_up_no_other(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    A "host" that takes connections and never says a word: the job runs
    on the other one, started as soon as its own check passed, and ends
    long before the silent one's check would time out (30 s).
    """
    a, _ = hosts.hosts
    with socket.socket() as silent:
        silent.bind(("127.0.0.3", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        done = octo(
            "run", EXPECTED_SCRIPT, "--hosts", f"{a.name},127.0.0.3:{port}",
            "--remote-python", sys.executable, "--ssh-command", hosts.ssh_command(),
            env=env, cwd=ROOT,
        )  # fmt: skip
        took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert parse_spaced(done.stdout) == word_count(sorted(BOOKS.glob("*.txt")))
    assert "checking 2 hosts over SSH" in done.stderr
    assert took < 25, done.stderr
    assert _settle(hosts)[a.name] == set()


def _conch_home(hosts: Hosts, env: dict[str, str], tmp_path: Path, known: list) -> dict[str, str]:
    """A home whose ~/.ssh holds the test's key and the host keys of C{known}."""
    dot_ssh = tmp_path / "home" / ".ssh"
    dot_ssh.mkdir(parents=True)
    (dot_ssh / "id_ed25519").write_bytes(hosts.user_key.read_bytes())
    (dot_ssh / "id_ed25519").chmod(0o600)
    (dot_ssh / "known_hosts").write_text("".join(h.known_hosts_line() for h in known))
    conch_env = {**env, "HOME": str(tmp_path / "home")}
    conch_env.pop("SSH_AUTH_SOCK", None)
    return conch_env


def test_hosts_are_reached_with_conch_where_there_is_no_ssh(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    --ssh-command conch (what a machine without an ssh program gets): the
    key in ~/.ssh, the host keys checked against ~/.ssh/known_hosts (read,
    never written), a host whose key is not there refused with its
    fingerprint; the job exact on the other, and nothing left behind.
    """
    a, b = hosts.hosts
    conch_env = _conch_home(hosts, env, tmp_path, known=[a])
    known_hosts = tmp_path / "home" / ".ssh" / "known_hosts"
    before = known_hosts.read_text()
    done = octo(
        "run", EXPECTED_SCRIPT, "--hosts", f"{a.name},{b.name}", "--remote-python",
        sys.executable, "--ssh-command", "conch", env=conch_env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert parse_spaced(done.stdout) == word_count(sorted(BOOKS.glob("*.txt")))
    assert f"worker {a.name} joined" in done.stderr
    refusal = next(line for line in done.stderr.splitlines() if f"host {b.name} cannot" in line)
    assert b.fingerprint() in refusal and "not in known_hosts" in refusal
    assert known_hosts.read_text() == before
    assert _settle(hosts) == {a.name: set(), b.name: set()}


def test_an_unknown_host_key_is_refused_with_its_fingerprint(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    A host whose key is not in known_hosts is left out, naming the key's
    fingerprint and what to do; the job runs on the other, exactly. With
    --require-all-hosts, the job fails instead, and runs nothing.
    """
    a, b = hosts.hosts
    ssh = hosts.ssh_command(known=[a], name="knows_only_a")
    args = ("run", EXPECTED_SCRIPT, "--hosts", f"{a.name},{b.name}")
    args += ("--remote-python", sys.executable, "--ssh-command", ssh)
    done = octo(*args, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert parse_spaced(done.stdout) == word_count(sorted(BOOKS.glob("*.txt")))
    refusal = next(line for line in done.stderr.splitlines() if f"host {b.name} cannot" in line)
    assert b.fingerprint() in refusal
    assert "not in known_hosts" in refusal and "answer yes" in refusal
    assert f"worker {b.name} joined" not in done.stderr

    failed = octo(*args, "--require-all-hosts", env=env, cwd=ROOT)
    assert failed.returncode == 1, failed.stderr
    assert "1 host of 2 cannot work for it" in failed.stderr
    assert "--require-all-hosts" in failed.stderr
    assert failed.stdout == ""
    assert _settle(hosts) == {a.name: set(), b.name: set()}


def test_a_host_without_octotwist_or_of_another_version_is_named(
    hosts: Hosts, env: dict[str, str], tmp_path: Path
) -> None:
    """
    A host whose Python lacks octotwist, and one whose octotwist is of
    another release: each is named with why (both versions for the
    second), and the job fails when no host is left.
    """
    a, b = hosts.hosts
    bare = tmp_path / "bare"
    subprocess.run(
        [
            getattr(sys, "_base_executable", sys.executable),
            "-m",
            "venv",
            "--without-pip",
            str(bare),
        ],
        check=True,
    )
    older = tmp_path / "older-python"
    older.write_text(
        "#!/bin/sh\n"
        'echo \'{"octotwist": "0.0.9", "wire": "OCTOTWIST/1", "python": "3.11.0", "cpus": 4}\'\n'
    )
    older.chmod(0o755)
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"{a.name} python={bare}/bin/python\n{b.name} python={older}\n")
    done = octo(
        "run",
        EXPECTED_SCRIPT,
        "--hostfile",
        str(hostfile),
        "--ssh-command",
        hosts.ssh_command(),
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    missing = next(line for line in lines if f"host {a.name} cannot" in line)
    assert f"{bare}/bin/python has no octotwist" in missing
    assert "pip install octotwist==" in missing
    other = next(line for line in lines if f"host {b.name} cannot" in line)
    import octotwist

    assert "octotwist 0.0.9 (OCTOTWIST/1) on Python 3.11.0" in other
    assert f"octotwist {octotwist.__version__}" in other
    assert "no host can work for it" in done.stderr
    assert done.stdout == ""

"""
Whole jobs through real processes: `octo run`, `octo server` + `octo client`,
`twistd octo`, over real sockets on 127.0.0.1.  Every result is compared
exactly with an independent computation.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    BOOKS,
    EXAMPLES,
    finish,
    free_port,
    gate,
    octo,
    parse_spaced,
    parse_tsv,
    start,
    tsv_field,
    wait_for_log,
    wait_for_port,
    word_count,
)

from octotwist.testing.harness import tasks_taken_from
from octotwist.transport import TestSetup

# The seed's word count exactly as octo.py's guide wrote it (Python 3).
SEED = """\
import glob
text_files = glob.glob('books/*.txt')
def file_contents(file_name):
    with open(file_name) as f:
        return f.read()
source = dict((f, file_contents(f)) for f in text_files)
def mapfn(key, value):
    for line in value.splitlines():
        for word in line.split():
            yield word.lower(), 1
def reducefn(key, value):
    return key, len(value)
def final(key, value):
    print(key, value)
"""

MAPFN = """
def mapfn(key, value):
    for line in value.splitlines():
        for word in line.split():
            yield word.lower(), 1
"""


def job(tmp_path: Path, body: str, name: str = "job.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def books_job(tmp_path: Path, extra: str = "", reducefn: str = "len(values)") -> Path:
    """The seed's word count over the sample books, results as TSV (no final)."""
    text = (
        "import glob\n"
        f"files = sorted(glob.glob({str(BOOKS / '*.txt')!r}))\n"
        "source = {f: open(f).read() for f in files}\n"
        + MAPFN
        + f"def reducefn(key, values):\n    return key, {reducefn}\n"
        + textwrap.dedent(extra)
    )
    return job(tmp_path, text)


def gated_books_job(tmp_path: Path, gate_file: Path) -> Path:
    """
    The books job, whose map tasks wait until C{gate_file} exists: a test
    that needs every worker to take part opens it once all have joined
    (otherwise the first could finish the job before the others connect).
    """
    return books_job(
        tmp_path,
        gate(gate_file)
        + textwrap.dedent(
            """
            _count = mapfn
            def mapfn(key, value):
                _gate()
                yield from _count(key, value)
            """
        ),
    )


def start_twistd(script: Path, *args: str, env: dict) -> subprocess.Popen[str]:
    """C{twistd -n octo --script SCRIPT ARGS...}, in the script's directory."""
    twistd = shutil.which("twistd", path=str(Path(sys.executable).parent)) or "twistd"
    return start(
        "-n", "--pidfile=", "--logfile=-", "octo", "--script", str(script), *args,
        env=env, cwd=script.parent, program=twistd,
    )  # fmt: skip


def test_octo_run_example(transport: str, env: dict, expected_books: Counter) -> None:
    r = octo("run", str(EXAMPLES / "wordcount.py"), "-w", "2", "--transport", transport, env=env)
    assert r.returncode == 0, r.stderr
    assert parse_spaced(r.stdout) == expected_books
    assert "finished" in r.stderr


def test_seed_script_runs_unchanged(transport: str, env: dict, tmp_path: Path) -> None:
    (tmp_path / "books").mkdir()
    picked = sorted(BOOKS.glob("*.txt"))[:2]
    for f in picked:
        shutil.copy(f, tmp_path / "books" / f.name)
    (tmp_path / "wordcount.py").write_text(SEED)
    r = octo("run", "wordcount.py", "-w", "2", "--transport", transport, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert parse_spaced(r.stdout) == word_count(picked)


def test_server_and_two_clients(
    transport: str, env: dict, tmp_path: Path, expected_books: Counter
) -> None:
    gate_file = tmp_path / "gate"
    script = gated_books_job(tmp_path, gate_file)
    out = tmp_path / "result.tsv"
    port = free_port()
    server = start(
        "server",
        str(script),
        "--transport",
        transport,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--output",
        str(out),
        env=env,
    )
    wait_for_port(port, server)
    workdir = tmp_path / "elsewhere"  # clients never see the script
    workdir.mkdir()
    clients = [
        start(
            "client",
            f"127.0.0.1:{port}",
            "--transport",
            transport,
            "--name",
            f"c{i}",
            env=env,
            cwd=workdir,
        )
        for i in range(2)
    ]
    log = wait_for_log(server, ["worker c0 joined", "worker c1 joined"])
    gate_file.touch()  # both take part: no map could finish before now
    code, _, err = finish(server)
    assert code == 0, log + err
    for c in clients:
        ccode, _, cerr = finish(c)
        assert ccode == 0, cerr
    assert parse_tsv(out.read_text()) == expected_books


def test_twistd_serves_the_same_job(
    transport: str, env: dict, tmp_path: Path, expected_books: Counter
) -> None:
    script = books_job(tmp_path)
    out = tmp_path / "result.tsv"
    port = free_port()
    server = start_twistd(
        script,
        "--transport",
        transport,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--output",
        str(out),
        env=env,
    )
    wait_for_port(port, server)
    client = start("client", f"localhost:{port}", "--transport", transport, "-p", "2", env=env)
    ccode, _, cerr = finish(client)
    code, _, err = finish(server)
    assert ccode == 0, cerr
    assert code == 0, err
    assert parse_tsv(out.read_text()) == expected_books


def test_lazy_source_is_read_as_tasks_are_handed_out(
    transport: str, env: dict, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    script = job(
        tmp_path,
        f"""
        import time
        LOG = {str(log)!r}
        def note(what):
            with open(LOG, "a") as f:
                f.write(what + "\\n")

        class DataSource:
            def __init__(self, n):
                self.n = n
            def __iter__(self):
                for i in range(self.n):
                    note(f"iter {{i}}")
                    yield i
            def __getitem__(self, key):
                note(f"get {{key}}")
                return " ".join(f"w{{j}}" for j in range(key % 7 + 1))

        source = DataSource(40)

        def mapfn(key, value):
            time.sleep(0.01)
            for w in value.split():
                yield w, 1

        def reducefn(key, values):
            return key, len(values)
        """,
    )
    r = octo("run", str(script), "-w", "1", "--transport", transport, env=env)
    assert r.returncode == 0, r.stderr
    expected = Counter(f"w{j}" for key in range(40) for j in range(key % 7 + 1))
    assert parse_tsv(r.stdout) == expected
    events = log.read_text().split()
    events = list(zip(events[::2], map(int, events[1::2]), strict=True))
    # Every key is read exactly once, and never far ahead of its task: keys
    # are drawn a map task's batch at a time, and its values read at once
    # (a run of gets), so when a batch is read, the iterator has gone at
    # most one key of look-ahead past its last key.
    assert sorted(k for e, k in events if e == "get") == list(range(40))
    drawn = 0
    for i, (event, _) in enumerate(events):
        if event == "iter":
            drawn += 1
        elif i == 0 or events[i - 1][0] == "iter":
            run = [k for _, k in itertools.takewhile(lambda e: e[0] == "get", events[i:])]
            assert drawn <= run[-1] + 2, f"source iterated {drawn} keys ahead of task {run}"


def test_combinefn_partitionfn_and_reduce_tasks(
    transport: str, env: dict, tmp_path: Path, expected_books: Counter
) -> None:
    script = books_job(
        tmp_path,
        extra="""
        def combinefn(key, values):
            return key, sum(values)
        def partitionfn(key, n):
            return 0 if key < "m" else 1
        reduce_tasks = 2
        """,
        reducefn="sum(values)",
    )
    r = octo("run", str(script), "-w", "2", "--transport", transport, env=env)
    assert r.returncode == 0, r.stderr
    assert parse_tsv(r.stdout) == expected_books
    keys = [tsv_field(line.split("\t")[0]) for line in r.stdout.splitlines()]
    assert keys == sorted(expected_books)


@pytest.mark.parametrize("unsorted", [False, True])
def test_results_come_sorted_unless_unsorted(env: dict, tmp_path: Path, unsorted: bool) -> None:
    """
    octo.py's order by default, whatever the partitions: the keys sorted;
    with --unsorted, partition by partition (here the high keys' first).
    """
    script = job(
        tmp_path,
        """
        source = {i: i for i in range(300)}
        def mapfn(key, value):
            yield f"k{value:03d}", value
        def reducefn(key, values):
            return key, sum(values)
        def partitionfn(key, n):
            return 0 if key >= "k150" else 1 + int(key[1:]) % (n - 1)
        reduce_tasks = 3
        """,
    )
    r = octo("run", str(script), *(["--unsorted"] if unsorted else []), env=env)
    assert r.returncode == 0, r.stderr
    keys = [line.split("\t")[0] for line in r.stdout.splitlines()]
    expected = [f"k{i:03d}" for i in range(300)]
    assert sorted(keys) == expected
    if unsorted:
        assert keys[:150] == expected[150:]  # partition 0 first, in its own key order
        assert keys[150:] != expected[:150]  # then 1 and 2, each sorted, not merged
    else:
        assert keys == expected


def test_raising_mapfn_fails_the_job_with_traceback_key_and_worker(
    transport: str, env: dict, tmp_path: Path
) -> None:
    script = job(
        tmp_path,
        """
        source = {f"doc{i}": "a b c" for i in range(5)}
        def check(word, key):
            if key == "doc3":
                raise ValueError(f"cannot count {word!r}")
        def mapfn(key, value):
            for w in value.split():
                check(w, key)
                yield w, 1
        def reducefn(key, values):
            return key, len(values)
        """,
    )
    r = octo("run", str(script), "-w", "2", "--transport", transport, env=env, timeout=60)
    assert r.returncode == 1
    assert "map 3 (key 'doc3') failed on worker local" in r.stderr
    assert "ValueError: cannot count 'a'" in r.stderr
    assert 'job.py", line 5, in check' in r.stderr  # the user's own frame
    assert '_child.py", line' not in r.stderr  # octotwist's frames are not shown


def test_raising_reducefn_names_the_key(transport: str, env: dict, tmp_path: Path) -> None:
    script = job(
        tmp_path,
        """
        source = {"d": "apple banana cherry"}
        def mapfn(key, value):
            for w in value.split():
                yield w, 1
        def reducefn(key, values):
            if key == "banana":
                raise KeyError("no bananas")
            return key, len(values)
        reduce_tasks = 1
        """,
    )
    r = octo("run", str(script), "--transport", transport, env=env, timeout=60)
    assert r.returncode == 1
    assert "reduce 0 (key 'banana') failed" in r.stderr and "KeyError: 'no bananas'" in r.stderr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("source = {}\ndef mapfn(k, v):\n  yield k, v\n", "does not define reducefn"),
        ("source = {}\ndef mapfn(k, v)\n", "job.py:2: syntax error"),
        (
            "import threading\nL = threading.Lock()\nsource = {}\n"
            "def mapfn(k, v):\n  with L:\n    yield k, v\ndef reducefn(k, v):\n  return k, v\n",
            "mapfn cannot be sent to workers",
        ),
    ],
)
def test_broken_job_script_fails_before_listening(
    env: dict, tmp_path: Path, body: str, message: str
) -> None:
    script = job(tmp_path, body)
    r = octo(
        "server",
        str(script),
        "--listen",
        f"tcp:{free_port()}:interface=127.0.0.1",
        env=env,
        timeout=30,
    )
    assert r.returncode == 2
    assert message in r.stderr
    assert "serving" not in r.stderr


def test_wrong_secret_is_refused_and_the_server_keeps_serving(
    transport: str, env: dict, tmp_path: Path, peers: TestSetup, expected_books: Counter
) -> None:
    if not peers.uses_secret or peers.refused_client_args:
        pytest.skip(f"{transport} authenticates with keys: see test_bad_credentials_are_refused")
    script = books_job(tmp_path)
    port = free_port()
    server_env = dict(env, OCTO_SECRET="right-secret-0123456789")
    server = start(
        "server",
        str(script),
        "--transport",
        transport,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--output",
        str(tmp_path / "out"),
        env=server_env,
    )
    wait_for_port(port, server)
    bad = octo(
        "client",
        f"127.0.0.1:{port}",
        "--transport",
        transport,
        env=dict(env, OCTO_SECRET="wrong-secret-0123456789"),
        timeout=30,
    )
    assert bad.returncode == 1
    assert "secret" in bad.stderr
    good = octo("client", f"127.0.0.1:{port}", "--transport", transport, env=server_env)
    assert good.returncode == 0, good.stderr
    code, _, err = finish(server)
    assert code == 0
    assert "authentication failed (wrong secret)" in err and "tcp:127.0.0.1:" in err
    assert parse_tsv((tmp_path / "out").read_text()) == expected_books


def test_refuses_to_listen_beyond_loopback_without_a_secret(env: dict, tmp_path: Path) -> None:
    script = books_job(tmp_path)
    r = octo("server", str(script), "--listen", "tcp:0", env=env, timeout=30)
    assert r.returncode == 2
    assert "refusing to listen on tcp:0 without a configured secret" in r.stderr
    assert "OCTO_SECRET" in r.stderr


def test_generated_secret_is_private_and_found_by_a_local_client(
    env: dict, tmp_path: Path, expected_books: Counter
) -> None:
    script = books_job(tmp_path)
    port = free_port()
    server = start(
        "server",
        str(script),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "-o",
        str(tmp_path / "o"),
        env=env,
    )
    wait_for_port(port, server)
    secret = Path(env["XDG_CONFIG_HOME"]) / "octotwist" / "secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    client = octo("client", f"localhost:{port}", env=env)
    assert client.returncode == 0, client.stderr
    assert finish(server)[0] == 0
    assert parse_tsv((tmp_path / "o").read_text()) == expected_books


@pytest.mark.slow  # waits out --wait
def test_client_without_a_server_retries_then_gives_up(transport: str, env: dict) -> None:
    port = free_port()
    env = dict(env, OCTO_SECRET="x-secret-0123456789")
    r = octo(
        "client", f"127.0.0.1:{port}", "--transport", transport, "--wait", "2", env=env, timeout=30
    )
    assert r.returncode == 1
    assert r.stderr.count("retrying in") >= 2
    assert "gave up" in r.stderr


def test_client_started_before_the_server_gets_work(
    transport: str, env: dict, tmp_path: Path
) -> None:
    env = dict(env, OCTO_SECRET="early-bird-secret-0123")
    port = free_port()
    client = start("client", f"127.0.0.1:{port}", "--transport", transport, env=env)
    first = client.stderr.readline()  # blocks until the client has tried once
    assert "cannot reach the server" in first and "retrying" in first
    script = books_job(tmp_path)
    out = tmp_path / "out.tsv"
    server = start(
        "server",
        str(script),
        "--transport",
        transport,
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "-o",
        str(out),
        env=env,
    )
    code, _, err = finish(server)
    assert code == 0, err
    ccode, _, cerr = finish(client)
    assert ccode == 0, cerr
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))


def test_twistd_exits_non_zero_when_the_job_fails(env: dict, tmp_path: Path) -> None:
    script = job(
        tmp_path,
        """
        source = {"k": "v"}
        def mapfn(key, value):
            raise RuntimeError("no")
        def reducefn(key, values):
            return key, values
        """,
    )
    port = free_port()
    server = start_twistd(script, "--listen", f"tcp:{port}:interface=127.0.0.1", env=env)
    wait_for_port(port, server)
    client = octo("client", f"localhost:{port}", env=env)
    code, out, err = finish(server)
    assert code == 1, out + err
    assert "RuntimeError: no" in out + err
    assert client.returncode == 1  # the server said the job failed


def test_port_in_use_is_one_clear_line(env: dict, tmp_path: Path) -> None:
    import socket

    script = books_job(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = octo(
            "server",
            str(script),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            env=env,
            timeout=30,
        )
    assert r.returncode == 1
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in r.stderr
    assert "Traceback" not in r.stderr and "Unhandled" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["server", "JOB", "--listen", "foo:bar"],
            "--listen foo:bar: Unknown endpoint type: 'foo'",
        ),
        (["client", "localhost:notaport"], "cannot connect to 'localhost:notaport'"),
        (["client", "--connect", "foo:bar"], "cannot connect to 'foo:bar'"),
        (["run", "JOB", "-w", "-1"], "must be at least 1"),
    ],
)
def test_bad_arguments_are_usage_errors(
    env: dict, tmp_path: Path, args: list[str], message: str
) -> None:
    script = str(books_job(tmp_path))
    r = octo(
        *[script if a == "JOB" else a for a in args],
        env=dict(env, OCTO_SECRET="x-secret-0123456789"),
        timeout=30,
    )
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


#: Numeric options and values that make no sense, with what octo says.
NONSENSE_FOR_A_SERVER = [
    ("--reduce-tasks", "0", "must be at least 1"),
    ("--reduce-tasks", "-3", "must be at least 1"),
    ("--reduce-tasks", "two", "must be a whole number"),
    ("--max-attempts", "0", "must be at least 1"),
    ("--max-attempts", "-1", "must be at least 1"),
    ("--task-timeout", "0", "must be more than 0"),
    ("--task-timeout", "-30", "must be more than 0"),
    ("--task-timeout", "nan", "must be a finite number"),
    ("--heartbeat", "0", "must be more than 0"),
    ("--heartbeat", "-2", "must be more than 0"),
    ("--heartbeat", "inf", "must be a finite number"),
    ("--backup-after", "-5", "must be 0 or more"),
    ("--backup-after", "nan", "must be a finite number"),
    ("--memory-limit", "-1", "must be 0 or more"),
    ("--memory-limit", "inf", "must be a finite number"),
]
NONSENSE = {
    "run": [
        *NONSENSE_FOR_A_SERVER,
        ("--workers", "-2", "must be at least 1"),
        ("--workers", "4097", "at most 4096 (a server refuses more)"),
    ],
    "server": NONSENSE_FOR_A_SERVER,
    "client": [
        ("--processes", "0", "must be at least 1"),
        ("--processes", "-1", "must be at least 1"),
        ("--processes", "4097", "at most 4096 (a server refuses more)"),
        ("--wait", "-1", "must be 0 or more"),
        ("--wait", "inf", "must be a finite number"),
    ],
}


@pytest.mark.parametrize(
    ("command", "option", "value", "message"),
    [(command, *case) for command, cases in NONSENSE.items() for case in cases],
)
def test_nonsense_option_values_are_refused(
    command: str, option: str, value: str, message: str
) -> None:
    from twisted.python import usage

    from octotwist import cli, tap

    parser = {"run": cli.RunOptions, "server": cli.ServerOptions, "client": cli.ClientOptions}
    script = [] if command == "client" else ["job.py"]
    with pytest.raises(usage.UsageError) as e:
        parser[command]().parseOptions([*script, option, value])
    assert tap.usage_message(e.value) == f"{option} {value}: {message}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "JOB", "--backup-after", "-5"], "octo: --backup-after -5: must be 0 or more"),
        (["run", "JOB", "-w", "-1"], "octo: --workers -1: must be at least 1"),
        (["server", "JOB", "--heartbeat", "0"], "octo: --heartbeat 0: must be more than 0"),
        (["server", "JOB", "-r", "-1"], "octo: --reduce-tasks -1: must be at least 1"),
        (["client", "--wait", "-1"], "octo: --wait -1: must be 0 or more"),
        (["client", "-p", "0"], "octo: --processes 0: must be at least 1"),
    ],
)
def test_nonsense_option_values_exit_with_status_2(
    env: dict, tmp_path: Path, args: list[str], message: str
) -> None:
    script = str(books_job(tmp_path))
    r = octo(
        *[script if a == "JOB" else a for a in args],
        env=dict(env, OCTO_SECRET="x-secret-0123456789"),
        timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.endswith(message + "\n"), r.stderr
    assert "Traceback" not in r.stderr and "serving" not in r.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--backup-after", "-5", "must be 0 or more"),
        ("--max-attempts", "0", "must be at least 1"),
        ("--memory-limit", "-1", "must be 0 or more"),
    ],
)
def test_twistd_refuses_nonsense_option_values_with_status_2(
    env: dict, tmp_path: Path, option: str, value: str, message: str
) -> None:
    port = free_port()
    server = start_twistd(
        books_job(tmp_path), "--listen", f"tcp:{port}:interface=127.0.0.1", option, value,
        env=dict(env, OCTO_SECRET="x-secret-0123456789"),
    )  # fmt: skip
    code, out, err = finish(server, timeout=60)
    assert code == 2, out + err
    assert err.endswith(f"octo: {option} {value}: {message}\n"), err
    assert "serving" not in out + err


def test_output_is_ignored_with_a_warning_when_the_job_has_final(
    env: dict, tmp_path: Path, expected_books: Counter
) -> None:
    out = tmp_path / "out.tsv"
    r = octo("run", str(EXAMPLES / "wordcount.py"), "-o", str(out), env=env)
    assert r.returncode == 0
    assert parse_spaced(r.stdout) == expected_books  # final printed them
    assert "--output" in r.stderr and "is ignored" in r.stderr
    assert not out.exists()


COUNT_WORDS_SOURCE = {i: "apple banana cherry apple " * (i + 1) for i in range(12)}
#: COUNT_WORDS's result, counted here.
COUNT_WORDS_EXPECTED = Counter(w for text in COUNT_WORDS_SOURCE.values() for w in text.split())
COUNT_WORDS = f"""
source = {COUNT_WORDS_SOURCE!r}
def mapfn(key, value):
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    if key == "cherry" and FAIL:
        raise KeyError("no cherries")
    return key, len(values)
reduce_tasks = 3
"""


def test_a_failed_job_leaves_the_previous_output_untouched(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "out.tsv"
    ok = job(tmp_path, "FAIL = False\n" + COUNT_WORDS, "ok.py")
    r = octo("run", str(ok), "-o", str(out), env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "worker local joined from embedded:local" in r.stderr  # no --transport: in-process
    assert parse_tsv(out.read_text()) == COUNT_WORDS_EXPECTED
    before = out.read_bytes()
    # The reduce of the other partitions succeeds (and may be written to
    # the temporary file) before cherry's fails every attempt.
    bad = job(tmp_path, "FAIL = True\n" + COUNT_WORDS, "bad.py")
    r = octo("run", str(bad), "-o", str(out), "--max-attempts", "1", env=env, timeout=60)
    assert r.returncode == 1 and "KeyError: 'no cherries'" in r.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.py", "ok.py", "out.tsv"]


def test_a_stopped_server_leaves_the_previous_output_untouched(env: dict, tmp_path: Path) -> None:
    import signal

    out = tmp_path / "out.tsv"
    out.write_text("previous\t1\n")
    script = job(tmp_path, "FAIL = False\n" + COUNT_WORDS)
    port = free_port()
    server = start(
        "server",
        str(script),
        "-o",
        str(out),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        env=dict(env, OCTO_SECRET="x-secret-0123456789"),
        cwd=tmp_path,
    )
    wait_for_port(port, server)
    assert [p.name for p in tmp_path.glob(".out.tsv.*.partial")]  # where results would go
    server.send_signal(signal.SIGTERM)
    finish(server, timeout=30)
    assert out.read_text() == "previous\t1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "out.tsv"]


def test_output_through_a_symlink_keeps_the_link_and_the_files_mode(
    env: dict, tmp_path: Path
) -> None:
    target = tmp_path / "results" / "out.tsv"
    target.parent.mkdir()
    target.write_text("previous\t1\n")
    target.chmod(0o600)
    link = tmp_path / "latest.tsv"
    link.symlink_to(target)
    script = job(tmp_path, "FAIL = False\n" + COUNT_WORDS)
    r = octo("run", str(script), "-o", str(link), env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and link.resolve() == target
    assert parse_tsv(target.read_text()) == COUNT_WORDS_EXPECTED
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.tsv"]


def test_bad_options_after_output_leave_no_temporary_file(env: dict, tmp_path: Path) -> None:
    script = job(tmp_path, "FAIL = False\n" + COUNT_WORDS)
    out = tmp_path / "out.tsv"
    r = octo("run", str(script), "-o", str(out), "--task-timeout", "1", "--heartbeat", "5", env=env)
    assert r.returncode == 2 and "must be longer than" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py"]


def test_a_result_that_cannot_be_written_fails_the_job_once(env: dict, tmp_path: Path) -> None:
    # A key with a lone surrogate cannot be written as UTF-8; the other
    # partitions' results may already be in the temporary file.
    script = job(
        tmp_path,
        """
        source = {i: i for i in range(8)}
        def mapfn(key, value):
            yield ("\\ud800" if key == 5 else f"k{key}"), 1
        def reducefn(key, values):
            return key, len(values)
        reduce_tasks = 4
        """,
    )
    out = tmp_path / "out.tsv"
    out.write_text("previous\t1\n")
    r = octo("run", str(script), "-o", str(out), env=env, timeout=60)
    assert r.returncode == 1
    assert "cannot write the results: UnicodeEncodeError" in r.stderr
    assert r.stderr.count("job job failed") == 1, r.stderr
    assert "lost the connection" not in r.stderr
    assert out.read_text() == "previous\t1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "out.tsv"]


def test_output_to_a_device_is_written_in_place(env: dict, tmp_path: Path) -> None:
    script = job(tmp_path, "FAIL = False\n" + COUNT_WORDS)
    r = octo("run", str(script), "-o", "/dev/null", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path("/dev/null").is_char_device()
    # What goes to a file that is not a regular one can be read back: a FIFO.
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    r = octo("run", str(script), "-o", str(fifo), env=env, timeout=60)
    reader.join(timeout=30)
    assert r.returncode == 0, r.stderr
    assert received and parse_tsv(received[0]) == COUNT_WORDS_EXPECTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "results.fifo"]


def test_a_full_disk_fails_the_job_with_a_clear_message(env: dict, tmp_path: Path) -> None:
    script = job(tmp_path, "FAIL = False\n" + COUNT_WORDS)
    r = octo("run", str(script), "-o", "/dev/full", env=env, timeout=60)  # ENOSPC on write
    assert r.returncode == 1
    assert "cannot write the results: OSError: [Errno 28] No space left on device" in r.stderr


def test_client_stopped_by_sigterm_exits_non_zero(env: dict) -> None:
    import signal

    client = start(
        "client", f"127.0.0.1:{free_port()}", env=dict(env, OCTO_SECRET="x-secret-0123456789")
    )
    assert "retrying" in client.stderr.readline()
    client.send_signal(signal.SIGTERM)
    code, _, err = finish(client, timeout=30)
    assert code != 0
    assert "interrupted" in err


def test_client_waits_for_a_local_server_to_create_the_secret(env: dict, tmp_path: Path) -> None:
    # Fresh machine: no secret anywhere yet; the client starts first.
    port = free_port()
    client = start("client", f"127.0.0.1:{port}", env=env)
    assert "waiting for a local server to create it" in client.stderr.readline()
    out = tmp_path / "out.tsv"
    server = start(
        "server",
        str(books_job(tmp_path)),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "-o",
        str(out),
        env=env,
    )
    assert finish(server)[0] == 0
    code, _, err = finish(client)
    assert code == 0, err
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))


SLOW_JOB_SOURCE = {i: f"w{i % 5} w{i % 3}" for i in range(30)}
SLOW_JOB = f"""
import time
source = {SLOW_JOB_SOURCE!r}
def mapfn(key, value):
    time.sleep(0.1)
    _gate()
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
"""


def test_a_client_killed_mid_job_loses_nothing(transport: str, env: dict, tmp_path: Path) -> None:
    gate_file = tmp_path / "gate"
    script = job(tmp_path, gate(gate_file) + SLOW_JOB)
    port = free_port()
    out = tmp_path / "out.tsv"
    server = start(
        "server", str(script), "--transport", transport,
        "--listen", f"tcp:{port}:interface=127.0.0.1", "-o", str(out), env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    doomed = start(
        "client", f"127.0.0.1:{port}", "--transport", transport, "-p", "2", "-v",
        "--name", "doomed", env=env,
    )  # fmt: skip
    # Its map tasks wait at the gate: once it has started two, it is in the
    # middle of its tasks and none of them can have finished.
    wait_for_log(doomed, ["running map "], count=2)
    doomed.kill()
    doomed.wait()
    gate_file.touch()
    survivor = octo("client", f"127.0.0.1:{port}", "--transport", transport, env=env)
    assert survivor.returncode == 0, survivor.stderr
    code, _, err = finish(server)
    assert code == 0, err
    # The two it was seen running at least (and any it had been sent ahead).
    assert tasks_taken_from("doomed", err) >= 2, err
    expected = Counter(w for text in SLOW_JOB_SOURCE.values() for w in text.split())
    assert parse_tsv(out.read_text()) == expected


def test_a_task_that_kills_its_process_fails_the_job_clearly(
    transport: str, env: dict, tmp_path: Path
) -> None:
    script = job(
        tmp_path,
        """
        import os
        source = {"fine": "a", "fatal": "b"}
        def mapfn(key, value):
            if key == "fatal":
                os._exit(3)
            yield value, 1
        def reducefn(key, values):
            return key, len(values)
        """,
    )
    r = octo("run", str(script), "--transport", transport, env=env, timeout=60)
    assert r.returncode == 1
    assert (
        "map 1" in r.stderr and "the worker process running the task died (exit code 3)" in r.stderr
    )

"""
The dask engine (plugins/octotwist_dask) against a real Dask cluster: a
`dask scheduler` and two `dask worker` processes on 127.0.0.1, started
here; and a LocalCluster, as `octo run --engine dask -w 2` makes one.
Every result is checked against a count made here, in plain Python.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BOOKS,
    descendants,
    finish,
    free_port,
    gate,
    octo,
    parents,
    parse_spaced,
    parse_tsv,
    python,
    start,
    wait_for_log,
    word_count,
)

distributed = pytest.importorskip(
    "distributed", reason="the dask engine needs Dask: pip install 'octotwist[dask]'"
)

ROOT = Path(__file__).resolve().parent.parent
DASK = Path(sys.executable).parent / "dask"


def _counters(stderr: str) -> dict[str, int]:
    """The counters table octo run logs at the end."""
    table = stderr.split("counters:\n", 1)[1]
    found = {}
    for line in table.splitlines():
        m = re.fullmatch(r"\s+(\S+)\s+(-?[\d,]+)", line)
        if m:
            found[m[1]] = int(m[2].replace(",", ""))
    return found


def _start(argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[str]:
    with log.open("w") as log_file:  # (the process keeps its own copy)
        return subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=log_file, text=True, cwd=cwd
        )


def _wait_for(proc: subprocess.Popen[str], log: Path, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while log.read_text().count(text) < count:
        assert proc.poll() is None, f"{proc.args} exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{proc.args} never said {text!r}:\n{log.read_text()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Dask scheduler with two single-threaded workers: its address."""
    if not DASK.exists():
        pytest.skip(f"no dask command beside {sys.executable}")
    logs = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    log = logs / "scheduler.log"
    scheduler_argv = [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port)]
    procs.append(_start([*scheduler_argv, "--no-dashboard"], log))
    _wait_for(procs[0], log, "Scheduler at:")
    for n in (1, 2):
        worker_log = logs / f"worker{n}.log"
        worker_argv = [str(DASK), "worker", address, "--nthreads", "1", "--name", f"w{n}"]
        # (not in the job's folder: its helper modules must travel)
        procs.append(
            _start([*worker_argv, "--no-dashboard", "--host", "127.0.0.1"], worker_log, logs)
        )
        _wait_for(procs[-1], worker_log, "Registered to")
    yield address
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_the_word_count_runs_on_a_dask_cluster(scheduler: str, env: dict[str, str]) -> None:
    done = octo(
        "run", "examples/wordcount.py", "--engine", "dask", "--scheduler", scheduler,
        env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert parse_spaced(done.stdout) == word_count(sorted(BOOKS.glob("*.txt")))
    assert f"running job wordcount on Dask at {scheduler}: 2 worker threads" in done.stderr
    # the counters are the tasks' own, exactly: one record a book
    assert _counters(done.stderr)["octotwist.records_read"] == 6


def test_the_word_count_runs_on_a_local_cluster(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "counts.tsv"
    done = octo(
        "run", "examples/wordcount_api.py", "--engine", "dask", "-w", "2", "-o", str(out),
        env=env, cwd=ROOT,
    )  # fmt: skip
    # (wordcount_api.py defines no source at import: a clear refusal, not a hang)
    assert done.returncode == 2, done.stderr
    script = tmp_path / "job.py"
    script.write_text(
        f"source = {{p: None for p in {sorted(map(str, BOOKS.glob('*.txt')))!r}}}\n"
        "def mapfn(path, _):\n"
        "    for word in open(path, encoding='utf-8').read().split():\n"
        "        yield word.lower(), 1\n"
        "def reducefn(word, counts):\n"
        "    return word, sum(counts)\n"
    )
    done = octo("run", str(script), "--engine", "dask", "-w", "2", "-o", str(out), env=env)
    assert done.returncode == 0, done.stderr
    got = parse_tsv(out.read_text())
    assert got == word_count(sorted(BOOKS.glob("*.txt")))
    assert list(got) == sorted(got)  # in key order, as octotwist's own server writes them


def test_a_two_step_job_with_counters_and_a_helper_module(
    scheduler: str, env: dict[str, str], tmp_path: Path
) -> None:
    """
    examples/two_steps.py's shape, its words cleaned by a helper module
    beside the script (the Dask workers run elsewhere: the module travels
    with the job), with counters: all exact.
    """
    (tmp_path / "cleaning.py").write_text(
        "def clean(word):\n    return word.lower().strip('.,;:!?\"()')\n"
    )
    script = tmp_path / "zipf.py"
    script.write_text(
        "import os\n"
        "from octotwist import Step, counters\n"
        "from octotwist.sources import files\n"
        f"source = files({str(BOOKS / '*.txt')!r})\n"
        "def words(path, text):\n"
        "    import cleaning\n"
        "    for line in text.splitlines():\n"
        "        counters.add('lines')\n"
        "        for word in line.split():\n"
        "            yield cleaning.clean(word), 1\n"
        "def total(word, counts):\n"
        "    return word, sum(counts)\n"
        "def by_count(word, n):\n"
        "    yield n, word\n"
        "def how_many(n, words):\n"
        "    return n, len(words)\n"
        "steps = [Step(words, total, combinefn=total), Step(by_count, how_many, reduce_tasks=1)]\n"
    )
    done = octo(
        "run", str(script), "--engine", "dask", "--scheduler", scheduler, "--format", "jsonl",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    counts: Counter[str] = Counter()
    lines = 0
    for book in sorted(BOOKS.glob("*.txt")):
        text = book.read_text()
        lines += len(text.splitlines())
        counts.update(w.lower().strip('.,;:!?"()') for w in text.split())
    expected = Counter(counts.values())
    got = dict(json.loads(line) for line in done.stdout.splitlines())
    assert got == dict(expected)
    assert list(got) == sorted(got)
    assert _counters(done.stderr)["lines"] == lines


def test_partitionfn_and_reduce_tasks_decide_the_part_files(
    scheduler: str, env: dict[str, str], tmp_path: Path
) -> None:
    """
    The job's partitionfn and reduce_tasks on Dask: -o DIR/ gets a part file
    per partition, each holding exactly the keys partitionfn sends there.
    """
    script = tmp_path / "letters.py"
    script.write_text(
        f"source = {{p: None for p in {sorted(map(str, BOOKS.glob('*.txt')))!r}}}\n"
        "reduce_tasks = 3\n"
        "def partitionfn(key, partitions):\n"
        "    return ord(key[0]) % partitions\n"
        "def mapfn(path, _):\n"
        "    for word in open(path, encoding='utf-8').read().split():\n"
        "        yield word.lower(), 1\n"
        "def combinefn(word, counts):\n"
        "    return word, sum(counts)\n"
        "def reducefn(word, counts):\n"
        "    return word, sum(counts)\n"
    )
    out = tmp_path / "counts"
    done = octo(
        "run", str(script), "--engine", "dask", "--scheduler", scheduler, "-o", f"{out}/",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = word_count(sorted(BOOKS.glob("*.txt")))
    parts = sorted(out.glob("part-*.tsv"))
    assert [p.name for p in parts] == ["part-00000.tsv", "part-00001.tsv", "part-00002.tsv"]
    assert (out / "_SUCCESS").exists()
    everything: dict[str, int] = {}
    for n, part in enumerate(parts):
        got = parse_tsv(part.read_text())
        assert got and all(ord(k[0]) % 3 == n for k in got), part
        assert list(got) == sorted(got)
        everything.update(got)
    assert everything == expected


@pytest.mark.slow
def test_a_dask_worker_killed_mid_job_changes_nothing(
    scheduler: str, env: dict[str, str], tmp_path: Path
) -> None:
    """
    Map tasks held on both workers (they wait for a gate); one worker is
    killed (SIGKILL: its nanny starts another); Dask runs its tasks again;
    the counts and the counters are exact.
    """
    opened = tmp_path / "gate"
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "gated.py"
    books = sorted(map(str, BOOKS.glob("*.txt")))
    script.write_text(
        gate(opened)
        + "from octotwist import counters\n"
        + f"source = {{p: None for p in {books!r}}}\n"
        + "def mapfn(path, _):\n"
        + f"    open(_gate_os.path.join({str(marks)!r}, str(_gate_os.getpid())), 'w').close()\n"
        + "    _gate()\n"
        + "    counters.add('books')\n"
        + "    for word in open(path, encoding='utf-8').read().split():\n"
        + "        yield word.lower(), 1\n"
        + "def reducefn(word, counts):\n"
        + "    return word, sum(counts)\n"
    )
    proc = start(
        "run", str(script), "--engine", "dask", "--scheduler", scheduler, "--format", "jsonl",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(marks.iterdir())) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "map tasks never ran on both workers"
        time.sleep(0.05)
    victim = int(sorted(marks.iterdir())[0].name)
    os.kill(victim, signal.SIGKILL)
    time.sleep(1)
    opened.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got = dict(json.loads(line) for line in out.splitlines())
    assert got == word_count(sorted(BOOKS.glob("*.txt")))
    # each book counted once, however often its task ran
    assert _counters(err)["books"] == 6, err


def test_a_task_that_raises_fails_the_job_with_its_traceback(
    scheduler: str, env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "broken.py"
    script.write_text(
        "source = {1: 'a', 2: 'b', 3: 'c'}\n"
        "def mapfn(k, v):\n"
        "    if k == 2:\n"
        "        raise ValueError('no b here')\n"
        "    yield v, 1\n"
        "def reducefn(k, vs):\n"
        "    return k, len(vs)\n"
    )
    done = octo(
        "run", str(script), "--engine", "dask", "--scheduler", scheduler, "--max-attempts", "2",
        env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "map task" in done.stderr and "ValueError: no b here" in done.stderr
    assert "at key 2" in done.stderr
    assert f'File "{script}", line 4, in mapfn' in done.stderr
    assert done.stdout == ""


def test_an_unreachable_scheduler_is_named(env: dict[str, str]) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    done = octo(
        "run", "examples/wordcount.py", "--engine", "dask", "--scheduler",
        f"tcp://127.0.0.1:{port}", env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within 10 s" in done.stderr
    assert time.monotonic() - started < 60
    assert done.stdout == ""


def test_dask_missing_or_too_old_is_said_with_what_to_install(env: dict[str, str]) -> None:
    for setup, said in (
        ("sys.modules['distributed'] = None", "needs Dask distributed, which is not installed"),
        (
            "import distributed; distributed.__version__ = '2022.1.0'",
            "Dask distributed 2022.1.0 is too old",
        ),
    ):
        done = python(
            f"""
            import sys
            {setup}
            from octotwist.cli import main
            main(["run", "examples/wordcount.py", "--engine", "dask"])
            """,
            env=env,
            cwd=ROOT,
        )
        assert done.returncode == 1, done.stderr
        assert said in done.stderr
        assert "pip install" in done.stderr and "octotwist[dask]" in done.stderr


def test_engine_options_that_do_not_go_together(env: dict[str, str]) -> None:
    for args, said in (
        (["--engine", "nope"], "unknown engine 'nope'; installed engines: dask"),
        (["--scheduler", "tcp://x:1"], "--scheduler is an engine's: add --engine NAME"),
        (["--engine", "dask", "--inline"], "it takes no --inline"),
        (["--engine", "dask", "-w", "0"], "--engine needs workers"),
    ):
        done = octo("run", "examples/wordcount.py", *args, env=env, cwd=ROOT)
        assert done.returncode == 2, (args, done.stderr)
        assert said in done.stderr, done.stderr
    listed = octo("engines", env=env)
    assert listed.returncode == 0 and listed.stdout.startswith("dask ")


def test_octotwist_run_takes_an_engine(scheduler: str, env: dict[str, str]) -> None:
    done = python(
        f"""
        import json, octotwist
        from pathlib import Path
        def mapfn(path, _):
            for word in open(path, encoding="utf-8").read().split():
                yield word.lower(), 1
        def reducefn(word, counts):
            return word, sum(counts)
        books = {{str(p): None for p in sorted(Path({str(BOOKS)!r}).glob("*.txt"))}}
        job = octotwist.Job(source=books, mapfn=mapfn, reducefn=reducefn)
        result = octotwist.run(job, engine="dask", scheduler={scheduler!r})
        print(json.dumps([result, result.counters["octotwist.records_read"]]))
        """,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    counts, records = json.loads(done.stdout.splitlines()[-1])
    assert counts == word_count(sorted(BOOKS.glob("*.txt")))
    assert records == 6


def test_octotwist_run_on_an_engine_says_how_a_failed_job_went(
    scheduler: str, env: dict[str, str]
) -> None:
    """The JobFailed of run(engine=...) carries the status page's last figures: its failure."""
    done = python(
        f"""
        import json, octotwist
        def mapfn(k, v):
            if k == 2:
                raise ValueError("no b here")
            yield v, 1
        def reducefn(k, vs):
            return k, len(vs)
        job = octotwist.Job(source={{1: "a", 2: "b", 3: "c"}}, mapfn=mapfn, reducefn=reducefn)
        try:
            octotwist.run(job, engine="dask", scheduler={scheduler!r}, max_attempts=2)
        except octotwist.JobFailed as e:
            print(json.dumps(e.outcome.stats))
        """,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout.splitlines()[-1])
    assert status["phase"] == "failed" and status["ok"] is False
    assert "ValueError: no b here" in status["error"]
    [failure] = status["failures"]
    assert failure["task"].startswith("map ") and failure["attempt"] == 2
    assert failure["error"] == "ValueError: no b here" and failure["key"] == "2"
    assert ", in mapfn\nValueError: no b here" in failure["traceback"]  # the user's
    assert status["engine"]["name"] == "dask"
    assert [w["name"] for w in status["workers"]] == sorted(
        w["name"] for w in status["workers"]
    ) and len(status["workers"]) == 2


def test_a_status_page_that_cannot_be_served_is_said_in_a_line(env: dict[str, str]) -> None:
    """--web on the engine: a bad endpoint and a port taken, said as octo run says them."""
    bad = octo(
        "run", "examples/wordcount.py", "--engine", "dask", "--web", "bogus:1", env=env, cwd=ROOT
    )
    assert bad.returncode == 2, bad.stderr
    assert "octo: --web bogus:1: Unknown endpoint type: 'bogus' (examples:" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = octo(
            "run", "examples/wordcount.py", "--engine", "dask", "--web", f"tcp:{port}",
            env=env, cwd=ROOT,
        )  # fmt: skip
    assert busy.returncode == 1, busy.stderr
    said = f"octo: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
    assert said in busy.stderr
    for done in (bad, busy):
        assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_job_on_dask_interrupted_stops_with_its_cluster(
    how: signal.Signals, env: dict[str, str], tmp_path: Path
) -> None:
    """
    Ctrl-C or SIGTERM mid-job on a LocalCluster: "interrupted", exit 1 (as
    octo run says it without --engine), no output file, and the cluster's
    processes are gone.
    """
    opened = tmp_path / "gate"  # never opened
    script = tmp_path / "gated.py"
    script.write_text(
        gate(opened)
        + "source = {i: i for i in range(4)}\n"
        + "def mapfn(k, v):\n    _gate()\n    yield k, v\n"
        + "def reducefn(k, vs):\n    return k, sum(vs)\n"
    )
    out = tmp_path / "out.tsv"
    proc = start(
        "run", str(script), "--engine", "dask", "-w", "2", "-o", str(out), env=env, cwd=tmp_path
    )  # fmt: skip
    seen = wait_for_log(proc, ["running job gated on Dask"])
    cluster = descendants(proc.pid)
    assert len(cluster) >= 2, cluster  # (the LocalCluster's workers, at least)
    proc.send_signal(how)
    code, _, err = finish(proc, timeout=60)
    err = seen + err
    assert code == 1, err
    # (ours, not a KeyboardInterrupt's traceback; Dask may log its own teardown)
    assert "octo: interrupted" in err and "KeyboardInterrupt" not in err, err
    assert not out.exists() and not list(tmp_path.glob("out.tsv*")), list(tmp_path.iterdir())
    deadline = time.monotonic() + 30
    while cluster & set(parents()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not cluster & set(parents()), err  # (live processes: zombies are not)

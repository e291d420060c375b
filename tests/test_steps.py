"""
Jobs of several steps, counters, what workers print, and setupfn: the
scheduler's step transitions as a state machine, then whole jobs through
octotwist.run (in-process channels with real task processes, and inline)
and octo run, each result checked against a computation done here.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from conftest import BOOKS, octo, parse_tsv, python
from test_scheduler import run_all

from octotwist.api import load
from octotwist.errors import JobScriptError
from octotwist.messages import TaskId, TaskKind
from octotwist.scheduler import (
    NO_BATCHING,
    NO_WORK,
    Assignment,
    AttemptFailed,
    AttemptReturned,
    AttemptSucceeded,
    InvalidEvent,
    Phase,
    Scheduler,
    Verdict,
    WorkerJoined,
)

BOOK_FILES = sorted(BOOKS.glob("*.txt"))


def M(i: int, step: int = 0) -> TaskId:
    return TaskId(TaskKind.MAP, i, step)


def R(i: int, step: int = 0) -> TaskId:
    return TaskId(TaskKind.REDUCE, i, step)


# The scheduler.


def test_step_two_maps_each_reduce_output_of_step_one_then_reduces_its_own() -> None:
    s = Scheduler(["a", "b", "c"], reduce_tasks=(2, 3), batching=NO_BATCHING)
    s.handle(WorkerJoined("w"))
    done = run_all(s, "w")
    assert [a.task for a in done] == [
        *(M(0), M(1), M(2), R(0), R(1)),
        # Step 2: one map task per reduce task of step 1, each keyed by it.
        *(M(0, 1), M(1, 1), R(0, 1), R(1, 1), R(2, 1)),
    ]
    assert [a.keys for a in done[5:7]] == [(R(0),), (R(1),)]
    assert s.phase is Phase.FINISHED and s.step == 1
    assert s.output_tasks() == [R(0, 1), R(1, 1), R(2, 1)]
    assert s.output_tasks(0) == [R(0), R(1)]


def test_the_barrier_between_steps() -> None:
    """Step 2's map waits for step 1's last reduce; then the step changes."""
    s = Scheduler(["a"], reduce_tasks=(2, 1), batching=NO_BATCHING)
    s.handle(WorkerJoined("w", slots=4))
    (m,) = [s.next_assignment("w")]
    assert isinstance(m, Assignment)
    s.handle(AttemptSucceeded("w", m.task, m.attempt))
    r0, r1 = s.next_assignment("w"), s.next_assignment("w")
    assert isinstance(r0, Assignment) and isinstance(r1, Assignment)
    assert s.next_assignment("w") is NO_WORK
    s.handle(AttemptSucceeded("w", r1.task, r1.attempt))
    assert (s.phase, s.step, s.next_assignment("w")) == (Phase.REDUCING, 0, NO_WORK)
    s.handle(AttemptSucceeded("w", r0.task, r0.attempt))
    assert (s.phase, s.step, s.reduce_tasks) == (Phase.MAPPING, 1, 1)
    assert s.counts(TaskKind.MAP).total == 2  # one item per producer
    assert s.next_assignment("w") == Assignment(M(0, 1), 1, (R(0),))


def test_a_map_only_step_goes_on_to_the_next_steps_map() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=(0, 2), batching=NO_BATCHING)
    s.handle(WorkerJoined("w"))
    done = run_all(s, "w")
    # No reduce in between: step 2 maps each map task's output of step 1.
    assert [x.task for x in done] == [M(0), M(1), M(0, 1), M(1, 1), R(0, 1), R(1, 1)]
    assert [x.keys for x in done[2:4]] == [(M(0),), (M(1),)]
    assert s.output_tasks(0) == [M(0), M(1)]
    assert s.phase is Phase.FINISHED


def test_a_map_only_last_step_is_the_jobs_output() -> None:
    s = Scheduler(["a", "b", "c"], reduce_tasks=(1, 0), batching=NO_BATCHING)
    s.handle(WorkerJoined("w", slots=4))
    run_all(s, "w")
    assert s.phase is Phase.FINISHED
    assert s.output_tasks() == [M(0, 1)]


def test_a_late_report_of_a_step_that_is_over_is_discarded() -> None:
    """A backup copy still running when its step ended cannot count afterwards."""
    s = Scheduler(["a"], reduce_tasks=(1, 1), backup_after=0.0, batching=NO_BATCHING)
    s.handle(WorkerJoined("w1"))
    s.handle(WorkerJoined("w2"))
    first = s.next_assignment("w1")
    backup = s.next_assignment("w2")
    assert isinstance(first, Assignment) and isinstance(backup, Assignment) and backup.backup
    assert s.handle(AttemptSucceeded("w1", first.task, first.attempt)) is Verdict.ACCEPTED
    assert [c.task for c in s.cancellations()] == [M(0)]
    run_all(s, "w1")  # reduce 0, then step 2's map: the job moves on
    assert s.step == 1
    assert s.handle(AttemptSucceeded("w2", backup.task, backup.attempt)) is Verdict.DISCARDED


def test_a_later_steps_map_task_is_never_skipped_as_a_bad_record() -> None:
    """It maps a whole partition of the step before: failing for good fails the job."""
    s = Scheduler(["a"], reduce_tasks=(1, 1), skip_bad_records=True, batching=NO_BATCHING)
    s.handle(WorkerJoined("w"))
    for _ in range(2):  # map 0, reduce 0 of step 1
        a = s.next_assignment("w")
        assert isinstance(a, Assignment)
        s.handle(AttemptSucceeded("w", a.task, a.attempt))
    a = s.next_assignment("w")
    assert isinstance(a, Assignment) and a.task == M(0, 1)
    s.handle(AttemptFailed("w", a.task, a.attempt, "'k'", "ValueError: x", ""))
    assert s.phase is Phase.FAILED and not s.skipped
    assert s.failure is not None and s.failure.task == M(0, 1)


def test_an_attempt_given_back_goes_back_in_the_queue_at_no_cost() -> None:
    s = Scheduler(["a"], reduce_tasks=1, max_attempts=1, batching=NO_BATCHING)
    s.handle(WorkerJoined("w1"))
    s.handle(WorkerJoined("w2"))
    a = s.next_assignment("w1")
    assert isinstance(a, Assignment)
    s.handle(AttemptReturned("w1", a.task, a.attempt))
    assert s.running("w1") == [] and s.phase is Phase.MAPPING
    again = s.next_assignment("w2")
    assert isinstance(again, Assignment) and again.task == a.task and again.attempt == 2
    # With max_attempts=1, a failure would have failed the job; this did not count.
    assert s.handle(AttemptSucceeded("w2", again.task, again.attempt)) is Verdict.ACCEPTED
    with pytest.raises(InvalidEvent):  # an attempt given back twice: a peer's lie
        s.handle(AttemptReturned("w1", a.task, a.attempt))
    assert s.phase is Phase.REDUCING


def test_an_empty_source_finishes_every_step_at_once() -> None:
    s = Scheduler([], reduce_tasks=(2, 0, 3))
    assert s.phase is Phase.FINISHED and s.output_tasks() == []


def test_bad_step_partitions() -> None:
    with pytest.raises(ValueError):
        Scheduler(["a"], reduce_tasks=(2, -1))
    with pytest.raises(ValueError):
        Scheduler(["a"], reduce_tasks=())


# Whole jobs.

TWO_STEPS = """
    from octotwist import Step, counters

    source = {SOURCE}

    def words(name, path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                counters.add("lines")
                for word in line.split():
                    yield word, 1

    def total(word, ones):
        return word, sum(ones)

    def by_count(word, n):
        yield n, word

    def how_many(n, words):
        return n, len(words)

    steps = [Step(words, total, combinefn=total), Step(by_count, how_many, reduce_tasks=2)]
"""


def write_job(tmp_path: Path, text: str, name: str = "job.py", **fields: str) -> Path:
    source = repr({p.name: str(p) for p in BOOK_FILES})
    body = textwrap.dedent(text).replace("{SOURCE}", source)
    for k, v in fields.items():
        body = body.replace("{" + k + "!r}", repr(v)).replace("{" + k + "}", v)
    path = tmp_path / name
    path.write_text(body)
    return path


class Ran:
    """What octotwist.run() returned in a process of its own (this one runs a reactor)."""

    def __init__(self, data: dict) -> None:
        self.results = {k: v for k, v in data["results"]}
        self.keys = [k for k, _ in data["results"]]
        self.counters = data["counters"]
        self.status = data["status"]


class Failed(Exception):
    pass


def run(job: Path, **options: object) -> Ran:
    """C{octotwist.run(job, **options)} in a fresh Python; L{Failed} with its error."""
    code = f"""
        import json, sys, octotwist
        try:
            r = octotwist.run({str(job)!r}, **{options!r})
        except octotwist.JobFailed as e:
            sys.exit(str(e))
        print(json.dumps({{"results": list(r.items()), "counters": r.counters,
                          "status": r.status}}, default=repr))
    """
    r = python(code, cwd=job.parent)
    if r.returncode:
        raise Failed(r.stderr)
    return Ran(json.loads(r.stdout))


def words_per_count() -> Counter[int]:
    counts: Counter[str] = Counter()
    for path in BOOK_FILES:
        counts.update(path.read_text(encoding="utf-8").split())
    return Counter(counts.values())


def lines_in_books() -> int:
    return sum(len(p.read_text(encoding="utf-8").splitlines(keepends=True)) for p in BOOK_FILES)


@pytest.mark.parametrize("workers", [2, 0])
def test_two_steps_count_the_words_then_how_many_words_have_each_count(
    tmp_path: Path, workers: int
) -> None:
    job = write_job(tmp_path, TWO_STEPS)
    result = run(job, workers=workers)
    assert result.results == dict(words_per_count())
    assert result.keys == sorted(result.keys)  # key order
    assert result.counters["lines"] == lines_in_books()
    distinct = sum(words_per_count().values())
    # Step 2 read each distinct word once: its records are step 1's results.
    assert result.counters["octotwist.records_read"] == len(BOOK_FILES) + distinct
    if workers:
        assert result.status["steps"] == 2 and result.status["step"] == 2


THREE_STEPS = """
    import octotwist

    source = {i: line for i, line in enumerate(open({BOOK!r}, encoding="utf-8"))}

    def words(i, line):
        for word in line.split():
            yield word.lower(), 1

    def keep_long(word, n):
        if len(word) > 6:
            octotwist.counters.add("long words", n)
            yield word[0], n

    def total(key, counts):
        return key, sum(counts)

    steps = [
        octotwist.Step(words),
        octotwist.Step(keep_long),
        octotwist.Step(lambda k, v: [(k, v)], total, reduce_tasks=3),
    ]
"""


def test_three_steps_with_two_map_only_ones(tmp_path: Path) -> None:
    book = BOOK_FILES[0]
    job = write_job(tmp_path, THREE_STEPS, BOOK=str(book))
    expected: Counter[str] = Counter()
    long_words = 0
    with open(book, encoding="utf-8") as f:
        for line in f:
            for word in line.split():
                if len(word.lower()) > 6:
                    expected[word.lower()[0]] += 1
                    long_words += 1
    result = run(job, workers=2)
    assert result.results == dict(expected)
    assert result.counters["long words"] == long_words
    inline = run(job, workers=0)
    assert inline.results == dict(expected) and inline.counters == {
        k: v for k, v in result.counters.items() if k != "octotwist.bytes_shuffled"
    }


def test_a_map_only_last_step_writes_every_pair_and_the_api_refuses_to_lose_any(
    tmp_path: Path, env: dict
) -> None:
    job = write_job(
        tmp_path,
        """
        from octotwist import Step
        source = {n: n for n in range(50)}
        steps = [Step(lambda k, v: [(k % 5, v)])]
        """,
    )
    out = tmp_path / "out.tsv"
    r = octo("run", str(job), "-w", "2", "-q", "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    pairs = [tuple(map(int, line.split("\t"))) for line in out.read_text().splitlines()]
    assert sorted(pairs) == sorted((n % 5, n) for n in range(50))
    with pytest.raises(Failed, match="map-only and gave 50 results for 5 distinct"):
        run(job, workers=2)


def test_a_failure_in_a_later_step_names_the_step(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        """
        from octotwist import Step
        source = {n: n for n in range(10)}
        def boom(key, values):
            raise ValueError(f"no {key}")
        steps = [Step(lambda k, v: [(k, v)], lambda k, vs: (k, sum(vs))), Step(
            lambda k, v: [(k, v)], boom, reduce_tasks=1)]
        """,
    )
    with pytest.raises(Failed) as failed:
        run(job, workers=2)
    message = str(failed.value)
    assert "step 2 of 2: reduce 0 (key 0)" in message
    assert "ValueError: no 0" in message and "boom" in message


# Counters count only what counted.

KILLED_ONCE = """
    import os
    from pathlib import Path
    from octotwist import counters

    MARK = Path({MARK!r})
    source = {n: f"record {n}" for n in range(200)}

    def mapfn(key, value):
        counters.add("records")
        counters.add("bytes", len(value))
        if key == 77 and not MARK.exists():
            MARK.touch()
            os._exit(3)  # the process dies mid-task: its counts must not count
        yield key % 7, 1

    def reducefn(key, ones):
        counters.add("reduced keys")
        return key, sum(ones)
"""


def test_counters_of_a_killed_and_retried_attempt_count_once(tmp_path: Path) -> None:
    job = write_job(tmp_path, KILLED_ONCE, MARK=str(tmp_path / "killed"))
    result = run(job, workers=2, max_attempts=3)
    assert (tmp_path / "killed").exists()  # the first attempt did die
    assert result.results == dict(Counter(n % 7 for n in range(200)))
    assert result.counters["records"] == 200
    assert result.counters["bytes"] == sum(len(f"record {n}") for n in range(200))
    assert result.counters["reduced keys"] == 7
    assert result.counters["octotwist.records_read"] == 200  # map inputs, each once
    assert any(f["task"].startswith("map") for f in result.status["failures"])


def test_counters_of_a_backup_copy_never_add_twice(tmp_path: Path) -> None:
    """Every map task slow enough to get a backup copy: both run, one counts."""
    job = write_job(
        tmp_path,
        """
        import time
        from octotwist import counters
        source = {n: n for n in range(6)}
        def mapfn(key, value):
            counters.add("calls")
            time.sleep(0.4)
            yield "n", value
        def reducefn(key, values):
            return key, sum(values)
        """,
    )
    result = run(job, workers=4, backup_after=0.05)
    assert result.results == {"n": sum(range(6))}
    assert result.counters["calls"] == 6


def test_a_counter_past_64_bits_fails_the_task_clearly(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        """
        from octotwist import counters
        source = {"k": 1}
        def mapfn(key, value):
            counters.add("big", 2**62)
            counters.add("big", 2**62)
            yield key, value
        def reducefn(key, values):
            return key, sum(values)
        """,
    )
    with pytest.raises(Failed, match=r"OverflowError: counter 'big': 9223372036854775808 is past"):
        run(job, workers=1)


def test_a_counter_name_that_is_not_a_string_fails_the_task_clearly(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        """
        from octotwist import counters
        source = {"k": 1}
        def mapfn(key, value):
            counters.add(42)
            yield key, value
        def reducefn(key, values):
            return key, sum(values)
        """,
    )
    with pytest.raises(Failed, match=r"TypeError: a counter's name is a str, not int"):
        run(job, workers=1)


# What workers print.

PRINTS = """
    import logging
    import sys
    source = {n: n for n in range(4)}
    def mapfn(key, value):
        print(f"mapping {key}")
        logging.getLogger("job").warning("warned about %s", key)
        if key == 3:
            sys.stdout.buffer.write(b"bytes too\\n")
            assert sys.stdout.fileno() == 1 and not sys.stderr.isatty()
        yield "k", value
    def reducefn(key, values):
        print("x" * 100_000, file=sys.stderr)  # more than a task keeps
        return key, sum(values)
"""


def test_what_the_users_code_prints_reaches_the_server_prefixed_and_bounded(
    tmp_path: Path, env: dict
) -> None:
    job = write_job(tmp_path, PRINTS)
    out = tmp_path / "out.tsv"
    r = octo("run", str(job), "-w", "2", "-r", "1", "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert parse_tsv(out.read_text()) == {"k": 6}
    for n in range(4):
        assert f"[map {n} attempt 1 on local] mapping {n}" in r.stderr
        assert f"[map {n} attempt 1 on local] warned about {n}" in r.stderr
    cut = [line for line in r.stderr.splitlines() if "[reduce 0 attempt 1 on local]" in line]
    assert "characters cut; the last 65536 follow" in cut[0]
    assert sum(line.count("x") for line in cut) == 65536 - 1  # (the newline kept)
    quiet = octo("run", str(job), "-w", "2", "-q", "-o", str(out), env=env)
    assert quiet.returncode == 0 and "mapping" not in quiet.stderr, quiet.stderr


def test_printed_output_is_in_the_status_and_the_api_result(tmp_path: Path) -> None:
    job = write_job(tmp_path, PRINTS)
    result = run(job, workers=2)
    texts = {p["task"]: p["text"] for p in result.status["printed"]}
    assert texts["map 2"] == "mapping 2\nwarned about 2\n"
    assert texts["map 3"] == "mapping 3\nwarned about 3\nbytes too\n"
    assert json.dumps(result.status)  # JSON-ready, as status.json serves it


# setupfn.


def test_setupfn_runs_once_in_each_task_process_before_its_first_task(tmp_path: Path) -> None:
    log = tmp_path / "setups"
    job = write_job(
        tmp_path,
        """
        import os
        TABLE = None
        source = {n: n for n in range(40)}
        def setupfn():
            global TABLE
            with open({LOG!r}, "a") as f:
                f.write(f"{os.getpid()}\\n")
            TABLE = {"pid": os.getpid()}
        def mapfn(key, value):
            yield TABLE["pid"], 1  # (TABLE is None in a process not set up)
        def reducefn(pid, ones):
            return pid, sum(ones)
        """,
        LOG=str(log),
    )
    result = run(job, workers=2)
    setups = [int(line) for line in log.read_text().splitlines()]
    assert len(setups) == len(set(setups)) <= 2  # once per process
    assert set(result.results) <= set(setups) and sum(result.results.values()) == 40


def test_a_setupfn_that_raises_fails_the_job_saying_so(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        """
        source = {1: 1}
        def setupfn():
            raise OSError("no model file")
        def mapfn(key, value):
            yield key, value
        def reducefn(key, values):
            return key, sum(values)
        """,
    )
    with pytest.raises(Failed, match=r"setupfn\(\) raised OSError: no model file"):
        run(job, workers=1)


# Bad steps.


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ("[mapfn]", "step 1 is a function, not an octotwist.Step"),
        ("[Step(mapfn, reducefn), Step(None)]", "step 2: mapfn is missing"),
        ("[Step(mapfn, 7)]", "step 1: reducefn is a int, not a function"),
        ("[Step(mapfn, combinefn=reducefn)]", "step 1 has a combinefn but no reducefn"),
        ("[Step(mapfn, reducefn, reduce_tasks=0)]", "step 1: reduce_tasks must be a positive"),
        ("[]", "steps must be a non-empty list of octotwist.Step"),
        ("Step(mapfn, reducefn)", "steps must be a non-empty list"),
    ],
)
def test_bad_steps_are_refused_before_anything_runs(tmp_path: Path, steps: str, error: str) -> None:
    job = tmp_path / "job.py"
    job.write_text(
        "from octotwist import Step\n"
        "source = {1: 1}\n"
        "def mapfn(k, v):\n    yield k, v\n"
        "def reducefn(k, vs):\n    return k, sum(vs)\n"
        f"steps = {steps}\n"
    )
    with pytest.raises(JobScriptError, match=error):
        load(str(job))  # what octotwist.run() and octo run do first


def test_a_job_built_in_python_takes_steps(tmp_path: Path) -> None:
    code = """
        import octotwist
        from collections import Counter
        text = {i: line for i, line in enumerate(["a b a", "b c", "a"])}
        job = octotwist.Job(
            source=text,
            steps=[
                octotwist.Step(lambda i, line: [(w, 1) for w in line.split()],
                               lambda w, ones: (w, sum(ones))),
                octotwist.Step(lambda w, n: [(n, w)], lambda n, ws: (n, sorted(ws)),
                               reduce_tasks=1),
            ],
        )
        for workers in (2, 0):
            print(dict(octotwist.run(job, workers=workers)))
    """
    r = python(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["{1: ['c'], 2: ['b'], 3: ['a']}"] * 2

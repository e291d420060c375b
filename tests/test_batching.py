"""
Map tasks carry batches of source items: the scheduler's sizing and failure
rules as a pure state machine, then whole jobs through C{octo run} (and one
over tcp) with thousands of tiny items and with sources that raise.
"""

from __future__ import annotations

import ast
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import finish, free_port, octo, start, wait_for_port

from octotwist.messages import TaskId, TaskKind
from octotwist.scheduler import (
    NO_BATCHING,
    NO_WORK,
    Assignment,
    AttemptFailed,
    AttemptSucceeded,
    Batching,
    Heard,
    InputSized,
    Phase,
    Scheduler,
    Tick,
    Verdict,
    WorkerJoined,
    WorkerSlots,
)


def M(i: int) -> TaskId:
    return TaskId(TaskKind.MAP, i)


def take(s: Scheduler, worker: str = "w") -> Assignment:
    a = s.next_assignment(worker)
    assert isinstance(a, Assignment), a
    return a


def succeed(s: Scheduler, a: Assignment, worker: str = "w") -> None:
    assert s.handle(AttemptSucceeded(worker, a.task, a.attempt)) is Verdict.ACCEPTED


def map_all(s: Scheduler, worker: str = "w") -> list[Assignment]:
    """Run every map task on C{worker}, one at a time, each at once successful."""
    done = []
    while s.phase is Phase.MAPPING:
        a = take(s, worker)
        s.handle(InputSized(a.task, 10 * len(a.keys)))
        succeed(s, a, worker)
        done.append(a)
    return done


def scheduler(keys: object, **kwargs: object) -> Scheduler:
    s = Scheduler(keys, reduce_tasks=1, **kwargs)  # type: ignore[arg-type]
    s.handle(WorkerJoined("w"))
    return s


# Sizing.


def test_tiny_items_go_in_growing_batches_and_every_key_once_in_order() -> None:
    keys = list(range(100_000))
    s = scheduler(iter(keys), batching=Batching(max_items=5000))
    done = map_all(s)
    assert [len(a.keys) for a in done[:4]] == [1, 8, 64, 512]  # at most 8x a quick one
    assert max(len(a.keys) for a in done) == 5000
    assert len(done) < 40
    assert [k for a in done for k in a.keys] == keys
    assert s.phase is Phase.REDUCING
    c = s.counts(TaskKind.MAP)
    assert (c.done, c.running, c.pending, c.total) == (100_000, 0, 0, 100_000)


def test_map_counts_are_items_and_len_source_stays_the_total() -> None:
    s = scheduler(range(1000), total=1000)
    assert s.counts(TaskKind.MAP).total == 1000
    a = take(s)
    succeed(s, a)
    b = take(s)
    assert len(b.keys) == 8
    c = s.counts(TaskKind.MAP)
    assert (c.done, c.running, c.pending, c.total) == (1, 8, 991, 1000)
    succeed(s, b)
    map_all(s)
    c = s.counts(TaskKind.MAP)
    assert (c.done, c.running, c.pending, c.total) == (1000, 0, 0, 1000)


def test_a_lazy_source_has_no_total_until_its_keys_run_out() -> None:
    s = scheduler(iter(range(20)))
    assert s.counts(TaskKind.MAP).total is None
    map_all(s)
    assert s.counts(TaskKind.MAP).total == 20


def test_big_items_travel_alone() -> None:
    s = scheduler(range(50), batching=Batching(target_bytes=64 * 1024))
    sizes = []
    while s.phase is Phase.MAPPING:
        a = take(s)
        s.handle(InputSized(a.task, 100_000 * len(a.keys)))  # 100 kB an item
        succeed(s, a)
        sizes.append(len(a.keys))
    assert sizes == [1] * 50


def test_a_batch_is_bounded_by_the_bytes_of_the_items_read_so_far() -> None:
    s = scheduler(range(10_000), batching=Batching(target_bytes=1000))
    sizes = []
    while s.phase is Phase.MAPPING:
        a = take(s)
        s.handle(InputSized(a.task, 10 * len(a.keys)))  # 10 bytes an item
        succeed(s, a)
        sizes.append(len(a.keys))
    assert max(sizes) == 100


def test_slow_items_stay_one_per_task_and_a_slow_batch_shrinks() -> None:
    s = scheduler(range(100), batching=Batching(target_seconds=0.1))
    now = 0.0
    for _ in range(5):
        a = take(s)
        now += 0.5  # each item takes half a second
        s.handle(Heard("w", now))
        succeed(s, a)
        assert len(a.keys) == 1

    s = scheduler(range(10_000), batching=Batching(target_seconds=0.1))
    sizes: list[int] = []
    now = 0.0
    while len(sizes) < 8:
        a = take(s)
        # Quick at first; from the 4th task on, an item takes 9.9 ms.
        now += 0.001 if len(sizes) < 3 else 0.0099 * len(a.keys)
        s.handle(Tick(now))
        succeed(s, a)
        sizes.append(len(a.keys))
    assert sizes[:4] == [1, 8, 64, 512]
    assert sizes[4:] == [10, 10, 10, 10]  # 0.1 s of such items


def test_a_long_link_is_not_held_against_a_batch() -> None:
    """
    Over a 100 ms round trip every task takes longer than the target as the
    scheduler sees it; the worker's own measure says the batch was quick.
    """
    s = scheduler(range(10_000), batching=Batching(target_seconds=0.1))
    sizes: list[int] = []
    now = 0.0
    while len(sizes) < 4:
        a = take(s)
        now += 0.1 + 0.0001 * len(a.keys)  # the round trip, and 0.1 ms an item
        s.handle(Tick(now))
        ran = 0.0001 * len(a.keys)
        assert s.handle(AttemptSucceeded("w", a.task, a.attempt, ran)) is Verdict.ACCEPTED
        sizes.append(len(a.keys))
    assert sizes == [1, 8, 64, 512]
    # Without the worker's measure, the batches stay as they were.
    s = scheduler(range(100), batching=Batching(target_seconds=0.1))
    now, sizes = 0.0, []
    while len(sizes) < 3:
        a = take(s)
        now += 0.1 + 0.0001 * len(a.keys)
        s.handle(Tick(now))
        succeed(s, a)
        sizes.append(len(a.keys))
    assert sizes == [1, 1, 1]


def test_a_worker_given_more_slots_holds_more_attempts() -> None:
    s = scheduler(range(100), batching=NO_BATCHING)
    assert take(s) and s.next_assignment("w") is NO_WORK  # one slot
    s.handle(WorkerSlots("w", 3))
    assert take(s) and take(s) and s.next_assignment("w") is NO_WORK
    assert len(s.running("w")) == 3


def test_a_slow_old_task_of_few_items_does_not_shrink_the_batches() -> None:
    s = scheduler(range(10_000))
    s.handle(WorkerJoined("v", slots=1))
    old = take(s, "v")  # waits for its process to start
    for _ in range(3):
        succeed(s, take(s))
    s.handle(Tick(5.0))
    succeed(s, old, "v")
    assert len(take(s).keys) == 512


def test_a_small_job_keeps_one_item_per_task() -> None:
    # Pool.map's default chunksize: len / (4 * processes), here 12 / 16.
    s = Scheduler([f"doc{i}" for i in range(12)], reduce_tasks=1, total=12)
    s.handle(WorkerJoined("w", slots=4))
    done = map_all(s)
    assert [a.keys for a in done] == [(f"doc{i}",) for i in range(12)]
    assert [a.task for a in done] == [M(i) for i in range(12)]


def test_no_batching_is_one_item_per_task() -> None:
    s = scheduler(range(100), batching=NO_BATCHING)
    assert all(len(a.keys) == 1 for a in map_all(s))


def test_bad_batching() -> None:
    for bad in ({"max_items": 0}, {"target_bytes": 0}, {"target_seconds": 0}, {"spread": 0}):
        with pytest.raises(ValueError):
            Batching(**bad)


# Failures.


def grown(keys: int = 10_000, **kwargs: object) -> tuple[Scheduler, Assignment]:
    """A scheduler whose next task is a batch of 8 keys: 1 to 8."""
    s = scheduler(range(keys), **kwargs)
    succeed(s, take(s))
    a = take(s)
    assert a.keys == tuple(range(1, 9))
    return s, a


def test_a_failed_batch_is_retried_whole() -> None:
    s, a = grown(max_attempts=2)
    s.handle(AttemptFailed("w", a.task, 1, "5", "E: bad", "tb"))
    b = take(s)
    assert b == Assignment(a.task, 2, a.keys)


def test_a_batch_that_fails_for_good_names_the_key_it_failed_at() -> None:
    s, a = grown()
    s.handle(AttemptFailed("w", a.task, 1, "5", "ValueError: bad five", "tb"))
    assert s.phase is Phase.FAILED
    assert s.failure is not None and s.failure.key == "5"


def test_a_batch_whose_failing_key_is_unknown_says_which_keys_it_had() -> None:
    s, a = grown()
    s.handle(AttemptFailed("w", a.task, 1, None, "the worker process died", "tb"))
    assert s.failure is not None and s.failure.key == "one of 8: 1 ... 8"


def test_skipping_splits_a_batch_and_skips_only_the_bad_record() -> None:
    s, a = grown(keys=9, max_attempts=2, skip_bad_records=True)
    s.handle(AttemptFailed("w", a.task, 1, "5", "E: bad five", "tb"))
    assert take(s) == Assignment(a.task, 2, a.keys)
    s.handle(AttemptFailed("w", a.task, 2, "5", "E: bad five", "tb"))
    assert s.phase is Phase.MAPPING and not s.skipped  # split, not skipped
    rest = take(s)
    assert rest.keys == (1, 2, 3, 4, 6, 7, 8) and rest.attempt == 1
    succeed(s, rest)
    alone = take(s)
    assert alone.keys == (5,) and alone.attempt == 1  # attempts of its own
    s.handle(AttemptFailed("w", alone.task, 1, "5", "E: bad five", "tb"))
    assert take(s) == Assignment(alone.task, 2, (5,))
    s.handle(AttemptFailed("w", alone.task, 2, "5", "E: bad five", "tb"))
    assert [(r.task, r.key, r.attempts) for r in s.skipped] == [(alone.task, "5", 2)]
    assert s.phase is Phase.REDUCING
    c = s.counts(TaskKind.MAP)
    assert (c.done, c.running, c.pending, c.total) == (9, 0, 0, 9)


def test_skipping_a_batch_whose_failing_key_is_unknown_splits_it_one_per_item() -> None:
    s, a = grown(keys=9, skip_bad_records=True)
    s.handle(AttemptFailed("w", a.task, 1, None, "the worker process died", "tb"))
    singles = [take(s)]
    s.handle(WorkerJoined("w2", slots=8))
    singles += [take(s, "w2") for _ in range(7)]
    assert [b.keys for b in singles] == [(k,) for k in range(1, 9)]
    assert len({b.task for b in singles} | {a.task}) == 9  # new tasks
    assert s.next_assignment("w2") is NO_WORK


def test_a_reported_key_that_matches_no_single_item_splits_one_per_item() -> None:
    s, a = grown(keys=9, skip_bad_records=True)
    s.handle(AttemptFailed("w", a.task, 1, "'not a key'", "E", "tb"))
    assert take(s).keys == (1,)


# A source that raises.


def test_a_source_whose_iter_raises_at_once_fails_the_job() -> None:
    class Broken:
        def __iter__(self) -> Iterator[int]:
            raise OSError("no such directory")

    s = Scheduler(Broken(), reduce_tasks=1)
    assert s.phase is Phase.FAILED and s.failure is None
    assert isinstance(s.source_error, OSError)


def test_a_source_whose_iter_raises_part_way_fails_the_job() -> None:
    def keys() -> Iterator[int]:
        yield from range(3)
        raise RuntimeError("listing broke")

    s = scheduler(keys())
    succeed(s, take(s))
    assert s.next_assignment("w") is NO_WORK
    assert s.phase is Phase.FAILED
    assert str(s.source_error) == "listing broke"


# Whole jobs.


def results(path: Path) -> dict[int, tuple[int, int]]:
    """The C{key<TAB>value} lines of TINY's output, as written."""
    out = {}
    for line in path.read_text().splitlines():
        key, value = line.split("\t")
        assert int(key) not in out, f"key {key} twice"
        out[int(key)] = ast.literal_eval(value)
    return out


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return path


TINY = """\
source = dict(enumerate(range({n})))

def mapfn(key, value):
    {bad}
    yield value % 100, value

def reducefn(key, values):
    return key, (len(values), sum(values))
"""


def test_thousands_of_tiny_items_give_the_exact_result_in_few_tasks(
    env: dict, tmp_path: Path
) -> None:
    n = 20_000
    script = write(tmp_path, TINY.format(n=n, bad="pass"))
    out = tmp_path / "out.tsv"
    r = octo("run", str(script), "-w", "2", "-v", "-o", str(out), env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    want: dict[int, list[int]] = {}
    for i in range(n):
        want.setdefault(i % 100, []).append(i)
    got = results(out)
    assert got == {k: (len(v), sum(v)) for k, v in want.items()}
    tasks = [line for line in r.stderr.splitlines() if "octo: map " in line and " done in " in line]
    assert 1 < len(tasks) < 200, len(tasks)
    records = sum(int(line.split("(")[1].split(" record")[0].replace(",", "")) for line in tasks)
    assert records == n  # every item mapped once, in some task


def test_a_failing_item_inside_a_batch_reports_its_key(env: dict, tmp_path: Path) -> None:
    bad = "if key == 4321:\n        raise ValueError('bad record 4321')"
    script = write(tmp_path, TINY.format(n=10_000, bad=bad))
    r = octo("run", str(script), "-w", "2", "--max-attempts", "2", env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "(key 4321) failed on worker" in r.stderr, r.stderr
    assert "ValueError: bad record 4321" in r.stderr
    assert 'job.py", line 5, in mapfn' in r.stderr


def test_skip_bad_records_drops_the_bad_item_alone(env: dict, tmp_path: Path) -> None:
    bad = "if key == 4321:\n        raise ValueError('bad record 4321')"
    n = 10_000
    script = write(tmp_path, TINY.format(n=n, bad=bad))
    out = tmp_path / "out.tsv"
    r = octo(
        "run",
        str(script),
        "-w",
        "2",
        "--max-attempts",
        "2",
        "--skip-bad-records",
        "-o",
        str(out),
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "(key 4321): it failed 2 attempts" in r.stderr, r.stderr
    want = Counter(i % 100 for i in range(n) if i != 4321)
    sums: Counter[int] = Counter()
    for i in range(n):
        if i != 4321:
            sums[i % 100] += i
    assert results(out) == {k: (want[k], sums[k]) for k in want}


ITER_RAISES = """\
class Source:
    def __iter__(self):
        yield from range(5)
        raise RuntimeError("listing broke after 5")

    def __getitem__(self, key):
        return key

source = Source()

def mapfn(key, value):
    yield key, value

def reducefn(key, values):
    return key, sum(values)
"""

GETITEM_RAISES = """\
class Source:
    def __iter__(self):
        return iter(range(5))

    def __getitem__(self, key):
        if key == 3:
            raise KeyError(f"cannot read {key}")
        return key

source = Source()

def mapfn(key, value):
    yield key, value

def reducefn(key, values):
    return key, sum(values)
"""


def test_a_source_whose_iter_raises_fails_octo_run_at_once(env: dict, tmp_path: Path) -> None:
    r = octo("run", str(write(tmp_path, ITER_RAISES)), "-w", "2", env=env, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "source raised while listing its keys: RuntimeError: listing broke after 5" in r.stderr
    assert 'job.py", line 4, in __iter__' in r.stderr  # the user's traceback...
    assert "octotwist/" not in r.stderr  # ...alone


def test_a_source_whose_getitem_raises_fails_octo_run_naming_the_key(
    env: dict, tmp_path: Path
) -> None:
    r = octo("run", str(write(tmp_path, GETITEM_RAISES)), "-w", "2", env=env, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "job failed: reading source[3] raised KeyError: 'cannot read 3'\n" in r.stderr
    assert 'job.py", line 7, in __getitem__' in r.stderr
    assert "octotwist/" not in r.stderr


def test_a_source_whose_iter_raises_ends_server_and_client_over_tcp(
    env: dict, tmp_path: Path
) -> None:
    port = free_port()
    script = write(tmp_path, ITER_RAISES)
    server = start("server", str(script), "--listen", f"tcp:{port}:interface=127.0.0.1", env=env)
    wait_for_port(port, server)
    client = start("client", f"127.0.0.1:{port}", "-p", "2", env=env)
    code, _, err = finish(server, timeout=60)
    assert code == 1, err
    assert "source raised while listing its keys" in err
    ccode, _, cerr = finish(client, timeout=60)  # told the job is over: no ghost worker
    assert ccode == 1, cerr
    assert "the server says the job is over" in cerr

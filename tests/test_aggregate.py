"""
octotwist.aggregate: each aggregation, as combiner, reducer or both, through
the real shuffle (MapOutput, then reduce_partition over two map tasks' runs),
gives what the plain Python definition gives on the grouped values; a user's
function is called as written, however it is spelled.
"""

from __future__ import annotations

import copy
import json
import pickle
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from conftest import BOOKS, octo, word_count

from octotwist import aggregate
from octotwist.shuffle import MapOutput, reduce_partition


def _distinct(values: list[Any]) -> list[Any]:
    unique: list[Any] = []
    for v in values:
        if v not in unique:
            unique.append(v)
    try:
        return sorted(unique)
    except TypeError:
        return unique


#: Each aggregation's meaning, written independently of the module.
DEFINITIONS = {
    "count": len,
    "sum": lambda vs: sum(vs),
    "min": lambda vs: min(vs),
    "max": lambda vs: max(vs),
    "first": lambda vs: vs[0],
    "last": lambda vs: vs[-1],
    "collect_set": _distinct,
}

#: Two map tasks' pairs each: counted (one value), listed, and mixed.
TASKS = {
    "counted ones": ([("a", 1), ("b", 1), ("a", 1)], [("b", 1), ("c", 1), ("a", 1)]),
    "counted threes": ([("a", 3), ("b", 3), ("a", 3)], [("b", 3)]),
    "listed ints": ([("a", 5), ("b", -2), ("a", 10**30)], [("a", 7), ("c", 0), ("b", 9)]),
    "bools": ([("a", True), ("b", True), ("a", True)], [("a", True)]),
    "counted then listed": ([("a", 1), ("b", 1)], [("a", 2), ("b", 1), ("a", 1)]),
    "strings": ([("a", "x"), ("a", "y"), ("b", "x")], [("a", "x"), ("b", "z")]),
}

#: The ones whose result on that data is defined (sum refuses strings).
CASES = [
    (name, data)
    for name in DEFINITIONS
    for data in TASKS
    if not (name == "sum" and data == "strings")
]


def _expected(name: str, tasks: tuple[list, ...], combined_by_same: bool) -> dict:
    """
    The definition applied to each key's values in task order; when the
    combiner is the same aggregation, to each task's partial results as the
    definition of that aggregation's merge says (counts add up, sets unite).
    """
    if not combined_by_same:
        groups: dict[Any, list] = defaultdict(list)
        for task in tasks:
            for k, v in task:
                groups[k].append(v)
        return {k: DEFINITIONS[name](vs) for k, vs in groups.items()}
    partials: dict[Any, list] = defaultdict(list)
    for task in tasks:
        grouped: dict[Any, list] = defaultdict(list)
        for k, v in task:
            grouped[k].append(v)
        for k, vs in grouped.items():
            partials[k].append(DEFINITIONS[name](vs))
    if name == "count":
        return {k: sum(ps) for k, ps in partials.items()}
    if name == "collect_set":
        return {k: _distinct([v for p in ps for v in p]) for k, ps in partials.items()}
    return {k: DEFINITIONS[name](ps) for k, ps in partials.items()}


def _shuffle(tasks, combinefn, reducefn, spill_values=1000) -> dict:
    runs = []
    for task in tasks:
        out = MapOutput(1, combinefn=combinefn, spill_values=spill_values)
        for spill in out.add_all(task):
            runs.append(spill[0])
        runs.extend(out.drain().values())
    keys, values = reduce_partition(reducefn, copy.deepcopy(runs), combinefn=combinefn)
    assert keys == sorted(keys)
    return dict(zip(keys, values, strict=True))


@pytest.mark.parametrize(("name", "data"), CASES)
@pytest.mark.parametrize("combine", ["none", "same", "same, spilling"])
def test_each_aggregation_gives_its_definition(name: str, data: str, combine: str) -> None:
    agg = getattr(aggregate, name)
    tasks = TASKS[data]
    spill = 1 if combine == "same, spilling" else 1000
    if spill == 1:  # every pair its own spill: a map task's partials are per pair
        tasks = tuple([pair] for task in tasks for pair in task)
    got = _shuffle(tasks, agg if combine != "none" else None, agg, spill)
    want = _expected(name, tasks, combined_by_same=combine != "none")
    assert got == want
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]


@pytest.mark.parametrize("data", ["counted ones", "listed ints", "counted then listed"])
def test_an_aggregation_combiner_feeds_a_users_reducer_its_partials(data: str) -> None:
    """combinefn = count, reducefn = the user's sum: the counts reach the user."""
    seen: list[tuple] = []

    def reducefn(key, values):
        seen.append((key, list(values)))
        return key, sum(values)

    tasks = TASKS[data]
    got = _shuffle(tasks, aggregate.count, reducefn)
    assert got == _expected("count", tasks, combined_by_same=True)
    per_task = [{k: sum(1 for kk, _ in task if kk == k) for k, _ in task} for task in tasks]
    assert dict(seen) == {k: [counts[k] for counts in per_task if k in counts] for k in got}


def test_a_users_combiner_then_an_aggregation_reducer_aggregates_what_it_gave() -> None:
    """combinefn = the user's count, reducefn = aggregate.sum: sums of counts."""
    tasks = TASKS["listed ints"]
    got = _shuffle(tasks, lambda k, vs: (k, len(vs)), aggregate.sum)
    assert got == _expected("count", tasks, combined_by_same=True)


def _calls_of(fn, work) -> int:
    """How many times C{fn}'s own code ran while C{work()} ran (a profile hook)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code is fn.__code__:
            calls += 1

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


def _plain_sum(key, values):
    return key, sum(values)


def _bare_sum(key, values):
    return sum(values)


@pytest.mark.parametrize("fn", [_plain_sum, _bare_sum])
def test_a_users_function_is_called_per_key_however_it_is_spelled(fn) -> None:
    """The old bytecode matcher took exactly these two for sum(): now they are called."""
    tasks = TASKS["counted ones"]
    results: list[dict] = []
    calls = _calls_of(fn, lambda: results.append(_shuffle(tasks, fn, fn)))
    keys = {k for task in tasks for k, _ in task}
    # once per key in each map task (the combiner), once per key (the reducer)
    per_task = sum(len({k for k, _ in task}) for task in tasks)
    assert calls == per_task + len(keys)
    assert results[0] == _expected("sum", tasks, combined_by_same=True)


def test_a_failing_aggregation_names_the_key() -> None:
    runs = [(["a", "b", "c"], [[1, 2], [1, "x"], [3]], [0, 0, 0])]
    current: list[Any] = [None]
    with pytest.raises(TypeError):
        reduce_partition(aggregate.sum, runs, current)
    assert current == ["b"]


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_aggregations_keep_their_identity_when_pickled(name: str) -> None:
    agg = getattr(aggregate, name)
    assert pickle.loads(pickle.dumps(agg)) is agg
    shipped = cloudpickle.loads(cloudpickle.dumps({"reducefn": agg, "combinefn": agg}))
    assert shipped["reducefn"] is agg and shipped["combinefn"] is agg
    assert repr(agg) == f"octotwist.aggregate.{name}"
    assert agg("k", [3, 1, 2]) == ("k", DEFINITIONS[name]([3, 1, 2]))


def test_a_sum_of_counted_strings_is_refused_as_sum_refuses_it() -> None:
    with pytest.raises(TypeError, match="unsupported operand"):
        _shuffle(([("a", "x"), ("a", "x")],), None, aggregate.sum)


def test_a_job_of_aggregations_runs_exact_through_octo_run(env: dict, tmp_path: Path) -> None:
    """
    Two steps through real task processes: words counted with count as
    combiner and reducer, then each count's words collected into a set, and
    each initial letter's shortest and longest word, checked against a Counter.
    """
    (tmp_path / "aggjob.py").write_text(
        textwrap.dedent(
            f"""
            import glob
            from octotwist import Step, aggregate
            source = {{p: None for p in sorted(glob.glob({str(BOOKS)!r} + "/*.txt"))}}

            def words(path, _):
                with open(path) as f:
                    for word in f.read().split():
                        yield word.lower(), 1

            def by_count(word, n):
                yield n, word
                yield "len:" + word[0], len(word)

            steps = [
                Step(words, aggregate.count, combinefn=aggregate.count),
                Step(by_count, aggregate.collect_set, reduce_tasks=3),
            ]
            """
        )
    )
    out = tmp_path / "out.jsonl"
    r = octo(
        "run", "aggjob.py", "-w", "2", "--format", "jsonl", "-o", str(out), env=env, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    got = {}
    for line in out.read_text().splitlines():
        k, v = json.loads(line)
        got[k] = v
    counts = word_count(sorted(BOOKS.glob("*.txt")))
    by_count: dict[Any, set] = defaultdict(set)
    for word, n in counts.items():
        by_count[n].add(word)
        by_count["len:" + word[0]].add(len(word))
    want = {str(k) if isinstance(k, int) else k: sorted(v) for k, v in by_count.items()}
    assert {str(k) if isinstance(k, int) else k: v for k, v in got.items()} == want

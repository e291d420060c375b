"""Partitioning, grouping, combining and merging, without a reactor."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections import Counter

import pytest

from octotwist.shuffle import (
    MapOutput,
    default_partition,
    merge_runs,
    reduce_partition,
    stable_hash,
)

#: Fixed vectors every machine must reproduce, or workers on two machines
#: would send one key to two reducers: the key, the canonical bytes the
#: definition hashes (a type tag, then UTF-8 for str, the bytes, the decimal
#: integer for ints and for integral floats, repr for other floats; tuples
#: bracketed, items joined by a comma), their CRC-32 (computed once, as
#: zlib.crc32 does, which is the standard CRC-32), and the partitions among
#: 2, 7, 13 and 64 reducers (the hash modulo the count).
PARTITIONS_AMONG = (2, 7, 13, 64)
PINNED = [
    ("the", b"sthe", 2613732506, [0, 0, 8, 26]),
    ("whale", b"swhale", 881929620, [0, 5, 0, 20]),
    ("Ahab", b"sAhab", 3261502032, [0, 5, 9, 16]),
    ("ünïcödé", b"s\xc3\xbcn\xc3\xafc\xc3\xb6d\xc3\xa9", 1294208844, [0, 5, 6, 12]),
    ("", b"s", 453955339, [1, 5, 6, 11]),
    ("\ud800lone", b"s\xed\xa0\x80lone", 2041395433, [1, 0, 12, 41]),  # lone surrogate
    (b"bytes", b"bbytes", 2202385185, [1, 0, 0, 33]),
    (b"", b"b", 1908338681, [1, 4, 2, 57]),
    (7, b"i7", 1297835806, [0, 1, 7, 30]),
    (-3, b"i-3", 666702404, [0, 4, 4, 4]),
    (10**20, b"i100000000000000000000", 3426037536, [0, 5, 12, 32]),
    (True, b"i1", 2755183147, [1, 3, 2, 43]),
    (2.0, b"i2", 1026659217, [1, 3, 12, 17]),
    (2.5, b"f2.5", 1163037490, [0, 6, 4, 50]),
    (None, b"n", 2013832146, [0, 4, 1, 18]),
    (("a", 1), b"t(sa,i1)", 2978179485, [1, 1, 8, 29]),
    ((), b"t()", 3008769880, [0, 4, 12, 24]),
]


@pytest.mark.parametrize(("key", "canonical", "expected", "partitions"), PINNED)
def test_stable_hash_is_pinned(key, canonical, expected, partitions) -> None:
    assert zlib.crc32(canonical) == expected  # the vector itself, by the definition
    assert stable_hash(key) == expected
    assert [default_partition(key, n) for n in PARTITIONS_AMONG] == partitions
    assert partitions == [expected % n for n in PARTITIONS_AMONG]


@pytest.mark.parametrize("only_str", [False, True])
@pytest.mark.parametrize("n", PARTITIONS_AMONG)
def test_map_output_partitions_by_the_pinned_hash(n: int, only_str: bool) -> None:
    # MapOutput has its own fast path when every key is a str that UTF-8
    # can encode (a lone surrogate takes the general path); it must agree.
    def fast(key: object) -> bool:
        return isinstance(key, str) and "\ud800" not in key

    pinned = [v for v in PINNED if fast(v[0]) or not only_str]
    out = MapOutput(n)
    list(out.add_all([(key, 1) for key, *_ in pinned]))
    got = {key: p for p, (keys, _, _) in out.drain().items() for key in keys}
    i = PARTITIONS_AMONG.index(n)
    assert got == {key: partitions[i] for key, _, _, partitions in pinned}


def test_partition_is_stable_across_hash_seeds() -> None:
    # str hashing is salted per process; our partitioning must not be.
    keys = [key for key, *_ in PINNED]
    script = (
        "from octotwist.shuffle import default_partition;"
        f"print([default_partition(k, 13) for k in {keys!r}])"
    )
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(out.stdout)
    pinned = [partitions[PARTITIONS_AMONG.index(13)] for *_, partitions in PINNED]
    assert outputs == {f"{pinned}\n"}


def test_equal_keys_land_in_the_same_partition() -> None:
    assert stable_hash(1) == stable_hash(1.0) == stable_hash(True)
    assert stable_hash((1, "a")) == stable_hash((1.0, "a"))
    assert stable_hash("1") != stable_hash(1)


def test_partitions_spread_keys() -> None:
    words = [f"word{i}" for i in range(10_000)]
    sizes = Counter(default_partition(w, 8) for w in words)
    assert set(sizes) == set(range(8))
    assert min(sizes.values()) > 1000  # about 1250 each


def groups(run) -> dict:
    """A run as {key: values}, whichever form it travels in."""
    keys, values, counts = run
    if type(values) is tuple:
        values = list(values) * len(keys)
    return {k: ([v] * c if c else v) for k, v, c in zip(keys, values, counts, strict=True)}


def test_map_output_groups_and_partitions() -> None:
    out = MapOutput(2, partitionfn=lambda k, n: 0 if k < "m" else 1)
    spills = list(out.add_all([("z", 1), ("a", 2), ("z", 3), ("b", 4)]))
    assert spills == []
    runs = out.drain()
    assert {p: groups(r) for p, r in runs.items()} == {0: {"a": [2], "b": [4]}, 1: {"z": [1, 3]}}
    assert out.records == 4


def test_equal_values_travel_as_counts() -> None:
    out = MapOutput(1)
    list(out.add_all([("b", 1), ("a", 1), ("b", 1)]))
    keys, values, counts = out.drain()[0]
    assert values == (1,)
    assert dict(zip(keys, counts, strict=True)) == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    "pairs",
    [
        [("a", 1), ("a", True), ("a", 1.0)],  # equal, but a reducefn can tell them apart
        [("a", 0.0), ("a", -0.0)],
        [("a", 2), ("b", 1), ("a", 1), ("a", 2)],  # order within a key
        [("a", [1]), ("a", [1])],  # unhashable
        [("a", (1,)), ("a", (True,))],
    ],
)
def test_values_reach_the_reducer_exactly_as_yielded(pairs) -> None:
    expected: dict = {}
    for k, v in pairs:
        expected.setdefault(k, []).append(v)
    for chunk in (1, 2, 1000):
        out = MapOutput(1, spill_values=chunk)
        runs = [s[0] for s in out.add_all(pairs)]
        runs += list(out.drain().values())
        merged = dict(merge_runs(runs))
        assert merged == expected
        for k in expected:  # types too, not just equality
            assert [(type(v), repr(v)) for v in merged[k]] == [
                (type(v), repr(v)) for v in expected[k]
            ]


def test_counting_then_ordered_chunks_keep_order(monkeypatch) -> None:
    monkeypatch.setattr("octotwist.shuffle.CHUNK", 2)
    pairs = [("a", 1), ("b", 1), ("a", 2), ("a", 1), ("b", "x"), ("a", 1)]
    out = MapOutput(1)
    assert list(out.add_all(pairs)) == []
    assert groups(out.drain()[0]) == {"a": [1, 2, 1, 1], "b": [1, "x"]}


def test_merge_mixes_counted_and_listed_runs_in_run_order() -> None:
    runs = [
        (["a", "b"], (1,), [2, 1]),
        (["a"], [[5, 1]], [0]),
        (["a", "c"], (1,), [1, 3]),
        (["b"], (True,), [1]),
    ]
    assert list(merge_runs(runs)) == [("a", [1, 1, 5, 1, 1]), ("b", [1, True]), ("c", [1, 1, 1])]


def test_combiner_runs_per_key() -> None:
    out = MapOutput(1, combinefn=lambda k, vs: (k, sum(vs)))
    list(out.add_all([("a", 1), ("a", 1), ("b", 5)]))
    assert groups(out.drain()[0]) == {"a": [2], "b": [5]}


def test_spills_when_the_buffer_is_full_and_merges_back() -> None:
    pairs = [(w, i) for i, w in enumerate("abcabcabca")]
    out = MapOutput(1, spill_values=4)
    runs = [spill[0] for spill in out.add_all(pairs)]
    runs.append(out.drain()[0])
    assert len(runs) == 3
    merged = list(merge_runs(runs))
    assert merged == [("a", [0, 3, 6, 9]), ("b", [1, 4, 7]), ("c", [2, 5, 8])]


def test_unsortable_keys_keep_first_seen_order() -> None:
    out = MapOutput(1, partitionfn=lambda k, n: 0)
    list(out.add_all([("a", 1), (1, 2), ("a", 3)]))
    assert groups(out.drain()[0]) == {"a": [1, 3], 1: [2]}
    assert list(merge_runs([out.drain().get(0, ([], [], []))])) == []
    assert [k for k, _ in merge_runs([(["a", 1], [[1, 3], [2]], [0, 0])])] == ["a", 1]


def test_default_partition_fast_path_matches_stable_hash() -> None:
    words = ["the", "ünïcödé", "", "x" * 300, "\ud800lone"]
    out = MapOutput(5)
    list(out.add_all([(w, 1) for w in words]))
    for p, (keys, _, _) in out.drain().items():
        assert all(default_partition(k, 5) == p for k in keys)


def test_bad_pairs_and_partitions_say_what_is_wrong() -> None:
    with pytest.raises(TypeError, match="mapfn must yield"):
        list(MapOutput(1).add_all(["oops"]))
    with pytest.raises(TypeError, match="mapfn must yield"):
        list(MapOutput(1).add_all([("a", 1, 2)]))
    bad = MapOutput(2, partitionfn=lambda k, n: 5)
    list(bad.add_all([("a", 1)]))
    with pytest.raises(ValueError, match=r"partitionfn\('a', 2\) returned 5"):
        bad.drain()
    with pytest.raises(TypeError, match="reducefn returned a generator"):
        reduce_partition(lambda k, vs: (yield k, 3), [(["a"], [[1]], [0])])


def test_reduce_merges_runs_in_order_and_reports_keys() -> None:
    current = [None]
    result = reduce_partition(
        lambda k, vs: (k, vs), [(["b", "a"], [[1], [2]], [0, 0]), (["a"], [3], [1])], current
    )
    assert result == (["a", "b"], [[2, 3], [1]])
    assert current == ["b"]
    with pytest.raises(ZeroDivisionError):
        reduce_partition(lambda k, vs: (k, 1 / 0), [(["x"], (1,), [1])], current)
    assert current == ["x"]


def test_equal_values_that_are_not_one_object_are_still_counted() -> None:
    big = [10**6 + 0 * i for i in range(3)]  # equal ints, three separate objects
    pairs = [("a", big[0]), ("b", big[1]), ("a", big[2]), ("c", "x")]
    out = MapOutput(1)
    assert list(out.add_all(pairs[:3])) == []
    keys, values, counts = out.drain()[0]
    assert values == (10**6,) and dict(zip(keys, counts, strict=True)) == {"a": 2, "b": 1}
    out = MapOutput(1)
    list(out.add_all(pairs))
    assert out.records == 4
    assert groups(out.drain()[0]) == {"a": [10**6, 10**6], "b": [10**6], "c": ["x"]}


def test_a_bad_pair_is_named_on_the_counting_path() -> None:
    out = MapOutput(1)
    with pytest.raises(TypeError, match=r"mapfn must yield \(key, value\) pairs, got 'abc'"):
        list(out.add_all([("a", 1), ("b", 1), "abc"]))


def test_runs_of_atoms_pack_without_a_memo_and_unpack_the_same() -> None:
    from octotwist import codec
    from octotwist.shuffle import is_flat

    out = MapOutput(3)
    list(out.add_all([("a", 1), ("b", 1), ("a", 1), ("é", 1)]))
    for run in out.drain().values():
        assert is_flat(run[0], run[1])
        assert codec.unpack(codec.pack_flat(run)) == codec.unpack(codec.pack(run))
    mixed = (["a", 1, 2.5, b"x", None, True], [10**30, -1, "s", 0.1, False, None])
    assert is_flat(*mixed)
    assert codec.unpack(codec.pack_flat(mixed, compress=False)) == mixed
    # anything with parts keeps the memo: a list of values, a tuple key, an object
    assert not is_flat(["a"], [[1, 1]])
    assert not is_flat([("a", 1)], [1])
    assert not is_flat(["a"], [object()])

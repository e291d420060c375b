"""Partitioning, grouping, combining and merging, without a reactor."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from octotwist.shuffle import (
    MapOutput,
    default_partition,
    merge_runs,
    reduce_partition,
    stable_hash,
)

KEYS = ["the", "whale", "Ahab", "ünïcödé", "", "x" * 1000, b"bytes", 7, -3, 2.5, None, ("a", 1)]


def test_partition_is_stable_across_hash_seeds() -> None:
    # str hashing is salted per process; our partitioning must not be.
    script = (
        "from octotwist.shuffle import default_partition;"
        f"print([default_partition(k, 13) for k in {KEYS!r}])"
    )
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(out.stdout)
    assert outputs == {f"{[default_partition(k, 13) for k in KEYS]}\n"}


def test_equal_keys_land_in_the_same_partition() -> None:
    assert stable_hash(1) == stable_hash(1.0) == stable_hash(True)
    assert stable_hash((1, "a")) == stable_hash((1.0, "a"))
    assert stable_hash("1") != stable_hash(1)


def test_partitions_spread_keys() -> None:
    words = [f"word{i}" for i in range(10_000)]
    sizes = Counter(default_partition(w, 8) for w in words)
    assert set(sizes) == set(range(8))
    assert min(sizes.values()) > 1000  # about 1250 each


def test_map_output_groups_sorts_and_partitions() -> None:
    out = MapOutput(2, partitionfn=lambda k, n: 0 if k < "m" else 1)
    spills = list(out.add_all([("z", 1), ("a", 2), ("z", 3), ("b", 4)]))
    assert spills == []
    assert out.drain() == {0: [("a", [2]), ("b", [4])], 1: [("z", [1, 3])]}
    assert out.records == 4


def test_combiner_runs_per_key() -> None:
    out = MapOutput(1, combinefn=lambda k, vs: (k, sum(vs)))
    list(out.add_all([("a", 1), ("a", 1), ("b", 5)]))
    assert out.drain() == {0: [("a", [2]), ("b", [5])]}


def test_spills_when_the_buffer_is_full_and_merges_back() -> None:
    pairs = [(w, 1) for w in "abcabcabca"]
    out = MapOutput(1, spill_values=4)
    runs = [spill[0] for spill in out.add_all(pairs)]
    runs.append(out.drain()[0])
    assert len(runs) == 3
    merged = merge_runs(runs)
    assert merged == [("a", [1] * 4), ("b", [1] * 3), ("c", [1] * 3)]


def test_unsortable_keys_keep_first_seen_order() -> None:
    out = MapOutput(1, partitionfn=lambda k, n: 0)
    list(out.add_all([("a", 1), (1, 2), ("a", 3)]))
    assert out.drain() == {0: [("a", [1, 3]), (1, [2])]}


def test_bad_pairs_and_partitions_say_what_is_wrong() -> None:
    with pytest.raises(TypeError, match="mapfn must yield"):
        list(MapOutput(1).add_all(["oops"]))
    bad = MapOutput(2, partitionfn=lambda k, n: 5)
    list(bad.add_all([("a", 1)]))
    with pytest.raises(ValueError, match=r"partitionfn\('a', 2\) returned 5"):
        bad.drain()
    with pytest.raises(TypeError, match="reducefn must return"):
        reduce_partition(lambda k, vs: 3, [[("a", [1])]])


def test_reduce_merges_runs_in_order_and_reports_keys() -> None:
    seen = []
    result = reduce_partition(
        lambda k, vs: (k, vs), [[("b", [1]), ("a", [2])], [("a", [3])]], seen.append
    )
    assert result == [("a", [2, 3]), ("b", [1])]
    assert seen == ["a", "b"]

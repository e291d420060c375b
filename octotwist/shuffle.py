"""
The shuffle, without I/O: partition map output, group it, combine it, and
merge it back together for the reducers.

Map side (L{MapOutput}): the pairs one map task yields are grouped by key in
memory, reduced by C{combinefn} when the job has one, split by partition and
sorted by key into I{runs}: lists of C{(key, values)}.  A task whose output
outgrows a bound emits its runs early (a spill) and starts again, so a worker's
memory is bounded by the bound, not by the task.

Reduce side (L{merge_runs}, L{reduce_partition}): a partition's runs, in map
task order, are merged into one group per key; C{reducefn} runs once per key in
key order.

Partitioning is stable across processes and machines: L{stable_hash} never
uses the built-in C{hash()}, which is salted per process for C{str}.
"""

from __future__ import annotations

import pickle
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Key = Any
Run = list[tuple[Key, list[Any]]]
PartitionFn = Callable[[Key, int], int]
CombineFn = Callable[[Key, list[Any]], tuple[Key, Any]]
ReduceFn = Callable[[Key, list[Any]], tuple[Key, Any]]

#: Values held by one L{MapOutput} before it spills its runs.
DEFAULT_SPILL_VALUES = 2_000_000


def _canonical(key: Key) -> bytes:
    """Bytes that are equal whenever keys are equal (C{1 == 1.0 == True})."""
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + key
    if isinstance(key, (bool, int)):
        return b"i%d" % key
    if isinstance(key, float):
        if key.is_integer():
            return b"i%d" % int(key)
        return b"f" + repr(key).encode()
    if isinstance(key, tuple):
        return b"t(" + b",".join(_canonical(k) for k in key) + b")"
    if key is None:
        return b"n"
    return b"p" + pickle.dumps(key, protocol=4)


def stable_hash(key: Key) -> int:
    """
    A 32-bit hash of C{key} that is the same in every process and on every
    machine.  Keys that compare equal hash equal for C{str}, C{bytes}, numbers,
    C{None} and tuples of them; other keys are hashed by their pickle, so a
    job with exotic keys should define C{partitionfn}.
    """
    return zlib.crc32(_canonical(key))


def default_partition(key: Key, n: int) -> int:
    """The partition of C{key} among C{n} when the job has no C{partitionfn}."""
    return stable_hash(key) % n


def _sorted_items(groups: dict[Key, list[Any]]) -> Run:
    try:
        return sorted(groups.items())
    except TypeError:  # keys of mixed types: keep first-seen order
        return list(groups.items())


class MapOutput:
    """
    Collects one map task's output and cuts it into per-partition runs.

    @param partitions: number of reduce partitions.
    @param partitionfn: C{(key, n) -> int}; the stable default when C{None}.
    @param combinefn: C{(key, values) -> (key, value)}, or C{None}.
    @param spill_values: values to hold before L{add_all} asks for a spill.
    """

    def __init__(
        self,
        partitions: int,
        partitionfn: PartitionFn | None = None,
        combinefn: CombineFn | None = None,
        spill_values: int = DEFAULT_SPILL_VALUES,
    ) -> None:
        self.partitions = partitions
        self.partitionfn = partitionfn or default_partition
        self.combinefn = combinefn
        self.spill_values = spill_values
        self.records = 0
        self._groups: defaultdict[Key, list[Any]] = defaultdict(list)

    def add_all(self, pairs: Iterable[tuple[Key, Any]]) -> Iterator[dict[int, Run]]:
        """
        Consume the pairs a mapfn produced, yielding the runs of each spill as
        the buffer fills up.  Call L{drain} afterwards for the rest.

        @raise TypeError: an item is not a C{(key, value)} pair.
        """
        groups = self._groups
        held = 0
        for pair in pairs:
            try:
                k, v = pair
            except (TypeError, ValueError):
                raise TypeError(f"mapfn must yield (key, value) pairs, got {pair!r}") from None
            groups[k].append(v)
            held += 1
            if held >= self.spill_values:
                self.records += held
                held = 0
                yield self.drain()
                groups = self._groups
        self.records += held

    def drain(self) -> dict[int, Run]:
        """Combine, partition and sort what is buffered; empty the buffer."""
        groups, self._groups = self._groups, defaultdict(list)
        if self.combinefn is not None:
            combine = self.combinefn
            groups = {k: [_second(combine(k, vs), "combinefn")] for k, vs in groups.items()}
        split: dict[int, dict[Key, list[Any]]] = {}
        n = self.partitions
        partition = self.partitionfn
        for k, vs in groups.items():
            p = partition(k, n)
            if not (isinstance(p, int) and 0 <= p < n):
                raise ValueError(
                    f"partitionfn({k!r}, {n}) returned {p!r}; it must return an int in range({n})"
                )
            bucket = split.get(p)
            if bucket is None:
                bucket = split[p] = {}
            bucket[k] = vs
        return {p: _sorted_items(g) for p, g in sorted(split.items())}


def _second(pair: Any, fname: str) -> Any:
    try:
        _, value = pair
    except (TypeError, ValueError):
        raise TypeError(f"{fname} must return a (key, value) pair, got {pair!r}") from None
    return value


def merge_runs(runs: Iterable[Run]) -> Run:
    """
    Merge a partition's runs (in map task order) into one group per key.
    Values keep the order of the runs, and each run's order within a key.
    """
    groups: defaultdict[Key, list[Any]] = defaultdict(list)
    for run in runs:
        for k, vs in run:
            groups[k].extend(vs)
    return _sorted_items(groups)


def reduce_partition(
    reducefn: ReduceFn, runs: Iterable[Run], on_key: Callable[[Key], None] | None = None
) -> list[tuple[Key, Any]]:
    """
    Run C{reducefn} once per key of a partition, in key order.

    @param on_key: called with each key before C{reducefn} sees it, so that a
        failure can name the key it failed on.
    """
    out = []
    for k, vs in merge_runs(runs):
        if on_key is not None:
            on_key(k)
        result = reducefn(k, vs)
        try:
            rk, rv = result
        except (TypeError, ValueError):
            raise TypeError(f"reducefn must return a (key, value) pair, got {result!r}") from None
        out.append((rk, rv))
    return out

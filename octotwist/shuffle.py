"""
The shuffle, without I/O: partition map output, group it, combine it, and
merge it back together for the reducers.

Map side (L{MapOutput}): the pairs one map task yields are grouped by key in
memory, reduced by C{combinefn} when the job has one, and split by partition
into I{runs}.  A task whose output outgrows a bound emits its runs early (a
spill) and starts again, so a worker's memory is bounded by the bound, not by
the task.

Reduce side (L{merge_runs}, L{reduce_partition}): a partition's runs, in map
task order, are merged into one group per key (a dict, then one sort of the
distinct keys); C{reducefn} runs once per key in key order.

Why it is shaped like this (docs/performance.md): a word count's map output is
tens of millions of C{(word, 1)} pairs, and every Python statement per pair
costs a good fraction of the user's C{mapfn}.  So while every value is the
same value, the keys are only counted (one fused loop, L{MapOutput._count}),
and the value travels once per run instead of once per pair.  A run is
C{(keys, values, counts)}:

  - C{values == (v,)}, a 1-tuple: key C{i} has C{counts[i]} copies of C{v};
  - otherwise C{values[i]} is key C{i}'s value repeated C{counts[i]} times,
    or, when C{counts[i] == 0}, the list of key C{i}'s values.

Counting is used only when it cannot change what C{reducefn} sees: every value
has the same type, one of int, str, bytes, bool, None, whose equal values are
indistinguishable (C{1 == True == 1.0} and C{0.0 == -0.0} are not), and equal
to the buffer's value.  Any other chunk makes the rest of the spill group pair
by pair, keeping each key's values in the order they were yielded.

An L{octotwist.aggregate} as C{combinefn} or C{reducefn} is not called per
key: it is computed for every key at once, from the counts alone where the
keys were only counted (a word count's C{count} or C{sum}).  Recognising it
is an identity check; a user's function is always called as written.

Partitioning is stable across processes and machines: L{stable_hash} never
uses the built-in C{hash()}, which is salted per process for C{str}.
"""

from __future__ import annotations

import inspect
import pickle
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from octotwist.aggregate import Aggregate

Key = Any
#: C{(keys, values, counts)}; see the module docstring.
Run = tuple[list[Key], list[Any] | tuple[Any], list[int]]
PartitionFn = Callable[[Key, int], int]
#: Both return C{(key, value)} or a bare value (L{_result}).
CombineFn = Callable[[Key, list[Any]], Any]
ReduceFn = Callable[[Key, list[Any]], Any]

#: Values held by one L{MapOutput} (a counted key holds one) before it spills.
DEFAULT_SPILL_VALUES = 2_000_000

#: Pairs taken from a mapfn at a time.
CHUNK = 65_536

#: Value types whose equal values are indistinguishable to a reducefn.
_INTERCHANGEABLE = frozenset({int, str, bytes, bool, type(None)})

_UNSET: Any = object()
_STR_SEED = zlib.crc32(b"s")


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


def _default_partitions(keys: list[Key], n: int) -> list[int]:
    """L{default_partition} of each key; one C-speed pass when all are C{str}."""
    if set(map(type, keys)) <= {str}:
        try:
            return [zlib.crc32(k.encode(), _STR_SEED) % n for k in keys]
        except UnicodeEncodeError:  # a lone surrogate: the general path handles it
            pass
    return [zlib.crc32(_canonical(k)) % n for k in keys]


def _sorted_keys(keys: list[Key]) -> list[Key]:
    try:
        return sorted(keys)
    except TypeError:  # keys of mixed types: keep first-seen order
        return keys


def _pairs_iterator(pairs: Any) -> Iterator[Any]:
    """
    An iterator over what a mapfn returned, or a C{TypeError} that says what
    it did instead: the two mistakes an octo.py author makes are forgetting
    to yield (C{None}) and returning one pair where an iterable of pairs is
    due.  The latter would otherwise be iterated as two "pairs", its key and
    its value, and fail on one of them with a message about neither.
    """
    if pairs is None:
        raise TypeError(
            "mapfn returned None; it must yield key, value pairs (or return a list of them)"
        )
    if type(pairs) in (tuple, list) and len(pairs) == 2 and not all(map(_looks_paired, pairs)):
        raise TypeError(
            f"mapfn returned a single pair {_short(pairs)}; use `yield k, v` or `return [(k, v)]`"
        )
    try:
        return iter(pairs)
    except TypeError:
        raise TypeError(
            f"mapfn returned {_short(pairs)}, which is not iterable; it must yield "
            "key, value pairs (or return a list of them)"
        ) from None


def _looks_paired(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


def _pair(item: Any) -> tuple[Key, Any]:
    try:
        k, v = item
    except (TypeError, ValueError):
        raise TypeError(f"mapfn must yield (key, value) pairs, got {item!r}") from None
    return k, v


class MapOutput:
    """
    Collects one map task's output and cuts it into per-partition runs.

    @param partitions: number of reduce partitions.
    @param partitionfn: C{(key, n) -> int}; the stable default when C{None}.
    @param combinefn: C{(key, values) -> (key, value)} or a value (see
        L{_result}), or C{None}.
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
        self.partitionfn = partitionfn
        self.combinefn = combinefn
        self.spill_values = spill_values
        self.records = 0
        self._reset()

    def _reset(self) -> None:
        # Either counting (every value so far is the one value self._one:
        # key -> count in self._counts) or ordered (key -> values in
        # self._lists); once a chunk needs the ordered path, the rest of the
        # spill takes it too.
        self._one: Any = None
        self._counts: dict[Key, int] = {}
        self._lists: dict[Key, list[Any]] = {}
        self._listed = 0  # values held in _lists
        self._ordered = False

    def add_all(self, pairs: Iterable[tuple[Key, Any]]) -> Iterator[dict[int, Run]]:
        """
        Consume the pairs a mapfn produced, yielding the runs of each spill as
        the buffer fills up.  Call L{drain} afterwards for the rest.

        @raise TypeError: an item is not a C{(key, value)} pair, or C{pairs}
            is not an iterable of them (the message says what mapfn did).
        """
        it = _pairs_iterator(pairs)
        size = max(1, min(CHUNK, self.spill_values))
        carry = 0  # pairs of the current chunk already taken by _count
        while True:
            if self._ordered:
                want, carry = size - carry, 0
                chunk = list(islice(it, want))
                more = len(chunk) == want
                self.records += len(chunk)
                self._append(chunk)
            else:
                taken, odd = self._count(islice(it, size))
                more = taken == size or odd is not _UNSET
                if odd is not _UNSET:
                    self.records += 1
                    self._append([odd])
                    if taken < size:  # finish the chunk before checking the bound
                        carry = taken
                        continue
            if len(self._counts) + self._listed >= self.spill_values:
                yield self.drain()
            if not more:
                return

    def _count(self, items: Iterator[Any]) -> tuple[int, Any]:
        """
        Count the keys of C{items} while each value is the buffer's one value.

        A plain loop, fused: unpack, compare by identity (the C{1} a word
        count yields is one object), add one.  That is about 80 ns a pair,
        half of what separate C passes (check lengths, values, types, then
        C{Counter}) cost, because each of those passes walks the chunk again.

        @return: pairs taken (the first pair that does not fit included),
            and that pair, or C{_UNSET} if every pair fitted.
        """
        counts = self._counts
        one = self._one
        n = 0
        if not counts:
            for item in items:
                k, v = _pair(item)
                n = 1
                if type(v) not in _INTERCHANGEABLE:
                    return n, item
                counts[k] = 1
                one = self._one = v
                break
            else:
                return 0, _UNSET
        self.records += n
        # Every pair taken adds one to a count, so the pairs taken are the
        # growth of the counts' sum: one C pass per chunk over the distinct
        # keys instead of an addition per pair in the loop.
        before = sum(counts.values())
        get = counts.get
        one_type = type(one)
        for item in items:
            try:
                k, v = item
            except (TypeError, ValueError):
                raise TypeError(f"mapfn must yield (key, value) pairs, got {item!r}") from None
            if v is not one and not (type(v) is one_type and v == one):
                taken = sum(counts.values()) - before
                self.records += taken
                return n + taken + 1, item
            counts[k] = get(k, 0) + 1
        taken = sum(counts.values()) - before
        self.records += taken
        return n + taken, _UNSET

    def _append(self, chunk: list[Any]) -> None:
        """Add a chunk pair by pair, keeping the order of each key's values."""
        lists = self._lists
        if not self._ordered:
            self._ordered = True
            one = self._one
            for k, c in self._counts.items():
                lists[k] = [one] * c
                self._listed += c
            self._counts = {}
        for item in chunk:
            k, v = _pair(item)
            values = lists.get(k)
            if values is None:
                lists[k] = [v]
            else:
                values.append(v)
        self._listed += len(chunk)

    def drain(self) -> dict[int, Run]:
        """Combine and partition what is buffered; empty the buffer."""
        one, counts, lists = self._one, self._counts, self._lists
        self._reset()
        combined: dict[Key, Any] | None = None
        if self.combinefn is not None:
            combined = self._combine(one, counts, lists)
        keys = list(combined if combined is not None else counts or lists)
        runs: dict[int, Run] = {}
        for p, ks in self._split(keys).items():
            if combined is not None:
                runs[p] = (ks, list(map(combined.__getitem__, ks)), [1] * len(ks))
            elif counts:
                runs[p] = (ks, (one,), list(map(counts.__getitem__, ks)))
            else:
                runs[p] = (ks, list(map(lists.__getitem__, ks)), [0] * len(ks))
        return runs

    def _combine(
        self, one: Any, counts: dict[Key, int], lists: dict[Key, list[Any]]
    ) -> dict[Key, Any]:
        """
        C{combinefn} once per buffered key, as documented: its value replaces
        the key's list (counted keys get C{[one] * count}).  The result is
        unpacked in the loop rather than by a helper: one call per key less.
        An L{Aggregate} is computed for every key at once instead.
        """
        combine = self.combinefn
        assert combine is not None
        if isinstance(combine, Aggregate):
            return combine.of_counts(one, counts) if counts else combine.of_lists(lists)
        combined: dict[Key, Any] = {}
        for k, c in counts.items():
            result = combine(k, [one] * c)
            if type(result) is tuple and len(result) == 2 and result[0] is k:
                combined[k] = result[1]
            else:
                combined[k] = _result(k, result, "combinefn")[1]
        for k, vs in lists.items():
            result = combine(k, vs)
            if type(result) is tuple and len(result) == 2 and result[0] is k:
                combined[k] = result[1]
            else:
                combined[k] = _result(k, result, "combinefn")[1]
        return combined

    def _split(self, keys: list[Key]) -> dict[int, list[Key]]:
        """The keys of each partition, in partition order."""
        n = self.partitions
        if self.partitionfn is None:
            where = _default_partitions(keys, n)
        else:
            where = [self.partitionfn(k, n) for k in keys]
            for k, p in zip(keys, where, strict=True):
                if not (isinstance(p, int) and 0 <= p < n):
                    raise ValueError(
                        f"partitionfn({k!r}, {n}) returned {p!r}; "
                        f"it must return an int in range({n})"
                    )
        split: dict[int, list[Key]] = {}
        for k, p in zip(keys, where, strict=True):
            bucket = split.get(p)
            if bucket is None:
                split[p] = [k]
            else:
                bucket.append(k)
        return {p: split[p] for p in sorted(split)}


#: Types with no parts: a run of only these can be pickled without a memo.
_ATOMS = frozenset({str, bytes, int, float, bool, type(None)})


def is_flat(*columns: Sequence[Any]) -> bool:
    """
    Whether C{columns} (a run's keys and values; a reduce task's results)
    hold atoms only, each item one of L{_ATOMS}, so that they may be
    pickled without a memo (L{octotwist.codec.pack_flat}).  One C pass
    over each; a word count's always do.
    """
    return all(set(map(type, column)) <= _ATOMS for column in columns)


def _result(key: Key, result: Any, fname: str) -> tuple[Key, Any]:
    """
    The C{(key, value)} that a reducefn or combinefn's C{result} for C{key}
    stands for.  The guide's functions return C{key, value}; octo.py's
    returned a bare value (C{return sum(values)}, a dict), which it stored
    under the key.  Both are accepted: a 2-tuple whose first item is, or
    equals, C{key} is the pair, anything else is the value.  (The callers
    check the common case, C{result[0] is key}, inline: a call per key less.)

    @raise TypeError: C{result} is a generator: the function yields, and
        its values would be the generator object, which cannot be pickled.
    """
    if type(result) is tuple and len(result) == 2 and _same_key(result[0], key):
        return result[0], result[1]
    if inspect.isgenerator(result):
        raise TypeError(
            f"{fname} returned a generator: it must return (key, value) or a value; "
            "use return, not yield"
        )
    return key, result


def _same_key(first: Any, key: Key) -> bool:
    if first is key:
        return True
    try:
        return bool(first == key)
    except Exception:  # an == that raises, or answers with an array: not the key
        return False


def _merge(runs: Iterable[Run]) -> tuple[Any, dict[Key, int], dict[Key, list[Any]]]:
    """
    A partition's runs (in map task order), merged: C{(one, counted,
    groups)}.  While every run is counted with the same value C{one}, only
    counts are added up (C{counted}); the first run that is not turns them
    into lists, in order (C{groups}).  One of the two is empty.
    """
    counted: dict[Key, int] = {}
    one: Any = _UNSET
    groups: dict[Key, list[Any]] = {}
    listing = False
    for keys, values, counts in runs:
        if type(values) is tuple:
            (v,) = values
            if not listing and (one is _UNSET or (type(one) is type(v) and one == v)):
                one = v
                if counted:
                    count_of = counted.get
                    for k, c in zip(keys, counts, strict=True):
                        counted[k] = count_of(k, 0) + c
                else:
                    counted = dict(zip(keys, counts, strict=True))
                continue
            values = [v] * len(keys)
        listing = True
        if counted:
            groups = {k: [one] * c for k, c in counted.items()}
            counted = {}
        get = groups.get
        for k, v, c in zip(keys, values, counts, strict=True):
            if c == 1:
                have = get(k)
                if have is None:
                    groups[k] = [v]
                else:
                    have.append(v)
                continue
            vs = [v] * c if c else v
            have = get(k)
            if have is None:
                groups[k] = vs
            else:
                have += vs
    return one, counted, groups


def merge_runs(runs: Iterable[Run]) -> Iterator[tuple[Key, list[Any]]]:
    """
    Merge a partition's runs (in map task order) into one group per key, in
    key order.  Values keep the order of the runs, and each run's order
    within a key.
    """
    one, counted, groups = _merge(runs)
    if counted:
        for k in _sorted_keys(list(counted)):
            yield k, [one] * counted[k]
    else:
        for k in _sorted_keys(list(groups)):
            yield k, groups.pop(k)


def reduce_partition(
    reducefn: ReduceFn,
    runs: Iterable[Run],
    current: list[Any] | None = None,
    combinefn: CombineFn | None = None,
) -> tuple[list[Key], list[Any]]:
    """
    Run C{reducefn} once per key of a partition, in key order.

    @param current: if given, C{current[0]} is set to each key before
        C{reducefn} sees it, so that a failure can name the key it failed on.
    @param combinefn: the step's: a reducefn that is the same L{Aggregate}
        merges its partial values rather than aggregating them anew.
    @return: the results, as two lists: keys and values.
    """
    if isinstance(reducefn, Aggregate):
        return _aggregate(reducefn, runs, current, partials=combinefn is reducefn)
    return _call_reducefn(reducefn, runs, current)


def _aggregate(
    agg: Aggregate, runs: Iterable[Run], current: list[Any] | None, partials: bool
) -> tuple[list[Key], list[Any]]:
    """
    L{reduce_partition} for an aggregation: every key at once, from its
    count alone where the runs were only counted.  If that raises (a
    C{sum} of strings), the keys are gone through one at a time, so that
    the error names the key it is about.
    """
    one, counted, groups = _merge(runs)
    if counted and partials:
        groups = {k: [one] * c for k, c in counted.items()}
        counted = {}
    try:
        results = agg.of_counts(one, counted) if counted else agg.of_lists(groups, partials)
    except Exception:
        each = agg.of_partials if partials else agg.of_values
        where = current if current is not None else [None]
        for k in counted or groups:
            where[0] = k
            each([one] * counted[k] if counted else groups[k])
        raise
    keys = _sorted_keys(list(results))
    return keys, list(map(results.__getitem__, keys))


def _call_reducefn(
    reducefn: ReduceFn, runs: Iterable[Run], current: list[Any] | None
) -> tuple[list[Key], list[Any]]:
    """The general path of L{reduce_partition}: C{reducefn} per key."""
    where = current if current is not None else [None]
    out_keys: list[Key] = []
    out_values: list[Any] = []
    add_key, add_value = out_keys.append, out_values.append
    for k, vs in merge_runs(runs):
        where[0] = k
        result = reducefn(k, vs)
        if type(result) is tuple and len(result) == 2 and result[0] is k:
            add_key(k)
            add_value(result[1])
        else:
            rk, rv = _result(k, result, "reducefn")
            add_key(rk)
            add_value(rv)
    return out_keys, out_values

"""
Reductions octotwist knows by name: C{reducefn = octotwist.aggregate.sum}.

A job's own C{reducefn} is a black box: the shuffle must build each key's
list of values and call it once per key, whatever it does.  An aggregation
named from this module says what it computes, so the shuffle can skip both
where the data allow: a key whose values were only counted (a word count's
C{1}s, L{octotwist.shuffle}) gets its C{count} or C{sum} from the count
alone, and the others go through a built-in (C{sum}, C{len}, C{min}) mapped
over every key's list at once, not a Python call per key.

Each aggregation is usable as C{combinefn} and as C{reducefn}, and each is
associative: a combiner that is one aggregation followed by a reducer that
is the same one gives what the reducer alone gives on all the values.  (The
shuffle knows the pair: with C{combinefn = reducefn = count}, the reducer
adds up the map tasks' counts instead of counting them.)  Any other pairing
means what it says: a reducer that is an aggregation gets the combiner's
values, as a function of the user's would.

They are recognised by identity, never by looking at code: a user's own
function, however it is spelled, is called as written.  They pickle by
name, so a job shipped to a worker (cloudpickle) still holds the same
objects there.
"""

from __future__ import annotations

import builtins
import itertools
import operator
from collections.abc import Callable
from typing import Any

__all__ = ["Aggregate", "collect_set", "count", "first", "last", "max", "min", "sum"]

#: The types whose C{one * n} is what adding C{n} copies of C{one} gives.
_MULTIPLIED = (int, bool)


class Aggregate:
    """
    A named reduction of a key's values, associative, callable as
    C{combinefn} or C{reducefn}: C{agg(key, values)} is C{(key, value)}.

    @ivar name: its name in this module (and how it pickles).
    @ivar of_values: a key's value from its list of values.
    @ivar of_partials: a key's value from the values this aggregation
        gave for parts of its list (each map task's, as a combiner).
    """

    def __init__(
        self,
        name: str,
        of_values: Callable[[list[Any]], Any],
        of_partials: Callable[[list[Any]], Any],
        of_copies: Callable[[Any, dict[Any, int]], dict[Any, Any]],
        doc: str,
    ) -> None:
        self.name = name
        self.of_values = of_values
        self.of_partials = of_partials
        self._of_copies = of_copies
        self.__doc__ = doc

    def __call__(self, key: Any, values: list[Any]) -> tuple[Any, Any]:
        return key, self.of_values(values)

    def __repr__(self) -> str:
        return f"octotwist.aggregate.{self.name}"

    def __reduce__(self) -> tuple[Callable[[str], Aggregate], tuple[str]]:
        return _named, (self.name,)

    def of_counts(self, one: Any, counts: dict[Any, int]) -> dict[Any, Any]:
        """
        Each key's value when its values are C{counts[key]} copies of
        C{one}: what C{of_values([one] * count)} gives, key by key, without
        building the lists where the aggregation allows.
        """
        return self._of_copies(one, counts)

    def of_lists(self, lists: dict[Any, list[Any]], partials: bool = False) -> dict[Any, Any]:
        """
        Each key's value from its list of values, or of partial values
        (L{of_partials}): one C{map} over every key's list.
        """
        each = self.of_partials if partials else self.of_values
        return dict(zip(lists, map(each, lists.values()), strict=True))


def _named(name: str) -> Aggregate:
    """The aggregation of that name: how one unpickles (L{Aggregate.__reduce__})."""
    found = globals().get(name)
    if not isinstance(found, Aggregate):
        raise ValueError(f"octotwist.aggregate has no aggregation {name!r}")
    return found


def _each_called(of_values: Callable[[list[Any]], Any]) -> Callable[..., dict[Any, Any]]:
    def of_copies(one: Any, counts: dict[Any, int]) -> dict[Any, Any]:
        return {k: of_values([one] * c) for k, c in counts.items()}

    return of_copies


def _sum_of_copies(one: Any, counts: dict[Any, int]) -> dict[Any, Any]:
    # Only values whose equal copies are interchangeable are counted (int,
    # bool, str, bytes, None: L{octotwist.shuffle}); adding n copies of an
    # int is multiplying it by n, exactly, and sum() refuses the others.
    if type(one) in _MULTIPLIED:
        return dict(zip(counts, map(int(one).__mul__, counts.values()), strict=True))
    return _each_called(builtins.sum)(one, counts)


def _the_copy(one: Any, counts: dict[Any, int]) -> dict[Any, Any]:
    return dict.fromkeys(counts, one)


def _distinct(values: list[Any]) -> list[Any]:
    """The distinct values, sorted, or in first-seen order if they do not sort."""
    unique = list(dict.fromkeys(values))
    try:
        return sorted(unique)
    except TypeError:
        return unique


def _distinct_of_lists(lists: list[list[Any]]) -> list[Any]:
    return _distinct(list(itertools.chain.from_iterable(lists)))


count = Aggregate(
    "count",
    len,
    builtins.sum,
    lambda one, counts: dict(counts),
    "How many values the key has (as a combiner, then reducer: the counts are added).",
)
sum = Aggregate(  # the name users write: aggregate.sum
    "sum",
    builtins.sum,
    builtins.sum,
    _sum_of_copies,
    "The values added up, as C{sum(values)} adds them (floats may differ in "
    "the last bits when a combiner groups them differently, as with any combiner).",
)
min = Aggregate(
    "min",
    builtins.min,
    builtins.min,
    _the_copy,
    "The smallest value, as C{min(values)}: the first of equal ones.",
)
max = Aggregate(
    "max",
    builtins.max,
    builtins.max,
    _the_copy,
    "The largest value, as C{max(values)}: the first of equal ones.",
)
first = Aggregate(
    "first",
    operator.itemgetter(0),
    operator.itemgetter(0),
    _the_copy,
    "The first value: from the first map task (by task number) that gave the key one.",
)
last = Aggregate(
    "last",
    operator.itemgetter(-1),
    operator.itemgetter(-1),
    _the_copy,
    "The last value: from the last map task (by task number) that gave the key one.",
)
collect_set = Aggregate(
    "collect_set",
    _distinct,
    _distinct_of_lists,
    lambda one, counts: {k: [one] for k in counts},
    "The distinct values, as a list: sorted, or in first-seen order if they do not "
    "sort.  The values must be hashable.",
)

"""
The order results are delivered in: sorted by key, as octo.py called
C{final()} over C{sorted(results)}.

Keys a job emits need not be comparable with each other (C{1} and C{"a"},
C{None} among strings); they still get one deterministic order instead of
a C{TypeError} after the whole job has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class _Ordered:
    """
    A key that sorts naturally among keys it can be compared with, and
    else by its type's name and its C{repr}: deterministic whatever the keys.
    """

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __lt__(self, other: _Ordered) -> bool:
        try:
            return bool(self.key < other.key)
        except TypeError:
            return _by_type(self.key) < _by_type(other.key)


def _by_type(key: Any) -> tuple[str, str, str]:
    kind = type(key)
    return (kind.__module__, kind.__qualname__, repr(key))


def sorted_order(keys: Sequence[Any]) -> list[int]:
    """
    The indices of C{keys} in key order (equal keys keep their order).

    The keys usually arrive as several sorted runs, one per reduce
    partition; Timsort finds those runs and merges them, so this costs a
    merge of the partitions rather than a full sort, at C speed.
    """
    indices = range(len(keys))
    try:
        return sorted(indices, key=keys.__getitem__)
    except TypeError:  # keys that cannot be compared with each other
        return sorted(indices, key=lambda i: _Ordered(keys[i]))

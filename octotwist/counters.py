"""
Counters a job keeps, as mrjob's C{increment_counter} and Hadoop's
counters do: C{octotwist.counters.add("lines", 1)} inside C{mapfn},
C{reducefn} or C{combinefn}.

Each task attempt counts into a table of its own, which travels with its
result (L{octotwist.messages.TaskDone}); the server adds an attempt's table
to the job's totals only when that attempt is the one whose output counts.
A failed attempt, a retried one, the losing copy of a backup task and a
cancelled one never add anything, so a total is exact however often
tasks were re-run (Spark's accumulators, by contrast, count re-run tasks
again: apache/spark#4022).

octotwist's own counters are named C{octotwist.*}
(L{octotwist._child}): records read, pairs emitted, map output bytes
shuffled, spilled runs.
"""

from __future__ import annotations

import threading

#: Most distinct counters one task attempt may keep, and the longest name:
#: a counter is a figure to read, not a place to store data.
MAX_COUNTERS = 1000
MAX_NAME = 200
#: A counter's value stays within a signed 64-bit int, as it travels.
LIMIT = 2**63 - 1


class _Tables(threading.local):
    """
    The current attempt's table, one per thread: an engine may run several
    tasks at once in one process, each in its own thread (a Dask worker's),
    and each counts into its own.
    """

    table: dict[str, int]

    def __init__(self) -> None:
        self.table = {}


_tables = _Tables()


def add(name: str, n: int = 1) -> None:
    """
    Add C{n} to the counter C{name}.

    @raise TypeError: C{name} is not a string, or C{n} not an int.
    @raise ValueError: the name is empty, too long or not printable, or
        the attempt already keeps L{MAX_COUNTERS} counters.
    @raise OverflowError: the counter would go past a signed 64-bit int.
    """
    if type(name) is not str:
        raise TypeError(f"a counter's name is a str, not {type(name).__name__} ({name!r:.60})")
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"counter {name!r}: add an int, not {type(n).__name__} ({n!r:.60})")
    table = _tables.table
    if name not in table:
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(
                f"counter name {name[:60]!r}: a counter's name is printable text of 1 to "
                f"{MAX_NAME} characters"
            )
        if len(table) >= MAX_COUNTERS:
            raise ValueError(
                f"counter {name[:60]!r}: a task keeps at most {MAX_COUNTERS} counters; "
                "a counter per key is data: emit it as a pair instead"
            )
        total = n
    else:
        total = table[name] + n
    if not -LIMIT <= total <= LIMIT:
        raise OverflowError(
            f"counter {name!r}: {total} is past what a counter holds (a signed 64-bit int)"
        )
    table[name] = total


def take() -> dict[str, int]:
    """The counts since the last call, and a fresh table (between two tasks)."""
    counts, _tables.table = _tables.table, {}
    return counts


def table(counts: dict[str, int]) -> str:
    """Counters as the end of C{octo run} prints them: a line each, aligned."""
    width = max(map(len, counts), default=0)
    return "\n".join(f"  {name:<{width}}  {n:>14,}" for name, n in counts.items())

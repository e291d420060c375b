"""
Handing a job's results to C{final()} or to its output, once they are all
in one place: what an engine that is not octotwist's own server does at
the end (L{octotwist.inline}, an engine plugin), as the server does it
(L{octotwist.server}): in key order unless the job said C{sort=False}, and
to an output of a file per partition, each partition in key order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from octotwist.config import JobConfig
from octotwist.job import Job
from octotwist.ordering import sorted_order
from octotwist.output import Results

#: A step's results: partition, keys, values (a partition may come in pieces).
Parts = Iterator[tuple[int, list[Any], list[Any]]]


def deliver(job: Job, config: JobConfig, output: Results, parts: Parts) -> int:
    """
    Hand the last step's results to C{final()} or the output, as the
    server does: in key order unless C{config.sort} is off; to an output
    of a file per partition, each partition in key order.

    @return: how many results there were.
    """
    n = 0
    if job.final is None and output.partitioned:
        by_partition: dict[int, tuple[list[Any], list[Any]]] = {}
        for partition, k, v in parts:
            keys, values = by_partition.setdefault(partition, ([], []))
            keys += k
            values += v
        output.begin(max(by_partition, default=0) + 1)
        for partition, (keys, values) in sorted(by_partition.items()):
            order = sorted_order(keys) if config.sort else range(len(keys))
            output.write_partition(partition, [keys[i] for i in order], [values[i] for i in order])
            n += len(keys)
        return n
    if not config.sort:
        output.begin(1)
        for _, keys, values in parts:
            _deliver(job, output, keys, values, range(len(keys)))
            n += len(keys)
        return n
    keys, values = [], []
    for _, k, v in parts:
        keys += k
        values += v
    output.begin(1)
    _deliver(job, output, keys, values, sorted_order(keys))
    return len(keys)


def _deliver(job: Job, output: Results, keys: list[Any], values: list[Any], order: Any) -> None:
    final = job.final
    if final is not None:
        for i in order:
            final(keys[i], values[i])
    else:
        order = list(order)
        output.write([keys[i] for i in order], [values[i] for i in order])

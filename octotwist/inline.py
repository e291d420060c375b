"""
Run a job in the calling process, one record at a time: C{octo run
--inline} and C{octotwist.run(job, workers=0)}, mrjob's inline runner.

Nothing is pickled and no process is started, so C{breakpoint()} and pdb
work inside C{mapfn}, and an exception comes up with the user's own
traceback.  The results are the same as a distributed run's: the same map
output buffer, combiner, partitioning and reduce merge
(L{octotwist.shuffle}) run here, in the same order, step after step; the
counters too (L{octotwist.counters}).  What the job prints goes straight to
the terminal.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from octotwist import counters
from octotwist.config import JobConfig
from octotwist.delivery import Parts, deliver
from octotwist.errors import UsageError
from octotwist.job import Job, Step
from octotwist.output import Results
from octotwist.server import DEFAULT_REDUCE_TASKS, JobOutcome
from octotwist.shuffle import MapOutput, Run, _pair, _pairs_iterator, reduce_partition
from octotwist.sources import expand


def run_inline(job: Job, config: JobConfig, output: Results) -> JobOutcome:
    """
    Map every record, reduce every partition, then hand the results to
    C{final()} or C{output}, in key order unless C{config.sort} is off.
    Exceptions from the job's own code propagate unchanged.
    """
    if config.state_dir is not None:
        raise UsageError(
            "--state-dir keeps a server's progress, and an inline run has no server: "
            "run it with workers (octo run -w N, octotwist.run(job, workers=N))"
        )
    started = time.monotonic()
    default = config.reduce_tasks or job.reduce_tasks or DEFAULT_REDUCE_TASKS
    counters.take()
    source = job.source
    items: Iterable[tuple[Any, Any]] = expand((key, source[key]) for key in source)
    steps = job.functions.steps
    try:
        if job.functions.setupfn is not None:
            job.functions.setupfn()
            counters.take()  # (setupfn's counts are no task's, as on a worker)
        for step in steps[:-1]:
            # A step's results are the next one's input, in memory.
            items = [kv for _, k, v in _step(step, items, default) for kv in zip(k, v, strict=True)]
        n = deliver(job, config, output, _step(steps[-1], items, default))
    except BaseException:
        counters.take()
        output.abort()
        raise
    output.commit()
    return JobOutcome(
        True, None, n, time.monotonic() - started, counters=dict(sorted(counters.take().items()))
    )


#: Pairs of a map-only step handed on at a time.
_CHUNK = 10_000


def _step(step: Step, items: Iterable[tuple[Any, Any]], default: int) -> Parts:
    """One step's results, partition by partition (a map-only step's pairs, in order)."""
    if step.reducefn is None:
        keys: list[Any] = []
        values: list[Any] = []
        for key, value in items:
            n = 0
            for pair in _pairs_iterator(step.mapfn(key, value)):
                n += 1
                k, v = _pair(pair)
                keys.append(k)
                values.append(v)
            counters.add("octotwist.records_read")
            counters.add("octotwist.pairs_emitted", n)
            if len(keys) >= _CHUNK:
                yield 0, keys, values
                keys, values = [], []
        yield 0, keys, values
        return
    partitions = step.reduce_tasks or default
    runs: list[list[Run]] = [[] for _ in range(partitions)]
    for key, value in items:
        buffer = MapOutput(partitions, step.partitionfn, step.combinefn)
        for spill in buffer.add_all(step.mapfn(key, value)):
            _keep(runs, spill)
        _keep(runs, buffer.drain())
        counters.add("octotwist.records_read")
        counters.add("octotwist.pairs_emitted", buffer.records)
    for partition, partition_runs in enumerate(runs):
        k, v = reduce_partition(step.reducefn, partition_runs, combinefn=step.combinefn)
        runs[partition] = []  # let the partition's input go
        yield partition, k, v


def _keep(runs: list[list[Run]], spill: dict[int, Run]) -> None:
    for partition, run in spill.items():
        runs[partition].append(run)

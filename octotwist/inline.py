"""
Run a job in the calling process, one record at a time: C{octo run
--inline} and C{octotwist.run(job, workers=0)}, mrjob's inline runner.

Nothing is pickled and no process is started, so C{breakpoint()} and pdb
work inside C{mapfn}, and an exception comes up with the user's own
traceback.  The results are the same as a distributed run's: the same map
output buffer, combiner, partitioning and reduce merge
(L{octotwist.shuffle}) run here, in the same order.
"""

from __future__ import annotations

import time
from typing import Any

from octotwist.config import JobConfig
from octotwist.job import Job
from octotwist.ordering import sorted_order
from octotwist.output import Results
from octotwist.server import DEFAULT_REDUCE_TASKS, JobOutcome
from octotwist.shuffle import MapOutput, Run, reduce_partition


def run_inline(job: Job, config: JobConfig, output: Results) -> JobOutcome:
    """
    Map every record, reduce every partition, then hand the results to
    C{final()} or C{output}, in key order unless C{config.sort} is off.
    Exceptions from the job's own code propagate unchanged.
    """
    started = time.monotonic()
    partitions = config.reduce_tasks or job.reduce_tasks or DEFAULT_REDUCE_TASKS
    f = job.functions
    runs: list[list[Run]] = [[] for _ in range(partitions)]
    source = job.source
    for key in source:
        buffer = MapOutput(partitions, f.partitionfn, f.combinefn)
        for spill in buffer.add_all(f.mapfn(key, source[key])):
            _keep(runs, spill)
        _keep(runs, buffer.drain())
    keys: list[Any] = []
    values: list[Any] = []
    try:
        for partition, partition_runs in enumerate(runs):
            k, v = reduce_partition(f.reducefn, partition_runs)
            runs[partition] = []  # let the partition's input go
            if not config.sort:
                _deliver(job, output, k, v, range(len(k)))
            keys += k
            values += v
        if config.sort:
            _deliver(job, output, keys, values, sorted_order(keys))
    except BaseException:
        output.abort()
        raise
    output.commit()
    return JobOutcome(True, None, len(keys), time.monotonic() - started)


def _keep(runs: list[list[Run]], spill: dict[int, Run]) -> None:
    for partition, run in spill.items():
        runs[partition].append(run)


def _deliver(job: Job, output: Results, keys: list[Any], values: list[Any], order: Any) -> None:
    final = job.final
    if final is not None:
        for i in order:
            final(keys[i], values[i])
    else:
        order = list(order)
        output.write([keys[i] for i in order], [values[i] for i in order])

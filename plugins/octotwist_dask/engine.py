"""
A job on Dask distributed: the same job script, its tasks run by Dask.

The data path is octotwist's, with Dask moving the bytes:

 1. The source is read here, as octotwist's server reads it: its keys in
    batches, each batch packed into one blob (a file of
    L{octotwist.sources} goes by name when the workers can open it) and
    scattered to the workers.
 2. A map task (L{octotwist.tasks.run_task}) maps a batch through the job's
    shuffle buffer (combiner, partitioner) into a few packed runs per
    partition; a small task beside it takes out one partition's runs, so
    that only those bytes travel to the reduce task of that partition.
 3. A reduce task merges its partition's runs and reduces them into one
    packed blob; a step's results are the next step's map inputs, as they
    are.  The last step's blobs come back here and go to C{final()} or the
    output, as octotwist's server hands them over.

Tasks are whole blobs, never elements (a Dask bag of a dict's items costs
an object per pair on the scheduler's side, dask/distributed#6368).  A
worker that dies loses its results; Dask runs the tasks that made them
again, and each task's result (and counters) is its own, so results and
counters stay exact.  A task whose code raised is retried up to
C{max_attempts} times, then the job fails with the user's traceback.
What does not carry over: C{skip_bad_records} (a failed task fails the
job), C{--state-dir}, and what tasks print (it goes to the Dask workers'
own logs).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from twisted.logger import Logger

from octotwist import codec
from octotwist.delivery import deliver
from octotwist.engine import EngineError, EngineRun, EngineWorker
from octotwist.job import Step
from octotwist.server import DEFAULT_REDUCE_TASKS, JobOutcome
from octotwist.sources import item
from octotwist.tasks import TaskFailed, TaskResult, run_task
from octotwist.version import Installation

_log = Logger()

#: The oldest Dask distributed this engine runs on.
MIN_VERSION = (2024, 1)
#: Seconds to reach a scheduler given with --scheduler.
CONNECT_TIMEOUT = 10.0
#: Map tasks per worker thread (as the hand-written Dask bag's partitions).
TASKS_PER_THREAD = 8


def run(r: EngineRun) -> JobOutcome:
    """Run the job of C{r} on Dask: a LocalCluster of C{r.workers}, or C{r.scheduler}."""
    distributed = _import_distributed()
    started = time.monotonic()
    cluster = None
    if r.scheduler is None:
        # This machine's alone: Dask authenticates nobody, and runs what it is sent.
        cluster = distributed.LocalCluster(
            n_workers=r.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            # Its processes' own logs (a task's "Compute Failed", each
            # attempt's traceback in Dask's words) would say again, in the
            # middle of the progress bars, what this engine reports once.
            silence_logs=logging.CRITICAL,
        )
        address = cluster.scheduler_address
    else:
        address = r.scheduler
    try:
        try:
            client = distributed.Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise EngineError(
                f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT:g} s "
                f"({type(e).__name__}: {e}); is `dask scheduler` running there?"
            ) from None
        with client:
            return _Job(r, client, distributed).run(started)
    finally:
        if cluster is not None:
            cluster.close()


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise EngineError(
            "the dask engine needs Dask distributed, which is not installed: "
            "pip install 'octotwist[dask]'"
        ) from None
    version = tuple(int(x) for x in distributed.__version__.split(".")[:2] if x.isdigit())
    if version < MIN_VERSION:
        raise EngineError(
            f"Dask distributed {distributed.__version__} is too old for the dask engine, "
            f"which needs {'.'.join(map(str, MIN_VERSION))} or newer: "
            "pip install -U 'octotwist[dask]'"
        )
    return distributed


class _Job:
    """One job's run on a Dask client."""

    def __init__(self, r: EngineRun, client: Any, distributed: Any) -> None:
        self.r = r
        self.client = client
        self.distributed = distributed
        self.name = r.job.name
        self.token = uuid.uuid4().hex[:8]
        self.counters: Counter[str] = Counter()

    def run(self, started: float) -> JobOutcome:
        r = self.r
        threads, local = self._check_workers()
        services = self.client.scheduler_info(n_workers=0).get("services", {})
        _log.info(
            "running job {job} on Dask at {address}: {threads} worker thread{s}; {board}",
            job=self.name,
            address=self.client.scheduler.address,
            threads=threads,
            s="" if threads == 1 else "s",
            board=f"its dashboard: {self.client.dashboard_link}"
            if "dashboard" in services
            else "its scheduler serves no dashboard",
        )
        if "dashboard" in services:
            r.progress.link("Dask's dashboard", self.client.dashboard_link)
        functions = self.client.scatter(r.job.pickled_functions, broadcast=True, hash=False)
        steps = r.job.functions.steps
        default = r.config.reduce_tasks or r.job.reduce_tasks or DEFAULT_REDUCE_TASKS
        inputs = self._source_inputs(threads, local)
        try:
            for index, step in enumerate(steps):
                inputs = self._step(functions, index, len(steps), step, inputs, default)
            parts = self._results(inputs)
            n = deliver(r.job, r.config, r.output, parts)
        except TaskFailed as e:
            return JobOutcome(False, str(e), 0, time.monotonic() - started)
        return JobOutcome(
            True,
            None,
            n,
            time.monotonic() - started,
            counters=dict(sorted(self.counters.items())),
        )

    def _check_workers(self) -> tuple[int, bool]:
        """
        The cluster's worker threads, and whether every worker is on this
        machine.

        @raise EngineError: it has no workers, or one runs another
            octotwist (or Python) than this one.
        """
        self.client.wait_for_workers(1, timeout=60)
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        ours = Installation.here()
        try:
            answers = self.client.run(_installation)
        except Exception as e:  # (a worker that cannot even unpickle the question)
            raise EngineError(
                f"a Dask worker cannot run octotwist's tasks ({type(e).__name__}: {e}): "
                f"install octotwist {ours.octotwist} on every worker, on Python "
                f"{ours.python.rsplit('.', 1)[0]}"
            ) from None
        for address, answer in answers.items():
            problem = ours.incompatibility(Installation.from_json(answer))
            if problem:
                raise EngineError(f"the Dask worker at {address} cannot run this job: {problem}")
        self._report_workers(workers)
        hosts = {_host(a) for a in workers}
        local = hosts <= {"127.0.0.1", "localhost", "::1"}
        return sum(w["nthreads"] for w in workers.values()) or 1, local

    def _report_workers(self, workers: dict[str, Any] | None = None) -> None:
        """Tell the status page the cluster's workers (as the scheduler knows them now)."""
        if workers is None:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        self.r.progress.workers(
            [
                EngineWorker(
                    address,
                    _host(address),
                    w.get("nthreads", 1),
                    int(w.get("metrics", {}).get("memory") or 0),
                )
                for address, w in sorted(workers.items())
            ]
        )

    def _source_inputs(self, threads: int, local: bool) -> list[Any]:
        """
        The source's items in batches, each packed into one blob: a map
        task's argument.  (Not scattered: a worker that dies would take
        scattered data with it, and Dask cannot make it again; an argument
        stays with its task, which Dask can run again anywhere.)
        """
        source = self.r.job.source
        keys = list(source)
        tasks = max(1, min(len(keys), TASKS_PER_THREAD * threads))
        size = -(-len(keys) // tasks) if keys else 1
        blobs = []
        for start in range(0, len(keys), size):
            batch = tuple(keys[start : start + size])
            values = [item(source, k, local=local) for k in batch]
            blobs.append(codec.pack((batch, values), compress=not local))
        if not blobs:
            blobs.append(codec.pack(((), []), compress=False))
        return blobs

    def _step(
        self, functions: Any, index: int, steps: int, step: Step, inputs: list[Any], default: int
    ) -> list[Any]:
        """Submit one step's tasks; return its outputs' futures (a blob list each)."""
        partitions = 0 if step.reducefn is None else (step.reduce_tasks or default)
        retries = self.r.config.policy.max_attempts - 1
        maps = [
            self.client.submit(
                _map,
                functions,
                index,
                partitions,
                given,
                key=f"octotwist-{self.name}-{self.token}-s{index}-map-{n}",
                retries=retries,
            )
            for n, given in enumerate(inputs)
        ]
        self._wait("map", index, steps, maps)
        self._count(maps, shuffled=partitions > 0)
        if not partitions:  # a map-only step: its pairs go on in order
            return [self._part(f, 0, index, n) for n, f in enumerate(maps)]
        reduces = [
            self.client.submit(
                _reduce,
                functions,
                index,
                [self._part(f, p, index, n) for n, f in enumerate(maps)],
                key=f"octotwist-{self.name}-{self.token}-s{index}-reduce-{p}",
                retries=retries,
            )
            for p in range(partitions)
        ]
        self._wait("reduce", index, steps, reduces)
        self._count(reduces)
        return [self._part(f, 0, index, p, "reduce") for p, f in enumerate(reduces)]

    def _part(self, task: Any, partition: int, index: int, n: int, kind: str = "map") -> Any:
        """A future of one partition's runs of C{task}'s result: only they travel."""
        return self.client.submit(
            _runs,
            task,
            partition,
            key=f"octotwist-{self.name}-{self.token}-s{index}-{kind}-{n}-part-{partition}",
        )

    def _wait(self, kind: str, index: int, steps: int, futures: list[Any]) -> None:
        """Until every task of a phase is done, reporting each; raise the first failure."""
        progress = self.r.progress
        self._report_workers()
        progress.start(kind, len(futures), index + 1, steps)
        phase = progress.phase  # ("map", "step 2/3 reduce")
        for future in self.distributed.as_completed(futures):
            if future.status == "error":
                error = future.exception()
                self.client.cancel(futures)
                task = f"{kind} {future.key.rsplit('-', 1)[-1]}"
                # (Dask retried it: its last attempt's error is the one we hear.)
                last, worker = self.r.config.policy.max_attempts, "a Dask worker"
                if isinstance(error, TaskFailed):
                    progress.failed(
                        task,
                        error.error,
                        error.traceback,
                        key=error.key,
                        attempt=last,
                        worker=worker,
                    )
                    raise TaskFailed(
                        f"{phase} task {task.split()[-1]} failed: {error.error}",
                        error.key,
                        error.traceback,
                    )
                progress.failed(
                    task, f"{type(error).__name__}: {error}", attempt=last, worker=worker
                )
                raise TaskFailed(f"{phase} task failed on Dask: {error!r}", None, "")
            progress.advance()

    def _count(self, tasks: list[Any], shuffled: bool = False) -> None:
        """
        Add the tasks' counters (each task's own: a re-run replaces, never
        adds), and for a step's map tasks the bytes of their output, as
        octotwist's server counts them.
        """
        tables = self.client.gather([self.client.submit(_counters, t, shuffled) for t in tasks])
        for table in tables:
            self.counters.update(table)
            self.r.progress.count(table)

    def _results(self, outputs: list[Any]) -> Iterator[tuple[int, list[Any], list[Any]]]:
        """The last step's results, partition by partition, as they come back."""
        for partition, future in enumerate(outputs):
            for blob in future.result():
                keys, values = codec.unpack(blob)
                yield partition, list(keys), list(values)


def _map(functions: bytes, step: int, partitions: int, given: Any) -> TaskResult:
    blobs = [given] if isinstance(given, bytes) else list(given)
    return run_task(functions, "map", step, partitions, blobs)


def _reduce(functions: bytes, step: int, parts: list[list[bytes]]) -> TaskResult:
    return run_task(functions, "reduce", step, 0, list(itertools.chain.from_iterable(parts)))


def _runs(result: TaskResult, partition: int) -> list[bytes]:
    return result.outputs.get(partition, [])


def _counters(result: TaskResult, shuffled: bool) -> dict[str, int]:
    if not shuffled:
        return result.counters
    size = sum(len(blob) for runs in result.outputs.values() for blob in runs)
    return {**result.counters, "octotwist.bytes_shuffled": size}


def _installation() -> str:
    return Installation.here().to_json()


def _host(address: str) -> str:
    """The host of a Dask address (C{tcp://127.0.0.1:40123}, C{tcp://[::1]:40123})."""
    rest = address.split("://", 1)[-1]
    host = rest.rsplit(":", 1)[0]
    return host.strip("[]") or os.uname().nodename

"""
Engines: where a job's tasks run when not on octotwist's own server and
workers.

An engine is a plugin, found as transports are (the C{octotwist_engines}
hook, L{octotwist.hookspecs}): C{octo run job.py --engine NAME} and
C{octotwist.run(job, engine=NAME)} hand it the loaded job, and it runs the
job's tasks with L{octotwist.tasks.run_task} (the same shuffle, blobs and
counters as octotwist's own workers) wherever it likes, then hands the
results over with L{octotwist.delivery.deliver}.  The core names no engine:
Dask's, under C{plugins/}, is packaged as anyone else's would be.

An engine runs outside any reactor, in the calling thread, and blocks
until the job is over: it is a scheduler's client, not a server.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TextIO

from twisted.logger import Logger

from octotwist.errors import OctotwistError, PluginError, UsageError
from octotwist.timeline import eta as timeline_eta

if TYPE_CHECKING:  # (the hook specs import this module: it imports little)
    from octotwist.config import JobConfig
    from octotwist.job import Job
    from octotwist.output import Results
    from octotwist.server import JobOutcome

_log = Logger()

#: Seconds between the progress lines written where no bars can be drawn.
LOG_INTERVAL = 10.0


class EngineError(OctotwistError):
    """The engine cannot run the job: it is not installed, unreachable, too old."""


@dataclass(frozen=True)
class Engine:
    """
    What an engine plugin provides.

    @ivar name: what users pass to C{--engine}.
    @ivar description: one line for C{octo engines}.
    @ivar run: the function that runs a job, C{run(EngineRun) -> JobOutcome},
        or where to import it from, C{"package.module:function"} (then the
        engine's own dependencies are imported only when it runs).
    """

    name: str
    description: str
    run: Callable[[EngineRun], JobOutcome] | str

    def runner(self) -> Callable[[EngineRun], JobOutcome]:
        """
        The run function, imported if need be.

        @raise PluginError: it cannot be imported.
        """
        if not isinstance(self.run, str):
            return self.run
        module, _, name = self.run.partition(":")
        try:
            function: Callable[[EngineRun], JobOutcome] = getattr(
                importlib.import_module(module), name
            )
            return function
        except (ImportError, AttributeError) as e:
            raise PluginError(f"engine {self.name!r}: cannot import {self.run}: {e}") from e


@dataclass(frozen=True)
class EngineRun:
    """
    One job for an engine to run.

    @ivar job: the loaded job (its C{pickled_functions} are what tasks load).
    @ivar config: how to run it (reduce tasks, sort, args...).
    @ivar output: where results go (for a job without C{final()}): pass it
        to L{octotwist.delivery.deliver}; the caller commits it.
    @ivar workers: worker processes to start, for an engine that starts
        its own cluster when given no C{scheduler} (C{-w}).
    @ivar scheduler: the address of an existing cluster to run on, or C{None}.
    @ivar progress: where to report the tasks done.
    """

    job: Job
    config: JobConfig
    output: Results
    workers: int
    scheduler: str | None
    progress: Progress


@dataclass(frozen=True)
class EngineWorker:
    """
    One of an engine's workers, as its status page lists it.

    @ivar name: the engine's name for it (Dask's: its address).
    @ivar host: the machine it runs on.
    @ivar threads: the tasks it runs at once.
    @ivar memory: the bytes it holds, as the engine last said (0: not known).
    """

    name: str
    host: str
    threads: int
    memory: int = 0


#: Failed attempts the status page keeps (as octotwist's own server does).
KEPT_FAILURES = 50
#: Seconds between the samples the page's charts draw.
SAMPLE_INTERVAL = 1.0


class Progress:
    """
    A job's progress as an engine reports it, step by step and phase by
    phase: tasks done of tasks to do, failed attempts, counters, workers,
    and links to the engine's own pages.

    It draws bars on a terminal (rich), else logs a line now and then
    (nothing with C{quiet}), and keeps the job's status for C{--web}'s
    page (L{status}, the schema of docs/status.md).  The engine reports
    from its own thread while the page reads from the reactor's: a lock
    keeps each reading whole.
    """

    def __init__(
        self,
        job: str = "job",
        engine: str = "",
        stream: TextIO | None = None,
        quiet: bool = False,
        clock: Callable[[], float] = time.monotonic,
        steps: int = 1,
    ) -> None:
        self.job = job
        self.engine = engine
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.clock = clock
        self._lock = threading.Lock()
        self._bars: Any = None
        self._task: Any = None
        self.phase = ""
        self.done = self.total = 0
        self._logged = 0.0
        self._started = clock()
        self._kind = "map"
        self._step, self._steps = 1, steps
        self._phases: dict[str, dict[str, Any]] = {}
        self._began: dict[str, float] = {}
        self._failures: deque[dict[str, Any]] = deque(maxlen=KEPT_FAILURES)
        self._counters: Counter[str] = Counter()
        self._workers: list[EngineWorker] = []
        self._links: list[tuple[str, str]] = []
        self._samples: list[dict[str, Any]] = []
        # Tasks done since the job began, by kind (all steps).
        self._done_in_job: Counter[str] = Counter()
        self._sampled_at: float | None = None
        self._ended: tuple[bool, str | None, float] | None = None

    def start(self, kind: str, total: int, step: int = 1, steps: int = 1) -> None:
        """
        A phase begins: C{total} tasks of C{kind} (C{"map"}, C{"reduce"})
        for step C{step} of C{steps}.
        """
        phase = f"step {step}/{steps} {kind}" if steps > 1 else kind
        with self._lock:
            if step != self._step:
                self._phases.clear()
            self._kind, self._step, self._steps = kind, step, steps
            self._phases[kind] = {"total": total, "done": 0}
            self._began[kind] = self.clock()
            self._sample()
            self.phase, self.done, self.total = phase, 0, total
        if self.quiet:
            return
        if self.stream.isatty():
            if self._bars is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                )
                from rich.progress import Progress as Bars

                self._bars = Bars(
                    TextColumn("{task.description:6}"),
                    BarColumn(bar_width=24),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=Console(file=self.stream),
                )
                self._bars.start()
            self._task = self._bars.add_task(phase, total=total)
        else:
            self._logged = time.monotonic()

    def advance(self, n: int = 1) -> None:
        """C{n} more tasks of the phase are done."""
        with self._lock:
            self.done += n
            done = self._phases[self._kind]["done"] = self.done
            self._done_in_job[self._kind] += n
            self._sample_if_due()
            log = not self.quiet and time.monotonic() - self._logged >= LOG_INTERVAL
            if log:
                self._logged = time.monotonic()
        if self._task is not None:
            self._bars.update(self._task, completed=done)
        elif log and self._bars is None:
            _log.info(
                "{phase}: {done}/{total} tasks", phase=self.phase, done=done, total=self.total
            )

    def failed(
        self,
        task: str,
        error: str,
        traceback: str = "",
        *,
        key: str | None = None,
        attempt: int = 1,
        worker: str = "?",
    ) -> None:
        """Attempt C{attempt} of C{task} (C{"map 3"}) failed with C{error} (one line)."""
        with self._lock:
            self._failures.append(
                {
                    "task": task,
                    "attempt": attempt,
                    "worker": worker,
                    "key": key,
                    "error": error,
                    "traceback": traceback,
                    "elapsed": round(self.clock() - self._started, 3),
                }
            )

    def count(self, counters: Mapping[str, int]) -> None:
        """Add counters of tasks whose results the job uses."""
        with self._lock:
            self._counters.update(counters)

    def workers(self, workers: Sequence[EngineWorker]) -> None:
        """The engine's workers, as they are now."""
        with self._lock:
            self._workers = list(workers)

    def link(self, label: str, url: str) -> None:
        """
        A page of the engine's own for the status page to link to (its
        dashboard): an C{http:} or C{https:} URL, nothing a click would run.

        @raise ValueError: C{url} is of another scheme (C{javascript:}, say).
        """
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"an engine's link must be an http(s) URL, not {url!r}")
        with self._lock:
            self._links.append((label, url))

    def ended(self, ok: bool, error: str | None, seconds: float | None = None) -> None:
        """The job is over (L{run_on_engine} says so), after C{seconds} as the engine says."""
        with self._lock:
            took = self.clock() - self._started if seconds is None else seconds
            self._ended = (ok, error, took)

    def stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = self._task = None

    def _sample_if_due(self) -> None:
        """A point of the charts, if the last is a second old (the lock held)."""
        if self._sampled_at is None or self.clock() - self._sampled_at >= SAMPLE_INTERVAL:
            self._sample()

    def _sample(self) -> None:
        """
        A point of the page's charts (the lock held): the tasks done since
        the job began, all steps together, so that its rate never drops
        below nothing when a step begins.
        """
        self._sampled_at = self.clock()
        self._samples.append(
            {
                "t": round(self._sampled_at - self._started, 3),
                "map_done": self._done_in_job["map"],
                "reduce_done": self._done_in_job["reduce"],
                "bytes_received": 0,
                "bytes_sent": 0,
                "memory": {w.name: w.memory for w in self._workers},
            }
        )
        del self._samples[: -int(3600 / SAMPLE_INTERVAL)]

    def status(self, stream_since: int | None = None) -> dict[str, Any]:
        """
        The status page's data (docs/status.md's schema): what octotwist's
        own server says of its workers' attempts, this says of the
        engine's tasks as far as it reported them.  Map counts tasks (a
        batch of keys each), not keys; what the engine does not tell
        (attempts running, bytes moved, what tasks print) is C{None} or
        empty, and its C{engine} field links to the engine's own pages.
        """
        with self._lock:
            now = self.clock()
            elapsed = now - self._started if self._ended is None else self._ended[2]
            phases = {kind: self._phase_status(kind, now) for kind in ("map", "reduce")}
            done = sum(self._done_in_job.values())  # (every step's, over the job's time)
            if self._ended is None and self._phases:
                self._sample_if_due()  # (a phase that stalls is drawn so)
            if self._ended is not None:
                phase = "finished" if self._ended[0] else "failed"
            elif not self._phases:
                phase = "starting"  # (the engine's cluster starts, or is reached)
            else:
                phase = "reducing" if self._kind == "reduce" else "mapping"
            status: dict[str, Any] = {
                "job": self.job,
                "phase": phase,
                "step": self._step,
                "steps": self._steps,
                "ok": None if self._ended is None else self._ended[0],
                "error": None if self._ended is None else self._ended[1],
                "elapsed": round(elapsed, 3),
                "map": phases["map"],
                "reduce": phases["reduce"],
                "workers": [
                    {
                        "name": w.name,
                        "host": w.host,
                        "pid": None,
                        "peer": None,
                        "processes": w.threads,
                        "running": None,
                        "tasks_done": None,
                        "last_heard": None,
                        "memory": w.memory,
                        "suspect": False,
                    }
                    for w in self._workers
                ],
                "failures": list(self._failures),
                "printed": [],
                "counters": dict(sorted(self._counters.items())),
                "resumed": None,
                "skipped": [],
                "throughput": {
                    "tasks_per_second": round(done / elapsed, 3) if elapsed > 0 else 0.0,
                    "bytes_received": None,
                    "bytes_sent": None,
                    "map_input_bytes": None,
                    "bytes_per_second": None,
                },
                "engine": {
                    "name": self.engine,
                    "links": [{"label": label, "url": url} for label, url in self._links],
                },
            }
            if stream_since is not None:
                samples = [dict(sample) for sample in self._samples]
                status["stream"] = {
                    "first": stream_since,
                    "next": stream_since,
                    "attempts": [],
                    "running": [],
                    "samples": samples,
                    "workers": {},
                }
            return status

    def _phase_status(self, kind: str, now: float) -> dict[str, Any]:
        p = self._phases.get(kind)
        over = self._ended is not None
        if p is None:  # not begun in this step
            idle = 0 if over else None
            return {"total": None, "done": 0, "running": idle, "pending": None, "eta": None}
        left = p["total"] - p["done"]
        eta = (
            None
            if over or kind != self._kind
            else timeline_eta(p["done"], p["total"], self._began.get(kind), now)
        )
        return {
            "total": p["total"],
            "done": p["done"],
            "running": 0 if over or not left else None,  # (else the engine does not say)
            "pending": left,
            "eta": eta,
        }


def run_on_engine(
    name: str,
    job: Job,
    config: JobConfig,
    output: Results,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    quiet: bool = False,
    web: str | None = None,
) -> JobOutcome:
    """
    Run C{job} on the engine called C{name}; commit the output if it
    succeeded, take it back if not.

    @param web: serve the job's status page on this endpoint string
        (L{octotwist.enginepage}) while it runs.
    @return: how it went; its C{stats} are the status page's last figures.
    @raise UnknownEngineError: no plugin provides it.
    @raise UsageError: the job asks for what no engine but octotwist's own
        server does (a state directory).
    @raise EngineError: the engine cannot run (not installed, unreachable).
    """
    from octotwist.hookspecs import get_engine

    engine = get_engine(name)
    if config.state_dir is not None:
        output.abort()
        raise UsageError(
            f"--state-dir journals octotwist's own server; the {name} engine keeps no "
            "journal of ours: leave it out, or run without --engine"
        )
    progress = Progress(job.name, name, quiet=quiet, steps=len(job.functions.steps))
    page = None
    if web is not None:
        from octotwist.enginepage import EnginePage

        try:
            page = EnginePage.serve(progress, web)
        except BaseException:
            output.abort()
            raise
    settled = False  # the job is over, its output committed or taken back
    try:
        try:
            outcome = engine.runner()(EngineRun(job, config, output, workers, scheduler, progress))
            if outcome.ok:
                output.commit()
            else:
                output.abort()
        except BaseException as e:
            output.abort()
            progress.ended(False, f"{type(e).__name__}: {e}")
            raise
        finally:
            progress.stop()
        progress.ended(outcome.ok, outcome.error, outcome.seconds)
        settled = True
        return replace(outcome, stats=outcome.stats or progress.status())
    finally:
        if page is not None:
            # A moment for an open page to see how it ended, unless the job
            # did not end (then it closes now); Ctrl-C meanwhile only closes
            # it sooner: the job is over by then, and its result stands.
            page.stop(linger=settled)

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from twisted.logger import Logger

from octotwist.errors import OctotwistError, PluginError, UsageError

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


class Progress:
    """
    A job's progress as an engine reports it: phase by phase, tasks done of
    tasks to do.  Bars on a terminal (rich), else a log line now and then;
    nothing with C{quiet}.
    """

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._bars: Any = None
        self._task: Any = None
        self.phase = ""
        self.done = self.total = 0
        self._logged = 0.0

    def start(self, phase: str, total: int) -> None:
        """A phase begins: C{total} tasks (C{"step 1/2 map"}, C{"reduce"})."""
        self.phase, self.done, self.total = phase, 0, total
        if self.quiet:
            return
        if self.stream.isatty():
            if self._bars is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self._bars = Progress(
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
        self.done += n
        if self._task is not None:
            self._bars.update(self._task, completed=self.done)
        elif not self.quiet and time.monotonic() - self._logged >= LOG_INTERVAL:
            self._logged = time.monotonic()
            _log.info(
                "{phase}: {done}/{total} tasks", phase=self.phase, done=self.done, total=self.total
            )

    def stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = self._task = None


def run_on_engine(
    name: str,
    job: Job,
    config: JobConfig,
    output: Results,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    quiet: bool = False,
) -> JobOutcome:
    """
    Run C{job} on the engine called C{name}; commit the output if it
    succeeded, take it back if not.

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
    progress = Progress(quiet=quiet)
    try:
        outcome = engine.runner()(EngineRun(job, config, output, workers, scheduler, progress))
    except BaseException:
        output.abort()
        raise
    finally:
        progress.stop()
    if outcome.ok:
        output.commit()
    else:
        output.abort()
    return outcome

"""
Progress a person can watch in a terminal: live bars for the map and reduce
phases while a job runs (C{octo run}, C{octo server} on a TTY), drawn with
rich.

Only on a terminal: when stderr is a file or a pipe, or with C{--quiet},
nothing here runs and the server's periodic log lines say the same thing in
plain text, so a log file never gets control characters.

Drawing happens on the reactor thread, from a C{LoopingCall} (rich's own
refresh thread is off), and log lines go through the same console while the
bars are up, so they scroll above the bars instead of tearing them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from octotwist.server import JobServer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

#: Seconds between redraws.
REDRAW_INTERVAL = 0.25


class LogSink:
    """
    Where the command's log lines go: straight to the stream, or, while a
    L{LiveProgress} is drawing, through its console (above the bars).
    """

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.console: Console | None = None

    def write(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()


class LiveProgress:
    """
    Bars for a running L{JobServer}: tasks done/total per phase, workers,
    throughput, time left.  Stops (leaving the last frame on screen) just
    before the job's results are written.
    """

    def __init__(self, job_server: JobServer, reactor: IReactorTime, sink: LogSink) -> None:
        # rich is imported only here: most runs (logs to a file, --quiet)
        # never draw a bar, and it costs every command 20 ms to import.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.job_server = job_server
        self.sink = sink
        self.console = Console(file=sink.stream, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description:6}"),
            # Colours that differ on a 16-colour terminal too.
            BarColumn(
                bar_width=24, style="bright_black", complete_style="green", finished_style="green"
            ),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("eta"),
            TimeRemainingColumn(compact=True),
            console=self.console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._loop = LoopingCall(self.redraw)
        self._loop.clock = reactor
        job_server.before_final(self.stop)
        job_server.result.addBoth(self._ended)

    @staticmethod
    def wanted(stream: TextIO, quiet: bool) -> bool:
        """Live bars only on a terminal, and not with C{--quiet}."""
        return not quiet and stream.isatty()

    def start(self) -> None:
        self.progress.start()
        self.sink.console = self.console
        for phase in ("map", "reduce"):
            self._tasks[phase] = self.progress.add_task(phase, total=None, info="", start=False)
        self._loop.start(REDRAW_INTERVAL, now=True)

    def redraw(self) -> None:
        status = self.job_server.status()
        workers = len(status["workers"])
        rate = status["throughput"]
        active = {"mapping": "map", "reducing": "reduce"}.get(status["phase"])
        steps = status.get("steps", 1)
        for phase, task in self._tasks.items():
            p = status[phase]
            if steps > 1:  # (both bars are the step's)
                self.progress.update(task, description=f"step {status['step']}/{steps} {phase}")
            if p["done"] or p["running"]:
                self.progress.start_task(task)
            info = f"{p['running']} running"
            if phase == active and self.console.width >= 100:
                info += (
                    f" · {workers} worker{'s' if workers != 1 else ''}"
                    f" · {rate['tasks_per_second']:.1f} tasks/s"
                    f" · {rate['bytes_per_second'] / 2**20:.1f} MiB/s"
                )
            elif phase == active:  # an 80-column terminal
                info += f" · {workers}w · {rate['tasks_per_second']:.0f}/s"
            self.progress.update(task, completed=p["done"], total=p["total"], info=info)
        self.progress.refresh()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
            self.redraw()
            self.progress.stop()
            self.sink.console = None

    def _ended(self, result: object) -> object:
        self.stop()
        return result

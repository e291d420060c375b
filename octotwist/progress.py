"""
Progress a person can watch in a terminal: live bars for the map and reduce
phases while a job runs (C{octo run}, C{octo server} and C{octo submit} on a
TTY), drawn with rich.

Only on a terminal: when stderr is a file or a pipe, or with C{--quiet},
nothing here runs and the server's periodic log lines say the same thing in
plain text, so a log file never gets control characters.

Drawing happens on the reactor thread, from a C{LoopingCall} (rich's own
refresh thread is off), and log lines go through the same console while the
bars are up, so they scroll above the bars instead of tearing them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

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


def bar_status(status: dict[str, Any]) -> dict[str, Any]:
    """What the bars show of a job's status (L{JobServer.status}): to send, small."""
    return {
        "phase": status["phase"],
        "step": status.get("step", 1),
        "steps": status.get("steps", 1),
        "map": status["map"],
        "reduce": status["reduce"],
        "workers": [w["name"] for w in status["workers"]],
        "silent": sum(bool(w.get("suspect")) for w in status["workers"]),
        "throughput": {
            "tasks_per_second": status["throughput"]["tasks_per_second"],
            "bytes_per_second": status["throughput"]["bytes_per_second"],
        },
    }


class LiveProgress:
    """
    Bars for a running job: tasks done/total per phase, workers,
    throughput, time left.  L{for_server} follows a L{JobServer} here, and
    stops (leaving the last frame on screen) just before the job's results
    are written; C{octo submit} follows its job on a cluster.

    @param snapshot: the job's status now (L{JobServer.status}, or its
        L{bar_status}).
    """

    @classmethod
    def for_server(
        cls, job_server: JobServer, reactor: IReactorTime, sink: LogSink
    ) -> LiveProgress:
        progress = cls(job_server.status, reactor, sink)
        job_server.before_final(progress.stop)
        job_server.result.addBoth(progress._ended)
        return progress

    def __init__(
        self, snapshot: Callable[[], dict[str, Any]], reactor: IReactorTime, sink: LogSink
    ) -> None:
        # rich is imported only here: most runs (logs to a file, --quiet)
        # never draw a bar, and it costs every command 20 ms to import.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.snapshot = snapshot
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
            TextColumn("·"),
            TimeElapsedColumn(),
            console=self.console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._loop = LoopingCall(self.redraw)
        self._loop.clock = reactor

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
        status = self.snapshot()
        workers = len(status["workers"])
        silent = (
            status["silent"]
            if "silent" in status
            else (sum(bool(w.get("suspect")) for w in status["workers"]))
        )
        shown = f"{workers} worker{'s' if workers != 1 else ''}" + (
            f" ({silent} silent)" if silent else ""
        )
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
                    f" · {shown}"
                    f" · {rate['tasks_per_second']:.1f} tasks/s"
                    f" · {rate['bytes_per_second'] / 2**20:.1f} MiB/s"
                )
            elif phase == active:  # an 80-column terminal
                info += f" · {workers}w{f' ({silent} silent)' if silent else ''}"
                info += f" · {rate['tasks_per_second']:.0f}/s"
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

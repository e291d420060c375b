"""
A job's history, for the status page's pictures of time: every task attempt
(the task stream) and, once a second, what the job had done by then (the
charts of tasks per second, bytes and memory).

The server tells it what happens (L{Timeline.sent}, L{Timeline.ended},
L{Timeline.sample}); it keeps it, bounded, as JSON-ready data (the schema is
in docs/status.md), and hands out what came since a given point, so that a
page watching a job of 10,000 tasks is sent each attempt once, not every
second.  Times are seconds since the job started.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

#: Finished attempts kept (the oldest go first; L{Timeline.dropped} counts them).
MAX_ATTEMPTS = 100_000
#: One sample a second: the last hour of a job.
MAX_SAMPLES = 3600
#: Characters of a traceback kept with a failed attempt.
MAX_TRACEBACK = 20_000
#: Characters of what an attempt printed kept with it (the end of it): the
#: status page's C{printed} keeps more, of the last 50.
MAX_OUTPUT = 2_000

#: How an attempt ended: its output counted, it lost to another attempt
#: of the same task (a backup copy, say), it raised, the server cancelled
#: it, or its worker went away.
STATES = ("ok", "superseded", "failed", "cancelled", "lost")


class Timeline:
    """The attempts of one job and its samples over time."""

    def __init__(self, started: float) -> None:
        self.started = started
        #: Finished attempts, oldest first; C{dropped} of them are gone.
        self.attempts: deque[dict[str, Any]] = deque(maxlen=MAX_ATTEMPTS)
        self.dropped = 0
        self.samples: deque[dict[str, Any]] = deque(maxlen=MAX_SAMPLES)
        self._running: dict[tuple[str, int], dict[str, Any]] = {}
        self._last_sample: float | None = None
        #: Every worker that joined, and how many tasks it runs at once.
        self.workers: dict[str, int] = {}

    def joined(self, worker: str, processes: int) -> None:
        """A worker joined: the task stream gives it a row per process."""
        self.workers[worker] = processes

    def _t(self, now: float) -> float:
        return round(now - self.started, 3)

    def sent(
        self, task: Any, kind: str, attempt: int, worker: str, now: float, backup: bool
    ) -> None:
        """An attempt was handed to C{worker}: it runs from now on, as far as we know."""
        self._running[(str(task), attempt)] = {
            "task": str(task),
            "kind": kind,
            "attempt": attempt,
            "worker": worker,
            "backup": backup,
            "start": self._t(now),
        }

    def ended(
        self, task: Any, attempt: int, now: float, state: str, seconds: float = 0.0, **details: Any
    ) -> None:
        """
        An attempt ended (C{state}, one of L{STATES}).  C{seconds} is what its
        worker said it ran: it started that long before now, not when it was
        sent (it may have waited in the worker's queue).

        @param details: what is known of it: C{records_in}, C{records_out},
            C{counters}, C{key}, C{error}, C{traceback}, C{output} (what it
            printed), C{why}, and
            C{process}, the worker's number of the process that ran it.
        """
        entry = self._running.pop((str(task), attempt), None)
        if entry is None:
            return  # (ended twice: cancelled, then its late report)
        end = self._t(now)
        if seconds > 0:
            entry["start"] = max(entry["start"], round(end - seconds, 3))
        entry.update(end=end, state=state)
        if "traceback" in details:
            details["traceback"] = str(details["traceback"])[-MAX_TRACEBACK:]
        if "output" in details:
            details["output"] = str(details["output"])[-MAX_OUTPUT:]
        entry.update({k: v for k, v in details.items() if v not in (None, "", {}, (), 0)})
        if len(self.attempts) == self.attempts.maxlen:
            self.dropped += 1
        self.attempts.append(entry)

    def end_all(self, now: float, state: str, why: str) -> None:
        """The job is over: what still runs ended so (C{cancelled}, say)."""
        for task, attempt in list(self._running):
            self.ended(task, attempt, now, state, why=why)

    def sample(self, now: float, *, last: bool = False, **figures: Any) -> None:
        """Record the job's figures now, at most once a second unless it is the C{last}."""
        if not last and self._last_sample is not None and now - self._last_sample < 1.0:
            return
        self._last_sample = now
        self.samples.append({"t": self._t(now), **figures})

    def json(self, since: int = 0) -> dict[str, Any]:
        """
        The task stream and the samples; of the finished attempts, those
        from number C{since} on (numbered from the job's first, dropped
        ones included), so that a watcher asks only for what is new.
        """
        first = self.dropped
        start = max(since - first, 0)
        # (a watcher asks every second: no copy of what it has already)
        attempts = list(itertools.islice(self.attempts, start, None))
        return {
            "first": first + start,
            "next": first + len(self.attempts),
            "attempts": attempts,
            "running": list(self._running.values()),
            "samples": list(self.samples),
            "workers": dict(self.workers),
        }


def eta(done: int, total: int | None, started: float | None, now: float) -> float | None:
    """
    Seconds left in a phase at the rate it has gone so far, or C{None}
    before that rate is known (nothing done yet), when its size is not
    (a source without a length), or once nothing is left.
    """
    if started is None or total is None or done <= 0 or total <= done:
        return None
    rate = done / max(now - started, 1e-6)
    return round((total - done) / rate, 1)

"""
Run tasks in child processes, off the reactor thread.

A worker's reactor keeps talking to the server (heartbeats, inputs, outputs)
while user code runs in C{python -m octotwist._child} processes, one task at a
time each.  A child that dies mid-task (a segfault, C{os._exit}, the OOM
killer) fails that attempt with a message saying how it died, and is
replaced, so one bad record never takes the worker down with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from octotwist._child import encode_frame
from octotwist.framing import FrameBuffer
from octotwist.messages import TaskId

_PIPE_SIZE = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")
_log = Logger()

OnOutput = Callable[[int, bytes], None]


@dataclass(frozen=True, slots=True)
class Finished:
    records_in: int
    records_out: int
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)
    printed: str = ""  # what the user's code printed (L{octotwist._child._Printed})
    process: int = 0  # the pool's number of the process that ran it


@dataclass(frozen=True, slots=True)
class Crashed:
    """The attempt raised (C{key}, C{error}, C{traceback}) or its process died."""

    key: str | None
    error: str
    traceback: str
    printed: str = ""
    process: int = 0


Outcome = Finished | Crashed


class _ChildProcess(ProcessProtocol):
    """One child process; runs one task at a time."""

    def __init__(self, pool: ProcessPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.killed = False  # on purpose: a cancelled task
        self.pid: int | None = None
        # Our own child's replies: no limit but the prefix's.
        self._frames = FrameBuffer(2**32 - 1)
        self._on_output: OnOutput | None = None
        self._result: Deferred[Outcome] | None = None
        self.ended: Deferred[None] = Deferred()

    @property
    def busy(self) -> bool:
        return self._result is not None

    def run(
        self, task: TaskId, partitions: int, inputs: list[bytes], on_output: OnOutput
    ) -> Deferred[Outcome]:
        assert self._result is None, "child is busy"
        self._result = Deferred()
        self._on_output = on_output
        assert self.transport is not None  # set by spawnProcess, before run
        request = (task.kind.value, task.step, partitions, inputs)
        self.transport.writeToChild(3, encode_frame(request))
        return self._result

    def kill(self) -> None:
        self.killed = True
        assert self.transport is not None
        with contextlib.suppress(error.ProcessExitedAlready):
            self.transport.signalProcess("KILL")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 4:
            return
        self._frames.feed(data)
        while (frame := self._frames.next_frame()) is not None:
            self._reply(pickle.loads(frame))

    def _reply(self, reply: tuple) -> None:
        match reply:
            case ("output", partition, blob):
                assert self._on_output is not None
                self._on_output(partition, blob)
            case ("done", records_in, records_out, seconds, counts, printed):
                self._finish(
                    Finished(records_in, records_out, seconds, counts, printed, self.number)
                )
            case ("failed", key, err, tb, printed):
                self._finish(Crashed(key, err, tb, printed, self.number))

    def _finish(self, outcome: Outcome) -> None:
        d, self._result, self._on_output = self._result, None, None
        if d is not None:
            d.callback(outcome)
        self.pool._next()

    def connectionMade(self) -> None:
        # Kept: once the process is reaped, its transport forgets the pid.
        assert self.transport is not None
        self.pid = self.transport.pid

    def processEnded(self, reason: Failure) -> None:
        if self._result is not None:
            assert self.transport is not None  # ended: it was started
            how = _describe_exit(reason)
            d, self._result = self._result, None
            d.callback(
                Crashed(
                    None,
                    f"the worker process running the task died ({how})",
                    f"worker process {self.number} (pid {self.pid}) {how}; the task's "
                    "user code may have crashed the interpreter, called os._exit(), "
                    "or run out of memory\n",
                    process=self.number,
                )
            )
        self.ended.callback(None)
        self.pool._child_ended(self)


def _widen_pipes(process: Any) -> None:
    """
    Give the pipe into a child 1 MiB of buffer instead of Linux's 64 KiB: a
    map task's input is a whole source value, and each wake-up of the
    reactor or the child moves 16 times as much of it.  Only that pipe: the
    kernel charges a user's pipe buffers against a soft limit
    (C{pipe-user-pages-soft}, 64 MiB), past which it gives new pipes a page
    or two.  Where the system does not allow it, the default stays.
    """
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(process.pipes[3].fileno(), set_size, _PIPE_SIZE)


def _describe_exit(reason: Failure) -> str:
    value = reason.value
    signal = getattr(value, "signal", None)
    if signal:
        return f"killed by signal {signal}"
    return f"exit code {getattr(value, 'exitCode', '?')}"


@dataclass(slots=True)
class _Queued:
    task: TaskId
    partitions: int
    inputs: list[bytes]
    on_output: OnOutput
    result: Deferred[Outcome]
    child: _ChildProcess | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.child is not None:
            self.child.kill()


class ProcessPool:
    """
    C{size} child processes running the job's functions.

    A pool may outlive its job: a worker of a cluster (C{octo serve}) keeps
    it for the next job (L{octotwist.client.run_worker}), whose functions
    L{load} ships to the same processes.

    @param functions: the cloudpickled L{octotwist.job.JobFunctions}.
    """

    def __init__(self, reactor: IReactorProcess, functions: bytes, size: int) -> None:
        self.reactor = reactor
        self.functions = functions
        self.size = size
        self._children: list[_ChildProcess] = []
        self._queue: list[_Queued] = []
        self._stopping = False
        self._spawned = 0
        for _ in range(size):
            self._spawn()

    @property
    def pids(self) -> list[int]:
        """The pids of the children that run (or will run) tasks, in spawn order."""
        return [c.pid for c in self._children if c.pid is not None and not c.killed]

    def rss(self) -> int:
        """
        Bytes of memory the children hold (their resident set sizes, from
        C{/proc}); 0 where that cannot be read.
        """
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    total += int(f.read().split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                pass
        return total

    def load(self, functions: bytes) -> None:
        """
        Make C{functions} the job the children run: each live child gets a
        C{("job", functions)} frame, which it reads before its next task; a
        child spawned later (replacing one that died) gets them first.

        Only between jobs: no task may be queued or running, since a task
        already handed to a child would run the old job's code (a killed
        child, whose task was cancelled, is left to end: its replacement
        loads these functions).

        @raise AssertionError: a task is queued or running.
        """
        assert not self._stopping, "the pool is stopping"
        assert not self._queue, "tasks are queued: load functions between jobs only"
        live = [c for c in self._children if not c.killed]
        assert not any(c.busy for c in live), "a task is running: load functions between jobs only"
        self.functions = functions
        frame = encode_frame(("job", functions))
        for child in live:
            assert child.transport is not None  # spawned
            child.transport.writeToChild(3, frame)

    def cancel_all(self) -> None:
        """
        Cancel every queued and running task (killing the children that run
        one; they are replaced), leaving the pool idle for the next job: the
        job is over, and what is left of it must not go on.
        """
        queued, self._queue = self._queue, []
        for job in queued:
            job.cancelled = True
        for child in self._children:
            if child.busy:
                child.kill()

    def _spawn(self) -> None:
        self._spawned += 1
        child = _ChildProcess(self, self._spawned)
        self.reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-m", "octotwist._child"],
            env=os.environ.copy(),
            childFDs={1: 1, 2: 2, 3: "w", 4: "r"},
        )
        assert child.transport is not None  # spawnProcess made it
        _widen_pipes(child.transport)
        child.transport.writeToChild(3, encode_frame(("job", self.functions)))
        self._children.append(child)

    def run(
        self, task: TaskId, partitions: int, inputs: list[bytes], on_output: OnOutput
    ) -> tuple[Deferred[Outcome], Callable[[], None]]:
        """
        Run a task in the next idle child (it waits for one if none is idle:
        a cancelled task's child is replaced before it can take another).

        @return: the outcome's Deferred, and a function that cancels the task
            (killing its child if it has started).
        """
        job = _Queued(task, partitions, inputs, on_output, Deferred())
        self._queue.append(job)
        self._next()
        return job.result, job.cancel

    def _next(self) -> None:
        """Start queued tasks on idle children."""
        while self._queue and not self._stopping:
            child = next((c for c in self._children if not c.busy and not c.killed), None)
            if child is None:
                return
            job = self._queue.pop(0)
            if job.cancelled:
                continue
            job.child = child
            child.run(job.task, job.partitions, job.inputs, job.on_output).chainDeferred(job.result)

    def _child_ended(self, child: _ChildProcess) -> None:
        if child in self._children:
            self._children.remove(child)
        if not self._stopping:
            if child.killed:
                _log.debug("worker process {n} stopped (task cancelled)", n=child.number)
            else:
                _log.warn("worker process {n} ended; starting another", n=child.number)
            self._spawn()
            self._next()

    @property
    def stopping(self) -> bool:
        """L{stop} was called: the children are ending, and none replaces them."""
        return self._stopping

    def stop(self) -> Deferred[None]:
        """
        Ask every child to exit (end of input); fires when all have.  Called
        again, it only waits for them.
        """
        ended = [c.ended for c in self._children]
        if self._stopping:
            return DeferredList(ended).addCallback(lambda _: None)
        self._stopping = True
        for child in self._children:
            assert child.transport is not None
            child.transport.closeChildFD(3)
            if child.busy:
                child.kill()
        return DeferredList(ended).addCallback(lambda _: None)

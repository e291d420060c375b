"""
A job's tasks as plain functions, for an engine that runs them where it
likes (an engine plugin, L{octotwist.hookspecs.octotwist_engines}).

L{run_task} does what octotwist's own task processes do for each task
(L{octotwist._child}): the same shuffle buffer, combiner, partitioning and
reduce merge, the same packed blobs, the same counters and the same
errors naming the key they happened at.  Only the I/O differs: the inputs
are arguments and the outputs are returned, as bytes, so that an engine
moves a map task's partitions as a few blobs rather than element by
element.

The job's functions arrive pickled (L{octotwist.job.Job.pickled_functions},
helper modules included) and are loaded once per process, whichever thread
asks (an engine may run several tasks at once, each in a thread; each
counts into its own table, L{octotwist.counters}); C{setupfn} runs once per
process, as on a worker.  What a task prints goes where the engine's
worker sends its standard output: it is not captured here.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from octotwist import codec, shipping
from octotwist._child import _cannot_load, _Runner

#: Jobs whose functions a process keeps loaded (the newest).
KEEP_JOBS = 4


@dataclass(frozen=True)
class TaskResult:
    """
    What a task made.

    @ivar outputs: its packed runs, by partition (a map task's partitions;
        a reduce task's one output, partition 0; a map-only step's pairs,
        partition 0, in order).
    @ivar records_in: records it read.
    @ivar records_out: pairs (map) or results (reduce) it made.
    @ivar seconds: how long it ran.
    @ivar counters: what it counted (L{octotwist.counters}), octotwist's own
        among them.
    """

    outputs: dict[int, list[bytes]] = field(default_factory=dict)
    records_in: int = 0
    records_out: int = 0
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)


class TaskFailed(Exception):
    """
    The job's code raised in a task: the message says what, at which key,
    with the user's traceback (as octotwist's own workers report it).
    """

    def __init__(self, error: str, key: str | None, traceback: str) -> None:
        super().__init__(error, key, traceback)
        self.error, self.key, self.traceback = error, key, traceback

    def __str__(self) -> str:
        where = f" at key {self.key}" if self.key is not None else ""
        return f"{self.error}{where}\n{self.traceback}".rstrip()


@dataclass
class _Loaded:
    functions: Any
    finder: shipping.ShippedFinder | None
    setup_lock: threading.Lock = field(default_factory=threading.Lock)
    set_up: bool = False


_lock = threading.Lock()
_loaded: OrderedDict[str, _Loaded] = OrderedDict()


def _load(pickled_functions: bytes) -> _Loaded:
    """The job's functions in this process, loaded the first time they are asked for."""
    digest = hashlib.sha256(pickled_functions).hexdigest()
    with _lock:
        loaded = _loaded.get(digest)
        if loaded is not None:
            _loaded.move_to_end(digest)
            return loaded
        try:
            functions = codec.load_functions(pickled_functions)
        except Exception as e:
            hint, tb = _cannot_load(e)
            raise TaskFailed(hint, None, tb) from None
        finder = shipping.install(getattr(functions, "modules", None) or {})
        loaded = _loaded[digest] = _Loaded(functions, finder)
        while len(_loaded) > KEEP_JOBS:
            _, old = _loaded.popitem(last=False)
            if old.finder is not None:
                shipping.uninstall(old.finder)
        return loaded


class _Collecting(_Runner):
    """A task process's runner whose replies are kept rather than framed on a pipe."""

    def __init__(self, loaded: _Loaded) -> None:
        super().__init__(loaded.functions, out=None)  # type: ignore[arg-type]  # never written
        self.loaded = loaded
        self.set_up = loaded.set_up or loaded.functions.setupfn is None
        self.replies: list[tuple[Any, ...]] = []

    def emit(self, *reply: Any) -> None:
        self.replies.append(reply)

    def setup(self) -> None:
        # Once per process, whichever of its threads comes first.
        with self.loaded.setup_lock:
            if not self.loaded.set_up:
                super().setup()
                self.loaded.set_up = True
        self.set_up = True


def run_task(
    pickled_functions: bytes, kind: str, step: int, partitions: int, inputs: list[bytes]
) -> TaskResult:
    """
    Run one task of a job.

    @param kind: C{"map"} or C{"reduce"}.
    @param step: the step's index (0 for a job of one step).
    @param partitions: a map task's partitions (the step's reduce tasks);
        0 for a map-only step's task.
    @param inputs: a map task's packed C{(keys, values)} items (source
        items, or the step before's results); a reduce task's packed runs
        of its partition, from every map task.
    @raise TaskFailed: the job's code raised (or its functions do not load here).
    """
    runner = _Collecting(_load(pickled_functions))
    runner.handle(kind, step, partitions, list(inputs))
    outputs: dict[int, list[bytes]] = {}
    for reply in runner.replies:
        if reply[0] == "output":
            outputs.setdefault(reply[1], []).append(reply[2])
        elif reply[0] == "failed":
            _, key, error, tb, _printed = reply
            raise TaskFailed(error, key, tb)
        else:
            _, records_in, records_out, seconds, counts, _printed = reply
            return TaskResult(outputs, records_in, records_out, seconds, counts)
    raise AssertionError(f"a {kind} task ended without saying how")  # (_Runner always does)

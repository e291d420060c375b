"""
Resuming a job whose server died: what ties a job's scheduler and store to
its journal (L{octotwist.journal}) in a state directory (C{--state-dir}).

The same command finds its job again by a fingerprint of what decides the
job's results: the script's bytes and those of the helper modules it
ships, its name, its arguments and each step's partitions.  A changed
script is a new job, which starts from nothing (and the old one's
progress stays until the state directory is cleared); an unchanged one
picks up where the dead server stopped.

A finished task is known across runs by its L{Origin} (its input), not
its number: the first step's map tasks by their keys, reduce tasks by
their step and partition, a later step's map tasks by the origin of the
task they map.  The keys of the first step's finished batches are left
out of the source (L{Resume.remaining}); every later task, as the
scheduler makes it, is looked up (L{Resume.restore}), and one that
finished gets its outputs, as files of the state directory, and its
counters back without running.

The state directory is trusted as the job script is: the keys of its
finished batches are unpickled from it, and its blobs are results.  The
journal refuses a directory other users may write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from twisted.logger import Logger

from octotwist import codec
from octotwist.job import Job
from octotwist.journal import Blob, FinishedTask, Journal
from octotwist.messages import TaskId, TaskKind
from octotwist.scheduler import Origin

_log = Logger()


def fingerprint(job: Job, args: Sequence[str]) -> str:
    """
    What names C{job} across runs of the same command (see the module's
    docstring): the same script, helpers and arguments, the same job.
    """
    h = hashlib.blake2b(digest_size=20)

    def add(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)

    add(job.name.encode())
    if job.path is not None:
        add(job.path.read_bytes())
    else:  # a job built in Python: its functions as pickled (the best there is)
        add(job.pickled_functions)
    for name, module in sorted(job.functions.modules.items()):
        add(name.encode())
        add(repr(module).encode())
    for arg in args:
        add(arg.encode())
    return h.hexdigest()


def _ident(origin: Origin) -> bytes:
    """The journal's name for a task of this origin (with its kind and step)."""
    if origin.partition is not None:
        return codec.pack(("reduce", *origin.partition), compress=False)
    return codec.pack(("keys", origin.keys), compress=False)


#: What the server does with a task an earlier run finished: count its
#: outputs and its counters as if an attempt of it had just been accepted.
Restorer = Callable[[TaskId, FinishedTask], None]


class Resume:
    """
    One job's journal, as its server sees it; what the scheduler asks
    (L{octotwist.scheduler.Resumed}).  Use L{start}.

    @ivar batches: the first step's map tasks that finished before, as
        their keys.
    @ivar restored: how many tasks, by kind, were done before and not run
        again.
    """

    def __init__(self, journal: Journal, job: int, finished: Iterable[FinishedTask]) -> None:
        self.journal = journal
        self.job = job
        self._finished = {(t.kind, t.step, t.ident): t for t in finished}
        self.batches: list[tuple[Any, ...]] = []
        for t in self._finished.values():
            if t.kind == TaskKind.MAP.value and t.step == 0:
                tag, keys = codec.unpack(t.ident)
                if tag == "keys":
                    self.batches.append(tuple(keys))
        self._done_keys = {
            codec.pack(key, compress=False) for batch in self.batches for key in batch
        }
        self.restored = dict.fromkeys(TaskKind, 0)
        #: What the journal dropped as it opened (a bad blob, a broken database).
        self.dropped: list[str] = []
        self.resumed = False
        self.restorer: Restorer | None = None

    @classmethod
    def start(
        cls, journal: Journal, fingerprint: str, name: str, partitions: Sequence[int]
    ) -> Resume:
        """The job of this fingerprint and these partitions, new or resumed."""
        steps = ",".join(map(str, partitions))
        replay = journal.start(f"{fingerprint}/{steps}", name)
        resume = cls(journal, replay.job, replay.tasks)
        resume.resumed = replay.resumed
        resume.dropped = [*journal.notes, *replay.dropped]
        return resume

    def remaining(self, keys: Iterable[Any]) -> Iterator[Any]:
        """The source's keys less those of the batches done before."""
        if not self._done_keys:
            yield from keys
            return
        for key in keys:
            if codec.pack(key, compress=False) not in self._done_keys:
                yield key

    def restore(self, task: TaskId, origin: Origin) -> bool:
        """
        Whether the task of C{origin} finished before; if so its outputs and
        counters are handed to the L{restorer} under its number now, C{task}.
        """
        found = self._finished.get((task.kind.value, task.step, _ident(origin)))
        if found is None:
            return False
        assert self.restorer is not None, "the server sets its restorer first"
        self.restorer(task, found)
        self.restored[task.kind] += 1
        return True

    def record(
        self,
        task: TaskId,
        origin: Origin,
        outputs: Mapping[int, list[bytes]],
        counters: Iterable[tuple[str, int]],
    ) -> list[Blob]:
        """
        A task's attempt counted: journal its outputs and counters.

        @return: the files its outputs were written to (L{Journal.record}).

        @raise octotwist.journal.JournalError: the state directory cannot
            take them (a full disk, say).
        """
        return self.journal.record(
            self.job, task.kind.value, task.step, _ident(origin), outputs, counters
        )

    def end(self, ok: bool, error: str | None = None) -> None:
        """The job is over: it is not resumed again, and its files go."""
        self.journal.end(self.job, ok, error)

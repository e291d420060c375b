"""
Where the server keeps task outputs: opaque blobs, in memory up to a bound,
then in a spill file on disk.

Outputs are staged per attempt while their parts arrive and count only once
the scheduler accepts the attempt (L{BlobStore.commit}); the outputs of a
failed, cancelled or duplicate attempt are dropped (L{BlobStore.discard}).
The server never unpickles what it stores here.

A spill file that cannot be written (a full disk, say) raises L{SpillError},
which says where and what to do: the server fails the job with it, since
retrying the task would only fill the same disk again.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from octotwist.errors import OctotwistError
from octotwist.journal import Blob
from octotwist.messages import TaskId, TaskKind

#: Bytes of blobs held in memory before the spill file (C{--memory-limit}).
#: Small on purpose: blobs wait for their reduce task and are read once, in
#: order, so the page cache serves spilled ones about as well, and the
#: server's memory stays flat however large the job (docs/performance.md).
DEFAULT_MEMORY_LIMIT = 32 * 1024 * 1024


#: A stored blob: the bytes themselves, or, for a blob in the spill file,
#: one int packing its offset and size (L{_on_disk}).  A 1.5 GB job commits
#: some 70 000 blobs; an int each keeps the index to a few MB.  A task an
#: earlier run of the job finished has its blobs in the state directory
#: (L{BlobStore.restore}): a L{Blob}, read from there when it is needed.
_Ref = bytes | int | Blob
_Attempt = tuple[TaskId, int]
_SIZE_BITS = 40  # blobs up to 1 TiB; offsets up to 2**23 TiB


def _on_disk(offset: int, size: int) -> int:
    return offset << _SIZE_BITS | size


class SpillError(OctotwistError):
    """
    The spill file could not be created or written: the directory is full,
    gone or not writable.  Not a peer's fault and not the task's: no retry
    helps, so the job fails with this message.
    """

    def __init__(self, directory: str, error: OSError) -> None:
        self.directory = directory
        self.error = error
        why = (error.strerror or str(error)).lower()
        super().__init__(
            f"cannot spill to {directory}: {why}. Free space there, point TMPDIR "
            "at a file system with room for the job's map output, or raise "
            "--memory-limit (MiB) so that more of it stays in memory"
        )


class _Committed:
    """One partition's committed blobs, in commit order, with their task indexes."""

    __slots__ = ("refs", "tasks")

    def __init__(self) -> None:
        self.tasks = array("l")
        self.refs: list[_Ref] = []

    def in_task_order(self) -> list[_Ref]:
        """The refs by task index; a task's own blobs keep their order (a stable sort)."""
        order = sorted(range(len(self.tasks)), key=self.tasks.__getitem__)
        return [self.refs[i] for i in order]


class BlobStore:
    """
    @param memory_limit: bytes of blobs to hold in memory before spilling.
    @param spill_dir: directory for the spill file (the system's temp dir by
        default); the file is unlinked at once, so it never outlives us.
    """

    def __init__(
        self, memory_limit: int = DEFAULT_MEMORY_LIMIT, spill_dir: str | None = None
    ) -> None:
        self.memory_limit = memory_limit
        self.spill_dir = spill_dir
        self.in_memory = 0
        self.on_disk = 0
        #: Bytes of blobs restored from a state directory, not yet consumed.
        self.durable = 0
        self._spill: BinaryIO | None = None
        self._spill_end = 0  # where the next spilled blob goes
        self._parts: dict[tuple[TaskId, int, int], list[bytes]] = {}
        self._staged: defaultdict[_Attempt, list[tuple[int, _Ref]]] = defaultdict(list)
        # Map outputs by step and partition (a reduce task reads one
        # partition); the outputs of reduce tasks and of a map-only step's
        # map tasks by task (the next step, or the server, reads each
        # task's results).
        self._maps: defaultdict[tuple[int, int], _Committed] = defaultdict(_Committed)
        self._results: dict[TaskId, list[tuple[int, _Ref]]] = {}

    def add_part(self, task: TaskId, attempt: int, partition: int, data: bytes, end: bool) -> None:
        """
        Stage one part of an attempt's output for C{partition}.

        @raise SpillError: the part had to go to the spill file, which
            cannot be written.
        """
        key = (task, attempt, partition)
        if not end:
            self._parts.setdefault(key, []).append(data)
            return
        pending = self._parts.pop(key, None)
        blob = data if pending is None else b"".join([*pending, data])
        self._staged[(task, attempt)].append((partition, self._put(blob)))

    def commit(self, task: TaskId, attempt: int, *, by_task: bool = False) -> int:
        """
        The attempt won: its staged outputs now count.

        @param by_task: keep a map task's outputs by task, as a reduce
            task's are (L{outputs}): a map-only step's, which are not
            shuffled.
        @return: how many bytes of output it committed.
        """
        staged = self._staged.pop((task, attempt), [])
        if task.kind is TaskKind.REDUCE or by_task:
            self._results.setdefault(task, []).extend(staged)
        else:
            for partition, ref in staged:
                c = self._maps[(task.step, partition)]
                c.tasks.append(task.index)
                c.refs.append(ref)
        self._drop_parts(task, attempt)
        return sum(_size(ref) for _, ref in staged)

    def staged(self, task: TaskId, attempt: int) -> dict[int, list[bytes]]:
        """An attempt's staged outputs, by partition, in the order they came (to journal)."""
        out: dict[int, list[bytes]] = {}
        for partition, ref in self._staged.get((task, attempt), ()):
            out.setdefault(partition, []).append(self._get(ref))
        return out

    def moved(self, task: TaskId, attempt: int, blobs: Iterable[Blob]) -> None:
        """
        An attempt's staged outputs are now in these files (the journal
        wrote them, in the order L{staged} gave them): hold the files, not
        the bytes, so that a state directory keeps what a spill file would.
        """
        files: defaultdict[int, list[Blob]] = defaultdict(list)
        for blob in reversed(list(blobs)):
            files[blob.partition].append(blob)
        staged = self._staged.get((task, attempt), [])
        for i, (partition, ref) in enumerate(staged):
            blob = files[partition].pop()
            self._release(ref)
            self.durable += blob.size
            staged[i] = (partition, blob)

    def restore(self, task: TaskId, blobs: Iterable[Blob], *, by_task: bool = False) -> None:
        """
        Count the outputs of C{task} that an earlier run of the job
        committed and journaled, as L{commit} counts an attempt's: they stay
        in their files (read when a task or the results need them).
        """
        refs: list[tuple[int, _Ref]] = [(blob.partition, blob) for blob in blobs]
        self.durable += sum(_size(ref) for _, ref in refs)
        self._staged[(task, 0)] = refs
        self.commit(task, 0, by_task=by_task)

    def discard(self, task: TaskId, attempt: int) -> None:
        """The attempt does not count: forget its outputs."""
        for _, ref in self._staged.pop((task, attempt), []):
            self._release(ref)
        self._drop_parts(task, attempt)

    def blobs(self, partition: int, step: int = 0) -> Iterator[bytes]:
        """
        The committed map outputs of C{partition} of C{step}, in task
        order, each read (from the spill file, say) only as it is reached:
        a reduce task's input is sent one blob at a time, never gathered
        whole in memory.
        """
        c = self._maps.get((step, partition))
        refs = c.in_task_order() if c is not None else []
        return (self._get(ref) for ref in refs)

    def outputs(self, task: TaskId) -> Iterator[bytes]:
        """
        A task's committed results (a reduce task's, or a map task's
        committed C{by_task}), by partition, then in the order they came.
        """
        staged = sorted(self._results.get(task, ()), key=lambda pr: pr[0])
        return (self._get(ref) for _, ref in staged)

    def forget(self, task: TaskId) -> None:
        """Forget a task's committed results (they have been consumed)."""
        for _, ref in self._results.pop(task, ()):
            self._release(ref)

    def drop(self, partition: int, step: int = 0) -> None:
        """Forget a partition's map outputs (its reduce task is done)."""
        c = self._maps.pop((step, partition), None)
        for ref in c.refs if c is not None else ():
            self._release(ref)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def _drop_parts(self, task: TaskId, attempt: int) -> None:
        for key in [k for k in self._parts if k[:2] == (task, attempt)]:
            del self._parts[key]

    def _put(self, blob: bytes) -> _Ref:
        """
        Keep C{blob} in memory, or append it to the spill file.

        @raise SpillError: the spill file cannot be created or written.
        """
        if self.in_memory + len(blob) <= self.memory_limit:
            self.in_memory += len(blob)
            return blob
        offset = self._spill_end
        try:
            fd = self._spill_fd()
            # Unbuffered, at an offset we keep: a write that fails fails
            # here, not at a later flush inside some reader, and a blob
            # that was half written is simply overwritten by the next one.
            view, written = memoryview(blob), 0
            while written < len(blob):
                written += os.pwrite(fd, view[written:], offset + written)
        except OSError as e:
            raise SpillError(self.spill_dir or tempfile.gettempdir(), e) from e
        self._spill_end = offset + len(blob)
        self.on_disk += len(blob)
        return _on_disk(offset, len(blob))

    def _spill_fd(self) -> int:
        if self._spill is None:
            # Unlinked at once (O_TMPFILE where there is one): it never
            # outlives us, and close() ends it.
            self._spill = tempfile.TemporaryFile(  # noqa: SIM115
                prefix="octo-spill-", dir=self.spill_dir, buffering=0
            )
        return self._spill.fileno()

    def _get(self, ref: _Ref) -> bytes:
        if isinstance(ref, bytes):
            return ref
        if isinstance(ref, Blob):
            return ref.read()
        assert self._spill is not None
        offset, size = ref >> _SIZE_BITS, ref & ((1 << _SIZE_BITS) - 1)
        return os.pread(self._spill.fileno(), size, offset)

    def _release(self, ref: _Ref) -> None:
        if isinstance(ref, bytes):
            self.in_memory -= len(ref)
        elif isinstance(ref, Blob):
            self.durable -= ref.size
        else:
            self.on_disk -= ref & ((1 << _SIZE_BITS) - 1)


def _size(ref: _Ref) -> int:
    if isinstance(ref, Blob):
        return ref.size
    return len(ref) if isinstance(ref, bytes) else ref & ((1 << _SIZE_BITS) - 1)

"""
Where the server keeps task outputs: opaque blobs, in memory up to a bound,
then in a spill file on disk.

Outputs are staged per attempt while their parts arrive and count only once
the scheduler accepts the attempt (L{BlobStore.commit}); the outputs of a
failed, cancelled or duplicate attempt are dropped (L{BlobStore.discard}).
The server never unpickles what it stores here.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from octotwist.messages import TaskId, TaskKind

DEFAULT_MEMORY_LIMIT = 128 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _OnDisk:
    offset: int
    size: int


_Ref = bytes | _OnDisk
_Attempt = tuple[TaskId, int]


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
        self._spill: tempfile._TemporaryFileWrapper | None = None
        self._parts: dict[tuple[TaskId, int, int], list[bytes]] = {}
        self._staged: defaultdict[_Attempt, list[tuple[int, _Ref]]] = defaultdict(list)
        # kind -> partition -> task index -> blobs
        self._committed: dict[TaskKind, defaultdict[int, dict[int, list[_Ref]]]] = {
            kind: defaultdict(dict) for kind in TaskKind
        }

    def add_part(self, task: TaskId, attempt: int, partition: int, data: bytes, end: bool) -> None:
        """Stage one part of an attempt's output for C{partition}."""
        key = (task, attempt, partition)
        if not end:
            self._parts.setdefault(key, []).append(data)
            return
        pending = self._parts.pop(key, None)
        blob = data if pending is None else b"".join([*pending, data])
        self._staged[(task, attempt)].append((partition, self._put(blob)))

    def commit(self, task: TaskId, attempt: int) -> None:
        """The attempt won: its staged outputs now count."""
        committed = self._committed[task.kind]
        for partition, ref in self._staged.pop((task, attempt), []):
            committed[partition].setdefault(task.index, []).append(ref)
        self._drop_parts(task, attempt)

    def discard(self, task: TaskId, attempt: int) -> None:
        """The attempt does not count: forget its outputs."""
        for _, ref in self._staged.pop((task, attempt), []):
            self._release(ref)
        self._drop_parts(task, attempt)

    def blobs(self, kind: TaskKind, partition: int) -> Iterator[bytes]:
        """
        The committed blobs of C{partition}, in task order, each read (from
        the spill file, say) only as it is reached: a reduce task's input is
        sent one blob at a time, never gathered whole in memory.
        """
        by_task = self._committed[kind].get(partition, {})
        refs = [ref for index in sorted(by_task) for ref in by_task[index]]
        return (self._get(ref) for ref in refs)

    def drop(self, kind: TaskKind, partition: int) -> None:
        """Forget a partition's committed blobs (they have been consumed)."""
        for refs in self._committed[kind].pop(partition, {}).values():
            for ref in refs:
                self._release(ref)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def _drop_parts(self, task: TaskId, attempt: int) -> None:
        for key in [k for k in self._parts if k[:2] == (task, attempt)]:
            del self._parts[key]

    def _put(self, blob: bytes) -> _Ref:
        if self.in_memory + len(blob) <= self.memory_limit:
            self.in_memory += len(blob)
            return blob
        if self._spill is None:
            # Lives as long as the store; close() ends it.
            self._spill = tempfile.TemporaryFile(  # noqa: SIM115
                prefix="octo-spill-", dir=self.spill_dir
            )
        offset = self._spill.seek(0, os.SEEK_END)
        self._spill.write(blob)
        self.on_disk += len(blob)
        return _OnDisk(offset, len(blob))

    def _get(self, ref: _Ref) -> bytes:
        if isinstance(ref, bytes):
            return ref
        assert self._spill is not None
        self._spill.flush()
        return os.pread(self._spill.fileno(), ref.size, ref.offset)

    def _release(self, ref: _Ref) -> None:
        if isinstance(ref, bytes):
            self.in_memory -= len(ref)
        else:
            self.on_disk -= ref.size

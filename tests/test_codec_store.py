"""The codec's guard rails and the blob store's commit/discard/spill rules."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from octotwist import codec, messages
from octotwist.errors import RemoteProtocolError
from octotwist.messages import TaskId, TaskKind
from octotwist.store import BlobStore, SpillError

M0, M1 = TaskId(TaskKind.MAP, 0), TaskId(TaskKind.MAP, 1)


@pytest.mark.parametrize(
    "message",
    [
        messages.Hello("w", "h", 1, 2),
        messages.TaskOutput(M0, 1, 3, b"\x00" * 10, end=False),
        messages.Heartbeat(((M0, 1), (M1, 2))),
        messages.TaskFailed(M0, 1, "'k'", "E: x", "tb"),
    ],
)
def test_messages_round_trip(message: messages.Message) -> None:
    assert codec.decode_message(codec.encode_message(message)) == message


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        pickle.dumps(Evil()),
        pickle.dumps({"not": "a message"}),
        pickle.dumps(TaskKind.MAP),
    ],
)
def test_decode_rejects_anything_but_messages(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.decode_message(data)


def test_pack_and_parts() -> None:
    blob = codec.pack([("word", [1] * 1000)])
    assert codec.unpack(blob) == [("word", [1] * 1000)]
    pieces = list(codec.parts(b"x" * 10, size=4))
    assert pieces == [(b"xxxx", False), (b"xxxx", False), (b"xx", True)]
    assert list(codec.parts(b"", size=4)) == [(b"", True)]


def test_store_commits_only_winning_attempts_in_task_order() -> None:
    store = BlobStore()
    store.add_part(M1, 1, 0, b"one-", end=False)
    store.add_part(M1, 1, 0, b"part", end=True)
    store.add_part(M0, 1, 0, b"zero", end=True)
    store.add_part(M0, 2, 0, b"dup", end=True)
    store.commit(M1, 1)
    store.commit(M0, 1)
    store.discard(M0, 2)
    assert list(store.blobs(0)) == [b"zero", b"one-part"]
    assert list(store.blobs(1)) == []
    assert store.in_memory == len(b"zero") + len(b"one-part")


def test_store_spills_past_its_memory_limit(tmp_path) -> None:
    store = BlobStore(memory_limit=10, spill_dir=str(tmp_path))
    for i in range(5):
        t = TaskId(TaskKind.MAP, i)
        store.add_part(t, 1, 0, bytes([65 + i]) * 6, end=True)
        store.commit(t, 1)
    assert store.in_memory <= 10 and store.on_disk == 24
    assert list(store.blobs(0)) == [
        b"AAAAAA",
        b"BBBBBB",
        b"CCCCCC",
        b"DDDDDD",
        b"EEEEEE",
    ]
    store.drop(0)
    assert store.in_memory == 0 and store.on_disk == 0
    store.close()


def test_store_hands_out_and_forgets_one_tasks_outputs(tmp_path) -> None:
    R0, R1 = TaskId(TaskKind.REDUCE, 0), TaskId(TaskKind.REDUCE, 1)
    store = BlobStore(memory_limit=6, spill_dir=str(tmp_path))  # R1's blobs spill
    store.add_part(R1, 1, 0, b"r1-a", end=True)
    store.add_part(R1, 1, 0, b"r1-b", end=True)
    store.add_part(R0, 2, 0, b"r0", end=True)
    store.commit(R1, 1)
    store.commit(R0, 2)
    assert list(store.outputs(R1)) == [b"r1-a", b"r1-b"]
    assert list(store.outputs(R0)) == [b"r0"]
    store.forget(R1)
    assert list(store.outputs(R1)) == [] and list(store.outputs(R0)) == [b"r0"]
    store.forget(R0)
    assert store.in_memory == 0 and store.on_disk == 0
    store.close()


def test_spilled_blobs_survive_short_writes(tmp_path, monkeypatch) -> None:
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: real_pwrite(fd, bytes(data)[:3], at))
    store = BlobStore(memory_limit=0, spill_dir=str(tmp_path))
    store.add_part(M0, 1, 0, b"0123456789", end=True)
    store.add_part(M1, 1, 0, b"abcdefg", end=True)
    store.commit(M0, 1)
    store.commit(M1, 1)
    assert list(store.blobs(0)) == [b"0123456789", b"abcdefg"]
    store.close()


def test_a_full_spill_file_says_where_and_what_to_do(tmp_path, monkeypatch) -> None:
    store = BlobStore(memory_limit=4, spill_dir=str(tmp_path))
    store.add_part(M0, 1, 0, b"kept", end=True)  # in memory
    store.add_part(M0, 1, 1, b"spilled", end=True)
    real_pwrite = os.pwrite

    def full(fd: int, data: bytes, at: int) -> int:
        if len(data) > 2:
            return real_pwrite(fd, bytes(data)[:2], at)  # what fits, then no more
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(SpillError) as caught:
        store.add_part(M1, 1, 0, b"no room for this", end=True)
    message = str(caught.value)
    assert message.startswith(f"cannot spill to {tmp_path}: no space left on device. ")
    assert "TMPDIR" in message and "--memory-limit" in message
    monkeypatch.undo()
    # What was stored before is intact, and a later blob overwrites the
    # half-written one.
    store.add_part(M1, 1, 0, b"fits now", end=True)
    store.commit(M0, 1)
    store.commit(M1, 1)
    assert list(store.blobs(0)) == [b"kept", b"fits now"]
    assert list(store.blobs(1)) == [b"spilled"]
    store.close()

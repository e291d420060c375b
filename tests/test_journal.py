"""
The state directory's journal (L{octotwist.journal}), on a real disk and
real SQLite: what is recorded survives a reopen and a C{kill -9} at any
moment, a blob that is short or altered drops its task (which runs again),
a database that is not one is set aside, and two servers cannot share one
directory.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from octotwist.journal import Journal, JournalError, JournalLocked, finished


def outputs(n: int) -> dict[int, list[bytes]]:
    """Blobs for task C{n}: two partitions, the second of two parts."""
    return {0: [f"task {n} p0".encode() * 50], 1: [b"a" * n, f"task {n} p1".encode()]}


def test_what_is_recorded_is_replayed_after_a_reopen(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)
    job = journal.start("fp", "wordcount")
    assert not job.resumed and job.tasks == []
    for n in range(5):
        journal.record(job.job, "map", 0, f"keys {n}".encode(), outputs(n))
    journal.record(job.job, "reduce", 0, b"0", {0: [b"result"]})
    journal.close()
    again = Journal.open(tmp_path)
    replay = again.start("fp", "wordcount")
    assert replay.resumed and replay.job == job.job and replay.dropped == []
    maps = list(finished(replay, "map", 0))
    assert [t.ident for t in maps] == [f"keys {n}".encode() for n in range(5)]
    for n, task in enumerate(maps):
        got: dict[int, list[bytes]] = {}
        for blob in task.blobs:
            got.setdefault(blob.partition, []).append(blob.read())
        assert got == outputs(n)
    (reduce,) = finished(replay, "reduce", 0)
    assert reduce.blobs[0].read() == b"result"
    assert again.start("other", "x").resumed is False  # another job's fingerprint


def test_an_ended_job_is_not_resumed_and_its_blobs_go(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)
    job = journal.start("fp", "j")
    journal.record(job.job, "map", 0, b"k", outputs(1))
    journal.end(job.job, ok=True)
    assert list((tmp_path / "blobs").iterdir()) == []
    assert journal.start("fp", "j").resumed is False
    assert [state for _, _, state in journal.jobs()] == ["done", "running"]


def test_a_second_server_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = Journal.open(tmp_path)
    with pytest.raises(JournalLocked, match=rf"in use by another server \(pid {os.getpid()}\)"):
        Journal.open(tmp_path)
    first.close()
    Journal.open(tmp_path).close()  # free again once closed


def test_a_blob_that_is_short_or_altered_drops_its_task(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)
    job = journal.start("fp", "j")
    for n in range(3):
        journal.record(job.job, "map", 0, bytes([n]), outputs(n + 1))
    journal.close()
    blobs = sorted((tmp_path / "blobs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    again = Journal.open(tmp_path)
    replay = again.replay(job.job)
    first, second = (t.blobs[0].path for t in replay.tasks[:2])
    first.write_bytes(first.read_bytes()[:-3])  # torn
    second.write_bytes(b"X" + second.read_bytes()[1:])  # same size, other bytes
    replay = again.replay(job.job)
    assert [t.ident for t in replay.tasks] == [bytes([2])]
    assert len(replay.dropped) == 2
    assert "bytes at offset" in replay.dropped[0] and "recorded" in replay.dropped[0]
    assert "not those recorded" in replay.dropped[1]
    # One file a task, whose blobs it holds one after another; the bad ones' go.
    assert len(blobs) == 3 and list((tmp_path / "blobs").iterdir()) == [
        replay.tasks[0].blobs[0].path
    ]
    assert [b.read() for b in replay.tasks[0].blobs] == [
        blob for blobs in outputs(3).values() for blob in blobs
    ]


def test_a_database_that_is_not_one_is_set_aside(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)
    journal.record(journal.start("fp", "j").job, "map", 0, b"k", outputs(1))
    journal.close()
    db = tmp_path / "journal.sqlite3"
    db.write_bytes(db.read_bytes()[:100] + b"\0garbage" * 500)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    again = Journal.open(tmp_path)
    assert len(again.notes) == 1 and "could not be read" in again.notes[0], again.notes
    assert again.start("fp", "j").resumed is False  # its jobs start again
    assert any(p.name.startswith("journal.sqlite3.broken-") for p in tmp_path.iterdir())
    assert list((tmp_path / "blobs").iterdir()) == []  # the old blobs, named by nothing


def test_a_state_directory_that_cannot_be_made_says_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(JournalError, match=r"cannot use the state directory .*give --state-dir"):
        Journal.open(tmp_path / "file" / "state")


RECORDER = """
import sys
from octotwist.journal import Journal
journal = Journal.open(sys.argv[1])
job = journal.start("fp", "j")
n = 0
while True:
    journal.record(job.job, "map", 0, str(n).encode(), {0: [str(n).encode() * 1000]})
    print(n, flush=True)
    n += 1
"""


@pytest.mark.parametrize("trial", range(5))
def test_kill_9_at_any_moment_leaves_every_recorded_task_whole(tmp_path: Path, trial: int) -> None:
    """A process recording tasks as fast as it can is killed at a random moment."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RECORDER), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # it has recorded at least one
    assert first.strip() == "0"
    time.sleep(random.Random(trial).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    printed = [int(line) for line in [first, *proc.stdout.read().split()] if str(line).strip()]
    proc.wait()
    journal = Journal.open(tmp_path)  # the lock died with its holder
    replay = journal.start("fp", "j")
    assert replay.resumed and replay.dropped == []
    idents = [int(t.ident) for t in replay.tasks]
    assert idents == list(range(len(idents)))  # a prefix, in order, no gap
    assert len(idents) >= len(printed)  # every task it said was recorded is there
    for task in replay.tasks:
        assert task.blobs[0].read() == task.ident * 1000
    assert len(list((tmp_path / "blobs").iterdir())) == len(idents)  # strays removed


def test_a_torn_write_ahead_log_keeps_a_whole_prefix(tmp_path: Path) -> None:
    """The server killed mid-job, then its WAL cut short (a torn last write): a prefix survives."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RECORDER), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(50):  # fifty tasks recorded, at least
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wal = tmp_path / "journal.sqlite3-wal"
    size = wal.stat().st_size
    assert size > 0  # (killed: nothing checkpointed it away)
    with open(wal, "r+b") as f:
        f.truncate(size // 2 + 7)  # mid-frame
    journal = Journal.open(tmp_path)
    replay = journal.start("fp", "j")
    idents = [int(t.ident) for t in replay.tasks]
    assert idents == list(range(len(idents))) and replay.dropped == []
    for task in replay.tasks:
        assert task.blobs[0].read() == task.ident * 1000
    assert len(list((tmp_path / "blobs").iterdir())) == len(idents)

"""
What a server keeps on disk so that a job survives its death (issue 16):
which tasks finished, and their outputs as files, in a state directory.

The journal is SQLite (the standard library's C{sqlite3}) in WAL mode, not
a log format of our own: a crash mid-write leaves the last committed
transaction whole, and one transaction records one task.  A task's outputs
are files under C{DIR/blobs/}, each written, fsynced, and its directory
fsynced I{before} the transaction that names it commits, so that whatever
the database says is done is on disk.  The database also keeps each blob's
size and BLAKE2 digest: a blob that is short or wrong when the job resumes
(a disk that lied, a file someone truncated) is dropped with its task,
which runs again, and L{Journal.replay} says so.  Blob files no task
names (a crash between writing and recording) are removed when the journal
opens.

The same database keeps a cluster's queue (C{octo serve --state-dir}):
each submitted job, its state, and how it ended (L{Journal.submit}); its
script (or pickled job) is a file under C{DIR/submitted/}, fsynced before
the row that names it commits, as blobs are.

One server per state directory: L{Journal.open} takes an exclusive
C{flock} on C{DIR/lock} and refuses, naming the holder's pid, while
another process holds it.  The lock dies with its process, so a server
killed with C{kill -9} leaves nothing to clean up.

Nothing here knows the scheduler or Twisted; blobs are opaque bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from octotwist.errors import OctotwistError

#: The schema's version, in C{PRAGMA user_version}: a journal of another
#: version is set aside rather than misread.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'running',
    error TEXT,
    created REAL NOT NULL,
    ended REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_fingerprint ON jobs (fingerprint, state);
CREATE TABLE IF NOT EXISTS tasks (
    job INTEGER NOT NULL REFERENCES jobs (id),
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    ident BLOB NOT NULL,
    counters TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (job, kind, step, ident)
);
CREATE TABLE IF NOT EXISTS blobs (
    job INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    ident BLOB NOT NULL,
    partition INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    path TEXT NOT NULL,  -- the task's file, in DIR/blobs/
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (job, kind, step, ident, partition, seq)
);
CREATE TABLE IF NOT EXISTS submitted (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    submitted REAL NOT NULL,
    request BLOB NOT NULL,  -- the caller's: how to run it (all but the script)
    script TEXT NOT NULL,   -- its file, in DIR/submitted/
    size INTEGER NOT NULL,
    digest TEXT NOT NULL,
    error TEXT,
    outcome TEXT            -- the caller's: how it ended
);
"""


class JournalError(OctotwistError):
    """The state directory cannot be used: the message says why and what to do."""


class JournalLocked(JournalError):
    """Another server holds the state directory."""


@dataclass(frozen=True, slots=True)
class Blob:
    """
    One output blob of a finished task, on disk: C{size} bytes at
    C{offset} in the task's file (one file a task, so that recording it
    costs one C{fsync}, not one a partition).
    """

    partition: int
    path: Path
    size: int
    digest: str
    offset: int = 0

    def read(self) -> bytes:
        """The blob's bytes (checked when the job was replayed)."""
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), self.size, self.offset)


@dataclass(frozen=True, slots=True)
class FinishedTask:
    """
    A task the journal says finished, with its outputs in order.

    @ivar ident: what names the task across restarts (the caller's bytes:
        for a map task of the first step, its keys, packed; for others, its
        index), since task numbers are not stable when batches are sized
        anew.
    """

    kind: str
    step: int
    ident: bytes
    blobs: tuple[Blob, ...]
    counters: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Submitted:
    """A job a cluster was sent (L{Journal.submit}), as the journal keeps it."""

    id: int
    name: str
    state: str
    submitted: float
    request: bytes
    script: Blob
    error: str | None
    outcome: str | None


@dataclass(slots=True)
class Replay:
    """What L{Journal.replay} found: the tasks that count, and what it dropped and why."""

    job: int
    tasks: list[FinishedTask] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resumed: bool = False


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """
    A state directory's journal and blobs.  Use L{open}; L{close} (or the
    process's end) releases the directory.
    """

    def __init__(self, directory: Path, db: sqlite3.Connection, lock_fd: int) -> None:
        self.directory = directory
        self.blob_dir = directory / "blobs"
        self.submitted_dir = directory / "submitted"
        self._db = db
        self._lock_fd = lock_fd
        #: What opening the journal had to set aside (a corrupt database).
        self.notes: list[str] = []

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Journal:
        """
        Open (or create) the journal in C{directory} and lock it.

        @raise JournalLocked: another process holds it (its pid is named).
        @raise JournalError: the directory cannot be created or written.
        """
        path = Path(directory).absolute()
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            (path / "blobs").mkdir(exist_ok=True, mode=0o700)
            (path / "submitted").mkdir(exist_ok=True, mode=0o700)
            lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise JournalError(
                f"cannot use the state directory {path}: {e.strerror or e}; give --state-dir a "
                "directory this user may create and write"
            ) from e
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(lock_fd)
            raise JournalLocked(
                f"the state directory {path} is in use by another server (pid {holder}); "
                "stop it, or give this one another --state-dir"
            ) from None
        try:
            _check_private(path)
        except JournalError:
            os.close(lock_fd)
            raise
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        notes: list[str] = []
        db = _connect(path / "journal.sqlite3", notes)
        journal = cls(path, db, lock_fd)
        journal.notes = notes
        # Blob files no task names: written by a server killed before it
        # recorded them, or named by a journal that was set aside.
        journal._remove_strays()
        return journal

    def close(self) -> None:
        self._db.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    # Jobs.

    def start(self, fingerprint: str, name: str) -> Replay:
        """
        The job with this C{fingerprint} (what the caller derives from the
        job and its configuration, so that the same command finds its
        job): the unfinished one the journal holds, with what of it is done
        (L{replay}), or a new one.
        """
        row = self._db.execute(
            "SELECT id FROM jobs WHERE fingerprint = ? AND state = 'running' "
            "ORDER BY id DESC LIMIT 1",
            (fingerprint,),
        ).fetchone()
        if row is not None:
            replay = self.replay(row[0])
            replay.resumed = True
            return replay
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO jobs (fingerprint, name, created) VALUES (?, ?, ?)",
                (fingerprint, name, time.time()),
            )
        assert cursor.lastrowid is not None
        return Replay(cursor.lastrowid)

    def end(self, job: int, ok: bool, error: str | None = None) -> None:
        """
        The job is over: it is not resumed again, and its blobs go.

        @raise JournalError: the database cannot be written.
        """
        try:
            self._end(job, ok, error)
        except (OSError, sqlite3.Error) as e:
            raise JournalError(
                f"cannot end job {job} in the journal of {self.directory}: {e}"
            ) from e

    def _end(self, job: int, ok: bool, error: str | None) -> None:
        with self._db:
            self._db.execute(
                "UPDATE jobs SET state = ?, error = ?, ended = ? WHERE id = ?",
                ("done" if ok else "failed", error, time.time(), job),
            )
            paths = [
                self.blob_dir / p
                for (p,) in self._db.execute(
                    "SELECT DISTINCT path FROM blobs WHERE job = ?", (job,)
                )
            ]
            self._db.execute("DELETE FROM blobs WHERE job = ?", (job,))
            self._db.execute("DELETE FROM tasks WHERE job = ?", (job,))
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def jobs(self) -> list[tuple[int, str, str]]:
        """Every job the journal knows: id, name, state."""
        return list(self._db.execute("SELECT id, name, state FROM jobs ORDER BY id"))

    # Tasks.

    def record(
        self,
        job: int,
        kind: str,
        step: int,
        ident: bytes,
        outputs: Mapping[int, list[bytes]],
        counters: Iterable[tuple[str, int]] = (),
    ) -> list[Blob]:
        """
        A task finished and its output counts: write each blob (fsynced,
        file and directory) and then, in one transaction, record the task
        and its blobs.  A crash before the commit leaves stray files (the
        next L{replay} removes them); after it, the task is done for good.

        @return: the blobs as written, by partition in the order of
            C{outputs}, each partition's in order.

        @param outputs: the task's blobs, by partition, in order.
        @param counters: the task's counters, added to the job's again
            when it is restored.
        @raise JournalError: the disk is full or not writable (the message
            names the directory).
        """
        rows, written = [], []
        try:
            path = self._write_blobs([data for blobs in outputs.values() for data in blobs])
            offset = 0
            for partition, blobs in outputs.items():
                for seq, data in enumerate(blobs):
                    blob = Blob(partition, path, len(data), _digest(data), offset)
                    offset += len(data)
                    written.append(blob)
                    rows.append(
                        (job, kind, step, ident, partition, seq, path.name, offset - len(data),
                         blob.size, blob.digest)
                    )  # fmt: skip
            _fsync_dir(self.blob_dir)
            with self._db:
                self._db.execute(
                    "INSERT OR IGNORE INTO tasks (job, kind, step, ident, counters) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (job, kind, step, ident, json.dumps(list(counters))),
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
        except (OSError, sqlite3.Error) as e:
            raise JournalError(
                f"cannot record a finished task in {self.directory}: "
                f"{getattr(e, 'strerror', None) or e}; free space there or use another "
                "--state-dir"
            ) from e
        return written

    # A cluster's queue.

    def submit(self, name: str, submitted: float, request: bytes, script: bytes) -> int:
        """
        Keep a job sent to a cluster, queued: C{script} in a file of its
        own, fsynced (file and directory), then its row.

        @return: its number, the cluster's job ID.
        @raise JournalError: the state directory cannot take it.
        """
        try:
            path = self._write_blobs([script], self.submitted_dir)
            _fsync_dir(self.submitted_dir)
            with self._db:
                cursor = self._db.execute(
                    "INSERT INTO submitted (name, submitted, request, script, size, digest) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (name, submitted, request, path.name, len(script), _digest(script)),
                )
        except (OSError, sqlite3.Error) as e:
            raise JournalError(
                f"cannot keep the job in {self.directory}: "
                f"{getattr(e, 'strerror', None) or e}; free space there or use another "
                "--state-dir"
            ) from e
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def set_state(
        self, number: int, state: str, error: str | None = None, outcome: str | None = None
    ) -> None:
        """
        A submitted job started or ended; one that ended lets its script go.

        @raise JournalError: the database cannot be written.
        """
        ended = state not in ("queued", "running")
        try:
            with self._db:
                self._db.execute(
                    "UPDATE submitted SET state = ?, error = ?, outcome = ? WHERE id = ?",
                    (state, error, outcome, number),
                )
                row = self._db.execute(
                    "SELECT script FROM submitted WHERE id = ?", (number,)
                ).fetchone()
            if ended and row is not None:
                (self.submitted_dir / row[0]).unlink(missing_ok=True)
        except (OSError, sqlite3.Error) as e:
            raise JournalError(f"cannot record job {number} in {self.directory}: {e}") from e

    def submissions(self) -> list[Submitted]:
        """Every job the cluster was sent, oldest first."""
        return [
            Submitted(
                number,
                name,
                state,
                when,
                request,
                Blob(0, self.submitted_dir / script, size, digest),
                error,
                outcome,
            )
            for number, name, state, when, request, script, size, digest, error, outcome in (
                self._db.execute(
                    "SELECT id, name, state, submitted, request, script, size, digest, error, "
                    "outcome FROM submitted ORDER BY id"
                )
            )
        ]

    @staticmethod
    def script(submitted: Submitted) -> bytes:
        """
        A queued job's script, as it was sent.

        @raise JournalError: its file is gone, short or altered.
        """
        why = _check(submitted.script)
        if why is not None:
            raise JournalError(
                f"job {submitted.id}'s script is lost from the state directory: {why}"
            )
        return submitted.script.read()

    def _write_blobs(self, blobs: list[bytes], directory: Path | None = None) -> Path:
        """A new file holding C{blobs}, one after another, fsynced."""
        path = (directory or self.blob_dir) / f"{os.urandom(12).hex()}.blob"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for data in blobs:
                view, written = memoryview(data), 0
                while written < len(data):
                    written += os.write(fd, view[written:])
            os.fsync(fd)
        except BaseException:
            path.unlink(missing_ok=True)  # (a full disk: what was written is not kept)
            raise
        finally:
            os.close(fd)
        return path

    def replay(self, job: int) -> Replay:
        """
        The tasks of C{job} the journal holds whose every blob is on disk
        whole (its size and digest as recorded); a task with a bad blob is
        forgotten (it runs again) and said in L{Replay.dropped}.
        """
        replay = Replay(job)
        by_task: dict[tuple[str, int, bytes], list[Blob]] = {}
        counts: dict[tuple[str, int, bytes], tuple[tuple[str, int], ...]] = {}
        for kind, step, ident, counted in self._db.execute(
            "SELECT kind, step, ident, counters FROM tasks WHERE job = ? ORDER BY rowid", (job,)
        ):
            by_task[(kind, step, ident)] = []
            counts[(kind, step, ident)] = tuple((str(n), int(v)) for n, v in json.loads(counted))
        for kind, step, ident, partition, path, offset, size, digest in self._db.execute(
            "SELECT kind, step, ident, partition, path, offset, size, digest FROM blobs "
            "WHERE job = ? ORDER BY partition, seq",
            (job,),
        ):
            by_task.setdefault((kind, step, ident), []).append(
                Blob(partition, self.blob_dir / path, size, digest, offset)
            )
        bad: list[tuple[str, int, bytes]] = []
        for (kind, step, ident), blobs in by_task.items():
            why = next((w for b in blobs if (w := _check(b)) is not None), None)
            if why is None:
                counted = counts.get((kind, step, ident), ())
                replay.tasks.append(FinishedTask(kind, step, ident, tuple(blobs), counted))
            else:
                bad.append((kind, step, ident))
                replay.dropped.append(f"a {kind} task of step {step + 1} runs again: {why}")
        if bad:
            with self._db:
                for key in bad:
                    self._db.execute(
                        "DELETE FROM tasks WHERE job = ? AND kind = ? AND step = ? AND ident = ?",
                        (job, *key),
                    )
                    self._db.execute(
                        "DELETE FROM blobs WHERE job = ? AND kind = ? AND step = ? AND ident = ?",
                        (job, *key),
                    )
            self._remove_strays()
        return replay

    def _remove_strays(self) -> None:
        named = {p for (p,) in self._db.execute("SELECT path FROM blobs")}
        queued = {
            p
            for (p,) in self._db.execute(
                "SELECT script FROM submitted WHERE state IN ('queued', 'running')"
            )
        }
        for directory, keep in ((self.blob_dir, named), (self.submitted_dir, queued)):
            for path in directory.iterdir():
                if path.name not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()


def _check_private(path: Path) -> None:
    """
    Refuse a state directory another user could write to: the server
    trusts what it holds (it unpickles the keys and results there), so a
    directory others may write is a way to run code as the server.

    @raise JournalError: the directory, or its database, is not this
        user's alone to write.
    """
    for p in (path, path / "blobs", path / "submitted", path / "journal.sqlite3"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise JournalError(
                f"the state directory {path} is not safe: {p} is "
                + ("owned by another user" if st.st_uid != os.getuid() else
                   "writable by other users")
                + "; the server runs what it finds there, so give --state-dir a directory "
                f"only you can write (chmod go-w {p})"
            )  # fmt: skip


def _check(blob: Blob) -> str | None:
    """Why C{blob} is not whole on disk, or C{None} when it is."""
    try:
        data = blob.read()
    except OSError as e:
        return f"{blob.path.name}: {e.strerror or e}"
    if len(data) != blob.size:
        return f"{blob.path.name}: {len(data)} bytes at offset {blob.offset}, {blob.size} recorded"
    if _digest(data) != blob.digest:
        return f"{blob.path.name}: its bytes are not those recorded"
    return None


def _connect(path: Path, notes: list[str]) -> sqlite3.Connection:
    """
    The journal's database, created if need be, in WAL mode.  One that is
    not a database of ours (corrupt, truncated, another schema) is set
    aside, said in C{notes}, and a new one started: its jobs run again.
    """
    for _ in range(2):
        db = sqlite3.connect(path)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, not {SCHEMA_VERSION}")
            (check,) = db.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return db
        except sqlite3.DatabaseError as e:
            db.close()
            aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            notes.append(
                f"the journal {path} could not be read ({e}); it was moved to {aside.name} "
                "and a new one started: the jobs it held start again"
            )
    raise JournalError(f"cannot start a journal in {path.parent}")


def finished(replay: Replay, kind: str, step: int) -> Iterator[FinishedTask]:
    """The replayed tasks of one kind and step."""
    return (t for t in replay.tasks if t.kind == kind and t.step == step)

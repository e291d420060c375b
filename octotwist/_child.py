"""
The process that runs user code: one task at a time, in a plain blocking loop.

Started by L{octotwist.worker} as C{python -m octotwist._child}.  It reads
requests from file descriptor 3 and writes replies to file descriptor 4, so
nothing the user's code prints can get into the protocol.  Both ends are
this package on the same machine; the frames are pickled tuples with a
4-byte length prefix.

Requests::

    ("job", functions)                       first, and between tasks: the cloudpickled
                                             JobFunctions of the next job (L{_Job})
    ("map", step, partitions, [blob...])     blob: pack((keys, values)), a batch of items
    ("reduce", step, partitions, [blob...])  the partition's runs, in map task order

A map task of a later step gets the output blobs of one task of the step
before, in the same C{(keys, values)} form.  C{partitions} is 0 for a
map-only step: its pairs go out as they are, C{pack((keys, values))}.

Replies, per task request (a C{"job"} request has none)::

    ("output", partition, blob)*   blob: pack(run) or pack((keys, values))
    ("done", records_in, records_out, seconds, counters, printed)
  | ("failed", key_repr, error_line, traceback_text, printed)

C{counters} is the attempt's L{octotwist.counters} table; C{printed} what
the user's code wrote to C{sys.stdout} and C{sys.stderr} during the task
(C{print()}, C{logging}), the last L{MAX_PRINTED} characters of it
(L{_Printed}).  Writes to the file descriptors themselves (a C extension's,
a subprocess's) still go to the worker's terminal.
"""

from __future__ import annotations

import contextlib
import gc
import io
import linecache
import os
import pickle
import signal
import struct
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from octotwist import allocator, codec, counters, shipping, sources
from octotwist.shuffle import MapOutput, _pair, _pairs_iterator, is_flat, reduce_partition

#: What a task attempt's printed output keeps: its last this many characters.
MAX_PRINTED = 64 * 1024
#: Pairs of a map-only step's task per output blob.
MAP_ONLY_BLOB = 64 * 1024

_HEADER = struct.Struct("!I")
_NO_KEY = object()
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def read_frame(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(size))


def write_frame(stream: BinaryIO, obj: Any) -> None:
    stream.write(encode_frame(obj))


def encode_frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=5)
    return _HEADER.pack(len(data)) + data


def user_traceback(e: BaseException) -> str:
    """The traceback of C{e} without octotwist's own frames."""
    frames = [
        f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_PACKAGE_DIR)
    ]
    # An error of octotwist's own making (a mapfn that returned None, say)
    # has no frame of the user's: then the message alone, under no empty
    # "Traceback" header.
    lines = (
        ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
    )
    lines += traceback.format_exception_only(e)
    return "".join(lines)


class _Printed:
    """
    What the user's code prints in a task process, kept in memory for the
    task's reply, never blocking: the sink of the process's C{sys.stdout}
    and C{sys.stderr} (L{_Stream}).  One for the process's life, emptied by
    each task (L{take}), so that a C{logging} handler made in one task
    still writes into the next one's.  Keeps the last L{MAX_PRINTED}
    characters and says how many it cut.
    """

    def __init__(self, limit: int = MAX_PRINTED) -> None:
        self.limit = limit
        self._parts: list[str] = []
        self._kept = 0
        self._cut = 0

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._kept += len(text)
        if self._kept > 2 * self.limit:
            self._trim()

    def _trim(self) -> None:
        text = "".join(self._parts)
        excess = len(text) - self.limit
        if excess > 0:
            self._cut += excess
            text = text[excess:]
        self._parts, self._kept = [text], len(text)

    def take(self) -> str:
        """What was printed since the last call, the cut, if any, said first."""
        self._trim()
        text = self._parts[0] if self._parts else ""
        if self._cut:
            text = f"[{self._cut} characters cut; the last {len(text)} follow]\n{text}"
        self._parts, self._kept, self._cut = [], 0, 0
        return text


class _Stream(io.TextIOBase):
    """
    C{sys.stdout} or C{sys.stderr} of a task process, writing into a
    L{_Printed}: text, and bytes through C{buffer} (decoded as UTF-8).  Its
    C{fileno()} is the real descriptor, for code that hands it to a
    subprocess or to C{faulthandler}: what is written there goes to the
    worker's terminal, as any write to a descriptor does.
    """

    def __init__(self, sink: _Printed, fd: int) -> None:
        super().__init__()
        self._sink = sink
        self._fd = fd
        self.buffer = _Bytes(sink, fd)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "replace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    def reconfigure(self, **_: Any) -> None:
        """Accepted and ignored (line buffering, encoding): nothing is buffered here."""

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._sink.write(text)
        return len(text)


class _Bytes(io.RawIOBase):
    """A L{_Stream}'s C{buffer}: bytes written to it are printed text."""

    def __init__(self, sink: _Printed, fd: int) -> None:
        super().__init__()
        self._sink = sink
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._sink.write(view.tobytes().decode("utf-8", "replace"))
        return view.nbytes


class _Runner:
    def __init__(self, functions: Any, out: BinaryIO, printed: _Printed | None = None) -> None:
        self.f = functions
        self.out = out
        self.printed = printed
        self.key: Any = None
        self.have_key = False
        self.set_up = functions.setupfn is None
        self.in_setup = False
        self.records_in = 0  # of the map task running
        self.step = functions.steps[0]

    def emit(self, *reply: Any) -> None:
        write_frame(self.out, reply)

    def _printed(self) -> str:
        return self.printed.take() if self.printed is not None else ""

    def handle(self, kind: str, step: int, partitions: int, inputs: list[bytes]) -> None:
        """Run one task and report how it went."""
        started = time.monotonic()
        self.key, self.have_key = None, False
        counters.take()
        try:
            self.step = self.f.steps[step]
            if not self.set_up:
                self.setup()
                counters.take()  # (setupfn's counts are no task's: not kept)
            records_in, records_out = self.run(kind, partitions, inputs)
        except (Exception, SystemExit) as e:  # (sys.exit() in a mapfn ends its task)
            key = repr(self.key) if self.have_key else None
            if key is not None and len(key) > 200:
                key = key[:200] + "..."
            error = "".join(traceback.format_exception_only(e)).strip()
            if "lost sys.stdin" in error:  # breakpoint(), pdb, input(): no terminal here
                error += (
                    " (a worker process has no terminal: to use breakpoint() or pdb, run "
                    "the job in one process with octo run --inline, or octotwist.run(job, "
                    "workers=0))"
                )
            if self.in_setup:
                error, self.in_setup = f"setupfn() raised {error}", False
            counters.take()  # a failed attempt counts nothing
            self.emit("failed", key, error, user_traceback(e), self._printed())
        else:
            seconds = time.monotonic() - started
            self.emit("done", records_in, records_out, seconds, counters.take(), self._printed())

    def setup(self) -> None:
        """
        Run the job's C{setupfn()}, once per process, before its first
        task.  If it raises, the task fails with that error, and the next
        task tries it again.
        """
        self.in_setup = True
        self.f.setupfn()
        self.in_setup = False
        self.set_up = True

    def run(self, kind: str, partitions: int, inputs: list[bytes]) -> tuple[int, int]:
        if kind == "map":
            return self.map(partitions, inputs)
        self.have_key = False
        current = [_NO_KEY]
        records = [0]
        try:
            keys, values = reduce_partition(
                self.step.reducefn, _unpacked(inputs, records), current, self.step.combinefn
            )
        finally:
            if current[0] is not _NO_KEY:
                self.key, self.have_key = current[0], True
        self.have_key = False
        pack = codec.pack_flat if is_flat(keys, values) else codec.pack
        self.emit("output", 0, pack((keys, values)))
        return records[0], len(keys)

    def map(self, partitions: int, inputs: list[bytes]) -> tuple[int, int]:
        """
        Map a batch of items (L{octotwist.scheduler.Batching}) into one
        output: one pass of the shuffle buffer over the pairs of every item,
        so that an item costs its C{mapfn} call and little more, and
        C{combinefn} combines across the batch.  A failure names the key of
        the item it happened at (L{_locate} finds it when the buffer, not
        the item's own C{mapfn}, raised).
        """
        keys: list[Any] = []
        values: list[Any] = []
        for blob in inputs:
            k, v = codec.unpack(blob)
            keys += k
            values += v
        # A file the server sent by name (octotwist.sources) is read here:
        # its records, not the item, are what mapfn gets.
        records = sources.records(keys, values)
        if not partitions:
            return self.map_only(records)
        step = self.step
        buffer = MapOutput(partitions, step.partitionfn, step.combinefn)
        self.records_in = 0
        if len(keys) == 1 and not isinstance(values[0], sources.Reference):
            self.key, self.have_key, self.records_in = keys[0], True, 1
            pairs: Iterable[Any] = step.mapfn(keys[0], values[0])
        else:
            pairs = self._pairs(records)
        spills = 0
        try:
            for spill in buffer.add_all(pairs):
                spills += 1
                self.send_runs(spill)
            self.send_runs(buffer.drain())
        except sources.SourceReadError:
            raise  # (it names its file: nothing to locate, and nothing to read twice)
        except Exception:
            if not self.have_key:
                self._locate(partitions, keys, values)
            raise
        counters.add("octotwist.records_read", self.records_in)
        counters.add("octotwist.pairs_emitted", buffer.records)
        if spills:
            counters.add("octotwist.spilled_runs", spills)
        return self.records_in, buffer.records

    def map_only(self, items: Iterable[tuple[Any, Any]]) -> tuple[int, int]:
        """
        A map-only step's task: its pairs go out as they are, in order,
        C{pack((keys, values))} blobs of L{MAP_ONLY_BLOB} pairs at most,
        the next step's (or the job's results') input as it is.
        """
        out_keys: list[Any] = []
        out_values: list[Any] = []
        pairs = records = 0
        self.have_key = True
        for key, value in items:
            self.key = key
            records += 1
            for item in _pairs_iterator(self.step.mapfn(key, value)):
                k, v = _pair(item)
                out_keys.append(k)
                out_values.append(v)
                if len(out_keys) >= MAP_ONLY_BLOB:
                    pairs += len(out_keys)
                    self.emit("output", 0, codec.pack((out_keys, out_values)))
                    out_keys, out_values = [], []
        self.have_key = False
        if out_keys or not pairs:
            pairs += len(out_keys)
            self.emit("output", 0, codec.pack((out_keys, out_values)))
        counters.add("octotwist.records_read", records)
        counters.add("octotwist.pairs_emitted", pairs)
        return records, pairs

    def _pairs(self, items: Iterable[tuple[Any, Any]]) -> Iterator[Any]:
        """Every record's pairs, in order; what a record's mapfn raises names its key."""
        mapfn = self.step.mapfn
        for key, value in items:
            self.key = key
            self.records_in += 1
            try:
                yield from _pairs_iterator(mapfn(key, value))
            except Exception:
                self.have_key = True
                raise

    def _locate(self, partitions: int, keys: list[Any], values: list[Any]) -> None:
        """
        After the shuffle buffer raised for a batch (a pair that is not one,
        a key that cannot be hashed, partitionfn or combinefn raising): find
        the item it raised for by mapping the items again, one at a time,
        into a buffer of their own (the attempt has failed: nothing is
        sent).  Sets L{key} if one item fails alone.
        """
        f = self.step
        for key, value in sources.records(keys, values):
            buffer = MapOutput(partitions, f.partitionfn, f.combinefn)
            try:
                for _ in buffer.add_all(f.mapfn(key, value)):
                    pass
                buffer.drain()
            except Exception:
                self.key, self.have_key = key, True
                return

    def send_runs(self, runs: dict[int, Any]) -> None:
        for partition, run in runs.items():
            pack = codec.pack_flat if is_flat(run[0], run[1]) else codec.pack
            self.emit("output", partition, pack(run))


def _unpacked(blobs: list[bytes], records: list[int]) -> Iterator[Any]:
    """
    The runs of a reduce task, unpacked one at a time as the merge reaches
    them, each blob let go once unpacked: a task holds its compressed input
    and the merged groups, never every run at once (a partition of a 1.5 GB
    word count unpacks to several hundred MB).  C{records[0]} counts the
    records read.
    """
    blobs.reverse()
    while blobs:
        run = codec.unpack(blobs.pop())
        records[0] += len(run[0])
        yield run


def _die_with_parent() -> None:
    """
    Be killed when the worker that started us dies (Linux), rather than
    run the task we hold to its end for no one: a worker killed mid-job
    (kill -9, its host's SSH session gone) leaves no task process behind.
    Elsewhere we end when our input closes, after the current task.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the worker died before we asked
        os._exit(1)


def main() -> int:
    # A Ctrl-C in the terminal reaches the whole process group; the parent
    # decides when we stop (it closes our input), so a task is never cut short
    # with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        _die_with_parent()
    allocator.tune()
    with os.fdopen(3, "rb") as inp, os.fdopen(4, "wb") as out:
        job: _Job | None = None
        printed = _Printed()
        while (request := read_frame(inp)) is not None:
            if request[0] == "job":
                if job is not None:
                    job.unload()
                job = _Job.load(request[1], out, printed)
                continue
            assert job is not None, "a task before the job's functions"
            job.handle(*request)
            out.flush()
    return 0


class _Job:
    """
    One job's functions in this process, and what loading them did to it:
    the finder of its helper modules (L{shipping.install}).  A worker of a
    cluster (C{octo serve}) keeps its task processes across jobs, each
    loaded after the one before is unloaded (L{unload}), so that nothing of
    a job leaks into the next: not its helper modules (two jobs' C{helper.py}
    are two modules), not its C{setupfn}'s effect on its own globals (the
    next job's C{setupfn} runs again, once, before its first task), not its
    counters.  What the job did to the process itself (an installed
    package it imported, a C{logging} handler, an environment variable) stays,
    as it does between the tasks of one job.

    @ivar runner: runs the tasks, or C{None} when the functions did not
        load here (then each task fails saying why, L{_cannot_load}).
    """

    def __init__(
        self,
        out: BinaryIO,
        runner: _Runner | None,
        finder: shipping.ShippedFinder | None = None,
        cannot_load: tuple[str, str] = ("", ""),
    ) -> None:
        self.out = out
        self.runner = runner
        self.finder = finder
        self.cannot_load = cannot_load

    @classmethod
    def load(cls, blob: bytes, out: BinaryIO, printed: _Printed) -> _Job:
        try:
            functions = codec.load_functions(blob)
        except Exception as e:
            return cls(out, None, cannot_load=_cannot_load(e))
        # Helper modules the functions import when they run, from the
        # sources the server shipped: this process may run anywhere.
        finder = shipping.install(getattr(functions, "modules", None) or {})
        # What the user's code prints is the task's, for the server to show
        # (sys.__stderr__ stays the terminal: _run puts it back at the end).
        sys.stdout, sys.stderr = _Stream(printed, 1), _Stream(printed, 2)
        runner = _Runner(functions, out, printed)
        counters.take()  # (a job's counts start at nothing)
        # A map task allocates a tuple per pair; with the default thresholds
        # the cyclic collector runs every 700 of them and rescans everything
        # young, which cost a word count 30-40% of its time.  Objects alive
        # now (the interpreter, the job) are frozen out of collection;
        # garbage cycles are still collected, just less often.
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        return cls(out, runner, finder)

    def handle(self, kind: str, step: int, partitions: int, inputs: list[bytes]) -> None:
        if self.runner is not None:
            self.runner.handle(kind, step, partitions, inputs)
        else:
            hint, tb = self.cannot_load
            write_frame(self.out, ("failed", None, hint, tb, ""))

    def unload(self) -> None:
        """
        Undo what L{load} did, before the next job loads: its helper
        modules go (L{shipping.uninstall}), its functions and whatever they
        made become garbage, and are collected.  L{load} froze them
        (C{gc.freeze()}), and the collector never looks at frozen objects:
        without C{gc.unfreeze()} a job's cycles (a function and its globals
        are one) would stay for the process's life, one more job's worth
        each time.
        """
        if self.finder is not None:
            shipping.uninstall(self.finder)
        self.runner = self.finder = None
        counters.take()
        linecache.clearcache()  # a traceback of the next job reads its own sources
        gc.unfreeze()
        gc.collect()


def _cannot_load(e: Exception) -> tuple[str, str]:
    """
    Why the job's functions do not load here (a module they need by name is
    not importable on this machine), and the traceback: each of the job's
    tasks fails with them, rather than the process die and be taken for a
    crash.  The process still reads the next job's functions, which may load.
    """
    error = "".join(traceback.format_exception_only(e)).strip()
    hint = (
        f"the job's functions cannot be loaded on this worker: {error} (a module the job "
        "uses is not importable here: install it on the worker, or keep it beside the "
        "job script, whose folder's modules travel with the job)"
    )
    return hint, user_traceback(e)


def _run() -> int:
    """
    L{main}, ending quietly when the parent is gone: a worker that stops
    (Ctrl-C, its job cancelled) closes our pipes, possibly while we write a
    reply nobody will read.  That is not an error to report.
    """
    try:
        return main()
    except BrokenPipeError:
        # Keep the interpreter's final flush from complaining as it exits.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 4)
        return 0
    finally:
        # Whatever ends us (a bug of ours, the interpreter's shutdown) says
        # so on the terminal, not into a task's printed output nobody reads.
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


if __name__ == "__main__":
    sys.exit(_run())

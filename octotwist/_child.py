"""
The process that runs user code: one task at a time, in a plain blocking loop.

Started by L{octotwist.worker} as C{python -m octotwist._child}.  It reads
requests from file descriptor 3 and writes replies to file descriptor 4, so a
C{print()} in a user's C{mapfn} goes to the terminal, not into the protocol.
Both ends are this package on the same machine; the frames are pickled tuples
with a 4-byte length prefix.

Requests::

    ("job", functions)                 once, first: the cloudpickled JobFunctions
    ("map", partitions, [blob])        blob: pack((keys, values)), a batch of items
    ("reduce", partitions, [blob...])  the partition's runs, in map task order

Replies, per request::

    ("output", partition, blob)*                blob: pack(run) or pack((keys, values))
    ("done", records_in, records_out, seconds)
  | ("failed", key_repr, error_line, traceback_text)
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import struct
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from octotwist import allocator, codec, shipping
from octotwist.shuffle import MapOutput, _pairs_iterator, reduce_partition

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


class _Runner:
    def __init__(self, functions: Any, out: BinaryIO) -> None:
        self.f = functions
        self.out = out
        self.key: Any = None
        self.have_key = False

    def emit(self, *reply: Any) -> None:
        write_frame(self.out, reply)

    def handle(self, kind: str, partitions: int, inputs: list[bytes]) -> None:
        """Run one task and report how it went."""
        started = time.monotonic()
        self.key, self.have_key = None, False
        try:
            records_in, records_out = self.run(kind, partitions, inputs)
        except Exception as e:
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
            self.emit("failed", key, error, user_traceback(e))
        else:
            self.emit("done", records_in, records_out, time.monotonic() - started)

    def run(self, kind: str, partitions: int, inputs: list[bytes]) -> tuple[int, int]:
        if kind == "map":
            return self.map(partitions, inputs)
        self.have_key = False
        current = [_NO_KEY]
        records = [0]
        try:
            keys, values = reduce_partition(self.f.reducefn, _unpacked(inputs, records), current)
        finally:
            if current[0] is not _NO_KEY:
                self.key, self.have_key = current[0], True
        self.have_key = False
        self.emit("output", 0, codec.pack((keys, values)))
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
        buffer = MapOutput(partitions, self.f.partitionfn, self.f.combinefn)
        if len(keys) == 1:
            self.key, self.have_key = keys[0], True
            pairs: Iterable[Any] = self.f.mapfn(keys[0], values[0])
        else:
            pairs = self._pairs(keys, values)
        try:
            for spill in buffer.add_all(pairs):
                self.send_runs(spill)
            self.send_runs(buffer.drain())
        except Exception:
            if not self.have_key:
                self._locate(partitions, keys, values)
            raise
        return len(keys), buffer.records

    def _pairs(self, keys: list[Any], values: list[Any]) -> Iterator[Any]:
        """Every item's pairs, in order; what an item's mapfn raises names its key."""
        mapfn = self.f.mapfn
        for key, value in zip(keys, values, strict=True):
            self.key = key
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
        f = self.f
        for key, value in zip(keys, values, strict=True):
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
            self.emit("output", partition, codec.pack(run))


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


def main() -> int:
    # A Ctrl-C in the terminal reaches the whole process group; the parent
    # decides when we stop (it closes our input), so a task is never cut short
    # with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    allocator.tune()
    with os.fdopen(3, "rb") as inp, os.fdopen(4, "wb") as out:
        first = read_frame(inp)
        if first is None:
            return 0
        _, functions_blob = first
        try:
            functions = codec.load_functions(functions_blob)
        except Exception as e:
            return _cannot_load(e, inp, out)
        # Helper modules the functions import when they run, from the
        # sources the server shipped: this process may run anywhere.
        shipping.install(getattr(functions, "modules", None) or {})
        runner = _Runner(functions, out)
        # A map task allocates a tuple per pair; with the default thresholds
        # the cyclic collector runs every 700 of them and rescans everything
        # young, which cost a word count 30-40% of its time.  Objects alive
        # now (the interpreter, the job) are frozen out of collection;
        # garbage cycles are still collected, just less often.
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        while (request := read_frame(inp)) is not None:
            runner.handle(*request)
            out.flush()
    return 0


def _cannot_load(e: Exception, inp: BinaryIO, out: BinaryIO) -> int:
    """
    The job's functions do not load here (a module they need by name is
    not importable on this machine): fail every task with why, rather than
    die and be taken for a crash.
    """
    error = "".join(traceback.format_exception_only(e)).strip()
    hint = (
        f"the job's functions cannot be loaded on this worker: {error} (a module the job "
        "uses is not importable here: install it on the worker, or keep it beside the "
        "job script, whose folder's modules travel with the job)"
    )
    while read_frame(inp) is not None:
        write_frame(out, ("failed", None, hint, user_traceback(e)))
        out.flush()
    return 0


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


if __name__ == "__main__":
    sys.exit(_run())

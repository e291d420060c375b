"""
Where a job's C{key<TAB>value} results go when it has no C{final()}.

C{--output FILE} is written to a temporary file beside C{FILE} and renamed
over it only when the job succeeds: a job that fails leaves the previous
results untouched instead of half a file, and the server may write a
partition's results as soon as its reduce task is done rather than all of
them after the last one.  Standard output, and a path that is not a regular
file (C{/dev/null}, a named pipe), cannot be taken back, so the server
writes to them only once the job has succeeded.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from typing import IO, Any


class Results:
    """
    A destination for results.

    @ivar early: whether results may be written before the job has
        succeeded, because L{abort} takes them back.
    """

    early = False

    def __init__(self, stream: IO[str], owned: bool = False) -> None:
        self.stream = stream
        self._owned = owned  # closed by commit/abort

    def write(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """One reduce task's results, in its key order, as lines."""
        self.stream.writelines(map("{}\t{}\n".format, keys, values))

    def commit(self) -> None:
        """The job succeeded: make the results final."""
        self.stream.close() if self._owned else self.stream.flush()

    def abort(self) -> None:
        """
        The job failed (or never started): take back what can be taken
        back.  Safe to call after L{commit}, and more than once.
        """
        with contextlib.suppress(OSError, ValueError):
            self.stream.close() if self._owned else self.stream.flush()


class _Replacing(Results):
    """A temporary file in C{path}'s directory, renamed to C{path} on commit."""

    early = True

    def __init__(self, path: str) -> None:
        directory, name = os.path.split(os.path.abspath(path))
        fd, self._temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
        # mkstemp makes the file 0600; results get what open() would give them.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        super().__init__(os.fdopen(fd, "w", encoding="utf-8"))
        self.path = path

    def commit(self) -> None:
        self.stream.close()
        os.replace(self._temporary, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temporary)


def stdout() -> Results:
    """Results on standard output, written once the job has succeeded."""
    return Results(sys.stdout)


def open_results(path: str) -> Results:
    """
    Results for C{--output path}.

    @raise OSError: the file (or its temporary sibling) cannot be created.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        return Results(open(path, "w", encoding="utf-8"), owned=True)
    return _Replacing(path)

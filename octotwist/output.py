"""
Where a job's C{key<TAB>value} results go when it has no C{final()}.

C{--output FILE} is written to a temporary file beside C{FILE} and renamed
over it only when the job succeeds: a job that fails leaves the previous
results untouched instead of half a file, and the server may write a
partition's results as soon as its reduce task is done rather than all of
them after the last one.  A symbolic link is followed (its target is
replaced, the link kept) and the replaced file keeps its permission bits.
Standard output, a path that is not a regular file (C{/dev/null}, a named
pipe), and a file in a directory we may not create files in cannot be
taken back, so the server writes to them only once the job has succeeded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
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
    """
    A temporary file in C{path}'s directory, renamed to C{path} on commit.

    @param path: the real path (symbolic links resolved, so that the link
        is kept and its target replaced).
    @param mode: the permission bits of the file being replaced, kept; a
        new file gets what C{open()} would give it (0666 less the umask).
    """

    early = True

    def __init__(self, path: str, mode: int | None) -> None:
        directory, name = os.path.split(path)
        for _ in range(100):
            temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")
            try:
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free temporary name beside {path}")
        if mode is not None:
            os.fchmod(fd, mode)
        super().__init__(os.fdopen(fd, "w", encoding="utf-8"))
        self._temporary = temporary
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
    Results for C{--output path}: replaced when the job succeeds, or, where
    a temporary file cannot be made beside it (a file one may write in a
    directory one may not) or the path is not a regular file, written in
    place at the end.

    @raise OSError: the file cannot be written.
    """
    real = os.path.realpath(path)
    try:
        mode: int | None = os.stat(real).st_mode
    except FileNotFoundError:
        mode = None
    if mode is None or stat.S_ISREG(mode):
        try:
            return _Replacing(real, None if mode is None else stat.S_IMODE(mode))
        except PermissionError:
            if mode is None:
                raise
    return Results(open(real, "w", encoding="utf-8"), owned=True)

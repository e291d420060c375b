"""
Where a job's results go when it has no C{final()}, and how they are written.

Two formats (L{encoder}): C{tsv}, C{key<TAB>value} lines, and C{jsonl}, one
C{[key, value]} JSON array a line.  In TSV a string is written as itself,
unless it would read as another value (C{"7"} beside C{7}, C{"None"}, text
that starts with a quote or a bracket): then as its C{repr}; anything else
is written as its C{repr} too.  Tabs, newlines and backslashes are escaped,
so a line is always one result.  A reader gets a field back with
C{ast.literal_eval} when it parses (C{inf}, C{-inf} and C{nan} being
floats), else as the string it is: exactly, for strings, numbers, bytes,
C{None}, booleans and tuples, lists, dicts and sets of them.  An object
whose C{repr} is no literal (a dataclass) reads back as that text.

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
import json
import os
import re
import secrets
import stat
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

#: Turns one reduce task's keys and values into lines.
Encoder = Callable[[Sequence[Any], Sequence[Any]], list[str]]

#: Strings written as themselves in TSV: they cannot be read as another value.
#: (Not one that starts like a literal: a digit, a sign, a dot, a quote, a
#: bracket, or a string prefix and a quote, as in C{b'x'}.)
_BARE = re.compile(r"(?![bBrRuUfF]{1,2}['\"])[^\d\s+\-.'\"(\[{\\][^\t\n\r\\]*\Z")
#: Words that read as a value: a string that is one is quoted (C{inf} and
#: C{nan} are how floats are written).
_LITERAL_WORDS = frozenset({"None", "True", "False", "Ellipsis", "inf", "nan"})
#: What a C{repr} may still hold that would break a line (a class's own C{__repr__}).
_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(x: Any) -> str:
    """One TSV field (see the module's docstring)."""
    if type(x) is str and x not in _LITERAL_WORDS and _BARE.match(x):
        return x
    return repr(x).translate(_ESCAPES)


def _tsv(keys: Sequence[Any], values: Sequence[Any]) -> list[str]:
    field = tsv_field
    return [f"{field(k)}\t{field(v)}\n" for k, v in zip(keys, values, strict=True)]


def _jsonl(keys: Sequence[Any], values: Sequence[Any]) -> list[str]:
    dumps = json.JSONEncoder(ensure_ascii=False, default=repr).encode
    return [dumps([k, v]) + "\n" for k, v in zip(keys, values, strict=True)]


def encoder(format: str) -> Encoder:
    """The line writer for C{--format} C{tsv} or C{jsonl}."""
    return {"tsv": _tsv, "jsonl": _jsonl}[format]


class Results:
    """
    A destination for results.

    @ivar early: whether results may be written before the job has
        succeeded, because L{abort} takes them back.
    """

    early = False

    def __init__(self, stream: IO[str], owned: bool = False, format: str = "tsv") -> None:
        self.stream = stream
        self._owned = owned  # closed by commit/abort
        self._encode = encoder(format)

    def write(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """Results, in order, as lines."""
        self.stream.writelines(self._encode(keys, values))

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

    def __init__(self, path: str, mode: int | None, format: str = "tsv") -> None:
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
        super().__init__(os.fdopen(fd, "w", encoding="utf-8"), format=format)
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


def stdout(format: str = "tsv") -> Results:
    """Results on standard output, written once the job has succeeded."""
    return Results(sys.stdout, format=format)


class Collected(Results):
    """
    Results kept in a dict, in the order they come (L{octotwist.run}'s
    answer): the job's keys are unique, so nothing is lost.
    """

    early = False

    def __init__(self) -> None:
        self.results: dict[Any, Any] = {}

    def write(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        self.results.update(zip(keys, values, strict=True))

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def open_results(path: str, format: str = "tsv") -> Results:
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
            return _Replacing(real, None if mode is None else stat.S_IMODE(mode), format)
        except PermissionError:
            if mode is None:
                raise
    return Results(open(real, "w", encoding="utf-8"), owned=True, format=format)

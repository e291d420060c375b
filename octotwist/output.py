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
The temporary file, C{.FILE.XXXXXXXX.partial}, is locked (C{flock}) by its
writer: one that a writer killed with C{kill -9} left is removed by the
next job to write C{FILE}.

C{--output DIR/} (a path ending in a slash, or an existing directory) gets
one file per reduce partition, as Hadoop writes them: C{part-00000.tsv},
C{part-00001.tsv}... (C{.jsonl} with that format), an empty one for a
partition with no results, and an empty C{_SUCCESS} last.  They are written
in a hidden sibling, C{.DIR.XXXX.partial/}, swapped in on success
(L{_ReplacingDirectory}); only a directory that holds nothing but
C{part-*} files and C{_SUCCESS} is ever replaced, so C{-o ~} is refused
rather than a home directory removed.

C{--output URL} (C{s3://bucket/x.tsv}, C{memory://out/dir/}: any U{fsspec
<https://filesystem-spec.readthedocs.io>} URL; fsspec is the optional
C{octotwist[fsspec]} extra) is written under a hidden temporary name beside
the target and moved to it on success (L{_ObjectFile},
L{_ObjectDirectory}).  A C{file://} URL is a local path, with the local
guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from twisted.logger import Logger

from octotwist.errors import UsageError

_log = Logger()

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
    return [
        f"{k}\t{v}\n"
        for k, v in zip(_column(keys, tsv_field), _column(values, tsv_field), strict=True)
    ]


def _jsonl(keys: Sequence[Any], values: Sequence[Any]) -> list[str]:
    # [k, v] is "[" + k's JSON + ", " + v's JSON + "]": JSON encodes an
    # array's items each on its own, so a column at a time gives the same
    # text as an array a line.
    encode = json.JSONEncoder(ensure_ascii=False, default=repr).encode
    return [
        f"[{k}, {v}]\n"
        for k, v in zip(
            _column(keys, encode, _JSON_STR), _column(values, encode, _JSON_STR), strict=True
        )
    ]


#: How JSONEncoder(ensure_ascii=False) writes a str (the json module's own function).
_JSON_STR: Callable[[str], str] = json.encoder.encode_basestring


def _column(items: Sequence[Any], field: Callable[[Any], str], str_field: Any = None) -> list[str]:
    """
    Each item as C{field} writes it; a column of one common type (the keys
    of a word count, its counts) through that type's own writer, mapped in
    C: C{int.__repr__}, which is what both formats write for an C{int}
    (not a C{bool}), and C{str_field}, when given, for C{str}.  Half the
    cost of the results' writing, which is the server's alone, after the
    last reduce task.
    """
    types = set(map(type, items))
    if types == {int}:
        return list(map(int.__repr__, items))
    if types == {str} and str_field is not None:
        return list(map(str_field, items))
    return list(map(field, items))


def encoder(format: str) -> Encoder:
    """The line writer for C{--format} C{tsv} or C{jsonl}."""
    return {"tsv": _tsv, "jsonl": _jsonl}[format]


class Results:
    """
    A destination for results.

    The server calls L{begin} once, then L{write} (or, when L{partitioned},
    L{write_partition}) any number of times, then L{commit} or L{abort}.

    @ivar early: whether results may be written before the job has
        succeeded, because L{abort} takes them back.
    @ivar partitioned: whether the destination keeps each reduce
        partition's results apart (a directory of part files), so that the
        server should call L{write_partition} rather than L{write}.
    """

    early = False
    partitioned = False

    def __init__(self, stream: IO[str], owned: bool = False, format: str = "tsv") -> None:
        self.stream = stream
        self._owned = owned  # closed by commit/abort
        self._encode = encoder(format)

    def begin(self, partitions: int) -> None:
        """
        Called once, before the first write: the job has C{partitions}
        reduce partitions (numbered from 0).  Only a partitioned output
        needs it, to make a file for a partition with no results.
        """

    def write(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """Results, in order, as lines."""
        self.stream.writelines(self._encode(keys, values))

    def write_partition(self, partition: int, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """
        Results of reduce partition C{partition}, in order.  Partitions
        come in increasing order, a partition's calls one after another;
        here, where partitions are not kept apart, this is L{write}.
        """
        self.write(keys, values)

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
        # Ours while this process writes it: a sibling no process holds was
        # left by a writer that died (kill -9, a power cut), and goes.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _remove_stale(directory, name)
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


def _remove_stale(directory: str, name: str) -> None:
    """
    Remove the C{.NAME.XXXXXXXX.partial} files beside C{NAME} whose writer
    is gone: each writer holds an exclusive C{flock} on its own until it
    commits or aborts, and the lock dies with its process.
    """
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}\.partial")
    with contextlib.suppress(OSError), os.scandir(directory or ".") as entries:
        stale = [e.path for e in entries if pattern.fullmatch(e.name) and e.is_file()]
    for path in stale:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer's
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
                _log.info("removed {path}, left by a writer that died", path=path)
        finally:
            os.close(fd)


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


#: The entries of a directory output, which alone let it be replaced.
_OUTPUT_ENTRY = re.compile(r"part-.+|_SUCCESS")
#: The marker written last into a directory output: "all the part files are here".
SUCCESS = "_SUCCESS"


def _foreign(entries: Iterable[tuple[str, bool]]) -> list[str]:
    """
    The names, from C{(name, is a directory)} pairs, that no octotwist
    output holds: anything but C{part-*} files and C{_SUCCESS}.  (A
    directory named C{part-x} is foreign too: replacing the output would
    remove what is in it.)
    """
    return sorted(name for name, is_dir in entries if is_dir or not _OUTPUT_ENTRY.fullmatch(name))


def _refusal(shown: str, foreign: list[str]) -> str:
    listing = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return (
        f"refusing to replace {shown}: it holds files that are not part of an "
        f"octotwist output ({listing}), and --output DIR replaces only a directory "
        f"that holds nothing but part-* files and {SUCCESS}; name a new or an empty "
        f"directory"
    )


class _Kept(OSError):
    """A commit that failed and kept the new results in their temporary place."""


class _Parts(Results):
    """
    One file per reduce partition (C{part-00000.tsv}...), made in a
    temporary place as the results come, and installed with C{_SUCCESS} on
    commit.  Subclasses say where the files are made (L{_create},
    L{_close}), how they are installed (L{_install}) and thrown away
    (L{_discard}).

    L{write} (results of no known partition: the server's single stream in
    key order) writes C{part-00000}: the part files, read in name order,
    are always the results in the order a single file would hold them.

    @param shown: the output as the user named it, for messages.
    """

    early = True
    partitioned = True

    def __init__(self, shown: str, format: str) -> None:
        self.shown = shown
        self._encode = encoder(format)
        self._suffix = "." + format
        self._partitions: int | None = None  # from begin()
        self._current = -1  # the partition whose file is open, or the last one
        self._file: IO[str] | None = None
        self._over = False  # committed or aborted

    def _name(self, partition: int) -> str:
        return f"part-{partition:05d}{self._suffix}"

    def begin(self, partitions: int) -> None:
        """Make C{partitions} part files, empty ones included (at least one)."""
        if partitions < 1 or partitions <= self._current:
            raise ValueError(f"{partitions} partitions, with partition {self._current} written")
        self._partitions = partitions

    def write_partition(self, partition: int, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """
        Append to C{partition}'s file.

        @raise ValueError: C{partition} comes before one already written, or
            is not below the count given to L{begin}: a bug in the caller,
            caught rather than a part file overwritten.
        """
        if partition != self._current:
            self._advance(partition)
        assert self._file is not None
        self._file.writelines(self._encode(keys, values))

    def write(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """Append to C{part-00000} (see the class's docstring)."""
        self.write_partition(0, keys, values)

    def _advance(self, partition: int) -> None:
        if partition < self._current:
            raise ValueError(
                f"results of partition {partition} after partition {self._current}: "
                f"a partitioned output takes partitions in increasing order"
            )
        if partition < 0 or (self._partitions is not None and partition >= self._partitions):
            raise ValueError(f"no partition {partition} of {self._partitions}")
        self._close_current()
        for empty in range(self._current + 1, partition):
            self._create(self._name(empty)).close()
        self._current = partition
        self._file = self._create(self._name(partition))

    def _close_current(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            self._close(file)

    def _finish(self) -> list[str]:
        """Close the last file and make the empty ones after it: all the names."""
        self._close_current()
        count = max(self._partitions or 1, self._current + 1)
        for empty in range(self._current + 1, count):
            self._create(self._name(empty)).close()
        return [self._name(partition) for partition in range(count)]

    def commit(self) -> None:
        """
        Install the part files and C{_SUCCESS}.  A failure before anything
        is installed throws the temporary files away; L{_install} says what
        a later one leaves.

        @raise OSError: they cannot be written or installed.
        """
        if self._over:
            return
        self._over = True
        try:
            names = self._finish()
        except BaseException:
            self._discard()
            raise
        self._install(names)

    def abort(self) -> None:
        if self._over:
            return
        self._over = True
        with contextlib.suppress(Exception):
            self._close_current()
        self._discard()

    # What subclasses provide.

    def _create(self, name: str) -> IO[str]:
        """A new part file, empty, in the temporary place."""
        raise NotImplementedError

    def _close(self, file: IO[str]) -> None:
        """Close a part file that holds results (an empty one is just closed)."""
        file.close()

    def _install(self, names: list[str]) -> None:
        """Put the temporary part files, and C{_SUCCESS}, in place."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Remove the temporary files, quietly: there is nothing to keep."""
        raise NotImplementedError


def _fsync_directory(path: str) -> None:
    """Make the names in C{path} (a rename, a new file) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ReplacingDirectory(_Parts):
    """
    Part files in a new hidden directory beside C{path},
    C{.NAME.XXXX.partial/}, swapped in on commit: C{path}, when it exists,
    is renamed aside to C{.NAME.XXXX.old}, the new directory renamed to
    C{path}, and the old one removed.  What a crash (or a power cut: the
    part files and the new directory are fsynced before the swap) leaves:

      - during the job, or at commit before the first rename: C{path} as
        it was, and the C{.partial} directory (which L{abort} would have
        removed; the next job does not, since it may be another job's);
      - between the two renames: no C{path}, the previous output whole in
        C{.NAME.XXXX.old} and the new one whole, with C{_SUCCESS}, in
        C{.NAME.XXXX.partial} (rename either back);
      - while the old one is removed: the new output at C{path}, and what is
        left of C{.NAME.XXXX.old}.

    So C{path} is always a whole output or none, never a mix.  It is checked
    again at commit, once renamed aside (so that nothing is added between
    the check and the removal): if it has come to hold other files, it is
    put back and the new results left in C{.partial}, named in the error.

    @param path: the real path (symbolic links resolved).
    @param mode: the permission bits of the directory being replaced,
        kept; a new one gets what C{mkdir} gives (0777 less the umask).
    """

    def __init__(self, path: str, shown: str, mode: int | None, format: str) -> None:
        super().__init__(shown, format)
        self.path = path
        self._parent, name = os.path.split(path)
        for _ in range(100):
            token = secrets.token_hex(4)
            temporary = os.path.join(self._parent, f".{name}.{token}.partial")
            try:
                os.mkdir(temporary)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free temporary name beside {path}")
        self._temporary = temporary
        self._aside = os.path.join(self._parent, f".{name}.{token}.old")
        if mode is not None:
            os.chmod(temporary, mode)

    def _create(self, name: str) -> IO[str]:
        return open(os.path.join(self._temporary, name), "x", encoding="utf-8")

    def _close(self, file: IO[str]) -> None:
        with file:
            file.flush()
            os.fsync(file.fileno())

    def _install(self, names: list[str]) -> None:
        try:
            open(os.path.join(self._temporary, SUCCESS), "x").close()
            _fsync_directory(self._temporary)
            replacing = os.path.lexists(self.path)
            if replacing:
                self._check(self.path)  # before anything moves
                os.rename(self.path, self._aside)
                try:
                    self._check(self._aside)  # what is removed below is what was checked
                    os.rename(self._temporary, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.rename(self._aside, self.path)
                    raise
            else:
                # (Onto an empty directory made meanwhile, rename() succeeds;
                # onto anything else, it fails, and nothing is lost.)
                os.rename(self._temporary, self.path)
        except _Kept:
            raise
        except BaseException:
            self._discard()
            raise
        # The output is in place: what follows is tidying, whose failure
        # must not fail a job whose results are there.
        with contextlib.suppress(OSError):
            _fsync_directory(self._parent)
        if replacing:
            shutil.rmtree(self._aside, ignore_errors=True)

    def _check(self, directory: str) -> None:
        with os.scandir(directory) as entries:
            foreign = _foreign((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
        if foreign:
            raise _Kept(
                errno.ENOTEMPTY,
                _refusal(self.shown, foreign) + f"; the results are in {self._temporary}",
            )

    def _discard(self) -> None:
        shutil.rmtree(self._temporary, ignore_errors=True)


def _fsspec() -> Any:
    """
    The C{fsspec} module, imported only for a URL: it is an optional extra.
    (Imported by name, so that C{mypy} sees no untyped import, whether or not
    it is installed.)
    """
    return importlib.import_module("fsspec")


def _text(binary: Any) -> IO[str]:
    return io.TextIOWrapper(binary, encoding="utf-8", newline="\n")


def _temporary_name(path: str, shown: str) -> str:
    """A hidden name beside C{path} (in its bucket or "directory")."""
    parent, slash, name = path.rstrip("/").rpartition("/")
    if not slash or not name:
        raise UsageError(f"cannot write {shown}: name a file or a directory inside it")
    return f"{parent}/.{name}.partial-{secrets.token_hex(4)}"


def _failed(error: Exception, doing: str) -> OSError:
    """
    A filesystem's error that is not an C{OSError} (an S3 client's may not
    be) as one: the kind the server reports as results that cannot be
    written.
    """
    return OSError(f"{doing}: {type(error).__name__}: {error}")


class _ObjectFile(Results):
    """
    A file on an fsspec filesystem, written as C{.NAME.partial-XXXX}
    beside C{path} and moved (C{fs.mv}) to it on commit; removed on abort.

    On S3 and the like, an object appears whole or not at all (a put, and
    the copy that a move is, is atomic per object): readers see the
    previous results, then the new ones, never part of them.  A crash
    before the move leaves the C{.partial} object behind; one during the
    move (a copy, then a delete) leaves the new C{path} and, perhaps, the
    C{.partial} object too.
    """

    early = True

    def __init__(self, fs: Any, path: str, shown: str, format: str) -> None:
        self._fs = fs
        self.path = path
        self.shown = shown
        self._temporary = _temporary_name(path, shown)
        self._binary = fs.open(self._temporary, "wb")
        super().__init__(_text(self._binary), format=format)
        self._over = False

    def commit(self) -> None:
        if self._over:
            return
        self._over = True
        try:
            self.stream.close()
            self._fs.mv(self._temporary, self.path)
        except OSError:
            self._discard()
            raise
        except Exception as e:
            self._discard()
            raise _failed(e, f"cannot write {self.shown}") from e

    def abort(self) -> None:
        if self._over:
            return
        self._over = True
        self._discard()

    def _discard(self) -> None:
        # discard() first: an S3 file's close() would complete its upload.
        for step in (getattr(self._binary, "discard", None), self.stream.close):
            with contextlib.suppress(Exception):
                if step is not None:
                    step()
        with contextlib.suppress(Exception):
            self._fs.rm(self._temporary)


def _object_listing(fs: Any, path: str) -> list[tuple[str, bool]]:
    """C{(name, is a directory)} for what is under C{path}."""
    fs.invalidate_cache(path)
    return [
        (entry["name"].rstrip("/").rpartition("/")[2], entry.get("type") == "directory")
        for entry in fs.ls(path, detail=True)
    ]


class _ObjectDirectory(_Parts):
    """
    Part files on an fsspec filesystem, written under a hidden prefix
    beside C{path}, C{.NAME.partial-XXXX/}, and moved under C{path} on
    commit.  An object store has no rename of a directory, so this is
    Hadoop's protocol rather than an atomic swap: C{_SUCCESS} says that the
    output is whole.  On commit the old C{_SUCCESS} is removed first, then
    the old part files; the new ones are moved in, one by one (each object
    appears whole), and the new C{_SUCCESS} is written last.  A reader that
    waits for C{_SUCCESS} sees the previous output or the new one.

    A job that fails (or is stopped) removes the prefix and leaves C{path}
    as it was.  A crash before the commit leaves C{path} as it was and the
    prefix behind; one during the commit, C{path} without C{_SUCCESS}, and
    the new part files not yet moved still under the prefix.  A commit that
    fails half way keeps the prefix too, and names it in its error.
    """

    def __init__(self, fs: Any, path: str, shown: str, format: str) -> None:
        super().__init__(shown, format)
        self._fs = fs
        self.path = path.rstrip("/")
        self._temporary = _temporary_name(path, shown)
        fs.makedirs(self._temporary, exist_ok=True)  # (a local-like filesystem needs it)

    def _create(self, name: str) -> IO[str]:
        return _text(self._fs.open(f"{self._temporary}/{name}", "wb"))

    def _install(self, names: list[str]) -> None:
        fs, path, marker = self._fs, self.path, f"{self.path}/{SUCCESS}"
        try:
            old = _object_listing(fs, path) if fs.exists(path) else []
        except Exception as e:
            self._discard()
            if isinstance(e, OSError):
                raise
            raise _failed(e, f"cannot write {self.shown}") from e
        foreign = _foreign(old)
        if foreign:
            raise _Kept(
                errno.ENOTEMPTY,
                _refusal(self.shown, foreign) + f"; the results are in {self._temporary}",
            )
        try:
            if (SUCCESS, False) in old:
                fs.rm_file(marker)  # first: the old output stops being one
            for name, _ in old:
                if name != SUCCESS:
                    fs.rm_file(f"{path}/{name}")
            fs.makedirs(path, exist_ok=True)
            for name in names:
                fs.mv(f"{self._temporary}/{name}", f"{path}/{name}")
            fs.pipe_file(marker, b"")
        except Exception as e:
            # The old output is (partly) gone and the new one not all there:
            # keep what is left of the new one, and say where.
            raise _failed(
                e,
                f"cannot write {self.shown}, left without {SUCCESS}; the part files "
                f"not moved to it are in {self._temporary}",
            ) from e
        with contextlib.suppress(Exception):
            fs.rm(self._temporary, recursive=True)

    def _discard(self) -> None:
        with contextlib.suppress(Exception):
            self._fs.rm(self._temporary, recursive=True)


#: A URL: a scheme (or fsspec's chain of them, C{simplecache::s3://}), then C{://}.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*(::[A-Za-z][A-Za-z0-9+.\-]*)*://")


def _open_url(url: str, format: str) -> Results:
    """
    Results for a URL through fsspec (see L{_ObjectFile},
    L{_ObjectDirectory}): a directory when it ends in C{/} or names one.

    @raise UsageError: fsspec, or the filesystem's own package (C{s3fs}),
        is not installed; the protocol is unknown; the URL names a file
        where a directory was asked for, or a directory that is no output.
    """
    try:
        fsspec = _fsspec()
    except ImportError:
        raise UsageError(
            f"cannot write {url}: writing to a URL needs fsspec, which is not installed; "
            f"pip install 'octotwist[fsspec]' (and the package for the URL's filesystem, "
            f"such as s3fs for s3://)"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
        _temporary_name(path, url)  # (a bucket itself has no "beside")
        exists = fs.exists(path)
        is_directory = exists and fs.isdir(path)
        if url.endswith("/") and exists and not is_directory:
            raise UsageError(f"cannot write {url}: it is a file, not a directory")
        if not (url.endswith("/") or is_directory):
            return _ObjectFile(fs, path, url, format)
        foreign = _foreign(_object_listing(fs, path) if is_directory else [])
        if foreign:
            raise UsageError(_refusal(url, foreign))
        return _ObjectDirectory(fs, path, url, format)
    except UsageError:
        raise
    except Exception as e:
        # "Install s3fs to access S3", "Protocol not known: x", no such
        # bucket, no credentials: all before the job starts.
        raise UsageError(f"cannot write {url}: {type(e).__name__}: {e}") from None


def _local_path(url: str) -> str:
    """The path a C{file://} URL names (its trailing slash kept)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"cannot write {url}: a file:// URL names a local path, file:///path")
    return urllib.parse.unquote(parts.path)


def _open_directory(path: str, format: str) -> Results:
    """
    Results for C{--output DIR/} (L{_ReplacingDirectory}).

    @raise UsageError: C{path} is a file, or a directory that holds more
        than a previous output.
    @raise OSError: no directory can be made beside it.
    """
    real = os.path.realpath(path)
    if not os.path.basename(real):
        raise UsageError(f"refusing to replace {path}: it is the root directory")
    try:
        mode: int | None = os.stat(real).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISDIR(mode):
            raise UsageError(
                f"cannot write {path}: it ends in {os.sep}, which asks for a directory of "
                f"part files, but it is a file; drop the {os.sep} to replace the file"
            )
        with os.scandir(real) as entries:
            foreign = _foreign((e.name, e.is_dir(follow_symlinks=False)) for e in entries)
        if foreign:
            raise UsageError(_refusal(path, foreign))
        mode = stat.S_IMODE(mode)
    return _ReplacingDirectory(real, path, mode, format)


def _names_directory(path: str) -> bool:
    """Whether C{--output path} asks for a directory of part files."""
    ends = tuple(sep for sep in (os.sep, os.altsep) if sep)
    return path.endswith(ends) or os.path.isdir(path)


def open_results(path: str, format: str = "tsv") -> Results:
    """
    Results for C{--output path}, chosen and checked before the job starts:

      - a URL (C{s3://}, C{memory://}; L{_open_url}): written through
        fsspec, a file or a directory;
      - a path ending in C{/}, or an existing directory: a directory of
        part files (L{_open_directory});
      - a file: replaced when the job succeeds, or, where a temporary file
        cannot be made beside it (a file one may write in a directory one
        may not) or the path is not a regular file, written in place at
        the end.

    @raise UsageError: the output is refused (see L{_open_url},
        L{_open_directory}).
    @raise OSError: it cannot be written.
    """
    if _URL.match(path):
        if not path.lower().startswith("file://"):
            return _open_url(path, format)
        path = _local_path(path)
    if _names_directory(path):
        return _open_directory(path, format)
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

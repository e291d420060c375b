"""
Sources a job author does not write by hand: L{files} (one item per file)
and L{lines} (one item per byte range of each file, whose records are its
lines), local or behind any fsspec URL, compressed or not.

Ship paths, not bytes.  The server reads a source's values and sends them
to the workers, so a hand-written source that returns a file's text pulls
every byte through the server.  These sources know where their data lives:
when a worker can open the file itself (it runs on the server's machine,
the files are on a mount every machine shares, or they are behind a URL
such as C{s3://}), the server sends a small L{Reference} (a path and a byte
range) and the worker reads the data.  Otherwise the server reads it and
sends the bytes, a compressed file still compressed.

Two hooks for the runners, so that they need to know nothing of files:
L{item} is what the server sends for C{source[key]}, and L{records} is what
a worker iterates instead of C{zip(keys, values)}: it passes ordinary values
through and expands a L{Reference} into the C{(key, value)} records it
stands for.  C{source[key]} itself gives what a user iterating the source
in Python expects: a file's content for L{Files}, and for L{Lines} the
range's L{Reference} (a range is not a value of its own: its records are
lines), which L{records} expands.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import importlib
import io
import lzma
import os
import re
from collections.abc import Iterable, Iterator, KeysView, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Final
from urllib.parse import urlsplit

import zstandard

from octotwist.errors import JobScriptError, OctotwistError

__all__ = [
    "Files",
    "Lines",
    "MissingExtraError",
    "NoFilesError",
    "SourceReadError",
    "files",
    "lines",
]

#: C{lines()}'s default range size: a map task's worth of a large file.
DEFAULT_SPLIT_BYTES: Final = 64 * 1024 * 1024

#: How much is read at a time while looking for the end of a line: a range
#: that starts inside a long line skips it without holding it.
_SCAN = 1024 * 1024

#: Compressions read transparently, by the name's extension.
_COMPRESSIONS: Final = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}

#: A URL: a scheme and C{://}, or an fsspec chain (C{simplecache::s3://...}).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*(://|::)")

_INSTALL = "pip install 'octotwist[fsspec]'"

PathSpec = str | os.PathLike[str]


class NoFilesError(JobScriptError, FileNotFoundError):
    """
    A path, directory or pattern given to L{files} or L{lines} names no
    file.  Raised when the source is built, so when the job loads, before
    any task runs.
    """


class MissingExtraError(OctotwistError, ImportError):
    """A URL was given, and fsspec, which reads URLs, is not installed."""


class SourceReadError(OctotwistError, OSError):
    """
    A file of the source could not be read, decompressed or decoded.  The
    message starts with the file's name (and, for L{lines}, the offset);
    the original exception is its C{__cause__}.
    """


class Unreachable(SourceReadError):
    """
    A local file could not be opened here.  On a worker sent the file's
    path, it means this worker does not see the server's files (a
    container, another user, another machine with the same boot id): the
    server then sends it the bytes instead (L{octotwist.server}), without
    counting the attempt as failed.
    """


#: How a worker's report of L{Unreachable} begins (its error line).
UNREACHABLE = f"{Unreachable.__module__}.{Unreachable.__qualname__}:"


# Where an entry's bytes live, which decides what the server ships.
_LOCAL = 0  # this machine's file system: a worker elsewhere needs a shared mount
_PROCESS = 1  # this process only (memory://): always shipped as bytes
_REMOTE = 2  # reachable from anywhere with fsspec (s3://, http://...): always a reference


@dataclass(frozen=True, slots=True)
class _Entry:
    """
    One file of a source.

    @ivar name: its key: the path or URL as given or as globbed.
    @ivar location: what opens it: an absolute path for a local file (so that
        a worker in another directory finds it), else the URL.
    @ivar where: L{_LOCAL}, L{_PROCESS} or L{_REMOTE}.
    @ivar size: its size in bytes, when known.
    @ivar compression: its compression, by extension, or C{None}.
    """

    name: str
    location: str
    where: int
    size: int | None
    compression: str | None


# The hooks.


class Reference:
    """
    A value that stands for records rather than being one: what the server
    ships instead of a file's bytes.  L{records} expands it on the worker.
    The one class L{records} checks for, so that ordinary values cost one
    C{isinstance} each.
    """

    __slots__ = ()

    def records(self, key: Any) -> Iterator[tuple[Any, Any]]:
        """
        The records this stands for, read lazily.

        @param key: the source key it was shipped for.
        @raise SourceReadError: the data cannot be read (the message names
            the file).
        """
        raise NotImplementedError


def item(source: Any, key: Any, *, local: bool, sees_files: bool = True) -> Any:
    """
    What the server ships for C{source[key]}: C{source[key]} for an
    ordinary source; for L{Files} and L{Lines}, a small L{Reference} when
    the worker can open the file itself, else the data (see L{Files.ship}).

    @param local: whether the worker runs on this machine.
    @param sees_files: C{False} once the worker said it cannot open a file
        of this machine's it was sent by name (L{Unreachable}): it gets the
        bytes of every local file from then on, shared or not.
    """
    if isinstance(source, _FileSource):
        return source.ship(key, local=local, sees_files=sees_files)
    return source[key]


def records(keys: Iterable[Any], values: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """
    What a worker (or the in-process runner) maps: each C{(key, value)}
    pair, with each L{Reference} among the values expanded into its records
    (a file's C{(key, content)}, a range's C{(path:offset, line)}s).  Lazy:
    C{values} is read one at a time, and a range's lines are made as they
    are consumed.

    @raise SourceReadError: a reference's data cannot be read.
    @raise ValueError: C{keys} and C{values} differ in length.
    """
    for key, value in zip(keys, values, strict=True):
        if isinstance(value, Reference):
            yield from value.records(key)
        else:
            yield key, value


def expand(items: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """
    L{records} for C{(key, value)} pairs, for a runner that reads the
    source as it iterates it (C{((k, source[k]) for k in source)}): a
    source's C{__iter__} may be called only once.
    """
    for key, value in items:
        if isinstance(value, Reference):
            yield from value.records(key)
        else:
            yield key, value


# Files.


class _FileSource(Mapping[str, Any]):
    """What L{Files} and L{Lines} share: the files found, and how to reach them."""

    __slots__ = ("_binary", "_items", "_shared", "_spec", "_storage_options")

    def __init__(
        self,
        spec: Any,
        binary: bool,
        shared: bool,
        storage_options: dict[str, Any] | None,
    ) -> None:
        self._spec = spec
        self._binary = binary
        self._shared = shared
        self._storage_options = storage_options
        #: The items, by key: what the subclass knows of each (set by it).
        self._items: dict[str, Any] = {}

    # Membership, len() and iteration read nothing.

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def keys(self) -> KeysView[str]:
        return self._items.keys()

    def _reachable(self, entry: _Entry, local: bool, sees_files: bool) -> bool:
        """Whether a worker can open C{entry} itself (see L{Files.ship})."""
        if entry.where == _LOCAL:
            return sees_files and (local or self._shared)
        return entry.where == _REMOTE

    def ship(self, key: str, *, local: bool, sees_files: bool = True) -> Any:
        """What the server sends a worker for C{key} (L{item})."""
        raise NotImplementedError

    def _describe(self, count: str) -> str:
        options = "binary" if self._binary else "text"
        if self._shared:
            options += ", shared"
        return f"{type(self).__name__}({self._spec!r}: {count}, {options})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Files(_FileSource):
    """
    One item per file (L{files}): keys are the paths, sorted; a value is
    the file's text, or bytes.

    Reading C{files[key]} reads the file now, decompressed.  Membership,
    C{len()} and iteration read nothing.  It pickles as its files' names and
    locations, never their data.
    """

    __slots__ = ()

    def __init__(
        self,
        entries: Iterable[_Entry],
        *,
        spec: Any = None,
        binary: bool = False,
        shared: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spec, binary, shared, storage_options)
        self._items = {e.name: e for e in entries}

    def __getitem__(self, key: str) -> str | bytes:
        """
        The file's content, read now.

        @raise KeyError: C{key} is not one of the files.
        @raise SourceReadError: it cannot be read, decompressed or decoded.
        """
        return self._reference(self._items[key]).read()

    def __repr__(self) -> str:
        return self._describe(_count(len(self._items), "file"))

    def _reference(self, entry: _Entry) -> FileRef:
        return FileRef(
            entry.name, entry.location, entry.compression, self._binary, self._storage_options
        )

    def ship(self, key: str, *, local: bool, sees_files: bool = True) -> Any:
        """
        A L{FileRef} when the worker can open the file: C{local} (it runs on
        this machine), the source is C{shared}, or the file is behind a
        URL other than C{memory://} (which exists in this process only).
        Otherwise the content (as C{files[key]} reads it), or for a
        compressed file its compressed bytes, as a L{FileData}, to be
        decompressed on the worker.
        """
        entry = self._items[key]
        ref = self._reference(entry)
        if self._reachable(entry, local, sees_files):
            return ref
        with _reading(entry.name), _opened(entry.location, self._storage_options) as f:
            raw = f.read()
        return FileData(entry.name, raw, entry.compression, self._binary)


@dataclass(frozen=True, slots=True)
class FileRef(Reference):
    """
    A file a worker opens itself: its one record is C{(key, content)}.

    @ivar location: an absolute path, or a URL (opened with fsspec).
    """

    name: str
    location: str
    compression: str | None
    binary: bool
    storage_options: dict[str, Any] | None = field(default=None, compare=False)

    def read(self) -> str | bytes:
        """The file's content, decompressed (and decoded unless binary)."""
        with _reading(self.name), _opened(self.location, self.storage_options) as f:
            data = _decompressed(f, self.compression).read()
        return data if self.binary else _text(data, self.name)

    def records(self, key: Any) -> Iterator[tuple[Any, Any]]:
        yield key, self.read()


@dataclass(frozen=True, slots=True)
class FileData(Reference):
    """
    A file's bytes, shipped as they are: decompressed and decoded on the
    worker, so that a file that is not text fails its task wherever it was
    read.
    """

    name: str
    data: bytes = field(repr=False)
    compression: str | None
    binary: bool

    def records(self, key: Any) -> Iterator[tuple[Any, Any]]:
        with _reading(self.name):
            data = _decompressed(io.BytesIO(self.data), self.compression).read()
        yield key, data if self.binary else _text(data, self.name)


def files(
    paths: PathSpec | Iterable[PathSpec],
    *,
    binary: bool = False,
    shared: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Files:
    """
    A source with one item per file: the key is the file's path (as given,
    or as the pattern or directory listing found it), the value its text
    (UTF-8, exactly as in the file: no newline translation), or its bytes.

    @param paths: a path, a directory (every regular file under it,
        recursively; hidden files and directories skipped), a glob pattern
        (C{"books/*.txt"}; C{**} matches any depth), a URL or URL pattern
        that fsspec opens (C{s3://bucket/logs/*.gz}, C{file://},
        C{memory://}...), or a list of any of these.  Names ending in
        C{.gz}, C{.bz2}, C{.xz} or C{.zst} are decompressed.
    @param binary: values are bytes rather than text.
    @param shared: every worker sees these local files at the same absolute
        paths (a shared mount), so the server ships paths, not bytes, to
        workers on other machines too.
    @param storage_options: passed to fsspec for URLs (credentials,
        C{anon=True}...); they travel to the workers with the references.
    @raise NoFilesError: a path, directory or pattern names no file.
    @raise MissingExtraError: a URL was given and fsspec is not installed.
    """
    return Files(
        _find(paths, storage_options),
        spec=_spec(paths),
        binary=binary,
        shared=shared,
        storage_options=storage_options,
    )


# Lines.


class Lines(_FileSource):
    """
    One item per byte range of each file (L{lines}), whose records are the
    file's lines.  Keys are C{"path[start:end]"} (C{"path[0:]"} for a
    compressed file, read whole); C{lines[key]} is the range's L{LineRange}
    (nothing is read), which L{records} expands into C{(path:offset, line)}
    pairs.
    """

    __slots__ = ()

    def __init__(
        self,
        entries: Iterable[_Entry],
        split_bytes: int,
        *,
        spec: Any = None,
        binary: bool = False,
        shared: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spec, binary, shared, storage_options)
        for entry in entries:
            if entry.compression is not None or entry.size is None:
                self._items[f"{entry.name}[0:]"] = (entry, 0, None)
                continue
            for start in range(0, entry.size, split_bytes):
                end = min(start + split_bytes, entry.size)
                self._items[f"{entry.name}[{start}:{end}]"] = (entry, start, end)

    def __getitem__(self, key: str) -> LineRange:
        """
        The range's reference: its lines come from L{records}, not from
        here.

        @raise KeyError: C{key} is not one of the ranges.
        """
        entry, start, end = self._items[key]
        return LineRange(
            entry.name,
            entry.location,
            start,
            end,
            entry.compression,
            self._binary,
            self._storage_options,
        )

    def __repr__(self) -> str:
        count = len({entry.name for entry, _, _ in self._items.values()})
        return self._describe(f"{_count(len(self._items), 'range')} of {_count(count, 'file')}")

    def ship(self, key: str, *, local: bool, sees_files: bool = True) -> Any:
        """
        The range's L{LineRange} when the worker can open the file (as
        L{Files.ship} decides); otherwise its lines' bytes, read now, as a
        L{LineData} (a compressed file's compressed bytes, whole).
        """
        ref = self[key]
        entry = self._items[key][0]
        if self._reachable(entry, local, sees_files):
            return ref
        with _reading(entry.name), _opened(entry.location, self._storage_options) as f:
            if ref.compression is not None:
                return LineData(entry.name, 0, f.read(), ref.compression, self._binary)
            first, data = _owned(f, ref.start, ref.end)
        return LineData(entry.name, first, data, None, self._binary)


@dataclass(frozen=True, slots=True)
class LineRange(Reference):
    """
    A byte range C{[start, end)} of a file, which a worker opens itself: it
    stands for the lines that start in it, each as
    C{("path:offset", line)} (L{lines}).  C{end} is C{None} for a
    compressed file, read whole from C{start} 0.
    """

    name: str
    location: str
    start: int
    end: int | None
    compression: str | None
    binary: bool
    storage_options: dict[str, Any] | None = field(default=None, compare=False)

    def records(self, key: Any) -> Iterator[tuple[Any, Any]]:
        with _reading(self.name), _opened(self.location, self.storage_options) as f:
            if self.compression is not None:
                yield from _stream(self.name, _decompressed(f, self.compression), self.binary)
                return
            first, data = _owned(f, self.start, self.end)
        yield from _split(self.name, first, data, self.binary)


@dataclass(frozen=True, slots=True)
class LineData(Reference):
    """
    A range's lines read by the server: C{data} is the bytes of the lines
    that start in the range, the first at C{start} in the file; for a
    compressed file, the file's compressed bytes.
    """

    name: str
    start: int
    data: bytes = field(repr=False)
    compression: str | None
    binary: bool

    def records(self, key: Any) -> Iterator[tuple[Any, Any]]:
        if self.compression is None:
            yield from _split(self.name, self.start, self.data, self.binary)
            return
        with _reading(self.name):
            stream = _decompressed(io.BytesIO(self.data), self.compression)
            yield from _stream(self.name, stream, self.binary)


def lines(
    paths: PathSpec | Iterable[PathSpec],
    *,
    split_bytes: int = DEFAULT_SPLIT_BYTES,
    binary: bool = False,
    shared: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Lines:
    """
    A source whose records are the lines of files, cut into items of
    about C{split_bytes} each, so that one large file makes many map tasks
    and is never loaded whole.  C{mapfn} gets C{("path:offset", line)} for
    every line: C{offset} is where the line starts in the (decompressed)
    file, and C{line} is its text (or bytes) without its C{"\\n"}.  Only
    C{"\\n"} ends a line: a C{"\\r"} before it is kept (CRLF files give lines
    ending in C{"\\r"}), and a last line without C{"\\n"} is a line.

    A range C{[start, end)} owns the lines that start in it, however far
    they run past C{end}, so every line is mapped exactly once.  A
    compressed file cannot be read from the middle: it is one range.

    @param paths: as for L{files}.
    @param split_bytes: the size of a range, in bytes of the file.
    @param binary, shared, storage_options: as for L{files}.
    @raise NoFilesError: a path, directory or pattern names no file.
    @raise MissingExtraError: a URL was given and fsspec is not installed.
    @raise ValueError: C{split_bytes} is not a positive int.
    """
    if not isinstance(split_bytes, int) or isinstance(split_bytes, bool) or split_bytes < 1:
        raise ValueError(f"lines(): split_bytes must be a positive int, not {split_bytes!r}")
    return Lines(
        _find(paths, storage_options),
        split_bytes,
        spec=_spec(paths),
        binary=binary,
        shared=shared,
        storage_options=storage_options,
    )


# Reading.


def _owned(f: IO[bytes], start: int, end: int | None) -> tuple[int, bytes]:
    """
    The bytes of the lines that start in C{[start, end)} (C{end} C{None}:
    to the end of the file), and where the first of them starts.

    A line starts at 0 and after each C{"\\n"}, so the first line at or
    after C{start} begins after the first C{"\\n"} at or after C{start - 1};
    the last one runs on past C{end} to its C{"\\n"} or the end of the file.
    """
    pos = 0
    if start > 0:
        pos = start - 1
        f.seek(pos)
        while True:  # skip, a chunk at a time, what belongs to the line before
            chunk = f.read(_SCAN)
            if not chunk:
                return pos, b""
            newline = chunk.find(b"\n")
            if newline >= 0:
                pos += newline + 1
                break
            pos += len(chunk)
        if end is not None and pos >= end:
            return pos, b""
        f.seek(pos)
    if end is None:
        return pos, f.read()
    data = f.read(end - pos)
    if len(data) < end - pos or data.endswith(b"\n"):
        return pos, data
    parts = [data]
    while True:  # the last line's rest
        chunk = f.read(_SCAN)
        if not chunk:
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            parts.append(chunk[: newline + 1])
            break
        parts.append(chunk)
    return pos, b"".join(parts)


def _split(name: str, offset: int, data: bytes, binary: bool) -> Iterator[tuple[str, Any]]:
    """The lines of C{data}, which starts at C{offset} in C{name}, one at a time."""
    find = data.find
    size = len(data)
    pos = 0
    while pos < size:
        stop = find(b"\n", pos)
        if stop < 0:
            stop = size
        key = f"{name}:{offset + pos}"
        line = data[pos:stop]
        yield key, line if binary else _text(line, key)
        pos = stop + 1


def _stream(name: str, stream: Iterable[bytes], binary: bool) -> Iterator[tuple[str, Any]]:
    """The lines of a stream read from its start (a compressed file), one at a time."""
    at = 0
    for raw in stream:
        key = f"{name}:{at}"
        line = raw[:-1] if raw.endswith(b"\n") else raw
        yield key, line if binary else _text(line, key)
        at += len(raw)


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise _not_text(name, e) from e


def _not_text(where: str, e: UnicodeDecodeError) -> SourceReadError:
    return SourceReadError(
        f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); binary=True reads bytes"
    )


@contextlib.contextmanager
def _reading(name: str) -> Iterator[None]:
    """Turn any failure to read C{name} into a L{SourceReadError} that names it."""
    try:
        yield
    except (SourceReadError, MissingExtraError, MemoryError):
        raise
    except Exception as e:
        # An OSError's strerror ("No such file or directory") without the
        # path it would repeat; anything else (a corrupt stream) as it says.
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise SourceReadError(f"{name}: {detail}") from e


@contextlib.contextmanager
def _opened(location: str, storage_options: dict[str, Any] | None) -> Iterator[IO[bytes]]:
    """C{location} opened for reading bytes: a local path, or a URL through fsspec."""
    if not _URL.match(location):
        try:
            f = open(location, "rb")  # noqa: SIM115  (closed below)
        except OSError as e:
            raise Unreachable(f"{location}: cannot open it here ({e.strerror or e})") from e
        with f:
            yield f
        return
    with _fsspec(location).open(location, "rb", **(storage_options or {})) as f:
        yield f


def _decompressed(f: IO[bytes], compression: str | None) -> IO[bytes] | io.BufferedIOBase:
    """C{f} read through its decompressor (C{f} itself when not compressed)."""
    if compression is None:
        return f
    if compression == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(f)
    if compression == "xz":
        return lzma.LZMAFile(f)
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)
    return io.BufferedReader(reader)


# Finding the files.


def _spec(paths: Any) -> Any:
    """How C{repr()} shows what was asked for."""
    if isinstance(paths, (str, os.PathLike)):
        return os.fspath(paths)
    return [os.fspath(p) for p in paths]


def _find(
    paths: PathSpec | Iterable[PathSpec], storage_options: dict[str, Any] | None
) -> list[_Entry]:
    """
    Every file named, sorted by name, each once.

    @raise NoFilesError: one of C{paths} names no file, or there are none.
    """
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not specs:
        raise NoFilesError(
            "no paths given: files() and lines() need a path, a directory or a pattern"
        )
    found: dict[str, _Entry] = {}
    for given in specs:
        spec = os.fspath(given)
        if not isinstance(spec, str):
            raise TypeError(f"a path must be a str or os.PathLike, not {type(given).__name__}")
        entries = _find_url(spec, storage_options) if _URL.match(spec) else _find_local(spec)
        for entry in entries:
            found.setdefault(entry.name, entry)
    return [found[name] for name in sorted(found)]


def _compression(name: str) -> str | None:
    # An http(s) URL's query (a signature, say) is not part of its name.
    path = urlsplit(name).path if name.lower().startswith(("http://", "https://")) else name
    return _COMPRESSIONS.get(os.path.splitext(path)[1].lower())


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _local_entry(name: str) -> _Entry:
    return _Entry(name, os.path.abspath(name), _LOCAL, os.path.getsize(name), _compression(name))


def _find_local(spec: str) -> list[_Entry]:
    if os.path.isdir(spec):
        names = []
        for top, dirs, found in os.walk(spec):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            names += [os.path.join(top, f) for f in found if not f.startswith(".")]
        names = [n for n in names if os.path.isfile(n)]
        if not names:
            raise NoFilesError(f"directory {spec!r} holds no file (hidden files are skipped)")
    elif os.path.exists(spec):
        names = [spec]
    elif _has_magic(spec):
        names = [n for n in glob.glob(spec, recursive=True) if os.path.isfile(n)]
        if not names:
            raise NoFilesError(f"pattern {spec!r} matches no file")
    else:
        raise NoFilesError(f"no such file or directory: {spec!r}")
    return [_local_entry(n) for n in names]


def _fsspec(url: str) -> Any:
    """fsspec, imported; or a L{MissingExtraError} that says how to get it."""
    try:
        return importlib.import_module("fsspec")
    except ImportError:
        raise MissingExtraError(
            f"{url!r} is a URL, and reading URLs needs fsspec, which is not installed: {_INSTALL}"
            " (and fsspec's package for the URL's file system: s3fs for s3://, gcsfs for gs://...)"
        ) from None


def _find_url(spec: str, storage_options: dict[str, Any] | None) -> list[_Entry]:
    fsspec = _fsspec(spec)
    fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
    local_fs = importlib.import_module("fsspec.implementations.local").LocalFileSystem
    memory_fs = importlib.import_module("fsspec.implementations.memory").MemoryFileSystem
    local = isinstance(fs, local_fs)
    if local:
        where = _LOCAL
    elif isinstance(fs, memory_fs) or "memory" in _schemes(spec):
        where = _PROCESS
    else:
        where = _REMOTE

    def entry(name: str, stripped: str, size: int | None) -> _Entry:
        # A local file is opened as a path, so that a worker needs no fsspec.
        return _Entry(name, stripped if local else name, where, size, _compression(name))

    if _has_magic(path):
        infos = fs.glob(path, detail=True)
        what = f"pattern {spec!r} matches no file"
        prefix = path[: min(path.find(c) for c in "*?[" if c in path)].rpartition("/")[0]
        hidden_asked = "/." in path or path.startswith(".")
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise NoFilesError(f"no such file or directory: {spec!r}") from None
        if info.get("type") != "directory":
            size = info.get("size")
            return [entry(spec, path, size)]
        infos = fs.find(path, detail=True)
        what = f"directory {spec!r} holds no file (hidden files are skipped)"
        prefix, hidden_asked = path.rstrip("/"), False
    found = []
    for p, info in sorted(infos.items()):
        if info.get("type") != "file":
            continue
        below = p[len(prefix) :] if p.startswith(prefix) else p
        if not hidden_asked and any(part.startswith(".") for part in below.split("/")):
            continue
        found.append(entry(fs.unstrip_protocol(p), p, info.get("size")))
    if not found:
        raise NoFilesError(what)
    return found


def _schemes(url: str) -> list[str]:
    """The protocols of a URL, an fsspec chain's included."""
    return re.findall(r"([A-Za-z][A-Za-z0-9+.-]*)(?:://|::)", url)

"""
octotwist.sources: files() and lines(), and the runners' hooks item() and
records(), each checked against a computation of its own (the files' bytes
as written, C{readlines()} over them).
"""

from __future__ import annotations

import bz2
import gzip
import inspect
import io
import lzma
import pickle
import random
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

import octotwist
from octotwist.errors import JobScriptError, OctotwistError
from octotwist.sources import (
    FileData,
    FileRef,
    Files,
    LineData,
    LineRange,
    MissingExtraError,
    NoFilesError,
    Reference,
    SourceReadError,
    Unreachable,
    expand,
    files,
    item,
    lines,
    records,
)

BOOKS = Path(__file__).resolve().parent.parent / "examples" / "books"

try:
    import fsspec
except ImportError:  # the test extra has it; the tests of its absence do not need it
    fsspec = None

needs_fsspec = pytest.mark.skipif(fsspec is None, reason="fsspec is not installed")

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": zstandard.ZstdCompressor().compress,
}

WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "θήτα", "iota", "kappa"]


def text(rng: random.Random, lines: int) -> str:
    return "".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 12))) + "\n"
        for _ in range(lines)
    )


def expected_lines(data: bytes, name: str) -> list[tuple[str, str]]:
    """
    The records lines() must give for a file holding C{data}: a binary
    file's readlines() (which, unlike C{bytes.splitlines()}, ends lines at
    C{"\\n"} only), offsets added up.
    """
    out, offset = [], 0
    for raw in io.BytesIO(data).readlines():
        out.append((f"{name}:{offset}", raw.removesuffix(b"\n").decode()))
        offset += len(raw)
    return out


def shipped(source: Any, *, local: bool) -> list[tuple[Any, Any]]:
    """Every record of C{source} as a worker sees it: item() here, pickled, records() there."""
    keys = list(source)
    values = [pickle.loads(pickle.dumps(item(source, k, local=local))) for k in keys]
    return list(records(keys, values))


def in_process(source: Any) -> list[tuple[Any, Any]]:
    """Every record of C{source} as the in-process runner reads it."""
    keys = list(source)
    return list(records(keys, (source[k] for k in keys)))


@pytest.fixture
def memory() -> Iterator[str]:
    """A fresh memory:// directory, removed afterwards."""
    root = f"memory://t-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def put(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


def starts(path: Any, rest: str) -> str:
    """A C{match=} pattern: a message that starts with C{path} and then C{rest} (a regex)."""
    return "^" + re.escape(str(path)) + rest


# files()


@pytest.mark.parametrize("ext", sorted(COMPRESSORS))
def test_compressed_corpus(tmp_path: Path, ext: str) -> None:
    """Each compression is read transparently, by extension, however it is shipped."""
    rng = random.Random(ext)
    corpus = {f"{tmp_path}/book{i}.txt{ext}": text(rng, 200) for i in range(5)}
    for path, content in corpus.items():
        Path(path).write_bytes(COMPRESSORS[ext](content.encode()))
    source = files(f"{tmp_path}/*.txt{ext}")
    assert list(source) == sorted(corpus)
    assert {k: source[k] for k in source} == corpus
    for local in (True, False):
        assert dict(shipped(source, local=local)) == corpus
    assert dict(in_process(source)) == corpus


def test_zstd_several_frames(tmp_path: Path) -> None:
    """A .zst of several frames (pzstd, or files concatenated) is read to its end."""
    c = zstandard.ZstdCompressor()
    (tmp_path / "a.zst").write_bytes(c.compress(b"one\n") + c.compress(b"two\n"))
    assert files(tmp_path / "a.zst")[str(tmp_path / "a.zst")] == "one\ntwo\n"
    assert [line for _, line in shipped(lines(tmp_path / "a.zst"), local=False)] == ["one", "two"]


def test_text_exactly_as_written(tmp_path: Path) -> None:
    """UTF-8, with no newline translation; binary=True gives the bytes."""
    data = "crlf\r\nlone\rlf\nθ".encode()
    (tmp_path / "f").write_bytes(data)
    assert files(tmp_path / "f")[str(tmp_path / "f")] == data.decode()
    raw = files(tmp_path / "f", binary=True)
    assert raw[str(tmp_path / "f")] == data
    assert shipped(raw, local=False) == shipped(raw, local=True) == [(str(tmp_path / "f"), data)]


def tree(root: Path) -> None:
    for name in [
        "b.txt",
        "a.txt",
        "sub/c.txt",
        "sub/deeper/d.log",
        ".hidden",
        ".git/config",
        "sub/.also-hidden",
    ]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"content of {name}\n")


def test_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every regular file under it, recursively, sorted; hidden ones skipped."""
    tree(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    expected = ["data/a.txt", "data/b.txt", "data/sub/c.txt", "data/sub/deeper/d.log"]
    assert list(files("data")) == expected
    assert list(files("data/")) == expected
    source = files("data")
    assert source["data/sub/c.txt"] == "content of sub/c.txt\n"


def test_globs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert list(files("data/*.txt")) == ["data/a.txt", "data/b.txt"]
    assert list(files("data/*")) == ["data/a.txt", "data/b.txt"]  # directories left out
    assert list(files("data/**/*.txt")) == ["data/a.txt", "data/b.txt", "data/sub/c.txt"]
    assert list(files("data/**")) == [
        "data/a.txt",
        "data/b.txt",
        "data/sub/c.txt",
        "data/sub/deeper/d.log",
    ]
    # A list of anything, each file once, all sorted; Path objects too.
    mixed = files(["data/sub", Path("data/b.txt"), "data/*.txt", "data/.hidden"])
    assert list(mixed) == [
        "data/.hidden",  # named outright
        "data/a.txt",
        "data/b.txt",
        "data/sub/c.txt",
        "data/sub/deeper/d.log",
    ]


def test_relative_paths_ship_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is the path as given; a reference holds the absolute path, for any worker's cwd."""
    (tmp_path / "x.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    ref = item(files("x.txt"), "x.txt", local=True)
    assert isinstance(ref, FileRef) and ref.location == str(tmp_path / "x.txt")
    monkeypatch.chdir("/")
    assert list(records(["x.txt"], [ref])) == [("x.txt", "x")]


def test_dict_like(tmp_path: Path) -> None:
    tree(tmp_path)
    source = files(str(tmp_path / "*.txt"))
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    assert isinstance(source, Files)
    assert len(source) == 2
    assert list(source) == list(source.keys()) == [a, b]
    assert a in source and "nope" not in source
    assert dict(source.items()) == {a: "content of a.txt\n", b: "content of b.txt\n"}
    assert source.get("nope") is None
    with pytest.raises(KeyError):
        source["nope"]
    assert repr(source) == f"Files({str(tmp_path / '*.txt')!r}: 2 files, text)"
    one = files(a, binary=True, shared=True)
    assert repr(one) == f"Files({a!r}: 1 file, binary, shared)"


def test_pickles_small(tmp_path: Path) -> None:
    """A source pickles as its names, a reference as a path: never the data."""
    big = "x" * 1_000_000
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(big)
    source = files(tmp_path)
    assert len(pickle.dumps(source)) < 1000
    assert list(pickle.loads(pickle.dumps(source))) == list(source)
    ref = item(source, str(tmp_path / "0.txt"), local=True)
    assert len(pickle.dumps(ref)) < 300
    ranges = lines(tmp_path, split_bytes=100_000)
    assert len(ranges) == 30
    assert len(pickle.dumps(ranges)) < 5000
    assert len(pickle.dumps(ranges[next(iter(ranges))])) < 300


# item() and records()


def test_item_ordinary_sources() -> None:
    class Lazy:
        def __iter__(self) -> Iterator[str]:
            return iter("ab")

        def __getitem__(self, key: str) -> str:
            return key * 2

    assert item({"k": [1]}, "k", local=False) == [1]
    assert item(Lazy(), "a", local=True) == "aa"


def test_item_files(tmp_path: Path) -> None:
    """Paths when the worker can open the file, else the data."""
    (tmp_path / "a.txt").write_text("plain")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"packed"))
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")
    source = files(tmp_path)
    assert item(source, a, local=True) == FileRef(a, a, None, False)
    assert item(source, b, local=True) == FileRef(b, b, "gzip", False)
    near = item(source, a, local=False)  # bytes, decoded on the worker
    assert near == FileData(a, b"plain", None, False)
    assert list(records([a], [near])) == [(a, "plain")]
    far = item(source, b, local=False)  # compressed bytes travel compressed
    assert isinstance(far, FileData) and far.data == (tmp_path / "b.txt.gz").read_bytes()
    assert "data" not in repr(far)
    shared = files(tmp_path, shared=True)
    assert isinstance(item(shared, a, local=False), FileRef)
    assert isinstance(item(shared, b, local=False), FileRef)


def test_item_lines(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"one\ntwo\nthree\n")
    (tmp_path / "b.gz").write_bytes(gzip.compress(b"x\ny\n"))
    source = lines(tmp_path, split_bytes=5)
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.gz")
    assert list(source) == [f"{a}[0:5]", f"{a}[5:10]", f"{a}[10:14]", f"{b}[0:]"]
    first = source[f"{a}[0:5]"]
    assert first == LineRange(a, a, 0, 5, None, False)
    assert item(source, f"{a}[5:10]", local=True) == LineRange(a, a, 5, 10, None, False)
    assert item(source, f"{b}[0:]", local=True) == LineRange(b, b, 0, None, "gzip", False)
    # The server reads the lines that start in the range, and no others.
    assert item(source, f"{a}[0:5]", local=False) == LineData(a, 0, b"one\ntwo\n", None, False)
    assert item(source, f"{a}[5:10]", local=False) == LineData(a, 8, b"three\n", None, False)
    assert item(source, f"{a}[10:14]", local=False) == LineData(a, 14, b"", None, False)
    compressed = item(source, f"{b}[0:]", local=False)
    assert compressed == LineData(b, 0, (tmp_path / "b.gz").read_bytes(), "gzip", False)
    assert isinstance(item(lines(tmp_path, shared=True), f"{b}[0:]", local=False), LineRange)
    assert repr(source) == f"Lines({str(tmp_path)!r}: 4 ranges of 2 files, text)"


def test_records_passes_values_through() -> None:
    assert list(records(["a", "b"], [1, "x"])) == [("a", 1), ("b", "x")]
    assert list(records([], [])) == []
    with pytest.raises(ValueError):
        list(records(["a"], []))


def test_expand_pairs(tmp_path: Path) -> None:
    """expand() is records() over (key, value) pairs: the source iterated once."""
    (tmp_path / "f").write_bytes(b"1\n2")
    source = lines(tmp_path / "f")
    listed = iter(list(source))  # a source whose __iter__ gives a one-pass iterator
    name = str(tmp_path / "f")
    assert list(expand((k, source[k]) for k in listed)) == [(f"{name}:0", "1"), (f"{name}:2", "2")]
    assert list(expand([("a", 1)])) == [("a", 1)]


def test_records_is_lazy(tmp_path: Path) -> None:
    """Values are taken one at a time; a range's lines are made as they are consumed."""
    (tmp_path / "f").write_bytes(b"1\n2\n3\n")
    taken = []

    def values() -> Iterator[Any]:
        for v in ["a", lines(tmp_path / "f")[f"{tmp_path / 'f'}[0:6]"], "z"]:
            taken.append(v)
            yield v

    it = records(["ka", "kr", "kz"], values())
    assert inspect.isgenerator(it)
    assert next(it) == ("ka", "a") and len(taken) == 1
    assert next(it) == (f"{tmp_path / 'f'}:0", "1") and len(taken) == 2
    assert [*it] == [(f"{tmp_path / 'f'}:2", "2"), (f"{tmp_path / 'f'}:4", "3"), ("kz", "z")]
    assert inspect.isgenerator(LineData("n", 0, b"x\n" * 10, None, False).records("k"))


def test_reference_base() -> None:
    """Every reference type is a Reference: the one class records() checks for."""
    for cls in (FileRef, FileData, LineRange, LineData):
        assert issubclass(cls, Reference)
    with pytest.raises(NotImplementedError):
        list(Reference().records("k"))


# lines()


def check_lines(path: Path, data: bytes, split_bytes: int) -> None:
    """lines() over C{path} gives exactly readlines()'s lines, by every route."""
    path.write_bytes(data)
    expected = expected_lines(data, str(path))
    source = lines(path, split_bytes=split_bytes)
    assert len(source) == -(-len(data) // split_bytes)
    assert shipped(source, local=True) == expected, split_bytes
    assert shipped(source, local=False) == expected, split_bytes
    assert in_process(source) == expected, split_bytes


AWKWARD = (
    b"first\n"
    b"\n"
    b"\n"
    b"crlf\r\n"
    b"a line longer than any of the small ranges tried below, by a long way\n"
    b"\r\n"
    b"x\n" + "θήτα\n".encode() + b"no final newline"
)


@pytest.mark.parametrize("split_bytes", [*range(1, 24), 40, 71, 72, 73, len(AWKWARD) - 1, 10**6])
def test_lines_every_boundary(tmp_path: Path, split_bytes: int) -> None:
    """
    Empty lines, CRLF (the "\\r" kept), a line longer than a range, a last
    line without "\\n", ranges ending on, before and after each newline.
    """
    check_lines(tmp_path / "f.txt", AWKWARD, split_bytes)
    check_lines(tmp_path / "g.txt", AWKWARD + b"\n", split_bytes)


def test_lines_ranges_on_newlines(tmp_path: Path) -> None:
    """Ranges that each end exactly at a newline hold one line each."""
    data = b"".join(b"%03d\n" % i for i in range(100))
    (tmp_path / "f").write_bytes(data)
    source = lines(tmp_path / "f", split_bytes=4)
    assert len(source) == 100
    for i, key in enumerate(source):
        got = list(records([key], [item(source, key, local=True)]))
        assert got == [(f"{tmp_path / 'f'}:{4 * i}", f"{i:03d}")]


def test_lines_random(tmp_path: Path) -> None:
    """Random files of newlines, carriage returns and letters, random range sizes."""
    rng = random.Random(15)
    for case in range(300):
        data = bytes(rng.choice(b"ab\n\n\r") for _ in range(rng.randrange(0, 60)))
        check_lines(tmp_path / f"{case}.txt", data, rng.randrange(1, 20))


def test_lines_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "one").write_bytes(b"\n")
    source = lines(tmp_path)
    assert list(source) == [f"{tmp_path / 'one'}[0:1]"]
    assert shipped(source, local=True) == [(f"{tmp_path / 'one'}:0", "")]


@pytest.mark.parametrize("ext", sorted(COMPRESSORS))
def test_lines_compressed(tmp_path: Path, ext: str) -> None:
    """A compressed file is one range; offsets count in the decompressed file."""
    data = AWKWARD * 50
    path = tmp_path / f"log{ext}"
    path.write_bytes(COMPRESSORS[ext](data))
    source = lines(path, split_bytes=10)
    assert list(source) == [f"{path}[0:]"]
    expected = expected_lines(data, str(path))
    assert shipped(source, local=True) == expected
    assert shipped(source, local=False) == expected
    assert in_process(source) == expected


def test_lines_binary(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"\xff\xfe\n\x00\r\n")
    source = lines(tmp_path / "f", binary=True, split_bytes=2)
    name = str(tmp_path / "f")
    expected = [(f"{name}:0", b"\xff\xfe"), (f"{name}:3", b"\x00\r")]
    assert shipped(source, local=True) == shipped(source, local=False) == expected


def test_lines_several_megabytes(tmp_path: Path) -> None:
    """The fast version of the big test: 4 MB in 41 ranges."""
    rng = random.Random(4)
    chunk = text(rng, 2000).encode()
    data = chunk * (4_000_000 // len(chunk))
    check_lines(tmp_path / "f.txt", data, 100_000)


@pytest.mark.slow
def test_lines_200_megabytes(tmp_path: Path) -> None:
    """
    A 200 MB file in 7 ranges: every line once, at its offset, in order
    (compared a line at a time with the file read line by line, so that
    neither side holds the whole file as lines).
    """
    rng = random.Random(200)
    chunk = "".join(
        f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 40))) + "\n"
        for i in range(20_000)
    ).encode()
    path = tmp_path / "big.log"
    with open(path, "wb") as f:
        for _ in range(200_000_000 // len(chunk) + 1):
            f.write(chunk)
    source = lines(path, split_bytes=30_000_000)
    assert len(source) == 7
    keys = list(source)
    got = records(keys, (item(source, k, local=True) for k in keys))
    count = 0
    with open(path, "rb") as f:
        offset = 0
        for raw, record in zip(f, got, strict=True):
            assert record == (f"{path}:{offset}", raw[:-1].decode())
            offset += len(raw)
            count += 1
    assert count == (200_000_000 // len(chunk) + 1) * 20_000
    # The server's route for one range in the middle: the same lines.
    middle = keys[3]
    assert list(records([middle], [item(source, middle, local=False)])) == list(
        records([middle], [source[middle]])
    )


# fsspec URLs


@needs_fsspec
def test_memory_urls(memory: str) -> None:
    """memory:// exists in this process only: the server always ships its data."""
    put(f"{memory}/a.txt", b"one\ntwo\n")
    put(f"{memory}/sub/b.txt.gz", gzip.compress(b"three\n"))
    put(f"{memory}/.hidden", b"no")
    source = files(f"{memory}/**")
    root = memory.replace("memory://", "memory:///")  # keys as fsspec's glob gives them
    assert list(source) == [f"{root}/a.txt", f"{root}/sub/b.txt.gz"]
    assert source[f"{root}/sub/b.txt.gz"] == "three\n"
    for local in (True, False):
        data = item(source, f"{root}/a.txt", local=local)
        assert data == FileData(f"{root}/a.txt", b"one\ntwo\n", None, False)
        assert isinstance(item(source, f"{root}/sub/b.txt.gz", local=local), FileData)
    assert item(files(f"{memory}/a.txt", shared=True), f"{memory}/a.txt", local=True) == (
        FileData(f"{memory}/a.txt", b"one\ntwo\n", None, False)
    )
    expected = {f"{root}/a.txt": "one\ntwo\n", f"{root}/sub/b.txt.gz": "three\n"}
    assert dict(shipped(source, local=True)) == expected
    assert list(files(memory)) == list(source)  # a directory URL
    ranges = lines(f"{memory}/a.txt", split_bytes=3)
    assert list(ranges) == [f"{memory}/a.txt[0:3]", f"{memory}/a.txt[3:6]", f"{memory}/a.txt[6:8]"]
    assert isinstance(item(ranges, f"{memory}/a.txt[0:3]", local=True), LineData)
    want = [(f"{memory}/a.txt:0", "one"), (f"{memory}/a.txt:4", "two")]
    assert shipped(ranges, local=True) == in_process(ranges) == want


@needs_fsspec
def test_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """file:// is found through fsspec, and opened as a plain path: a worker needs no fsspec."""
    tree(tmp_path)
    source = files(f"file://{tmp_path}/*.txt")
    a = f"file://{tmp_path}/a.txt"
    assert list(source) == [a, f"file://{tmp_path}/b.txt"]
    ref = item(source, a, local=True)
    assert isinstance(ref, FileRef) and ref.location == str(tmp_path / "a.txt")
    assert item(source, a, local=False) == FileData(a, b"content of a.txt\n", None, False)
    ranges = lines(f"file://{tmp_path}/a.txt")
    monkeypatch.setitem(sys.modules, "fsspec", None)
    assert list(records([a], [ref])) == [(a, "content of a.txt\n")]
    assert shipped(ranges, local=True) == [(f"file://{tmp_path}/a.txt:0", "content of a.txt")]


@needs_fsspec
def test_remote_urls_ship_references(tmp_path: Path) -> None:
    """
    A URL any machine can open (here fsspec's dir:// over tmp_path, standing
    in for s3://) goes as a reference, storage options and all, and the
    worker reads it through fsspec.
    """
    tree(tmp_path)
    (tmp_path / "z.txt.xz").write_bytes(lzma.compress(b"far\naway\n"))
    options = {"path": str(tmp_path), "target_protocol": "file"}
    source = files("dir://*.txt*", storage_options=options)
    assert list(source) == ["dir://a.txt", "dir://b.txt", "dir://z.txt.xz"]
    for local in (True, False):
        ref = item(source, "dir://z.txt.xz", local=local)
        assert ref == FileRef("dir://z.txt.xz", "dir://z.txt.xz", "xz", False, options)
        assert ref.storage_options == options
    assert dict(shipped(source, local=False))["dir://z.txt.xz"] == "far\naway\n"
    ranges = lines("dir://sub/c.txt", split_bytes=4, storage_options=options)
    assert isinstance(item(ranges, "dir://sub/c.txt[0:4]", local=False), LineRange)
    assert shipped(ranges, local=False) == [("dir://sub/c.txt:0", "content of sub/c.txt")]


# Errors


def test_no_match(tmp_path: Path) -> None:
    """Raised by files() itself, so when the job loads, naming what matched nothing."""
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(NoFilesError, match=re.escape(f"pattern '{pattern}' matches no file")):
        files(pattern)
    with pytest.raises(NoFilesError, match=r"no such file or directory: '.*missing\.txt'"):
        lines(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".only-hidden").write_text("")
    with pytest.raises(NoFilesError, match="holds no file"):
        files(tmp_path / "empty")
    with pytest.raises(NoFilesError, match="no paths given"):
        files([])
    (tmp_path / "here.txt").write_text("")
    with pytest.raises(NoFilesError, match="nothing"):  # one of a list is enough
        files([tmp_path / "here.txt", tmp_path / "nothing*"])
    error = NoFilesError("x")
    assert isinstance(error, FileNotFoundError)
    assert isinstance(error, JobScriptError)


@needs_fsspec
def test_no_match_urls(memory: str) -> None:
    with pytest.raises(NoFilesError, match=re.escape(f"pattern '{memory}/*.txt' matches no file")):
        files(f"{memory}/*.txt")
    with pytest.raises(NoFilesError, match=re.escape(f"no such file or directory: '{memory}/x'")):
        files(f"{memory}/x")


def test_url_without_fsspec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)
    for make in (files, lines):
        with pytest.raises(MissingExtraError) as e:
            make("s3://bucket/logs/*.gz")
        assert "'s3://bucket/logs/*.gz'" in str(e.value)
        assert "pip install 'octotwist[fsspec]'" in str(e.value)
        assert isinstance(e.value, ImportError) and isinstance(e.value, OctotwistError)
    # A worker without fsspec, given a reference to a URL:
    ref = FileRef("s3://bucket/x", "s3://bucket/x", None, False)
    with pytest.raises(MissingExtraError, match="'s3://bucket/x' is a URL"):
        list(records(["s3://bucket/x"], [ref]))


@pytest.mark.parametrize("ext", sorted(COMPRESSORS))
def test_corrupt_compressed(tmp_path: Path, ext: str) -> None:
    """A corrupt file fails with its name, whoever reads it, whichever way it travels."""
    bad = tmp_path / f"x.txt{ext}"
    bad.write_bytes(b"this is not compressed at all\n" * 10)
    name = str(bad)
    for source in (files(bad), lines(bad)):
        key = next(iter(source))
        for local in (True, False):
            with pytest.raises(SourceReadError, match=starts(name, ": ")) as e:
                list(records([key], [item(source, key, local=local)]))
            assert e.value.__cause__ is not None
            assert isinstance(e.value, OSError)
    with pytest.raises(SourceReadError, match=starts(name, ": ")):
        files(bad)[name]


def test_truncated_gzip(tmp_path: Path) -> None:
    bad = tmp_path / "x.gz"
    bad.write_bytes(gzip.compress(b"a\n" * 1000)[:-20])
    with pytest.raises(SourceReadError, match=starts(bad, ": Compressed file ended")):
        files(bad)[str(bad)]
    with pytest.raises(SourceReadError, match=starts(bad, ": ")):
        list(records([str(bad)], [lines(bad)[f"{bad}[0:]"]]))


def test_gzip_message(tmp_path: Path) -> None:
    bad = tmp_path / "books" / "x.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"hello")
    with pytest.raises(SourceReadError) as e:
        list(records(["k"], [item(files(bad), str(bad), local=True)]))
    assert str(e.value) == f"{bad}: Not a gzipped file (b'he')"


def test_file_gone(tmp_path: Path) -> None:
    """Deleted between the job's load and its task: the worker's error names it."""
    path = tmp_path / "gone.txt"
    path.write_text("a\nb\n")
    source, ranges = files(path), lines(path)
    path.unlink()
    gone = r": cannot open it here \(No such file or directory\)$"
    with pytest.raises(Unreachable, match=starts(path, gone)):
        list(records([str(path)], [item(source, str(path), local=True)]))
    with pytest.raises(Unreachable, match=starts(path, gone)):
        item(ranges, f"{path}[0:4]", local=False)
    with pytest.raises(SourceReadError, match=starts(path, ": ")):
        in_process(ranges)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(SourceReadError, match=starts(path, ": not UTF-8 text .*binary=True")):
        files(path)[str(path)]
    for local in (True, False):
        with pytest.raises(SourceReadError, match=starts(path, ":3: not UTF-8 text")):
            shipped(lines(path, split_bytes=2), local=local)
    gz = tmp_path / "latin1.txt.gz"
    gz.write_bytes(gzip.compress(b"ok\ncaf\xe9\n"))
    with pytest.raises(SourceReadError, match=starts(gz, ":3: not UTF-8 text")):
        shipped(lines(gz), local=False)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "64"])
def test_split_bytes_checked(tmp_path: Path, bad: Any) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="split_bytes must be a positive int"):
        lines(tmp_path / "f", split_bytes=bad)


# End to end, through the public API


def wordcount_map(key: str, value: str) -> Iterator[tuple[str, int]]:
    for word in value.split():
        yield word.lower(), 1


def wordcount_reduce(key: str, values: list[int]) -> tuple[str, int]:
    return key, sum(values)


@pytest.fixture
def books(tmp_path: Path) -> Path:
    """Two of the example books, gzipped."""
    for name in ("persuasion.txt", "northangerabbey.txt"):
        (tmp_path / f"{name}.gz").write_bytes(
            gzip.compress((BOOKS / name).read_bytes(), compresslevel=1)
        )
    return tmp_path


def expected_counts(books: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for path in books.glob("*.txt.gz"):
        counts.update(w.lower() for w in gzip.decompress(path.read_bytes()).decode().split())
    return counts


def test_run_over_files(books: Path) -> None:
    job = octotwist.Job(
        source=files(f"{books}/*.txt.gz"), mapfn=wordcount_map, reducefn=wordcount_reduce
    )
    assert dict(octotwist.run(job, workers=0)) == expected_counts(books)


def test_run_over_lines(books: Path) -> None:
    def mapfn(key: str, line: str) -> Iterator[tuple[str, int]]:
        path, _, offset = key.rpartition(":")
        assert path.endswith(".txt.gz") and offset.isdigit()
        yield from wordcount_map(key, line)

    job = octotwist.Job(
        source=lines(f"{books}/*.txt.gz", split_bytes=64 * 1024),
        mapfn=mapfn,
        reducefn=wordcount_reduce,
    )
    assert dict(octotwist.run(job, workers=0)) == expected_counts(books)


def test_run_over_split_lines(tmp_path: Path) -> None:
    """An uncompressed file in many ranges: each line is mapped once."""
    data = (BOOKS / "persuasion.txt").read_bytes()
    (tmp_path / "p.txt").write_bytes(data)

    def mapfn(key: str, line: str) -> Iterator[tuple[str, str]]:
        yield key, line

    def reducefn(key: str, values: list[str]) -> tuple[str, str]:
        (value,) = values
        return key, value

    job = octotwist.Job(
        source=lines(tmp_path / "p.txt", split_bytes=50_000), mapfn=mapfn, reducefn=reducefn
    )
    result = octotwist.run(job, workers=0, sort=False)
    assert dict(result) == dict(expected_lines(data, str(tmp_path / "p.txt")))


def test_module_names() -> None:
    """What a job author imports."""
    import octotwist.sources as sources

    assert set(sources.__all__) >= {"files", "lines", "Files", "Lines"}

"""
C{--output DIR/} and C{--output URL} (L{octotwist.output}): one part file a
reduce partition and C{_SUCCESS}, swapped in only when the job succeeds;
the same through fsspec (C{memory://}); and what is refused before a job
starts.  Each test reads the files back and compares them with what was
written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import parse_tsv

import octotwist
from octotwist.errors import UsageError
from octotwist.output import SUCCESS, Results, open_results

#: fsspec is an optional extra: without it, only its tests are skipped.
needs_fsspec = pytest.mark.skipif(
    importlib.util.find_spec("fsspec") is None, reason="fsspec is not installed"
)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def parts(directory: Path) -> dict[str, str]:
    """Every part file's text, by name."""
    return {p.name: p.read_text() for p in sorted(directory.glob("part-*"))}


def write_output(path: str, partitions: dict[int, list[tuple[Any, Any]]], count: int) -> Results:
    """Results for C{path}, given C{count} partitions and written as the server writes them."""
    output = open_results(path)
    assert output.partitioned and output.early
    output.begin(count)
    for partition, pairs in sorted(partitions.items()):
        for half in (pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :]):  # several calls
            output.write_partition(partition, [k for k, _ in half], [v for _, v in half])
    return output


# Results as three partitions' worth, the middle one empty.
RESULTS = {
    0: [("apple", 3), ("7", 7), (7, "seven")],
    2: [(("a", 1), None), ("tab\there", 1.5), ("zebra", [1, 2])],
}


def test_a_directory_gets_one_exact_file_per_partition_and_success_last(tmp_path: Path) -> None:
    out = tmp_path / "out"
    output = write_output(f"{out}/", RESULTS, 3)
    assert not out.exists()  # nothing at DIR before the commit
    assert len(list(tmp_path.glob(".out.*.partial"))) == 1
    output.commit()
    assert listing(out) == [SUCCESS, "part-00000.tsv", "part-00001.tsv", "part-00002.tsv"]
    assert (out / SUCCESS).read_bytes() == b""
    got = parts(out)
    assert parse_tsv(got["part-00000.tsv"]) == dict(RESULTS[0])
    assert got["part-00001.tsv"] == ""
    assert parse_tsv(got["part-00002.tsv"]) == dict(RESULTS[2])
    # In the order written, within a file.
    assert [line.split("\t")[0] for line in got["part-00000.tsv"].splitlines()] == [
        "apple",
        "'7'",
        "7",
    ]
    assert listing(tmp_path) == ["out"]  # no temporary directory left


def test_partitions_with_no_results_still_get_a_file(tmp_path: Path) -> None:
    output = open_results(str(tmp_path / "out") + os.sep)
    output.begin(4)
    output.commit()
    out = tmp_path / "out"
    assert parts(out) == {f"part-0000{i}.tsv": "" for i in range(4)}
    assert listing(out) == [SUCCESS] + [f"part-0000{i}.tsv" for i in range(4)]


def test_results_of_no_partition_go_to_the_first_part_file(tmp_path: Path) -> None:
    # write() is the server's one stream (results in key order): part-00000.
    output = open_results(f"{tmp_path}/out/")
    output.write(["b", "a"], [2, 1])
    output.write(["c"], [3])
    output.commit()
    out = tmp_path / "out"
    assert listing(out) == [SUCCESS, "part-00000.tsv"]  # no begin(): one file
    assert (out / "part-00000.tsv").read_text() == "b\t2\na\t1\nc\t3\n"


def test_partitions_out_of_order_or_range_are_refused(tmp_path: Path) -> None:
    output = open_results(f"{tmp_path}/out/")
    output.begin(3)
    output.write_partition(1, ["x"], [1])
    with pytest.raises(ValueError, match="increasing order"):
        output.write_partition(0, ["y"], [2])
    with pytest.raises(ValueError, match="no partition 3"):
        output.write_partition(3, ["y"], [2])
    output.abort()
    assert listing(tmp_path) == []


def test_jsonl_part_files(tmp_path: Path) -> None:
    output = open_results(f"{tmp_path}/out/", "jsonl")
    output.begin(2)
    output.write_partition(1, ["k", 2], [{"a": [1, 2]}, None])
    output.commit()
    out = tmp_path / "out"
    assert listing(out) == [SUCCESS, "part-00000.jsonl", "part-00001.jsonl"]
    assert (out / "part-00000.jsonl").read_text() == ""
    lines = (out / "part-00001.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [["k", {"a": [1, 2]}], [2, None]]


def previous_output(out: Path) -> dict[str, bytes]:
    """A previous job's output, five partitions, in C{out}: its files' bytes."""
    out.mkdir()
    for i in range(5):
        (out / f"part-{i:05d}.tsv").write_text(f"old{i}\t{i}\n")
    (out / SUCCESS).write_text("")
    out.chmod(0o750)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_previous_output_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous_output(out)
    # An existing directory is a directory output, with or without the slash.
    output = write_output(str(out), {1: [("new", 1)]}, 2)
    assert listing(out)[-1] == "part-00004.tsv"  # untouched until the commit
    output.commit()
    assert parts(out) == {"part-00000.tsv": "", "part-00001.tsv": "new\t1\n"}  # no stale parts
    assert (out / SUCCESS).exists()
    assert out.stat().st_mode & 0o777 == 0o750  # its mode kept
    assert listing(tmp_path) == ["out"]  # the old one is gone, and no temporary


def test_a_failed_job_leaves_the_previous_output_exactly_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = previous_output(out)
    output = write_output(f"{out}/", RESULTS, 3)
    output.abort()
    output.abort()  # more than once
    output.commit()  # and no commit after an abort
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path) == ["out"]


def test_abort_after_commit_takes_nothing_back(tmp_path: Path) -> None:
    output = write_output(f"{tmp_path}/out/", RESULTS, 3)
    output.commit()
    output.abort()
    output.commit()
    assert parse_tsv(parts(tmp_path / "out")["part-00002.tsv"]) == dict(RESULTS[2])


def test_a_failed_swap_puts_the_previous_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    before = previous_output(out)
    output = write_output(f"{out}/", RESULTS, 3)
    renames: list[str] = []
    real_rename = os.rename

    def rename(src: str, dst: str) -> None:
        renames.append(os.path.basename(src))
        if len(renames) == 2:  # the new one into place, after the old was moved aside
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        output.commit()
    assert renames[0] == "out" and renames[2].startswith(".out.")  # and back
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("slash", ["", "/"])
def test_a_directory_that_is_not_an_output_is_refused(tmp_path: Path, slash: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    (home / "part-00000.tsv").write_text("looks like one")
    with pytest.raises(UsageError) as e:
        open_results(f"{home}{slash}")
    message = str(e.value)
    assert f"refusing to replace {home}{slash}" in message
    assert ".bashrc" in message and "part-*" in message and SUCCESS in message
    assert "new or an empty directory" in message
    assert listing(home) == [".bashrc", "part-00000.tsv"]
    assert listing(tmp_path) == ["home"]  # no temporary made


def test_a_directory_named_like_a_part_file_is_not_an_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "part-00000").mkdir(parents=True)
    with pytest.raises(UsageError, match="part-00000"):
        open_results(f"{out}/")


def test_an_empty_directory_is_used(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    output = write_output(str(out), RESULTS, 3)
    output.commit()
    assert len(parts(out)) == 3


def test_a_trailing_slash_on_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out.tsv").write_text("x\t1\n")
    with pytest.raises(UsageError, match="it is a file"):
        open_results(f"{tmp_path}/out.tsv/")


def test_a_directory_that_gains_other_files_during_the_job_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = previous_output(out)
    output = write_output(f"{out}/", RESULTS, 3)
    (out / "notes.txt").write_text("added while the job ran")
    with pytest.raises(OSError, match=r"notes\.txt") as e:
        output.commit()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == dict(
        before, **{"notes.txt": b"added while the job ran"}
    )
    # The new results are not lost: the error says where they are.
    (kept,) = tmp_path.glob(".out.*.partial")
    assert str(kept) in str(e.value)
    assert parse_tsv(parts(kept)["part-00002.tsv"]) == dict(RESULTS[2])


def test_a_symlink_to_an_output_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "results"
    previous_output(real)
    link = tmp_path / "latest"
    link.symlink_to(real)
    write_output(f"{link}/", RESULTS, 3).commit()
    assert link.is_symlink() and link.resolve() == real
    assert len(parts(real)) == 3
    assert listing(tmp_path) == ["latest", "results"]


def test_a_file_url_is_a_local_path(tmp_path: Path) -> None:
    output = write_output(f"file://{tmp_path}/out/", RESULTS, 3)
    output.commit()
    assert len(parts(tmp_path / "out")) == 3
    single = open_results(f"file://{tmp_path}/one.tsv")
    assert not single.partitioned
    single.write_partition(0, ["a"], [1])  # (a file: the same as write())
    single.begin(8)  # (and nothing to prepare)
    single.commit()
    assert (tmp_path / "one.tsv").read_text() == "a\t1\n"


# fsspec: memory://


@pytest.fixture
def memory() -> Iterator[tuple[Any, str]]:
    """fsspec's memory filesystem and a fresh prefix in it, removed after."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    prefix = f"/octotwist-test-{uuid.uuid4().hex}"
    yield fs, prefix
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


def memory_files(fs: Any, prefix: str) -> dict[str, bytes]:
    return {path.removeprefix(prefix + "/"): fs.cat_file(path) for path in fs.find(prefix)}


def test_a_url_file_is_moved_into_place_on_commit(memory: tuple[Any, str]) -> None:
    fs, prefix = memory
    fs.pipe_file(f"{prefix}/x.tsv", b"previous\t1\n")
    output = open_results(f"memory://{prefix}/x.tsv")
    assert not output.partitioned and output.early
    output.write(["a", "b"], [1, 2])
    output.stream.flush()
    (temporary,) = (name for name in memory_files(fs, prefix) if name != "x.tsv")
    assert temporary.startswith(".x.tsv.partial-")
    assert fs.cat_file(f"{prefix}/x.tsv") == b"previous\t1\n"  # until the commit
    output.commit()
    assert memory_files(fs, prefix) == {"x.tsv": b"a\t1\nb\t2\n"}


def test_a_url_file_is_left_as_it_was_when_the_job_fails(memory: tuple[Any, str]) -> None:
    fs, prefix = memory
    fs.pipe_file(f"{prefix}/x.jsonl", b"previous\n")
    output = open_results(f"memory://{prefix}/x.jsonl", "jsonl")
    output.write(["a"], [1])
    output.abort()
    output.abort()
    assert memory_files(fs, prefix) == {"x.jsonl": b"previous\n"}


def test_a_url_directory_gets_part_files_and_success(memory: tuple[Any, str]) -> None:
    fs, prefix = memory
    output = write_output(f"memory://{prefix}/out/", RESULTS, 3)
    files = memory_files(fs, prefix)
    assert all(name.startswith(".out.partial-") for name in files)  # hidden until the commit
    output.commit()
    files = memory_files(fs, prefix)
    assert sorted(files) == [f"out/{SUCCESS}"] + [f"out/part-0000{i}.tsv" for i in range(3)]
    assert files[f"out/{SUCCESS}"] == b""
    assert parse_tsv(files["out/part-00000.tsv"].decode()) == dict(RESULTS[0])
    assert files["out/part-00001.tsv"] == b""
    assert parse_tsv(files["out/part-00002.tsv"].decode()) == dict(RESULTS[2])


def test_a_url_directory_replaces_a_previous_output(memory: tuple[Any, str]) -> None:
    fs, prefix = memory
    for i in range(5):
        fs.pipe_file(f"{prefix}/out/part-{i:05d}.jsonl", b"[0, 0]\n")
    fs.pipe_file(f"{prefix}/out/{SUCCESS}", b"")
    before = memory_files(fs, prefix)
    # An existing directory, without the slash.
    output = open_results(f"memory://{prefix}/out", "jsonl")
    output.begin(2)
    output.write_partition(0, ["k"], [1])
    output.abort()
    assert memory_files(fs, prefix) == before  # a failed job: as it was
    output = open_results(f"memory://{prefix}/out", "jsonl")
    output.begin(2)
    output.write_partition(0, ["k"], [1])
    output.commit()
    assert memory_files(fs, prefix) == {
        f"out/{SUCCESS}": b"",
        "out/part-00000.jsonl": b'["k", 1]\n',
        "out/part-00001.jsonl": b"",
    }


def test_a_url_directory_that_is_not_an_output_is_refused(memory: tuple[Any, str]) -> None:
    fs, prefix = memory
    fs.pipe_file(f"{prefix}/data/input.csv", b"mine")
    with pytest.raises(UsageError, match=r"refusing to replace memory://.*/data/: .*input\.csv"):
        open_results(f"memory://{prefix}/data/")
    fs.pipe_file(f"{prefix}/file.tsv", b"x")
    with pytest.raises(UsageError, match="it is a file, not a directory"):
        open_results(f"memory://{prefix}/file.tsv/")
    assert memory_files(fs, prefix) == {"data/input.csv": b"mine", "file.tsv": b"x"}


def test_a_url_directory_that_gains_other_files_is_left_alone(memory: tuple[Any, str]) -> None:
    fs, prefix = memory
    output = write_output(f"memory://{prefix}/out/", RESULTS, 3)
    fs.pipe_file(f"{prefix}/out/notes.txt", b"added while the job ran")
    with pytest.raises(OSError, match=r"notes\.txt.*the results are in /.*\.out\.partial-"):
        output.commit()
    files = memory_files(fs, prefix)
    assert files.pop("out/notes.txt") == b"added while the job ran"
    assert sorted(name.split("/")[1] for name in files) == [f"part-0000{i}.tsv" for i in range(3)]
    assert all(name.startswith(".out.partial-") for name in files)  # kept, not lost


def test_a_url_directory_half_moved_says_so_and_keeps_the_rest(
    memory: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, prefix = memory
    output = write_output(f"memory://{prefix}/out/", RESULTS, 3)
    real_mv = type(fs).mv

    def mv(self: Any, source: str, target: str, **kwargs: Any) -> None:
        if target.endswith("part-00001.tsv"):
            raise RuntimeError("connection reset")  # (not an OSError, as a client's may not be)
        real_mv(self, source, target, **kwargs)

    monkeypatch.setattr(type(fs), "mv", mv)
    with pytest.raises(OSError, match=f"without {SUCCESS}.*RuntimeError: connection reset"):
        output.commit()
    files = memory_files(fs, prefix)
    assert f"out/{SUCCESS}" not in files
    assert "out/part-00000.tsv" in files
    assert sorted(name.split("/")[1] for name in files if name.startswith(".out.")) == [
        "part-00001.tsv",
        "part-00002.tsv",
    ]


def test_a_url_file_that_cannot_be_moved_fails_and_leaves_the_previous_one(
    memory: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, prefix = memory
    fs.pipe_file(f"{prefix}/x.tsv", b"previous\t1\n")
    output = open_results(f"memory://{prefix}/x.tsv")
    output.write(["a"], [1])

    def mv(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(fs), "mv", mv)
    with pytest.raises(PermissionError):
        output.commit()
    assert memory_files(fs, prefix) == {"x.tsv": b"previous\t1\n"}


def test_a_url_without_fsspec_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if not installed
    with pytest.raises(UsageError) as e:
        open_results("s3://bucket/results.tsv")
    assert "s3://bucket/results.tsv" in str(e.value)
    assert "pip install 'octotwist[fsspec]'" in str(e.value)


@needs_fsspec
def test_a_url_of_an_unknown_filesystem_is_refused_before_the_job() -> None:
    with pytest.raises(UsageError, match=r"cannot write nosuch://x/y\.tsv: .*nosuch"):
        open_results("nosuch://x/y.tsv")


@needs_fsspec
@pytest.mark.parametrize("url", ["memory://", "memory:///"])
def test_the_root_of_a_filesystem_cannot_be_the_output(url: str) -> None:
    # (As s3://bucket/ cannot: nothing is beside it for the temporary name.)
    with pytest.raises(UsageError, match="name a file or a directory inside it"):
        open_results(url)


# Through the API, inline: whatever the server's calls, the part files in
# name order hold every result, in key order.


def test_a_job_writes_a_directory_output(tmp_path: Path) -> None:
    def mapfn(key: int, value: str) -> Iterator[tuple[str, int]]:
        for word in value.split():
            yield word, 1

    def reducefn(key: str, values: list[int]) -> int:
        return len(values)

    job = octotwist.Job(source={1: "a b a", 2: "b c d"}, mapfn=mapfn, reducefn=reducefn)
    out = tmp_path / "out"
    octotwist.run(job, workers=0, reduce_tasks=3, output=f"{out}/")
    names = listing(out)
    assert names[0] == SUCCESS and all(n.startswith("part-") for n in names[1:])
    text = "".join(parts(out).values())
    assert parse_tsv(text) == {"a": 2, "b": 2, "c": 1, "d": 1}
    assert listing(tmp_path) == ["out"]


class _Shown:
    def __repr__(self) -> str:
        return "Shown()"


#: Columns of one type (written a column at a time) and of many.
_VALUES = [
    1,
    True,
    None,
    1.5,
    float("inf"),
    'x\t\n"é\u2028',
    b"b",
    [1, "a"],
    {"a": 1},
    (1, 2),
    _Shown(),
    10**30,
    -3,
    "",
    "None",
    "7",
]
_COLUMNS = [
    (["a", "b\u00e9", 'c"\\'], [1, 2, -(10**20)]),
    ([1, 2, 3], ["x", "y\n", "None"]),
    (["a", "b"], [True, False]),
    (_VALUES, _VALUES[::-1]),
]


@pytest.mark.parametrize(("keys", "values"), _COLUMNS)
def test_jsonl_lines_are_each_results_json_array(keys, values, tmp_path: Path) -> None:
    output = open_results(str(tmp_path / "out.jsonl"), "jsonl")
    output.write(keys, values)
    output.commit()
    encode = json.JSONEncoder(ensure_ascii=False, default=repr).encode
    want = "".join(encode([k, v]) + "\n" for k, v in zip(keys, values, strict=True))
    assert (tmp_path / "out.jsonl").read_text() == want


@pytest.mark.parametrize(("keys", "values"), _COLUMNS)
def test_tsv_lines_are_each_results_two_fields(keys, values, tmp_path: Path) -> None:
    from octotwist.output import tsv_field

    output = open_results(str(tmp_path / "out.tsv"), "tsv")
    output.write(keys, values)
    output.commit()
    want = "".join(f"{tsv_field(k)}\t{tsv_field(v)}\n" for k, v in zip(keys, values, strict=True))
    assert (tmp_path / "out.tsv").read_text() == want

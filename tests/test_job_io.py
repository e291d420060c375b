"""
Files in and out of whole jobs, run as a user runs them (C{octo run} with
real task processes): compressed corpora through C{files()}, a big file
through C{lines()} in several map tasks, C{memory://} through fsspec (whose
files only the server can read, so it ships their bytes), C{-o DIR/}, and
the two-step example.  Every result is checked against a computation done
here, on the same files.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from conftest import (
    BOOKS,
    EXAMPLES,
    finish,
    free_port,
    octo,
    parse_tsv,
    python,
    start,
    wait_for_log,
)

BOOK_FILES = sorted(BOOKS.glob("*.txt"))

needs_fsspec = pytest.mark.skipif(
    importlib.util.find_spec("fsspec") is None, reason="fsspec is not installed"
)

WORD_COUNT = """
    from octotwist.sources import {KIND}

    source = {KIND}({PATTERN!r}{EXTRA})

    def mapfn(key, text):
        for word in text.split():
            yield word.lower(), 1

    def combinefn(word, ones):
        return word, sum(ones)

    def reducefn(word, counts):
        return word, sum(counts)
"""


def job_script(tmp_path: Path, kind: str, pattern: str, extra: str = "") -> Path:
    body = (
        textwrap.dedent(WORD_COUNT)
        .replace("{KIND}", kind)
        .replace("{PATTERN!r}", repr(pattern))
        .replace("{EXTRA}", extra)
    )
    path = tmp_path / "job.py"
    path.write_text(body)
    return path


def expected_words(texts: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w.lower() for w in text.split())
    return counts


def run_job(job: Path, env: dict, *args: str) -> dict:
    out = job.parent / "out.tsv"
    r = octo("run", str(job), "-w", "2", "-o", str(out), *args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return parse_tsv(out.read_text(encoding="utf-8"))


COMPRESSORS = {
    "gz": gzip.compress,
    "bz2": bz2.compress,
    "xz": lzma.compress,
    "zst": zstandard.ZstdCompressor().compress,
}


@pytest.mark.parametrize("suffix", ["gz", "zst"])
def test_a_compressed_corpus_through_files(tmp_path: Path, env: dict, suffix: str) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = []
    for book in BOOK_FILES[:3]:
        data = book.read_bytes()
        (corpus / f"{book.name}.{suffix}").write_bytes(COMPRESSORS[suffix](data))
        texts.append(data.decode("utf-8"))
    job = job_script(tmp_path, "files", f"{corpus}/*.{suffix}")
    assert run_job(job, env) == expected_words(texts)


def test_a_corrupt_gz_fails_the_job_naming_the_file(tmp_path: Path, env: dict) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt.gz").write_bytes(gzip.compress(b"fine words\n"))
    (corpus / "bad.txt.gz").write_bytes(gzip.compress(b"cut short " * 1000)[:40])
    job = job_script(tmp_path, "files", f"{corpus}/*.gz")
    r = octo("run", str(job), "-w", "2", "-o", str(tmp_path / "out.tsv"), env=env)
    assert r.returncode == 1
    assert "bad.txt.gz" in r.stderr and "failed" in r.stderr, r.stderr
    assert not (tmp_path / "out.tsv").exists()  # nothing half-written


def test_a_pattern_that_matches_nothing_is_refused_before_anything_runs(
    tmp_path: Path, env: dict
) -> None:
    job = job_script(tmp_path, "files", f"{tmp_path}/nothing/*.txt")
    r = octo("run", str(job), "-w", "2", env=env)
    assert r.returncode != 0
    assert "matches no file" in r.stderr and "to map" not in r.stderr, r.stderr


def big_log(path: Path, size: int) -> bytes:
    """Lines of the books, repeated to C{size} bytes, with some empty and long lines."""
    base = b"".join(p.read_bytes() for p in BOOK_FILES[:2])
    chunks, total = [], 0
    n = 0
    while total < size:
        chunk = base + b"\n" + b"x" * (3000 + n) + b"\n"
        chunks.append(chunk)
        total += len(chunk)
        n += 1
    data = b"".join(chunks)[:size]
    path.write_bytes(data)
    return data


LINE_STATS = """
    from octotwist import counters
    from octotwist.sources import lines

    source = lines({PATH!r}, split_bytes={SPLIT})

    def mapfn(key, line):
        path, _, offset = key.rpartition(":")
        counters.add("lines")
        yield "lines", 1
        yield "chars", len(line)
        yield "offsets", int(offset) % 1000

    def combinefn(key, values):
        return key, sum(values)

    def reducefn(key, values):
        return key, sum(values)
"""


def line_stats(data: bytes) -> dict[str, int]:
    stats = {"lines": 0, "chars": 0, "offsets": 0}
    offset = 0
    for line in data.split(b"\n")[: -1 if data.endswith(b"\n") else None]:
        stats["lines"] += 1
        stats["chars"] += len(line.decode("utf-8"))
        stats["offsets"] += offset % 1000
        offset += len(line) + 1
    return stats


def lines_job(tmp_path: Path, size: int, split: int) -> tuple[Path, bytes]:
    data = big_log(tmp_path / "big.log", size)
    job = tmp_path / "job.py"
    job.write_text(
        textwrap.dedent(LINE_STATS)
        .replace("{PATH!r}", repr(str(tmp_path / "big.log")))
        .replace("{SPLIT}", str(split))
    )
    return job, data


def test_a_file_through_lines_in_many_tasks(tmp_path: Path, env: dict) -> None:
    job, data = lines_job(tmp_path, 3_000_000, 100_000)
    r = octo("run", str(job), "-w", "2", "-o", str(tmp_path / "out.tsv"), env=env)
    assert r.returncode == 0, r.stderr
    assert parse_tsv((tmp_path / "out.tsv").read_text()) == line_stats(data)
    assert "30 source keys" in r.stderr  # one map task per range of 100 KB


@pytest.mark.slow
def test_a_200_mb_file_through_lines_in_several_tasks(tmp_path: Path, env: dict) -> None:
    job, data = lines_job(tmp_path, 200 * 2**20, 32 * 2**20)
    out = tmp_path / "out.tsv"
    r = octo("run", str(job), "-w", "2", "-o", str(out), env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    expected = line_stats(data)
    assert parse_tsv(out.read_text()) == expected
    assert "7 source keys" in r.stderr
    assert re.search(rf"\blines +{expected['lines']:,}\n", r.stderr)  # the counter, at the end


@needs_fsspec
def test_memory_urls_through_fsspec_ship_their_bytes(tmp_path: Path) -> None:
    """memory:// files exist in the server's process only: the workers get the data."""
    code = f"""
        import fsspec, json, octotwist
        from octotwist.sources import files
        fs = fsspec.filesystem("memory")
        books = {[str(p) for p in BOOK_FILES[:2]]!r}
        for path in books:
            with open(path, "rb") as f, fs.open("/books/" + path.rsplit("/", 1)[1], "wb") as g:
                g.write(f.read())
        def mapfn(key, text):
            for word in text.split():
                yield word.lower(), 1
        def reducefn(word, ones):
            return word, sum(ones)
        job = octotwist.Job(source=files("memory://books/*.txt"), mapfn=mapfn, reducefn=reducefn)
        r = octotwist.run(job, workers=2)
        print(json.dumps([list(r.items()), sorted(job.source)]))
    """
    r = python(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    results, keys = json.loads(r.stdout)
    expected = expected_words([p.read_text(encoding="utf-8") for p in BOOK_FILES[:2]])
    assert dict(results) == expected
    assert keys == [f"memory:///books/{p.name}" for p in BOOK_FILES[:2]]


def test_output_to_a_directory_gets_one_sorted_part_file_per_partition(
    tmp_path: Path, env: dict
) -> None:
    job = job_script(tmp_path, "files", str(BOOKS / "*.txt"))
    out = tmp_path / "counts"
    for _ in range(2):  # the second run replaces the first's output
        r = octo("run", str(job), "-w", "2", "-r", "3", "-q", "-o", f"{out}/", env=env)
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["_SUCCESS", "part-00000.tsv", "part-00001.tsv", "part-00002.tsv"]
    merged: dict = {}
    for name in names[1:]:
        part = parse_tsv((out / name).read_text(encoding="utf-8"))
        assert list(part) == sorted(part)  # each partition in key order
        assert not set(part) & set(merged)  # a key in one partition only
        merged.update(part)
    assert merged == expected_words([p.read_text(encoding="utf-8") for p in BOOK_FILES])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts", "job.py"]  # no leftovers


def test_the_two_step_example(tmp_path: Path, env: dict) -> None:
    out = tmp_path / "out.tsv"
    r = octo("run", str(EXAMPLES / "two_steps.py"), "-w", "2", "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    words = expected_words([p.read_text(encoding="utf-8") for p in BOOK_FILES])
    assert parse_tsv(out.read_text()) == dict(Counter(words.values()))
    assert re.search(rf"\bwords +{sum(words.values()):,}\n", r.stderr), r.stderr


def can_hide_files() -> bool:
    """Whether this process may start one in a mount namespace of its own (root, unshare)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_hide_files(), reason="needs root and unshare(1) for a mount namespace")
def test_a_worker_that_cannot_open_the_files_gets_their_bytes(tmp_path: Path, env: dict) -> None:
    """
    A worker on this machine that does not see its files (a container, say:
    here, a mount namespace with an empty tmpfs over the corpus) is sent
    paths, says it cannot open them, and is sent the bytes instead; the
    attempt costs nothing (--max-attempts 1) and the answer is exact.
    """
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for book in BOOK_FILES[:3]:
        shutil.copy(book, corpus / book.name)
    job = job_script(tmp_path, "files", str(corpus))
    port = free_port()
    out = tmp_path / "out.tsv"
    server = start(
        "server",
        str(job),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--max-attempts",
        "1",
        "-o",
        str(out),
        env=env,
    )
    log = wait_for_log(server, ["serving job"])
    hidden = (
        f"mount -t tmpfs tmpfs {corpus} && exec {sys.executable} -m octotwist client "
        f"127.0.0.1:{port} -p 1"
    )
    client = start("--mount", "sh", "-c", hidden, env=env, program="unshare")
    code, _, err = finish(server)
    assert code == 0, log + err
    assert finish(client)[0] == 0
    assert "cannot open the job's files" in log + err and "sending it their bytes" in log + err
    texts = [p.read_text(encoding="utf-8") for p in BOOK_FILES[:3]]
    assert parse_tsv(out.read_text(encoding="utf-8")) == expected_words(texts)

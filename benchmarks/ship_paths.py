"""
Ship paths, not bytes: what C{octotwist.sources.files()} saves the server.

    python benchmarks/ship_paths.py CORPUS_DIR [--runs 3]

The same word count (combinefn and reducefn sum) over every file of the
corpus, with two sources, run alternately, each as a user runs a job on
several machines: C{octo server JOB} and two C{octo client -p 1} processes
over tcp on 127.0.0.1 (real sockets, the authenticated channel):

  1. bytes: the guide's lazy source, a dict-like whose C{__getitem__} reads
     the file on the server, which sends its text to the worker;
  2. paths: C{files(CORPUS_DIR)}, which sends the worker the path; the
     worker reads the file itself (it is on the same machine).

Figures, medians of --runs: wall time; the CPU time of the server process
alone (from C{wait4}); and the bytes of source items the server sent (its
C{map_input_bytes}, logged at C{-v}).  Ratios are paths / bytes, in this one
invocation: the machines we run on are shared and noisy.  Each run's results
are checked against the first's; a mismatch exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = '''
import os
from octotwist.sources import files

CORPUS = os.environ["SHIP_CORPUS"]
PATHS = sorted(os.path.join(CORPUS, n) for n in os.listdir(CORPUS))


class Texts:
    """The guide's lazy source: each file read on the server as its task is sent."""

    def __iter__(self):
        return iter(PATHS)

    def __len__(self):
        return len(PATHS)

    def __getitem__(self, path):
        with open(path, encoding="utf-8") as f:
            return f.read()


source = Texts() if os.environ["SHIP_ROW"] == "bytes" else files(PATHS)


def mapfn(path, text):
    for word in text.split():
        yield word, 1


def combinefn(word, counts):
    return word, sum(counts)


reducefn = combinefn
'''

SENT = re.compile(r"task input sent: (\d+) bytes, (\d+) of them source items")


def octo(*args: str) -> list[str]:
    return [sys.executable, "-m", "octotwist", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(work: Path, row: str, corpus: Path) -> dict[str, float]:
    """One run of C{row}: the server, then two clients; the server's own CPU from wait4."""
    env = dict(os.environ, SHIP_ROW=row, SHIP_CORPUS=str(corpus))
    env["XDG_CONFIG_HOME"] = str(work / "config")  # a secret of this run's own
    env.pop("OCTO_SECRET", None)
    port = free_port()
    out = work / f"{row}.jsonl"
    log = work / "server.err"
    listen = f"tcp:{port}:interface=127.0.0.1"
    started = time.perf_counter()
    with open(log, "w") as err:
        server = subprocess.Popen(
            [
                *octo("server", str(work / "job.py"), "-v", "--listen", listen),
                "--format",
                "jsonl",
                "-o",
                str(out),
            ],
            env=env,
            stderr=err,
        )
    deadline = time.monotonic() + 120
    while "serving job" not in log.read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"FAILED: the server did not start:\n{log.read_text()}")
        time.sleep(0.02)
    clients = [
        subprocess.Popen(
            octo("client", f"127.0.0.1:{port}", "-p", "1"), env=env, stderr=subprocess.DEVNULL
        )
        for _ in range(2)
    ]
    _, status, usage = os.wait4(server.pid, 0)
    server.returncode = os.waitstatus_to_exitcode(status)
    for c in clients:
        c.wait(timeout=120)
    wall = time.perf_counter() - started
    text = log.read_text()
    if server.returncode or any(c.returncode for c in clients):
        sys.exit(f"FAILED: {row}:\n{text}")
    sent = SENT.search(text)
    if sent is None:
        sys.exit(f"FAILED: no 'task input sent' line:\n{text}")
    with open(out, encoding="utf-8") as f:
        results = dict(json.loads(line) for line in f)
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "sent": int(sent.group(1)),
        "items": int(sent.group(2)),
        "results": len(results),
        "checksum": sum(results.values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    corpus = a.corpus.resolve()
    files = [p for p in corpus.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(
        f"corpus: {corpus} ({len(files)} files, {size / 2**20:.1f} MiB); octo server + 2 "
        f"clients over tcp on 127.0.0.1; median of {a.runs} runs",
        flush=True,
    )
    rows: dict[str, list[dict[str, float]]] = {"bytes": [], "paths": []}
    with tempfile.TemporaryDirectory(prefix="octo-ship-") as tmp:
        work = Path(tmp)
        (work / "job.py").write_text(JOB)
        for _ in range(a.runs):
            for row in rows:  # alternated, so that both see the same machine
                rows[row].append(run_once(work, row, corpus))
                print(f"  done: {row}", flush=True)
    first = rows["bytes"][0]
    for row, runs in rows.items():
        for r in runs:
            if (r["results"], r["checksum"]) != (first["results"], first["checksum"]):
                print(f"MISMATCH in {row}: {r} vs {first}", file=sys.stderr)
                return 1
    keys = ("wall", "cpu", "sent", "items")
    med = {
        row: {k: statistics.median(r[k] for r in runs) for k in keys} for row, runs in rows.items()
    }
    labels = {"bytes": "bytes: the server reads", "paths": "paths: files(), worker reads"}
    print(f"{'':30}{'wall s':>8}{'server cpu s':>14}{'source sent':>15}{'all sent':>12}")
    for row, m in med.items():
        print(
            f"{labels[row]:30}{m['wall']:8.2f}{m['cpu']:14.2f}"
            f"{m['items'] / 2**20:11.2f} MiB{m['sent'] / 2**20:8.1f} MiB"
        )
    b, p = med["bytes"], med["paths"]
    print(
        f"ratios paths/bytes: wall {p['wall'] / b['wall']:.2f}x, server CPU "
        f"{p['cpu'] / b['cpu']:.2f}x, source bytes sent {p['items'] / b['items']:.4f}x "
        f"({b['items'] / max(p['items'], 1):,.0f} times fewer), all task input sent "
        f"{p['sent'] / b['sent']:.2f}x"
    )
    print(f"results identical across all rows and runs: {int(first['results'])} distinct words")
    return 0


if __name__ == "__main__":
    sys.exit(main())

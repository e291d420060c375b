"""
Tiny items: what a map item costs octotwist, against multiprocessing.Pool.

    python benchmarks/tiny_items.py [--items 100000] [--runs 3]

The job: `source = dict(enumerate(range(N)))`, `mapfn` yields `(value % 100, 1)`,
`reducefn` sums.  Before map tasks carried batches of items, every key was its
own task (a message, an attempt, a round trip): 100,000 items took 15.7 s, about
150 us an item.  Rows, on the same items, each result checked against a plain
Python computation (a mismatch exits non-zero):

  1. `octo run JOB -w 2` (subprocess, the CLI as a user runs it);
  2. `multiprocessing.Pool(2).imap_unordered(fn, items, chunksize=1000)`, where
     `fn` runs the same mapfn on one item, and the parent groups and reduces.

Each is also run on 1 item, to tell the fixed cost (starting Python, the
server, the worker processes) from the cost per item.  Three figures per row,
each the median of --runs whole-process runs:

  - wall: the whole process, start-up included;
  - job: octotwist's job time as the server logs it (from the server's start
    to the last result), and the Pool script's own time (from building the
    source to the last result, Pool start-up included);
  - per item: (job on N items - job on 1 item) / N, in microseconds.

The machines we run on are shared and noisy: compare the ratios, printed
octotwist / Pool for each figure, not the seconds.  The goal is a per-item
ratio of at most 2x.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

JOB = """\
import os
source = dict(enumerate(range(int(os.environ["TINY_ITEMS"]))))

def mapfn(key, value):
    yield value % 100, 1

def reducefn(key, values):
    return key, sum(values)
"""

# The same functions, imported from the job script, on the same items.
POOL = """\
import os, sys, time
started = time.perf_counter()
from collections import defaultdict
from multiprocessing import Pool
sys.path.insert(0, sys.argv[1])
import job

def fn(item):
    return list(job.mapfn(*item))

if __name__ == "__main__":
    groups = defaultdict(list)
    with Pool(2) as pool:
        for pairs in pool.imap_unordered(fn, job.source.items(), chunksize=1000):
            for k, v in pairs:
                groups[k].append(v)
    with open(sys.argv[2], "w") as out:
        for k in sorted(groups):
            rk, rv = job.reducefn(k, groups[k])
            out.write(f"{rk}\\t{rv}\\n")
    print(f"job {time.perf_counter() - started:.4f}")
"""


def expected(n: int) -> dict[str, str]:
    """The answer, computed without the job's machinery."""
    return {str(k): str(v) for k, v in Counter(i % 100 for i in range(n)).items()}


def read_result(path: Path) -> dict[str, str]:
    result = {}
    with open(path) as f:
        for line in f:
            k, v = line.rstrip("\n").split("\t")
            result[k] = v
    return result


def run(argv: list[str], env: dict[str, str], out: Path, n: int) -> tuple[float, float]:
    """Run one process to the end; return its wall time and its job time."""
    if out.exists():
        out.unlink()
    started = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if p.returncode != 0:
        sys.exit(f"FAILED ({p.returncode}): {' '.join(argv)}\n{p.stderr}")
    if read_result(out) != expected(n):
        sys.exit(f"MISMATCH: {' '.join(argv)} on {n} items gave a wrong result")
    m = re.search(r"finished: \d+ results? in ([\d.]+) s", p.stderr) or re.search(
        r"^job ([\d.]+)$", p.stdout, re.MULTILINE
    )
    if m is None:
        sys.exit(f"FAILED: no job time in the output of {' '.join(argv)}\n{p.stderr}")
    return wall, float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="octo-tiny-") as tmp:
        work = Path(tmp)
        (work / "job.py").write_text(JOB)
        (work / "pool.py").write_text(POOL)
        out = work / "out.tsv"
        env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"), PYTHONUNBUFFERED="1")
        env.pop("OCTO_SECRET", None)
        rows = {
            "octo run -w 2": [
                sys.executable,
                "-m",
                "octotwist",
                "run",
                str(work / "job.py"),
                "-w",
                "2",
                "-o",
                str(out),
            ],
            "Pool(2).imap_unordered, chunksize=1000": [
                sys.executable,
                str(work / "pool.py"),
                str(work),
                str(out),
            ],
        }
        print(f"{a.items:,} tiny items; median of {a.runs} runs; {os.cpu_count()} CPUs", flush=True)
        figures: dict[str, tuple[float, float, float]] = {}
        for name, argv in rows.items():
            samples: dict[int, list[tuple[float, float]]] = {1: [], a.items: []}
            for _ in range(a.runs):
                for n in samples:
                    samples[n].append(run(argv, dict(env, TINY_ITEMS=str(n)), out, n))
            wall = statistics.median(w for w, _ in samples[a.items])
            job = statistics.median(j for _, j in samples[a.items])
            fixed = statistics.median(j for _, j in samples[1])
            per_item = max(0.0, job - fixed) / max(1, a.items - 1)
            figures[name] = (wall, job, per_item)
            print(f"  done: {name} (1 item: job {fixed:.2f} s)", file=sys.stderr, flush=True)
        print(f"{'':40} {'wall s':>7} {'job s':>7} {'per item':>10}")
        for name, (wall, job, per_item) in figures.items():
            print(f"{name:40} {wall:7.2f} {job:7.2f} {per_item * 1e6:7.2f} us")
        octo, pool = figures["octo run -w 2"], figures["Pool(2).imap_unordered, chunksize=1000"]
        ratios = [o / p if p > 0 else float("inf") for o, p in zip(octo, pool, strict=True)]
        print(
            f"{'octotwist / Pool':40} {ratios[0]:6.2f}x {ratios[1]:6.2f}x {ratios[2]:9.2f}x"
            f"   (goal: per item <= 2x; {'met' if ratios[2] <= 2 else 'NOT met'})"
        )
        print(f"results identical to the plain computation in every run ({a.items:,} items)")


if __name__ == "__main__":
    main()

"""
Word count: octotwist against a plain single-process Python loop, in one run.

    python benchmarks/wordcount.py [CORPUS_DIR] [--runs 3] [--workers 2]

CORPUS_DIR defaults to the bundled sample (examples/books); for the 150 MB
benchmark corpus, build it with `python ../shared/corpus/build.py DIR`.
Every figure is the median of --runs whole-process runs, and every row
carries its ratio to the baseline measured in this same invocation (the
machines we run on are shared and noisy: compare ratios, not seconds).
Each run's result is checked against the baseline's; a mismatch fails loudly.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The seed's mapfn/reducefn over every .txt file of a directory; the
# directory comes from the environment so that the same script serves every row.
JOB = """\
import glob, os
text_files = sorted(glob.glob(os.path.join(os.environ["CORPUS_DIR"], "*.txt")))

class Files:
    # lazy: the server reads a file when its map task is handed out
    def __iter__(self):
        return iter(text_files)
    def __len__(self):
        return len(text_files)
    def __getitem__(self, name):
        with open(name) as f:
            return f.read()

source = Files()

def mapfn(key, value):
    for line in value.splitlines():
        for word in line.split():
            yield word.lower(), 1

def reducefn(key, value):
    return key, len(value)
"""

BASELINE = """\
import sys
from collections import defaultdict
sys.path.insert(0, sys.argv[1])
import job
groups = defaultdict(list)
for key in job.source:
    for k, v in job.mapfn(key, job.source[key]):
        groups[k].append(v)
with open(sys.argv[2], "w") as out:
    for k in sorted(groups):
        rk, rv = job.reducefn(k, groups[k])
        out.write(f"{rk}\\t{rv}\\n")
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"FAILED: {' '.join(argv)}\n{r.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def read_result(path: Path) -> dict[str, str]:
    result = {}
    with open(path) as f:
        for line in f:
            k, v = line.rstrip("\n").rsplit("\t", 1)
            result[k] = v
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("corpus", nargs="?", default=str(ROOT / "examples" / "books"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    corpus = Path(a.corpus).resolve()
    files = sorted(corpus.glob("*.txt"))
    size = sum(f.stat().st_size for f in files)
    if not files:
        sys.exit(f"no .txt files in {corpus}")
    with tempfile.TemporaryDirectory(prefix="octo-bench-") as tmp:
        work = Path(tmp)
        (work / "job.py").write_text(JOB)
        (work / "baseline.py").write_text(BASELINE)
        env = dict(os.environ, CORPUS_DIR=str(corpus), XDG_CONFIG_HOME=str(work / "config"))
        rows = {
            "baseline: one process, dict-of-lists": [
                sys.executable,
                str(work / "baseline.py"),
                str(work),
                str(work / "out.tsv"),
            ],
            f"octo run -w {a.workers}": [
                sys.executable,
                "-m",
                "octotwist",
                "run",
                str(work / "job.py"),
                "-w",
                str(a.workers),
                "-q",
                "-o",
                str(work / "out.tsv"),
            ],
        }
        print(
            f"corpus: {corpus} ({len(files)} files, {size / 2**20:.1f} MiB); "
            f"median of {a.runs} runs; {os.cpu_count()} CPUs"
        )
        reference: dict[str, str] | None = None
        medians: dict[str, tuple[float, float]] = {}
        for name, argv in rows.items():
            walls, cpus = [], []
            for _ in range(a.runs):
                wall, cpu = timed(argv, env)
                walls.append(wall)
                cpus.append(cpu)
                result = read_result(work / "out.tsv")
                if reference is None:
                    reference = result
                elif result != reference:
                    sys.exit(f"MISMATCH: {name} gave a different result from the baseline")
            medians[name] = (statistics.median(walls), statistics.median(cpus))
        base_wall = medians[next(iter(rows))][0]
        print(f"{'':40} {'wall s':>8} {'cpu s':>8} {'ratio':>7}")
        for name, (wall, cpu) in medians.items():
            print(f"{name:40} {wall:8.2f} {cpu:8.2f} {wall / base_wall:6.2f}x")
        assert reference is not None
        print(f"results identical across all runs: {len(reference)} distinct words")


if __name__ == "__main__":
    main()

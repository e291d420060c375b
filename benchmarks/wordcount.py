"""
Word count: octotwist against the anchors, in one invocation.

    python benchmarks/wordcount.py CORPUS_DIR [--runs 3] [--quick] [--small-tasks 10000]

Build the 150 MB corpus with `python3 ../shared/corpus/build.py DIR`
(`--target-bytes N` for other sizes).  Rows, all on the same files with the
seed's mapfn:

  1. baseline: one process, plain Python, dict-of-lists shuffle;
  2. `octo run -w 2`, the seed's job (no combiner, `len(values)`), with its
     lazy source and with the guide's eager dict source;
  3. `octo run -w 2` with the eager source and a summing combiner and
     reducer: written by hand, `octotwist.aggregate.sum`, and the aggregate
     with a reducefn of the user's; the aggregate again with --state-dir
     (every finished task journaled) and --unsorted;
  4. multiprocessing.Pool(2), hand-written map + combine: lazy (each process
     reads its files), and forked from a parent holding the eager dict;
  5. Dask LocalCluster(2) with a Counter per partition, if Dask is installed,
     and the seed's job unchanged on `octo run --engine dask -w 2` (a
     LocalCluster(2) too: octotwist's shuffle, Dask running the tasks);
  6. per installed transport: `octo server` + 2 `octo client -p 1` processes.

The targets of issue 18 are printed last, as ratios of these rows.

Every figure is the median of --runs whole-process runs; every row carries its
ratio to the baseline measured in this same invocation (the machines we run
on are shared and noisy: compare ratios, not seconds).  Peak RSS is sampled
every 20 ms: "server" is the process that serves the job (for `octo run`, the
one process holding the server and the local worker's reactor; the task
processes are not in it), "tree" is the largest sum over the whole process
tree.  Each run's result is checked against the baseline's; a mismatch exits
non-zero.  --small-tasks N times N one-pair map tasks through one server and 2
workers and prints tasks per second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")

# The seed's mapfn/reducefn over the files listed in $CORPUS_LIST; the list
# comes from the environment so that the same script serves every row.
FILES = """\
import os
with open(os.environ["CORPUS_LIST"]) as f:
    text_files = f.read().split("\\n")
"""

LAZY = """
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
"""

# As the guide (and examples/wordcount.py) writes it: every file read into
# a dict when the script loads.
EAGER = """
def file_contents(file_name):
    with open(file_name) as f:
        return f.read()

source = dict((f, file_contents(f)) for f in text_files)
"""

SEED = """
def mapfn(key, value):
    for line in value.splitlines():
        for word in line.split():
            yield word.lower(), 1

def reducefn(key, value):
    return key, len(value)
"""

JOB = FILES + LAZY + SEED

#: The job's other spellings, each a folder's job.py: its source and functions.
SPELLINGS = {
    "eager": EAGER + SEED,
    # a combiner and reducer written by hand, the way the docs used to
    "hand_sum": EAGER
    + SEED
    + """
def combinefn(key, values):
    return key, sum(values)

def reducefn(key, values):
    return key, sum(values)
""",
    "aggregate_sum": EAGER
    + SEED
    + """
import octotwist.aggregate
combinefn = reducefn = octotwist.aggregate.sum
""",
    # the aggregate's combiner, and a reducefn equivalent to it, written as a
    # user might: a docstring, a temporary, a start value
    "aggregate_hand_reduce": EAGER
    + SEED
    + """
import octotwist.aggregate
combinefn = octotwist.aggregate.sum

def reducefn(word, counts):
    \"\"\"The word's count: the map tasks' counts added up.\"\"\"
    total = sum(counts, 0)
    return word, total
""",
}

BASELINE = """\
import json
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
        out.write(json.dumps([rk, rv], ensure_ascii=False) + "\\n")
"""

# The best one can write by hand: each process maps whole files and sums per
# word as it goes (the combine); the parent adds up the per-file tables.
# With the lazy job each process reads its files; with the eager one the
# processes are forked from the parent that read them all, and read its dict.
POOL = """\
import json
import sys
from collections import defaultdict
from multiprocessing import get_context
sys.path.insert(0, sys.argv[1])
import job

def count(names):
    sums = defaultdict(int)
    for name in names:
        for k, v in job.mapfn(name, job.source[name]):
            sums[k] += v
    return sums

if __name__ == "__main__":
    names = list(job.source)
    batches = [names[i::16] for i in range(16)]
    total = defaultdict(int)
    with get_context("fork").Pool(2) as pool:
        for sums in pool.imap_unordered(count, batches):
            for k, v in sums.items():
                total[k] += v
    with open(sys.argv[2], "w") as out:
        for k in sorted(total):
            out.write(json.dumps([k, total[k]], ensure_ascii=False) + "\\n")
"""

# Dask's best spelling we found: a bag of file names, a Counter per
# partition, the Counters added up; two worker processes of one thread.
DASK = """\
import json
import sys
from collections import Counter
sys.path.insert(0, sys.argv[1])
import job

def count(names):
    counts = Counter()
    for name in names:
        for k, v in job.mapfn(name, job.source[name]):
            counts[k] += v
    return counts

def add(counters):
    total = Counter()
    for c in counters:
        total.update(c)
    return total

if __name__ == "__main__":
    import dask.bag as db
    from dask.distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        bag = db.from_sequence(list(job.source), npartitions=16)
        total = bag.reduction(count, add).compute()
    with open(sys.argv[2], "w") as out:
        for k in sorted(total):
            out.write(json.dumps([k, total[k]], ensure_ascii=False) + "\\n")
"""

#: The targets of issue 18: (what, numerator row, denominator row, at most).
BASE = "baseline: one process, dict-of-lists"
SEED_LAZY = "octo run -w 2"
SEED_EAGER = "octo run -w 2, eager dict"
HAND_SUM = "octo run -w 2, eager, hand-written sums"
AGG = "octo run -w 2, eager, aggregate.sum"
AGG_HAND = "octo run -w 2, eager, aggregate.sum + own reducefn"
POOL_LAZY = "Pool(2), hand combine, lazy"
POOL_FORK = "Pool(2) fork, hand combine, eager"
DASK_ROW = "Dask LocalCluster(2), Counter"
ENGINE_DASK = "octo run --engine dask -w 2"
TARGETS = [
    ("seed job, eager dict / baseline", SEED_EAGER, BASE, 0.45),
    ("seed job, lazy source / baseline", SEED_LAZY, BASE, 0.45),
    ("aggregate.sum / Pool(2) fork", AGG, POOL_FORK, 1.0),
    ("own reducefn / aggregate.sum", AGG_HAND, AGG, 1.1),
    ("hand-written sums / aggregate.sum", HAND_SUM, AGG, None),
    ("seed job, lazy / Dask LocalCluster(2)", SEED_LAZY, DASK_ROW, 0.5),
    ("seed job, eager / Dask LocalCluster(2)", SEED_EAGER, DASK_ROW, 0.5),
    # issue 21: the same job script on Dask, against Dask's best spelling
    ("--engine dask / Dask LocalCluster(2)", ENGINE_DASK, DASK_ROW, 1.1),
    ("--engine dask / octo run -w 2", ENGINE_DASK, SEED_LAZY, None),
]

SMALL = """\
import os
source = {i: i for i in range(int(os.environ["SMALL_TASKS"]))}

def mapfn(key, value):
    yield value % 100, 1

def reducefn(key, values):
    return key, len(values)
"""


@dataclass
class Sample:
    wall: float
    cpu: float
    server_rss: int  # bytes
    tree_rss: int


@dataclass
class Row:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


class RssWatch(threading.Thread):
    """Samples the RSS of a process tree until told to stop."""

    def __init__(self, roots: list[int], server: int) -> None:
        super().__init__(daemon=True)
        self.roots, self.server = roots, server
        self.tree_peak = self.server_peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            parents: dict[int, int] = {}
            rss: dict[int, int] = {}
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(entry)] = int(fields[1])
                rss[int(entry)] = int(fields[21]) * PAGE
            tree = set(self.roots)
            grew = True
            while grew:
                more = {p for p, pp in parents.items() if pp in tree} - tree
                grew = bool(more)
                tree |= more
            self.tree_peak = max(self.tree_peak, sum(rss.get(p, 0) for p in tree))
            try:
                with open(f"/proc/{self.server}/status") as f:
                    hwm = re.search(r"VmHWM:\s+(\d+) kB", f.read())
                if hwm:
                    self.server_peak = max(self.server_peak, int(hwm.group(1)) * 1024)
            except OSError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until the server has logged C{text} (any endpoint: tcp:, unix:, ...)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            sys.exit(f"FAILED: the server exited early:\n{path.read_text()}")
        time.sleep(0.02)
    sys.exit(f"FAILED: the server did not say {text!r} within {timeout} s")


def run_once(commands: list[list[str]], env: dict[str, str], logs: Path) -> Sample:
    """
    Run C{commands[0]} (the server, or the only process) and then the rest
    (clients, once the server serves); time it all, sample RSS, check exit codes.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    log = logs / "server.err"
    with open(log, "w") as err_file:
        procs = [subprocess.Popen(commands[0], env=env, stderr=err_file, text=True)]
    watch = RssWatch([procs[0].pid], procs[0].pid)
    watch.start()
    try:
        if len(commands) > 1:
            wait_for_text(log, "serving job", procs[0])
            for argv in commands[1:]:
                procs.append(subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL))
                watch.roots.append(procs[-1].pid)
        for p in procs:
            p.wait(timeout=1800)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - started
    watch.stopped.set()
    watch.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    err = log.read_text()
    for argv, p in zip(commands, procs, strict=True):
        if p.returncode != 0:
            sys.exit(f"FAILED ({p.returncode}): {' '.join(argv)}\n{err}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run_once.stderr = err  # type: ignore[attr-defined]
    return Sample(wall, cpu, watch.server_peak, watch.tree_peak)


def read_result(path: Path) -> dict[Any, Any]:
    """The results, written by every row as JSON lines (octo's --format jsonl)."""
    result = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            k, v = json.loads(line)
            result[k] = v
    return result


def octo(*args: str) -> list[str]:
    return [sys.executable, "-m", "octotwist", *args]


def transport_rows(
    work: Path, env: dict[str, str], job: Path, out: Path
) -> dict[str, tuple[list[list[str]], dict[str, str], int]]:
    """One row per installed transport: server + 2 clients (1 process each)."""
    from octotwist.hookspecs import transports

    try:
        from octotwist.hookspecs import conformance_setup
    except ImportError:
        conformance_setup = None
    rows = {}
    for name in sorted(transports()):
        port = free_port()
        setup = None
        if conformance_setup is not None:
            try:
                setup = conformance_setup(name, work / f"setup-{name}")
            except Exception as e:
                print(f"note: transport {name} skipped: its test setup failed ({e})", flush=True)
                continue
        listen = (setup.listen if setup else "tcp:{port}:interface=127.0.0.1").format(port=port)
        address = (setup.address if setup else "127.0.0.1:{port}").format(port=port)
        server = octo(
            "server",
            str(job),
            "--transport",
            name,
            "--listen",
            listen,
            "--format",
            "jsonl",
            "-o",
            str(out),
            *(setup.server_args if setup else []),
        )
        client = octo(
            "client",
            address,
            "--transport",
            name,
            "-p",
            "1",
            *(setup.client_args if setup else []),
        )
        row_env = dict(env, **(setup.env if setup else {}))
        rows[f"{name}: octo server + 2 clients"] = ([server, client, client], row_env, port)
    return rows


def _have_dask() -> bool:
    try:
        import dask.bag  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def pick_files(corpus: Path, limit: int | None) -> list[Path]:
    files = sorted(corpus.glob("*.txt"))
    if limit is None:
        return files
    chosen, size = [], 0
    for f in files:
        if size >= limit:
            break
        chosen.append(f)
        size += f.stat().st_size
    return chosen


def small_tasks(n: int, work: Path, env: dict[str, str]) -> None:
    """N one-pair map tasks: tasks per second through one server, 2 workers."""
    (work / "small.py").write_text(SMALL)
    out = work / "small.jsonl"
    jsonl = ["--format", "jsonl"]
    env = dict(env, SMALL_TASKS=str(n))
    expected = dict(Counter(i % 100 for i in range(n)))
    port = free_port()
    setups = {
        "octo run -w 2": (
            [octo("run", str(work / "small.py"), "-w", "2", *jsonl, "-o", str(out))],
            None,
        ),
        "tcp: octo server + 2 clients": (
            [
                octo(
                    "server",
                    str(work / "small.py"),
                    "--transport",
                    "tcp",
                    "--listen",
                    f"tcp:{port}:interface=127.0.0.1",
                    *jsonl,
                    "-o",
                    str(out),
                ),
                *[octo("client", f"127.0.0.1:{port}", "-p", "1")] * 2,
            ],
            port,
        ),
    }
    print(f"\n{n} map tasks of one pair each (job time as the server logs it):", flush=True)
    for name, (commands, _) in setups.items():
        sample = run_once(commands, env, work)
        m = re.search(r"finished: \d+ results in ([\d.]+) s", run_once.stderr)  # type: ignore[attr-defined]
        if read_result(out) != expected:
            sys.exit(f"MISMATCH: {name} gave a wrong small-task result")
        job_s = float(m.group(1)) if m else sample.wall
        print(
            f"  {name:32} {job_s:6.2f} s  {n / job_s:8.0f} tasks/s  (wall {sample.wall:.2f} s)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("corpus", nargs="?", default=str(ROOT / "examples" / "books"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="10 MB of the corpus, 1 run")
    ap.add_argument("--rows", default="", help="comma-separated substrings: only these rows")
    ap.add_argument("--small-tasks", type=int, default=0, metavar="N")
    a = ap.parse_args()
    corpus = Path(a.corpus).resolve()
    files = pick_files(corpus, 10_000_000 if a.quick else None)
    runs = 1 if a.quick else a.runs
    if not files:
        sys.exit(f"no .txt files in {corpus}")
    size = sum(f.stat().st_size for f in files)
    with tempfile.TemporaryDirectory(prefix="octo-bench-") as tmp:
        work = Path(tmp)
        (work / "files.txt").write_text("\n".join(str(f) for f in files))
        (work / "job.py").write_text(JOB)
        jobs = {}
        for name, functions in SPELLINGS.items():
            (work / name).mkdir()
            jobs[name] = work / name / "job.py"
            jobs[name].write_text(FILES + functions)
        for script in ("baseline", "pool", "dask"):
            (work / f"run_{script}.py").write_text(globals()[script.upper()])
        out = work / "out.tsv"
        env = dict(
            os.environ,
            CORPUS_LIST=str(work / "files.txt"),
            XDG_CONFIG_HOME=str(work / "config"),
            PYTHONUNBUFFERED="1",
        )
        env.pop("OCTO_SECRET", None)
        jsonl = ["--format", "jsonl"]
        state = ["--state-dir", str(work / "state")]

        def run(job: Path, *more: str) -> list[list[str]]:
            return [octo("run", str(job), "-w", "2", "-q", *jsonl, "-o", str(out), *more)]

        def script(name: str, job_dir: Path) -> list[list[str]]:
            return [[sys.executable, str(work / f"run_{name}.py"), str(job_dir), str(out)]]

        rows: dict[str, tuple[list[list[str]], dict[str, str], int | None]] = {
            BASE: (script("baseline", work), env, None),
            SEED_LAZY: (run(work / "job.py"), env, None),
            SEED_EAGER: (run(jobs["eager"]), env, None),
            HAND_SUM: (run(jobs["hand_sum"]), env, None),
            AGG: (run(jobs["aggregate_sum"]), env, None),
            AGG_HAND: (run(jobs["aggregate_hand_reduce"]), env, None),
            # What journaling every finished task costs (issue 16): each
            # output blob written and fsynced, one SQLite transaction a task.
            AGG + ", --state-dir": (run(jobs["aggregate_sum"], *state), env, None),
            # What handing final() and the output sorted keys costs.
            AGG + ", --unsorted": (run(jobs["aggregate_sum"], "--unsorted"), env, None),
            POOL_LAZY: (script("pool", work), env, None),
            POOL_FORK: (script("pool", jobs["eager"].parent), env, None),
        }
        if _have_dask():
            # the workers unpickle count() by reference to the job module
            dask_env = dict(env, PYTHONPATH=os.pathsep.join([str(work), *sys.path]))
            rows[DASK_ROW] = (script("dask", work), dask_env, None)
            rows[ENGINE_DASK] = (run(work / "job.py", "--engine", "dask"), env, None)
        else:
            print(
                "note: Dask row skipped: pip install 'octotwist[bench]' (Dask)",
                flush=True,
            )
        rows.update(transport_rows(work, env, work / "job.py", out))
        wanted = [w for w in a.rows.split(",") if w]
        if wanted:
            rows = {
                k: v
                for i, (k, v) in enumerate(rows.items())
                if i == 0 or any(w in k for w in wanted)
            }
        print(
            f"corpus: {corpus} ({len(files)} files, {size / 2**20:.1f} MiB); "
            f"median of {runs} runs; {os.cpu_count()} CPUs"
        )
        reference: dict[str, str] | None = None
        # The rows take turns, run by run: a machine that slows down for a
        # while slows every row, not the ones that happened to run then.
        results = [Row(name) for name in rows]
        for run in range(runs):
            for row, (commands, row_env, _) in zip(results, rows.values(), strict=True):
                if out.exists():
                    out.unlink()
                row.samples.append(run_once(commands, row_env, work))
                result = read_result(out)
                if reference is None:
                    reference = result
                elif result != reference:
                    sys.exit(f"MISMATCH: {row.name} gave a different result from the baseline")
            print(f"  done: run {run + 1} of {runs}", file=sys.stderr, flush=True)
        base = results[0].median("wall")
        print(
            f"{'':52} {'wall s':>7} {'cpu s':>7} {'ratio':>7} {'server':>9} {'tree':>9}", flush=True
        )
        for row in results:
            wall = row.median("wall")
            server_mib = row.median("server_rss") / 2**20
            tree_mib = row.median("tree_rss") / 2**20
            print(
                f"{row.name:52} {wall:7.2f} {row.median('cpu'):7.2f} {wall / base:6.2f}x "
                f"{server_mib:5.0f} MiB {tree_mib:5.0f} MiB"
            )
        walls = {row.name: row.median("wall") for row in results}
        print("targets (ratios of medians in this invocation):")
        for what, top, bottom, goal in TARGETS:
            if top in walls and bottom in walls:
                ratio = walls[top] / walls[bottom]
                verdict = (
                    ""
                    if goal is None
                    else f"  target <= {goal:.2f}x: " + ("met" if ratio <= goal else "NOT met")
                )
                print(f"  {what:44} {ratio:6.2f}x{verdict}")
        assert reference is not None
        print(
            f"results identical across all rows and runs: {len(reference)} distinct words",
            flush=True,
        )
        if a.small_tasks:
            small_tasks(a.small_tasks, work, env)


if __name__ == "__main__":
    main()

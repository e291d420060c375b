"""
octotwist.run(): from a script, many times in one process, inline with pdb,
inside a running reactor, with the job's own arguments.  Each job's result
is checked against a Counter computed here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from conftest import BOOKS, EXAMPLES, octo, parse_tsv, python, tsv_field, word_count

BOOK_FILES = sorted(BOOKS.glob("*.txt"))


def run_script(script: Path, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """C{python SCRIPT}, run from C{cwd}, as a user runs a script of theirs."""
    return subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_the_api_example_prints_the_ten_most_common_words(env: dict, tmp_path: Path) -> None:
    r = run_script(EXAMPLES / "wordcount_api.py", env, tmp_path)
    assert r.returncode == 0, r.stderr
    *top, summary = r.stdout.splitlines()
    expected = word_count(BOOK_FILES)
    printed = [(w, int(n)) for w, n in (line.split("\t") for line in top)]
    assert [n for _, n in printed] == [n for _, n in expected.most_common(10)]
    assert all(expected[w] == n for w, n in printed)
    assert summary.startswith(f"{len(expected)} words in ")


def test_run_many_times_in_one_process_with_every_kind_of_job(env: dict, tmp_path: Path) -> None:
    """A script, a module and a Job, one after the other; functions from __main__."""
    (tmp_path / "countjob.py").write_text(
        textwrap.dedent(
            f"""
            import glob
            source = {{p: None for p in sorted(glob.glob({str(BOOKS)!r} + "/*.txt"))}}
            def mapfn(path, _):
                with open(path) as f:
                    for word in f.read().split():
                        yield word.lower(), 1
            def reducefn(word, counts):
                return word, sum(counts)
            """
        )
    )
    r = python(
        """
        import json, sys
        import octotwist
        import countjob

        def mapfn(key, value):
            for word in value.split():
                yield word, 1

        def reducefn(key, values):
            return key, len(values)

        out = {}
        out["script"] = octotwist.run("countjob.py", workers=1)
        out["module"] = octotwist.run(countjob, workers=2, reduce_tasks=3)
        job = octotwist.Job(source={1: "a b a", 2: "b c"}, mapfn=mapfn, reducefn=reducefn)
        out["job"] = octotwist.run(job)
        out["job_again"] = octotwist.run(job, transport="tcp")
        print(json.dumps({k: [list(v), list(v.values())] for k, v in out.items()}))
        print(out["job"].results, out["job"].status["map"]["done"], file=sys.stderr)
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    books = word_count(BOOK_FILES)
    for name in ("script", "module"):
        keys, values = out[name]
        assert keys == sorted(books), name  # sorted, as octo.py's final() saw them
        assert dict(zip(keys, values, strict=True)) == books, name
    for name in ("job", "job_again"):
        keys, values = out[name]
        assert dict(zip(keys, values, strict=True)) == Counter(["a", "b", "a", "b", "c"])
        assert keys == ["a", "b", "c"]
    assert r.stderr.split() == ["3", "2"]


def test_a_failing_job_raises_job_failed_with_the_users_traceback(
    env: dict, tmp_path: Path
) -> None:
    r = python(
        """
        import octotwist

        def mapfn(key, value):
            if key == 3:
                raise ValueError(f"bad record {key}")
            yield key, value

        job = octotwist.Job(source={i: i for i in range(5)}, mapfn=mapfn,
                            reducefn=lambda k, vs: (k, vs[0]))
        try:
            octotwist.run(job, max_attempts=2)
        except octotwist.JobFailed as e:
            print(e)
        print("then", dict(octotwist.run(octotwist.Job(
            source={1: 1}, mapfn=lambda k, v: [(k, v)], reducefn=lambda k, vs: (k, sum(vs))))))
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    # (which map task holds key 3 is the scheduler's business)
    assert re.search(r"job job failed: map \d+ \(key 3\) failed on worker local after 2 ", r.stdout)
    assert "ValueError: bad record 3" in r.stdout
    assert "line 6, in mapfn" in r.stdout
    assert r.stdout.rstrip().endswith("then {1: 1}")


def test_workers_0_runs_inline_so_breakpoint_works_in_mapfn(env: dict, tmp_path: Path) -> None:
    """pdb reads this process's stdin: the commands below print a local and go on."""
    r = python(
        """
        import octotwist

        def mapfn(key, value):
            word = value.upper()
            breakpoint()
            yield word, 1

        job = octotwist.Job(source={1: "x", 2: "y", 3: "x"}, mapfn=mapfn,
                            reducefn=lambda k, vs: (k, sum(vs)))
        print("result", dict(octotwist.run(job, workers=0)))
        """,
        {**env, "PYTHONBREAKPOINT": "pdb.set_trace"},
        tmp_path,
        stdin="p 'seen', word\nc\np 'seen', word\nc\np 'seen', word\nc\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("(Pdb)") >= 3
    assert [line.count("('seen', 'X')") for line in r.stdout.splitlines()].count(1) == 2
    assert "result {'X': 2, 'Y': 1}" in r.stdout


def test_octo_run_inline_gives_the_distributed_result(env: dict, tmp_path: Path) -> None:
    script = EXAMPLES / "wordcount.py"
    inline = octo("run", str(script), "--inline", env=env)
    distributed = octo("run", str(script), "-w", "2", env=env)
    assert inline.returncode == distributed.returncode == 0, inline.stderr + distributed.stderr
    assert inline.stdout == distributed.stdout
    lines = inline.stdout.splitlines()
    assert {w: int(n) for w, n in (line.rsplit(" ", 1) for line in lines)} == word_count(BOOK_FILES)


def test_run_deferred_inside_a_running_reactor_and_run_refuses_there(
    env: dict, tmp_path: Path
) -> None:
    r = python(
        """
        from twisted.internet.task import deferLater, react
        from twisted.internet.threads import deferToThread
        import octotwist

        job = octotwist.Job(source={i: str(i % 7) for i in range(200)},
                            mapfn=lambda k, v: [(v, 1)],
                            reducefn=lambda k, vs: (k, len(vs)))

        async def main(reactor):
            await deferLater(reactor, 0)  # react() calls main before the reactor runs
            try:
                octotwist.run(job)
            except octotwist.errors.UsageError as e:
                print("refused:", e)
            first = await octotwist.run_deferred(job, reactor=reactor)
            second = await octotwist.run_deferred(job, workers=1, reduce_tasks=2)
            # In a thread of the program's, run() waits there, the job on its reactor.
            third = await deferToThread(octotwist.run, job, workers=1)
            print(dict(first) == dict(second) == dict(third), sorted(first.items()))

        react(lambda reactor: __import__("twisted.internet.defer").internet.defer
              .ensureDeferred(main(reactor)))
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "refused: octotwist.run() waits for the job" in r.stdout
    expected = sorted(Counter(str(i % 7) for i in range(200)).items())
    assert f"True {expected}" in r.stdout


def test_the_job_gets_its_own_arguments_and_an_absolute_file(env: dict, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one two two\n")
    (tmp_path / "b.txt").write_text("three three three -n\n")
    (tmp_path / "argjob.py").write_text(
        textwrap.dedent(
            """
            import os, sys
            assert os.path.isabs(__file__), __file__
            source = {path: open(path).read() for path in sys.argv[1:]}
            def mapfn(key, value):
                for word in value.split():
                    yield word, 1
            def reducefn(key, values):
                return key, sum(values)
            """
        )
    )
    expected = Counter(["one", "two", "two", "three", "three", "three", "-n"])
    r = octo("run", "argjob.py", "a.txt", "--", "b.txt", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert parse_tsv(r.stdout) == expected
    r = python(
        """
        import octotwist
        print(dict(octotwist.run("argjob.py", args=["a.txt", "b.txt"])))
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert eval(r.stdout) == dict(expected)


def test_unknown_options_are_refused_by_name(env: dict, tmp_path: Path) -> None:
    r = python(
        """
        import octotwist
        job = octotwist.Job(source={1: 1}, mapfn=lambda k, v: [(k, v)],
                            reducefn=lambda k, vs: (k, vs))
        for bad in ({"max_atempts": 3}, {"task_timeout": 1, "heartbeat": 2}, {"format": "xml"}):
            try:
                octotwist.run(job, **bad)
            except octotwist.errors.UsageError as e:
                print(e)
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(
        "unknown option max_atempts (did you mean max_attempts?); octotwist.run takes args, "
    )
    assert ", workers" in lines[0] and ", reduce_tasks," in lines[0]
    assert lines[1] == "--task-timeout (1 s) must be longer than --heartbeat (2 s)"
    assert lines[2] == "format must be one of tsv, jsonl, not 'xml'"


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_output_formats_keep_what_tsv_lost(env: dict, tmp_path: Path, fmt: str) -> None:
    """Tabs and newlines in keys, 7 beside '7': each result read back as it was."""
    import json

    source = {
        1: ["a\tb", "line\nbreak", 7, "7", "None", "back\\slash", "plain words", b"x", "b'x'",
            "u'y'", float("inf"), "inf", "", (1, "2")]
    }  # fmt: skip
    (tmp_path / "fmtjob.py").write_text(
        textwrap.dedent(
            f"""
            inf = float("inf")
            source = {source!r}
            def mapfn(key, value):
                for item in value:
                    yield item, repr(item)
            def reducefn(key, values):
                return key, values[0]
            """
        )
    )
    r = octo("run", "fmtjob.py", "--format", fmt, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    if fmt == "tsv":
        got = parse_tsv(r.stdout)
    else:  # JSON keeps the values (reprs, here); a key JSON has no type for is its repr
        pairs = [json.loads(line) for line in r.stdout.splitlines()]
        got = {tsv_field(v): v for _, v in pairs}
        native = [k for k, _ in pairs if k in source[1][:4]]  # JSON's own types
        assert sorted(native, key=repr) == sorted(source[1][:4], key=repr)
    expected = {item: repr(item) for item in source[1]}
    assert got == expected
    assert len(r.stdout.splitlines()) == len(expected)


def test_the_example_notebook_runs_in_a_real_jupyter_kernel(env: dict, tmp_path: Path) -> None:
    """
    examples/wordcount.ipynb, every cell, in an ipykernel (its own event loop).
    nbclient drives it from a Python of its own: its asyncio loop takes over
    SIGCHLD in the process it runs in, which would leave this one's reactor
    (pytest-twisted's) deaf to the end of the processes it starts.
    """
    for name in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(name, reason=f"{name} is a test dependency")
    r = python(
        f"""
        import nbclient, nbformat
        notebook = nbformat.read({str(EXAMPLES / "wordcount.ipynb")!r}, as_version=4)
        client = nbclient.NotebookClient(
            notebook,
            timeout=300,
            kernel_name="python3",
            resources={{"metadata": {{"path": {str(EXAMPLES)!r}}}}},  # the kernel's directory
        )
        client.execute()  # raises CellExecutionError, with the cell's traceback
        outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
        print("\\n".join(
            o.get("text", "") or o.get("data", {{}}).get("text/plain", "") for o in outputs
        ))
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    expected = word_count(BOOK_FILES)
    assert f"{len(expected)} words;" in r.stdout
    assert repr(expected.most_common(1)[0]) in r.stdout


def test_a_helper_beside_a_script_run_from_elsewhere_travels_with_the_job(
    env: dict, tmp_path: Path
) -> None:
    """The workers start in another directory, where `import helpers` finds nothing."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "helpers.py").write_text("def norm(w):\n    return w.strip('.,').lower()\n")
    (work / "helpjob.py").write_text(
        "from helpers import norm\n"
        "source = {1: 'Cat hat.', 2: 'cat'}\n"
        "def mapfn(key, value):\n"
        "    for w in value.split():\n"
        "        yield norm(w), 1\n"
        "def reducefn(key, values):\n"
        "    return key, sum(values)\n"
    )
    (work / "usehelp.py").write_text(
        "import sys\n"
        "import octotwist\n"
        "from helpers import norm\n"
        "def mapfn(key, value):\n"
        "    for w in value.split():\n"
        "        yield norm(w), 1\n"
        "def reducefn(key, values):\n"
        "    return key, sum(values)\n"
        "job = octotwist.Job(source={1: 'Cat hat.', 2: 'cat'}, mapfn=mapfn, reducefn=reducefn)\n"
        "print(dict(octotwist.run(job)))\n"
        "sys.path.insert(0, sys.path[0])\n"
        "import helpjob\n"
        "print(dict(octotwist.run(helpjob)))\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_script(work / "usehelp.py", env, elsewhere)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["{'cat': 2, 'hat': 1}"] * 2


def test_functions_that_cannot_load_on_a_worker_say_so(env: dict, tmp_path: Path) -> None:
    """Not 'the worker process died': which module is missing, and what to do."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "faraway.py").write_text("def norm(w):\n    return w\n")
    r = python(
        """
        import sys
        sys.path.insert(0, "site")  # importable here, not by the workers (another cwd)
        import faraway, octotwist
        faraway.__file__ = "/usr/lib/python3/site-packages/faraway.py"  # as if installed
        def mapfn(key, value):
            yield faraway.norm(value), 1
        job = octotwist.Job(source={1: "a"}, mapfn=mapfn, reducefn=lambda k, vs: (k, sum(vs)))
        try:
            octotwist.run(job, max_attempts=1)
        except octotwist.JobFailed as e:
            print(e)
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "the job's functions cannot be loaded on this worker: ModuleNotFoundError: " in r.stdout
    assert "No module named 'faraway'" in r.stdout
    assert "died" not in r.stdout

"""
A cluster from Python and jobs side by side (issue 16, part 1):
C{octotwist.Cluster(ADDRESS).run(job)} gives the L{JobResult} that
C{octotwist.run(job)} gives, and a job that takes at most N workers leaves
the others to the next job.  Real C{octo serve} and C{octo client}
processes on 127.0.0.1; each result is checked against one computed here.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

from conftest import finish, octo, parse_tsv, python, start, wait_for_log
from test_cluster import WORDS, held_job, serve, submit, words
from test_end_to_end import job


def test_cluster_run_gives_what_octotwist_run_gives(env: dict, tmp_path: Path) -> None:
    """A Job from __main__ (values that are not text), a script with args, a final() here."""
    server, address = serve("tcp", env)
    worker = start("client", address, "-p", "2", env=env)
    script = job(
        tmp_path,
        """
        import sys
        import octotwist
        n = int(sys.argv[1])
        source = {i: i for i in range(n)}
        def mapfn(key, value):
            octotwist.counters.add("seen", 1)
            yield value % 4, (value, str(value))
        def reducefn(key, values):
            return key, sorted(values)
        """,
        "pairs.py",
    )
    r = python(
        f"""
        import json, sys
        import octotwist

        class Word(str):
            pass

        def mapfn(key, value):
            for w in value.split():
                yield Word(w), 1

        def reducefn(key, values):
            return key, (len(values), type(key).__name__)

        cluster = octotwist.Cluster({address!r})
        job = octotwist.Job(source={{1: "a b a", 2: "b c", 3: "a"}}, mapfn=mapfn,
                            reducefn=reducefn, reduce_tasks=2)
        here = octotwist.run(job)
        there = cluster.run(job)
        assert type(there) is type(here) and there == here, (there, here)
        script = cluster.run({str(script)!r}, args=["10"], reduce_tasks=3)
        seen = []
        nothing = cluster.run({str(script)!r}, args=["6"], max_workers=1)
        final = octotwist.Job(source={{1: "x y x"}}, mapfn=mapfn, reducefn=reducefn,
                              final=lambda k, v: seen.append([k, v[0]]))
        empty = cluster.run(final)
        print(json.dumps({{
            "here": sorted(here.items()),
            "there": sorted(there.items()),
            "script": [[k, v] for k, v in script.items()],
            "counters": script.counters.get("seen"),
            "results": script.results,
            "mapped": script.status["map"]["done"],
            "seconds": script.seconds > 0,
            "final": sorted(seen),
            "empty": [dict(empty), empty.results],
            "jobs": [[j.id, j.state] for j in cluster.jobs()],
        }}))
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (
        out["there"] == out["here"] == [["a", [3, "Word"]], ["b", [2, "Word"]], ["c", [1, "Word"]]]
    )
    expected = {k: sorted((v, str(v)) for v in range(10) if v % 4 == k) for k in range(4)}
    assert out["script"] == [[k, [list(p) for p in v]] for k, v in expected.items()]
    assert out["counters"] == 10 and out["results"] == 4 and out["mapped"] == 10
    assert out["seconds"]
    assert out["final"] == [["x", 2], ["y", 1]]
    assert out["empty"] == [{}, 2]
    assert out["jobs"] == [[1, "done"], [2, "done"], [3, "done"], [4, "done"]]
    server.kill()
    worker.kill()


def test_a_failing_job_and_a_final_that_raises_here(env: dict, tmp_path: Path) -> None:
    server, address = serve("tcp", env)
    worker = start("client", address, env=env)
    r = python(
        f"""
        import octotwist

        def mapfn(key, value):
            if key == 3:
                raise ValueError(f"bad record {{key}}")
            yield key, value

        def final(key, value):
            raise KeyError(f"no room for {{key}}")

        cluster = octotwist.Cluster({address!r})
        job = octotwist.Job(source={{i: i for i in range(5)}}, mapfn=mapfn,
                            reducefn=lambda k, vs: (k, vs[0]))
        for j in (job, octotwist.Job(source={{1: 1}}, mapfn=lambda k, v: [(k, v)],
                                     reducefn=lambda k, vs: (k, vs), final=final)):
            try:
                cluster.run(j)
            except octotwist.JobFailed as e:
                print(str(e).splitlines()[0])
        print([(j.id, j.state) for j in cluster.jobs()])
        try:
            octotwist.Cluster({address!r}, secret_file="/nonexistent").run(job)
        except octotwist.errors.OctotwistError as e:
            print(type(e).__name__, e)
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("job job failed: map 3 (key 3) failed"), r.stdout
    assert lines[0].endswith("ValueError: bad record 3"), r.stdout
    assert lines[1] == "job job failed: final() raised at key 1: KeyError: 'no room for 1'"
    assert lines[2] in ("[(1, 'failed'), (2, 'cancelled')]", "[(1, 'failed'), (2, 'done')]")
    assert lines[3].startswith("UsageError") and "/nonexistent" in lines[3], lines
    server.kill()
    worker.kill()


def test_two_jobs_side_by_side_each_on_its_workers(env: dict, tmp_path: Path) -> None:
    """Job 1 takes one worker and holds it; job 2 runs on the other, and ends first."""
    server, address = serve("tcp", env)
    workers = [start("client", address, "-p", "1", "--name", f"w{n}", env=env) for n in (1, 2)]
    held, gate_file = held_job(tmp_path)
    first = start("submit", "-c", address, "--max-workers", "1", str(held), env=env)
    seen = wait_for_log(server, ["job 1 (held) takes at most 1 worker", "worker w"])
    beside = job(tmp_path, WORDS.format(mod=7), "beside.py")
    second = submit("tcp", env, address, "-m", "1", "-r", "2", str(beside))
    assert second.returncode == 0, second.stderr
    assert parse_tsv(second.stdout) == words(7)
    assert first.poll() is None  # still held: job 2 did not wait for it
    gate_file.touch()
    code, out, err = finish(first)
    assert code == 0, err
    assert parse_tsv(out) == words(5)
    listed = octo("jobs", "-c", address, env=env)
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [
        ["1", "done"],
        ["2", "done"],
    ]
    # Without a cap a job takes every worker: the next waits for it.
    third = submit("tcp", env, address, str(job(tmp_path, WORDS.format(mod=3), "all.py")))
    assert third.returncode == 0 and parse_tsv(third.stdout) == words(3), third.stderr
    server.send_signal(signal.SIGINT)
    _, _, log = finish(server)
    log = seen + log
    assert "job beside: 30 source keys to map, 2 reduce tasks" in log, log
    for w in workers:
        assert w.poll() is None
        w.kill()


def test_word_counts_of_a_cluster_and_of_a_counter_agree(env: dict, tmp_path: Path) -> None:
    """Cluster.run(output=FILE) writes the file octo run writes."""
    server, address = serve("tcp", env)
    worker = start("client", address, "-p", "2", env=env)
    text = "the quick brown fox jumps over the lazy dog the end\n" * 50
    (tmp_path / "in.txt").write_text(text)
    out = tmp_path / "counts.tsv"
    r = python(
        f"""
        import octotwist
        source = dict(enumerate(open({str(tmp_path / "in.txt")!r}).read().splitlines()))
        job = octotwist.Job(source=source, mapfn=lambda k, v: [(w, 1) for w in v.split()],
                            reducefn=lambda k, vs: (k, sum(vs)))
        result = octotwist.Cluster({address!r}).run(job, output={str(out)!r})
        print(len(result), result.results)
        """,
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "9"]
    assert parse_tsv(out.read_text()) == Counter(text.split())
    assert not list(tmp_path.glob(".counts.tsv.*"))
    server.kill()
    worker.kill()

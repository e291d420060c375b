"""
What a job's functions may return and use, as octo.py scripts do: values of
the script's own classes, a reducefn that returns a bare value, helper
modules imported inside the functions; and the hint a mapfn or reducefn
gets when it returns the wrong thing.  Jobs run through real worker
processes (C{octo run}, C{octo server} + C{octo client}); each result is
checked against an independent computation.
"""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import textwrap
import types
from collections import Counter
from pathlib import Path

import pytest
from conftest import finish, free_port, octo, parse_tsv, start, wait_for_port

from octotwist import codec, shipping
from octotwist.job import load_job
from octotwist.shuffle import MapOutput, reduce_partition

SOURCE = {f"doc{i}": " ".join(f"w{(i * j) % 7}" for j in range(i + 3)) for i in range(12)}
WORDS = Counter(w for text in SOURCE.values() for w in text.split())


def write(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def run(
    script: Path, *args: str, env: dict, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return octo("run", str(script), "-w", "2", *args, env=env, cwd=cwd, timeout=90)


def parse_lines(text: str) -> dict[str, tuple[int, int]]:
    """C{key x y} lines, each key once."""
    result: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        key, x, y = line.split()
        assert key not in result, f"key {key!r} output twice"
        result[key] = (int(x), int(y))
    return result


# 1. Values of classes defined in the job script or beside it.

POINT = """
from dataclasses import dataclass

@dataclass(frozen=True)
class Point:
    x: int
    y: int
"""

POINT_JOB = """
source = {source!r}

def mapfn(key, value):
    for w in value.split():
        yield w, Point(1, len(key))

def reducefn(key, values):
    assert all(type(p) is Point for p in values)
    return key, Point(sum(p.x for p in values), sum(p.y for p in values))

def final(key, value):
    # On the server: the script's own class, not a copy of it.
    assert type(value) is Point, (type(value), Point)
    assert value == Point(value.x, value.y)
    print(key, value.x, value.y)
"""


def _expected_points() -> dict[str, tuple[int, int]]:
    expected: dict[str, list[int]] = {}
    for key, text in SOURCE.items():
        for w in text.split():
            x, y = expected.setdefault(w, [0, 0])
            expected[w] = [x + 1, y + len(key)]
    return {w: (x, y) for w, (x, y) in expected.items()}


@pytest.mark.parametrize("where", ["script", "helper"])
def test_values_of_the_scripts_own_class_reach_final_as_that_class(
    env: dict, tmp_path: Path, where: str
) -> None:
    if where == "script":
        body = POINT + POINT_JOB
    else:  # a helper module beside the script defines it
        write(tmp_path / "geometry_octo_test.py", POINT)
        body = "from geometry_octo_test import Point\n" + POINT_JOB
    script = write(tmp_path / "job.py", body.format(source=SOURCE))
    elsewhere = tmp_path / "elsewhere"  # workers cannot import the script's folder
    elsewhere.mkdir()
    r = run(script, env=env, cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert parse_lines(r.stdout) == _expected_points()


@pytest.mark.parametrize("module_name", ["octo_job_not_importable", "__main__"])
def test_pack_falls_back_to_cloudpickle_and_keeps_the_class_object(module_name: str) -> None:
    # A class whose module cannot be imported, as a worker sees the script's,
    # or that is not where its module says (a notebook's __main__ elsewhere).
    module = types.ModuleType(module_name)
    exec(compile(POINT, "<job>", "exec", dont_inherit=True), module.__dict__)
    point = module.Point
    assert point.__module__ == module_name
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(point(1, 2), protocol=5)
    for compress in (True, False):
        back = codec.unpack(codec.pack([point(1, 2)], compress=compress))
        assert back == [point(1, 2)] and type(back[0]) is point


def test_pack_keeps_plain_pickle_for_what_plain_pickle_takes() -> None:
    data = ([("a", 1), ("b", [1.5, None])], {"k": b"v"})
    assert codec.pack(data, compress=False) == pickle.dumps(data, protocol=5)


def test_pack_still_refuses_what_neither_pickle_takes() -> None:
    import threading

    with pytest.raises(TypeError, match="lock"):
        codec.pack(threading.Lock())


# 2. reducefn and combinefn may return a bare value, as in octo.py.


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (lambda k, vs: (k, len(vs)), ("a", 2)),  # the guide's pair
        (lambda k, vs: len(vs), ("a", 2)),  # octo.py's bare value
        (lambda k, vs: {"n": len(vs)}, ("a", {"n": 2})),
        (lambda k, vs: ("other", 2), ("a", ("other", 2))),  # first item is not the key
        (lambda k, vs: [k, 2], ("a", ["a", 2])),  # a list is a value
        (lambda k, vs: (k, 2, 3), ("a", ("a", 2, 3))),  # so is a triple
        (lambda k, vs: None, ("a", None)),
        (lambda k, vs: ("".join(["a"]), 9), ("a", 9)),  # equal, not the same object
    ],
)
def test_reducefn_returns_a_pair_or_a_value(result, expected) -> None:
    keys, values = reduce_partition(result, [(["a"], ["x"], [2])])
    assert list(zip(keys, values, strict=True)) == [expected]


class _NoTruth:
    """A value whose C{==} answers with something that has no truth value."""

    def __eq__(self, other):
        return self

    def __bool__(self):
        raise ValueError("ambiguous")

    __hash__ = object.__hash__


def test_a_first_item_whose_equality_is_ambiguous_is_a_value() -> None:
    odd = _NoTruth()
    keys, values = reduce_partition(lambda k, vs: (odd, 1), [(["a"], ["x"], [1])])
    assert keys == ["a"] and values == [(odd, 1)]


def test_combinefn_returns_a_pair_or_a_value() -> None:
    for combinefn in (lambda k, vs: (k, sum(vs)), lambda k, vs: sum(vs)):
        out = MapOutput(1, combinefn=combinefn)
        list(out.add_all([("a", 2), ("b", 1), ("a", 2), ("b", 3)]))
        keys, values, counts = out.drain()[0]
        assert dict(zip(keys, values, strict=True)) == {"a": 4, "b": 4}
        assert counts == [1, 1]


def _bare_sum(key, values):
    return sum(values)


def _bare_sum_called(key, values):
    total = sum(values)
    return total


@pytest.mark.parametrize(
    "pairs",
    [
        [("a", 1), ("b", 1), ("a", 1)],  # counted: summed in C
        [("a", 1), ("b", 2), ("a", 10**30)],  # listed ints
        [("a", 0.1), ("a", 0.2), ("b", 1)],  # floats: called
    ],
)
def test_a_bare_sum_is_the_same_fast_or_called(pairs) -> None:
    outcomes = []
    for fn in (_bare_sum, _bare_sum_called):
        runs = []
        for task in (pairs, pairs[::-1]):
            out = MapOutput(1, combinefn=fn)
            list(out.add_all(task))
            runs.append(out.drain()[0])
        outcomes.append(reduce_partition(fn, runs))
    assert outcomes[0] == outcomes[1]
    assert [type(v) for v in outcomes[0][1]] == [type(v) for v in outcomes[1][1]]


def test_octo_py_reducefn_returning_bare_values(env: dict, tmp_path: Path) -> None:
    script = write(
        tmp_path / "job.py",
        f"""
        source = {SOURCE!r}
        def mapfn(key, value):
            for w in value.split():
                yield w, 1
        def combinefn(key, values):
            return sum(values)
        def reducefn(key, values):
            return sum(values)
        """,
    )
    r = run(script, env=env)
    assert r.returncode == 0, r.stderr
    assert parse_tsv(r.stdout) == WORDS


def test_octo_py_reducefn_returning_a_dict_reaches_final(env: dict, tmp_path: Path) -> None:
    script = write(
        tmp_path / "job.py",
        f"""
        source = {SOURCE!r}
        def mapfn(key, value):
            for w in value.split():
                yield w, key
        def reducefn(key, values):
            return {{"count": len(values), "docs": len(set(values))}}
        def final(key, value):
            assert isinstance(value, dict), value
            print(key, value["count"], value["docs"])
        """,
    )
    r = run(script, env=env)
    assert r.returncode == 0, r.stderr
    docs = {w: {k for k, t in SOURCE.items() if w in t.split()} for w in WORDS}
    assert parse_lines(r.stdout) == {w: (n, len(docs[w])) for w, n in WORDS.items()}


GENERATOR_HINT = (
    "reducefn returned a generator: it must return (key, value) or a value; use return, not yield"
)


def test_a_generator_reducefn_is_told_to_return() -> None:
    def reducefn(key, values):
        yield key, len(values)

    with pytest.raises(TypeError) as e:
        reduce_partition(reducefn, [(["a"], ["x"], [1])])
    assert str(e.value) == GENERATOR_HINT

    def combinefn(key, values):
        yield key, len(values)

    out = MapOutput(1, combinefn=combinefn)
    list(out.add_all([("a", 1)]))
    with pytest.raises(TypeError, match=r"^combinefn returned a generator: "):
        out.drain()


def test_a_generator_reducefn_fails_the_job_with_the_hint(env: dict, tmp_path: Path) -> None:
    script = write(
        tmp_path / "job.py",
        """
        source = {"d": "a b a"}
        def mapfn(key, value):
            for w in value.split():
                yield w, 1
        def reducefn(key, values):
            yield key, len(values)
        """,
    )
    r = run(script, env=env)
    assert r.returncode == 1
    assert f"TypeError: {GENERATOR_HINT}" in r.stderr


# 3. A mapfn that returns instead of yielding.

NONE_HINT = "mapfn returned None; it must yield key, value pairs (or return a list of them)"


def _single_hint(pair: object) -> str:
    return f"mapfn returned a single pair {pair!r}; use `yield k, v` or `return [(k, v)]`"


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (None, NONE_HINT),
        (("word", 1), _single_hint(("word", 1))),
        (("ab", 1), _single_hint(("ab", 1))),  # "ab" would unpack as a pair
        (["word", 1], _single_hint(["word", 1])),
        (("k", ("v", 1)), _single_hint(("k", ("v", 1)))),
        (
            5,
            "mapfn returned 5, which is not iterable; it must yield key, value pairs "
            "(or return a list of them)",
        ),
    ],
)
def test_mapfn_returning_the_wrong_thing_is_told_what_to_do(returned, message) -> None:
    with pytest.raises(TypeError) as e:
        list(MapOutput(1).add_all(returned))
    assert str(e.value) == message


def test_mapfn_may_return_pairs_in_a_tuple_or_list() -> None:
    pair = collections.namedtuple("pair", "key value")
    for returned in ((("a", 1), ("b", 2)), [("a", 1), ["b", 2]], [("a", 1)], (pair("a", 1),) * 2):
        out = MapOutput(1)
        list(out.add_all(returned))
        assert out.records == len(returned)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    words = value.split()\n", NONE_HINT),
        ("    return value, 1\n", _single_hint(("a b", 1))),
    ],
)
def test_mapfn_mistakes_fail_the_job_with_the_hint(
    env: dict, tmp_path: Path, body: str, message: str
) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        'source = {"d": "a b"}\ndef mapfn(key, value):\n'
        + body
        + "def reducefn(key, values):\n    return key, len(values)\n"
    )
    r = run(script, env=env)
    assert r.returncode == 1
    assert "map 0 (key 'd') failed" in r.stderr
    assert f"TypeError: {message}" in r.stderr


# 4. Helper modules imported inside the functions.

STOPWORDS = """
allStopWords = {"w0": 1, "w3": 1}
"""

HELPER_PACKAGE = {
    "textkit/__init__.py": "from .norm import normalise\n",
    "textkit/norm.py": "def normalise(w):\n    from . import table\n    return table.PREFIX + w\n",
    "textkit/table.py": "PREFIX = 'n:'\n",
}

IMPORTING_JOB = """
source = {source!r}

def mapfn(key, value):
    from stopwords import allStopWords
    for w in value.split():
        if w not in allStopWords:
            yield w, 1

def reducefn(key, values):
    import textkit
    return key, f"{{textkit.normalise(key)}}={{sum(values)}}"
"""


def _write_importing_job(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    write(directory / "stopwords.py", STOPWORDS)
    for name, text in HELPER_PACKAGE.items():
        (directory / name).parent.mkdir(exist_ok=True)
        (directory / name).write_text(text)
    return write(directory / "job.py", IMPORTING_JOB.format(source=SOURCE))


def _expected_imports() -> dict[str, str]:
    return {w: f"n:{w}={n}" for w, n in WORDS.items() if w not in ("w0", "w3")}


def test_imports_inside_functions_ship_their_modules(tmp_path: Path) -> None:
    script = _write_importing_job(tmp_path / "jobdir")
    job = load_job(script)
    functions = codec.load_functions(job.pickled_functions)
    assert sorted(functions.modules) == [
        "stopwords",
        "textkit",
        "textkit.norm",
        "textkit.table",
    ]
    filename, source = functions.modules["stopwords"]
    assert filename == str((tmp_path / "jobdir" / "stopwords.py").resolve())
    assert source == STOPWORDS


def test_only_the_scripts_own_modules_are_shipped(tmp_path: Path) -> None:
    (tmp_path / "json.py").write_text("raise SystemExit('shadowed')\n")  # a stdlib name
    (tmp_path / "pytest").mkdir()  # a folder named like an installed package
    (tmp_path / "mine.py").write_text("import os\nimport helper2\n")
    (tmp_path / "helper2.py").write_text("X = 1\n")

    def mapfn(key, value):
        import json  # noqa: F401

        import mine  # noqa: F401
        import pytest  # noqa: F401

    found = shipping.find_modules([mapfn], tmp_path)
    # mapfn's code is not in tmp_path, so only what it is given is scanned:
    assert found == {}
    code = compile(
        "def mapfn(k, v):\n    import json, pytest, mine, os.path\n", str(tmp_path / "j.py"), "exec"
    )
    scope: dict = {}
    exec(code, scope)
    found = shipping.find_modules([scope["mapfn"]], tmp_path)
    assert sorted(found) == ["helper2", "mine"]  # mine imports helper2


def test_the_job_directory_is_the_scripts_or_the_functions_file(tmp_path: Path) -> None:
    script = write(tmp_path / "job.py", "def mapfn(k, v):\n    yield k, v\n")
    scope: dict = {"__file__": str(script)}
    exec(compile(script.read_text(), str(script), "exec"), scope)
    assert shipping.job_directory(str(script), []) == tmp_path.resolve()
    # A job built in Python: where its functions were defined.
    assert shipping.job_directory("job 'wc'", [scope["mapfn"]]) == tmp_path.resolve()
    # A notebook's functions have no file; an installed package's are not the job's.
    del scope["__file__"]
    assert shipping.job_directory("job 'wc'", [scope["mapfn"]]) is None
    assert shipping.job_directory("job 'wc'", [pytest.main]) is None


def test_the_finder_serves_shipped_modules_in_a_process_elsewhere(tmp_path: Path) -> None:
    script = _write_importing_job(tmp_path / "jobdir")
    blob = load_job(script).pickled_functions
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "blob").write_bytes(blob)
    probe = textwrap.dedent(
        """
        import pickle, sys
        from octotwist import codec, shipping
        f = codec.load_functions(open("blob", "rb").read())
        shipping.install(f.modules)
        pairs = list(f.steps[0].mapfn("k", "w0 w1 w1 w3 w2"))
        print(pairs, f.steps[0].reducefn("w1", [1, 1]))
        import textkit.norm
        print(textkit.norm.__file__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[('w1', 1), ('w1', 1), ('w2', 1)] ('w1', 'n:w1=2')"
    assert lines[1] == str((tmp_path / "jobdir" / "textkit" / "norm.py").resolve())


def test_a_client_elsewhere_imports_the_scripts_helpers(env: dict, tmp_path: Path) -> None:
    jobdir = tmp_path / "jobdir"
    script = _write_importing_job(jobdir)
    out = tmp_path / "out.tsv"
    port = free_port()
    server = start(
        "server", "job.py", "--listen", f"tcp:{port}:interface=127.0.0.1", "-o", str(out),
        env=env, cwd=jobdir,
    )  # fmt: skip
    wait_for_port(port, server)
    elsewhere = tmp_path / "elsewhere"  # a machine with no copy of the script's folder
    elsewhere.mkdir()
    client_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    client = octo("client", f"127.0.0.1:{port}", "-p", "2", env=client_env, cwd=elsewhere)
    code, _, err = finish(server)
    assert client.returncode == 0, client.stderr
    assert code == 0, err
    assert script.exists()
    assert dict(line.split("\t") for line in out.read_text().splitlines()) == _expected_imports()

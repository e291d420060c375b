"""Loading job scripts: every mistake is named before anything listens."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from octotwist import codec
from octotwist.errors import JobScriptError
from octotwist.job import load_job

GOOD = """
source = {"a": "x y", "b": "y"}
def mapfn(k, v):
    for w in v.split():
        yield w, 1
def reducefn(k, vs):
    return k, len(vs)
"""


def write(tmp_path: Path, text: str, name: str = "job.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_job_loads_and_its_functions_round_trip(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, GOOD))
    assert job.name == "job" and job.final is None and job.reduce_tasks is None
    functions = codec.load_functions(job.pickled_functions)
    assert list(functions.steps[0].mapfn("k", "a b a")) == [("a", 1), ("b", 1), ("a", 1)]
    assert job.source_size() == 2


def test_helpers_beside_the_script_travel_by_value(tmp_path: Path) -> None:
    write(tmp_path, "def shout(w):\n    return w.upper()\n", "jobhelpers_xyz.py")
    job = load_job(
        write(
            tmp_path,
            "import jobhelpers_xyz\n"
            + GOOD.replace("yield w, 1", "yield jobhelpers_xyz.shout(w), 1"),
        )
    )
    import sys

    data = job.pickled_functions
    del sys.modules["jobhelpers_xyz"]  # as on a worker, which never saw the file
    sys.path.remove(str(tmp_path))
    functions = codec.load_functions(data)
    assert list(functions.steps[0].mapfn("k", "a")) == [("A", 1)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("source = {}\ndef mapfn(k, v): pass\n", "does not define reducefn"),
        ("def mapfn(k, v): pass\ndef reducefn(k, v): pass\n", "does not define source"),
        ("source = 3\ndef mapfn(k, v): pass\ndef reducefn(k, v): pass\n", "source is a int"),
        (
            "source = ['a', 'b']\ndef mapfn(k, v): pass\ndef reducefn(k, v): pass\n",
            r"source is a list.*dict\(enumerate\(items\)\)",
        ),
        ("source = {}\nmapfn = 1\ndef reducefn(k, v): pass\n", "mapfn must be a function"),
        (GOOD + "reduce_tasks = 0\n", "reduce_tasks must be a positive int"),
        ("source = {}\ndef mapfn(k, v)\n    pass\n", "job.py:2: syntax error"),
        ("import no_such_module_anywhere\n", "ModuleNotFoundError"),
        ("source = {}\n1 / 0\n", "ZeroDivisionError"),
    ],
)
def test_broken_scripts_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(JobScriptError, match=message):
        load_job(write(tmp_path, text))


def test_traceback_of_a_failing_script_shows_its_line(tmp_path: Path) -> None:
    with pytest.raises(JobScriptError) as e:
        load_job(write(tmp_path, "x = 1\nsource = {}[2]\n"))
    assert 'job.py", line 2' in str(e.value)
    assert "octotwist/job.py" not in str(e.value)


def test_unpicklable_function_is_named(tmp_path: Path) -> None:
    text = GOOD.replace("yield w, 1", "with LOCK:\n            yield w, 1")
    with pytest.raises(JobScriptError, match="mapfn cannot be sent to workers"):
        load_job(write(tmp_path, "import threading\nLOCK = threading.Lock()\n" + text))


def test_missing_script(tmp_path: Path) -> None:
    with pytest.raises(JobScriptError, match="not found"):
        load_job(tmp_path / "nope.py")

"""
Load a job script, check it, and get its functions ready to ship.

A job script is an ordinary Python file with octo.py's module-level names:
C{source}, C{mapfn}, C{reducefn}, and optionally C{final}, C{combinefn},
C{partitionfn}, C{reduce_tasks} and C{setupfn} (see docs/guide.md); or,
for a job of several steps, C{source} and C{steps}, a list of L{Step}.  A
job without C{steps} is one step of its C{mapfn} and C{reducefn}.  It is
imported on the server only.  Workers get the functions by value through cloudpickle, together
with the module globals they use and any helper module that sits beside the
script, so a worker machine never needs the script or its helpers.

Every problem is reported before the server listens, as a L{JobScriptError}
that names the script and what to change.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cloudpickle

from octotwist import codec, shipping
from octotwist.errors import JobScriptError

_REQUIRED = ("source", "mapfn", "reducefn")
_STEP_FUNCTIONS = ("mapfn", "reducefn", "combinefn", "partitionfn")


@dataclass(frozen=True, slots=True)
class Step:
    """
    One map and reduce of a job of several steps (a job script's
    C{steps}, or L{octotwist.Job}'s): step 1 maps the job's C{source},
    step I{k}+1 maps step I{k}'s results, and C{final()} (or the output)
    gets the last step's.  As mrjob's C{MRStep}.

    @ivar mapfn: C{mapfn(key, value)} yields C{(key, value)} pairs.
    @ivar reducefn: C{reducefn(key, values)} returns C{(key, value)} (or
        the value); C{None} makes a map-only step, whose pairs go on to
        the next step (or to the results) as they are, ungrouped.
    @ivar combinefn: combines a map task's values of one key, as the
        job-level C{combinefn} does; needs a C{reducefn}.
    @ivar partitionfn: C{partitionfn(key, partitions)}, the partition of a key.
    @ivar reduce_tasks: this step's partitions; else C{-r}, else the job's
        C{reduce_tasks}, else 8.  A step whose answer must be in one place
        (a top N) says C{reduce_tasks=1}.
    """

    mapfn: Callable[[Any, Any], Any]
    reducefn: Callable[[Any, list[Any]], Any] | None = None
    combinefn: Callable[[Any, list[Any]], Any] | None = None
    partitionfn: Callable[[Any, int], int] | None = None
    reduce_tasks: int | None = None


@dataclass(frozen=True, slots=True)
class JobFunctions:
    """
    What a worker needs to run tasks; shipped with cloudpickle.

    C{modules} holds the sources of the helper modules beside the script
    that the functions import (L{octotwist.shipping.find_modules}), for the
    imports that run on the worker, inside the functions.

    @ivar steps: the job's steps, one for a job without C{steps}.
    @ivar setupfn: called once in each task process, before its first task.
    """

    steps: tuple[Step, ...]
    setupfn: Callable[[], Any] | None = None
    modules: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(slots=True)
class Job:
    """A loaded, checked job script."""

    name: str
    path: Path | None  # None: a job built in Python (octotwist.Job)
    source: Any
    functions: JobFunctions
    final: Callable[[Any, Any], Any] | None
    reduce_tasks: int | None
    pickled_functions: bytes

    def source_size(self) -> int | None:
        """C{len(source)} when the source has one (for progress), else C{None}."""
        try:
            return len(self.source)
        except Exception:
            return None


def load_job(path: str | os.PathLike[str], args: Sequence[str] = ()) -> Job:
    """
    Import the job script at C{path} and check it.

    @param args: the job's own arguments: while it loads, C{sys.argv} is
        C{[path, *args]}, as for C{python path args...}.
    @raise JobScriptError: the script is missing, does not compile, raises
        while it is imported, lacks a required name, or has a function that
        cannot be pickled.
    """
    given = Path(path)
    if not given.is_file():
        raise JobScriptError(f"job script {str(given)!r} not found")
    path = given.absolute()  # its __file__, whatever the directory it is run from
    argv, sys.argv = sys.argv, [str(path), *args]
    try:
        module = _import_script(path)
    finally:
        sys.argv = argv
    return job_from_namespace(module, given.stem, path, str(given))


def job_from_namespace(namespace: Any, job_name: str, path: Path | None, where: str) -> Job:
    """
    Check the job's names (a job script's module, or L{octotwist.Job}'s
    fields) and get its functions ready to ship.

    @param where: what error messages call it (the script's path).
    @raise JobScriptError: a required name is missing or wrong, or a
        function cannot be pickled.
    """
    steps = getattr(namespace, "steps", None)
    required = ("source",) if steps is not None else _REQUIRED
    missing = [name for name in required if not hasattr(namespace, name)]
    if missing:
        raise JobScriptError(
            f"{where} does not define {', '.join(missing)}; a job script needs "
            "module-level source, mapfn(key, value) and reducefn(key, values) "
            "(or source and steps, a list of octotwist.Step)"
        )
    source = namespace.source
    if isinstance(source, (list, tuple, str, bytes, range)):
        raise JobScriptError(
            f"{where}: source is a {type(source).__name__}, whose items are not keys; "
            "make it a dict (for a list of items: source = dict(enumerate(items)))"
        )
    if not (hasattr(source, "__iter__") and hasattr(source, "__getitem__")):
        raise JobScriptError(
            f"{where}: source is a {type(source).__name__}; it must be a dict or an "
            "object with __iter__ (its keys) and __getitem__ (a key's value)"
        )
    functions: dict[str, Any] = {}
    for name in ("final", "setupfn", *(() if steps is not None else _STEP_FUNCTIONS)):
        fn = getattr(namespace, name, None)
        if (name in _REQUIRED or fn is not None) and not callable(fn):
            raise JobScriptError(f"{where}: {name} must be a function, not {type(fn).__name__}")
        functions[name] = fn
    reduce_tasks = getattr(namespace, "reduce_tasks", None)
    if not _is_count(reduce_tasks):
        raise JobScriptError(f"{where}: reduce_tasks must be a positive int, not {reduce_tasks!r}")
    final = functions.pop("final")
    setupfn = functions.pop("setupfn")
    job_steps = (Step(**functions),) if steps is None else _check_steps(steps, where)
    job_functions = JobFunctions(job_steps, setupfn)
    return Job(
        name=job_name,
        path=path,
        source=source,
        functions=job_functions,
        final=final,
        reduce_tasks=reduce_tasks,
        pickled_functions=_pickle_functions(job_functions, where),
    )


def _is_count(n: Any) -> bool:
    """Whether C{n} is C{None} or a positive int (a number of reduce tasks)."""
    return n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)


def _check_steps(steps: Any, where: str) -> tuple[Step, ...]:
    """
    A job's C{steps}, checked: a non-empty list of L{Step}, each with its
    functions callable.

    @raise JobScriptError: which step is wrong, and how.
    """
    if not isinstance(steps, (list, tuple)) or not steps:
        raise JobScriptError(
            f"{where}: steps must be a non-empty list of octotwist.Step, not {steps!r:.80}"
        )
    if len(steps) > codec.MAX_STEPS:
        raise JobScriptError(f"{where}: {len(steps)} steps; a job has at most {codec.MAX_STEPS}")
    for number, step in enumerate(steps, 1):
        if not isinstance(step, Step):
            raise JobScriptError(
                f"{where}: step {number} is a {type(step).__name__}, not an octotwist.Step; "
                "write steps = [Step(mapfn, reducefn), ...]"
            )
        for name in _STEP_FUNCTIONS:
            fn = getattr(step, name)
            if (name == "mapfn" or fn is not None) and not callable(fn):
                what = "missing" if fn is None else f"a {type(fn).__name__}, not a function"
                raise JobScriptError(f"{where}: step {number}: {name} is {what}")
        if step.combinefn is not None and step.reducefn is None:
            raise JobScriptError(
                f"{where}: step {number} has a combinefn but no reducefn: a map-only step's "
                "pairs are not grouped, so there is nothing to combine"
            )
        if not _is_count(step.reduce_tasks):
            raise JobScriptError(
                f"{where}: step {number}: reduce_tasks must be a positive int, "
                f"not {step.reduce_tasks!r}"
            )
    return tuple(steps)


#: The helper modules each job script's folder gave, by folder (L{_import_script}).
_HELPERS: dict[str, set[str]] = {}


def _own_helpers(directory: str) -> None:
    """
    Make C{import helper} in a script of C{directory} find that folder's
    C{helper.py}: forget the modules of the same names that other job
    scripts' folders gave this process (C{octo serve} loads many jobs, as
    L{octotwist.run} may), and put C{directory} first on C{sys.path}, as
    C{python path} would.  (The jobs loaded before keep theirs: their
    functions hold them, and they were shipped by value.)
    """
    for other, names in _HELPERS.items():
        if other == directory:
            continue
        for name in names:
            module = sys.modules.get(name)
            if module is not None and (getattr(module, "__file__", None) or "").startswith(
                other + os.sep
            ):
                del sys.modules[name]
    with contextlib.suppress(ValueError):
        sys.path.remove(directory)
    sys.path.insert(0, directory)


def _import_script(path: Path) -> Any:
    """Run the script as a fresh module, as C{python path} would, and return it."""
    name = "octo_job_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    directory = str(path.resolve().parent)
    try:
        code = compile(path.read_bytes(), str(path), "exec")
    except SyntaxError as e:
        raise JobScriptError(
            f"{e.filename}:{e.lineno}: syntax error in job script: {e.msg}\n"
            + "".join(traceback.format_exception_only(e))
        ) from None
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    _own_helpers(directory)
    before = set(sys.modules)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except Exception as e:
        del sys.modules[name]
        tb = traceback.format_exception(e)
        # Drop our own frames: the user wants to see their script's lines.
        user = [line for line in tb if "octotwist/job.py" not in line]
        raise JobScriptError(
            f"{path} raised {type(e).__name__} while it was loaded:\n" + "".join(user)
        ) from None
    # Ship the script, and helper modules it imported from its own folder, by
    # value: workers have neither.
    cloudpickle.register_pickle_by_value(module)
    for mod_name in set(sys.modules) - before - {name}:
        mod = sys.modules[mod_name]
        mod_file = getattr(mod, "__file__", None) or ""
        if mod_file.startswith(directory + os.sep) and "site-packages" not in mod_file:
            cloudpickle.register_pickle_by_value(mod)
            _HELPERS.setdefault(directory, set()).add(mod_name)
    return module


def _pickle_functions(functions: JobFunctions, where: str) -> bytes:
    named: list[tuple[str, Any]] = [("setupfn", functions.setupfn)]
    for number, step in enumerate(functions.steps, 1):
        prefix = f"step {number}: " if len(functions.steps) > 1 else ""
        named += [(prefix + name, getattr(step, name)) for name in _STEP_FUNCTIONS]
    for name, fn in named:
        if fn is None:
            continue
        try:
            codec.dump_functions(fn)
        except Exception as e:
            raise JobScriptError(
                f"{where}: {name} cannot be sent to workers (cloudpickle: "
                f"{type(e).__name__}: {e}); it uses something that cannot be pickled, "
                "such as an open file, a lock or a socket. Open such things inside "
                "the function instead."
            ) from None
    fns = [fn for _, fn in named if fn is not None]
    directory = shipping.job_directory(where, fns)
    modules = shipping.find_modules(fns, directory) if directory is not None else {}
    return codec.dump_functions(replace(functions, modules=modules))

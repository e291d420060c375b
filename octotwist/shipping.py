"""
Ship the job's own helper modules as source, for the imports a worker runs.

cloudpickle carries the job's functions by value, and with them the helper
modules the script imported when it was loaded (L{octotwist.job}).  What it
cannot carry is an C{import} that runs later: octo.py scripts write
C{from stopwords import allStopWords} inside C{reducefn}, with C{stopwords.py}
beside the script, and a worker on another machine (or in another directory)
has no such file.  So, on the server, L{find_modules} reads which modules the
functions import (the C{IMPORT_NAME} instructions of their code, nested code
included, and of whatever script or helper code they call), keeps those that
are C{.py} files or packages in the script's directory, and returns their
sources; in the worker process, L{install} puts a finder first on
C{sys.meta_path} that imports them from those sources, wherever the worker
runs.

Only the script's directory is searched, and never for a standard library
name: a module from site-packages is the worker's own business, as it is for
any import.
"""

from __future__ import annotations

import contextlib
import dis
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cloudpickle

#: Module name -> (file name, source).  A package's file name ends with
#: C{__init__.py} (a namespace package gets an empty one).
Modules = Mapping[str, tuple[str, str]]

_INIT = "__init__.py"


def job_directory(where: str, functions: Iterable[Any]) -> Path | None:
    """
    The directory whose modules are the job's own: the script's (C{where}
    is its path), or for a job built in Python (C{where} names it) the
    directory of the file that defines the first function, if any (a
    notebook's functions have none, and travel by value with C{__main__}).
    An installed package's directory is not the job's: C{None}.
    """
    script = Path(where)
    if not script.is_file():
        files = (getattr(f, "__globals__", {}).get("__file__") for f in functions)
        first = next((f for f in files if isinstance(f, str) and f), None)
        if first is None or not Path(first).is_file():
            return None
        script = Path(first)
    directory = script.resolve().parent
    if {"site-packages", "dist-packages"} & set(directory.parts):
        return None
    return directory


def find_modules(
    functions: Iterable[Any], directory: str | os.PathLike[str]
) -> dict[str, tuple[str, str]]:
    """
    The sources of the modules in C{directory} that C{functions} import,
    when they run or when they were loaded, and of the modules those import
    in turn; a package is shipped whole (each C{.py} file in it).

    A name that is already imported on the server from elsewhere (octotwist
    itself, when the script sits in its checkout) is not shipped: only the
    modules the script brought in by value (L{octotwist.job}) or that are
    not loaded yet.
    """
    root = Path(directory).resolve()
    names: set[str] = set()
    for code in _reachable_code(functions, root):
        names.update(_imported_tops(code))
    by_value = cloudpickle.list_registry_pickle_by_value()
    names.update(n.partition(".")[0] for n in by_value)
    shipped: dict[str, tuple[str, str]] = {}
    seen: set[str] = set()
    todo = sorted(names)
    while todo:
        top = todo.pop()
        if top in seen:
            continue
        seen.add(top)
        found = _sources_of(top, root, by_value)
        for name, (filename, source) in found.items():
            shipped[name] = (filename, source)
            try:
                code = compile(source, filename, "exec", dont_inherit=True)
            except SyntaxError:  # the import on the worker reports it, as it would here
                continue
            todo.extend(t for t in _imported_tops(code) if t not in seen)
    return dict(sorted(shipped.items()))


def _sources_of(top: str, root: Path, by_value: set[str]) -> dict[str, tuple[str, str]]:
    """The module or package C{top} as sources, if it is the job's own."""
    if not top.isidentifier() or top in sys.stdlib_module_names or top == "__main__":
        return {}
    loaded = sys.modules.get(top)
    if loaded is not None and top not in by_value:
        return {}
    spec = importlib.machinery.PathFinder.find_spec(top, [str(root)])
    if spec is None:
        return {}
    if spec.submodule_search_locations is not None:
        locations = list(spec.submodule_search_locations)
        if not locations:
            return {}
        if spec.origin is None:
            # A directory without __init__.py: the import system prefers a
            # regular package anywhere on the path to it (a folder named
            # like an installed package is not that package).
            anywhere = importlib.machinery.PathFinder.find_spec(top)
            if anywhere is not None and anywhere.origin is not None:
                return {}
        return _package_sources(top, Path(locations[0]))
    origin = spec.origin or ""
    if not origin.endswith(".py"):
        return {}  # an extension module or bytecode: not source we can ship
    return {top: (origin, _read(Path(origin)))}


def _package_sources(top: str, where: Path) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    init = where / _INIT
    out[top] = (str(init), _read(init) if init.is_file() else "")
    for dirpath, dirnames, filenames in os.walk(where):
        dirnames[:] = sorted(d for d in dirnames if d.isidentifier() and d != "__pycache__")
        here = Path(dirpath)
        package = ".".join([top, *here.relative_to(where).parts])
        if here != where:
            sub_init = here / _INIT
            out[package] = (str(sub_init), _read(sub_init) if sub_init.is_file() else "")
        for f in sorted(filenames):
            stem, ext = os.path.splitext(f)
            if ext == ".py" and stem != "__init__" and stem.isidentifier():
                out[f"{package}.{stem}"] = (str(here / f), _read(here / f))
    return out


def _read(path: Path) -> str:
    # As the import system decodes source: PEP 263 coding line, else UTF-8.
    return importlib.util.decode_source(path.read_bytes())


def _reachable_code(functions: Iterable[Any], root: Path) -> Iterator[types.CodeType]:
    """
    The code of C{functions} and of the script's or helpers' functions and
    classes they reach through their globals and closures, nested code
    included.  Code from outside C{root} (the standard library, installed
    packages) is not followed: its imports are not the job's.
    """
    seen: set[int] = set()
    todo = [f for f in functions if f is not None]
    prefix = str(root) + os.sep
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, type):
            todo.extend(_class_members(obj))
            continue
        fn = getattr(obj, "__func__", obj)  # a bound method
        code = getattr(fn, "__code__", None)
        if not isinstance(code, types.CodeType):
            continue
        if not os.path.abspath(code.co_filename).startswith(prefix):
            continue
        scope = getattr(fn, "__globals__", {})
        for c in _nested(code):
            yield c
            todo.extend(scope[n] for n in c.co_names if _followed(scope.get(n)))
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if _followed(value):
                todo.append(value)


def _followed(value: Any) -> bool:
    return isinstance(value, (types.FunctionType, types.MethodType, type))


def _class_members(cls: type) -> Iterator[Any]:
    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            yield from (f for f in (value.fget, value.fset, value.fdel) if f is not None)
            continue
        if isinstance(value, types.FunctionType):
            yield value


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const)


def _imported_tops(code: types.CodeType) -> set[str]:
    """Top-level names of the absolute imports in C{code} and its nested code."""
    tops: set[str] = set()
    for c in _nested(code):
        consts: list[Any] = []
        for ins in dis.get_instructions(c):
            if ins.opname == "LOAD_CONST":
                consts = [*consts[-1:], ins.argval]
            elif ins.opname == "IMPORT_NAME":
                # `import a.b` is LOAD_CONST level, LOAD_CONST fromlist,
                # IMPORT_NAME a.b; a relative import (level > 0) stays in
                # its package, which is shipped whole.
                level = consts[0] if len(consts) == 2 else 0
                if level == 0 and ins.argval:
                    tops.add(ins.argval.partition(".")[0])
                consts = []
            else:
                consts = []
    return tops


class ShippedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """
    Imports the modules L{find_modules} shipped, from their sources.  It is
    first on C{sys.meta_path}: the job's own C{stopwords.py} wins over one
    that happens to sit in the worker's current directory, as it did on the
    server.
    """

    def __init__(self, modules: Modules) -> None:
        self.modules = dict(modules)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        found = self.modules.get(fullname)
        if found is None:
            return None
        filename = found[0]
        is_package = os.path.basename(filename) == _INIT
        spec = importlib.machinery.ModuleSpec(
            fullname, self, origin=filename, is_package=is_package
        )
        if is_package:
            spec.submodule_search_locations = [os.path.dirname(filename)]
        spec.has_location = True  # sets __file__, as for a module from a file
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        filename, source = self.modules[module.__name__]
        code = compile(source, filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname: str) -> str:
        """For tracebacks (C{linecache}): the worker may have no such file."""
        return self.modules[fullname][1]


def install(modules: Modules) -> ShippedFinder | None:
    """Make C{modules} importable in this process (a worker's); C{None} if none."""
    if not modules:
        return None
    finder = ShippedFinder(modules)
    sys.meta_path.insert(0, finder)
    return finder


def uninstall(finder: ShippedFinder) -> None:
    """
    Undo L{install}: C{finder} leaves C{sys.meta_path}, and the modules it
    imported leave C{sys.modules}, so that the next job's module of the same
    name (another C{helper.py}) is imported from its own source, not found
    already there.  A module of the same name that C{finder} did not import
    (the worker's own, imported before the job was) stays.
    """
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(finder)
    for name in finder.modules:
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        if module is not None and getattr(spec, "loader", None) is finder:
            del sys.modules[name]

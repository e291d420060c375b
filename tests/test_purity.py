"""
The core knows no transport, and the scheduler and the shuffle stay sans-IO
(no Twisted, no sockets, no clock).

The core is every module under C{octotwist/}; C{octotwist.testing} may know
transports by name, through the hooks, and import none either.  The
transport packages are every installed plugin's: the modules the
C{octotwist} entry points name.  Both rules are checked twice: on the
source (every import statement, also inside functions, followed from module
to module within octotwist; a package's lazy C{__getattr__} aside) and on
what importing each module in a fresh interpreter really loads.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import octotwist

PACKAGE = Path(octotwist.__file__).parent

#: The top-level packages of every installed transport plugin.
TRANSPORTS = frozenset(ep.module.split(".")[0] for ep in entry_points(group="octotwist"))

PURE = ["octotwist.scheduler", "octotwist.shuffle"]
#: What a pure module may not import, directly or through another module.
NO_IO = frozenset({"twisted", "zope", "socket", "time", "asyncio", "select", "selectors",
                   "threading", "subprocess"})  # fmt: skip


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package in C{root}, by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


ALL = modules(PACKAGE, "octotwist")
CORE = sorted(m for m in ALL if not m.startswith("octotwist.testing"))
TESTING = sorted(m for m in ALL if m.startswith("octotwist.testing"))


def imports(path: Path, name: str) -> set[str]:
    """
    The dotted names a module's source imports anywhere in it (the module
    of C{from M import N}, and C{M.N} in case N is a submodule), relative
    imports resolved, and the literal names given to C{importlib.import_module}
    or C{__import__}.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    # A package's module-level __getattr__ (PEP 562: octotwist.run, imported
    # when first used) runs when an attribute the package lacks is looked
    # up, never because a submodule is imported: not followed.
    lazy: set[int] = set()
    if path.name == "__init__.py":
        for top in tree.body:
            if isinstance(top, ast.FunctionDef) and top.name == "__getattr__":
                lazy |= {id(n) for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                found.add(str(first.value))
    return found


def reachable(start: str, tree: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """
    Every name imported by C{start} or by a module of C{tree} it imports,
    with the chain of modules that leads to it.
    """
    seen = {start}
    queue = [(start, [start])]
    while queue:
        module, chain = queue.pop(0)
        for name in sorted(imports(tree[module], module)):
            yield name, chain
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                prefix = ".".join(parts[:i])
                if prefix in tree and prefix not in seen:
                    seen.add(prefix)
                    queue.append((prefix, [*chain, prefix]))


def offences(start: str, tree: dict[str, Path], forbidden: frozenset[str]) -> list[str]:
    return [
        f"{' -> '.join(chain)} imports {name}"
        for name, chain in reachable(start, tree)
        if name.split(".")[0] in forbidden
    ]


#: Run in a fresh interpreter: import a module; say which top-level modules
#: that loaded, and which imports of a transport package did not come
#: through the plugin manager (L{octotwist.hookspecs.plugin_manager} loading
#: the entry points, the one sanctioned way: the options of every transport
#: are declared as octo's commands are defined, for C{--help}).
PROBE = """
import importlib, json, os, sys, traceback
module, transports, HOOKSPECS = sys.argv[1], set(json.loads(sys.argv[2])), sys.argv[3]
direct = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in transports:
            stack = traceback.extract_stack()
            real = os.path.realpath
            if not any(f.name == "plugin_manager" and real(f.filename) == HOOKSPECS for f in stack):
                where = [f"{f.filename}:{f.lineno}" for f in stack if "importlib" not in f.filename]
                direct.append(f"{name}, from " + " <- ".join(reversed(where[:-1])))
        return None
sys.meta_path.insert(0, Watch())
before = set(sys.modules)
importlib.import_module(module)
seen = sys.modules.get("octotwist.hookspecs")
HOOKSPECS_SEEN = os.path.realpath(seen.__file__) if seen else None
loaded = sorted({n.split(".")[0] for n in set(sys.modules) - before})
print(json.dumps({"loaded": loaded, "direct": direct, "hookspecs": HOOKSPECS_SEEN}))
"""


def load(module: str) -> tuple[set[str], list[str]]:
    """
    What importing C{module} in a fresh interpreter loads: the top-level
    names it added to C{sys.modules}, and its imports of a transport
    package other than through the plugin manager.
    """
    r = subprocess.run(
        [
            sys.executable,
            "-P",  # not the current directory first: the octotwist under test, not the tree's
            "-c",
            PROBE,
            module,
            json.dumps(sorted(TRANSPORTS)),
            os.path.realpath(ALL["octotwist.hookspecs"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    # The same octotwist as this process's (an installed wheel, not the tree).
    # (A strict editable install links the tree's files: compare real paths.)
    assert report["hookspecs"] in (None, os.path.realpath(ALL["octotwist.hookspecs"])), report
    return set(report["loaded"]), report["direct"]


def test_the_transport_packages_are_found() -> None:
    # An empty set would let every test below pass.
    assert {"octotwist_tcp", "octotwist_http", "octotwist_ssh"} <= TRANSPORTS
    assert len(CORE) > 20 and "octotwist.scheduler" in CORE and "octotwist.testing" in TESTING


@pytest.mark.parametrize("module", CORE + TESTING)
def test_no_octotwist_module_imports_a_transport(module: str) -> None:
    assert not offences(module, ALL, TRANSPORTS)


@pytest.mark.parametrize("module", [m for m in CORE if not m.endswith("__main__")] + TESTING)
def test_importing_an_octotwist_module_imports_no_transport(module: str) -> None:
    _, direct = load(module)
    assert not direct


@pytest.mark.parametrize("module", CORE)
def test_core_modules_do_not_name_a_transport_package(module: str) -> None:
    text = ALL[module].read_text()
    assert not [t for t in TRANSPORTS if t in text], f"{module} names a transport package"


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io_and_no_transport(module: str) -> None:
    assert not offences(module, ALL, NO_IO | TRANSPORTS)
    loaded, _ = load(module)
    assert not loaded & (NO_IO | TRANSPORTS)


def test_the_checks_see_through_modules_functions_and_relative_imports(tmp_path: Path) -> None:
    """The source check finds a transport imported two modules away, lazily."""
    root = tmp_path / "fake"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "top.py").write_text("from .sub import helper\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "helper.py").write_text(
        "def later():\n    from octotwist_tcp import protocol\n"
        "def dynamic():\n    import importlib\n    importlib.import_module('twisted.web')\n"
    )
    (root / "clean.py").write_text("import json\n")
    tree = modules(root, "fake")
    assert offences("fake.top", tree, TRANSPORTS) == [
        "fake.top -> fake.sub.helper imports octotwist_tcp",
        "fake.top -> fake.sub.helper imports octotwist_tcp.protocol",
    ]
    assert offences("fake.top", tree, NO_IO) == ["fake.top -> fake.sub.helper imports twisted.web"]
    assert offences("fake.clean", tree, TRANSPORTS | NO_IO) == []

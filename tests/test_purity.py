"""The scheduler and the shuffle stay sans-IO: no Twisted, no sockets, no clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import octotwist

PURE = ["scheduler.py", "shuffle.py"]
FORBIDDEN = {"twisted", "socket", "time", "asyncio", "select", "threading", "octotwist_tcp"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io(module: str) -> None:
    tree = ast.parse((Path(octotwist.__file__).parent / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{module} imports {imported & FORBIDDEN}"


def test_core_imports_no_transport() -> None:
    for path in Path(octotwist.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "octotwist_tcp" not in text, f"{path.name} names a transport"

"""
Known failures of this transport in octotwist's conformance kit, marked
strict: once the plugin is fixed, the test passes, and the mark must go.
"""

from __future__ import annotations

import pytest

KNOWN: dict[str, str] = {}  # none today


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        reason = KNOWN.get(item.name)
        if reason is not None and item.path.name == "test_conformance.py":
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))

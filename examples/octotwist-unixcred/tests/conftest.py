"""
Known failures of this transport in octotwist's conformance kit, marked
strict: once the plugin is fixed, the test passes, and the mark must go.
"""

from __future__ import annotations

import pytest

KNOWN = {
    # A 32-byte first frame of zeros is an X25519 public key of low order:
    # Connection._open's exchange() raises ValueError ("Error computing shared
    # key"), which nothing catches, so the server logs "Unhandled Error" and a
    # traceback instead of one line, "malformed key exchange" (the connection
    # is dropped all the same, and nothing is decoded).
    "test_garbage_from_a_peer_does_not_disturb_the_job": (
        "an all-zero key share raises out of the key exchange (a traceback, not one line)"
    ),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        reason = KNOWN.get(item.name)
        if reason is not None and item.path.name == "test_conformance.py":
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))

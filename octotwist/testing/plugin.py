"""
The conformance kit's pytest plugin, loaded by pytest through the
C{pytest11} entry point whenever octotwist is installed.

It adds C{--octo-transport NAME} (default: C{$OCTO_TRANSPORT}) and the
C{octo} fixture the scenarios in L{octotwist.testing.conformance} use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from octotwist.testing.harness import Octo


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("octotwist", "octotwist transport conformance")
    group.addoption(
        "--octo-transport",
        default=None,
        metavar="NAME",
        help="the transport the conformance tests run over (default: $OCTO_TRANSPORT, else tcp)",
    )


@pytest.fixture
def octo_transport(request: pytest.FixtureRequest) -> str:
    """The transport under test."""
    return request.config.getoption("--octo-transport") or os.environ.get("OCTO_TRANSPORT", "tcp")


@pytest.fixture
def octo(octo_transport: str, tmp_path: Path) -> Iterator[Octo]:
    """Runs C{octo} servers and clients over the transport under test."""
    runner = Octo(octo_transport, tmp_path)
    try:
        yield runner
    finally:
        runner.close()

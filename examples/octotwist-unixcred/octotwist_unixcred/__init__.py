"""
octotwist-unixcred: an example third-party octotwist transport.

Workers on the server's machine connect over a Unix-domain socket, and the
kernel vouches for who they are (C{SO_PEERCRED}): only the users allowed
(by default, the server's own) get past the first frame.

This module is what the C{octotwist} entry point in setup.cfg names: it
provides the transport, and tells the conformance kit how to test it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from octotwist.hookspecs import hookimpl
from octotwist.transport import Option, TestSetup, Transport
from octotwist_unixcred.transport import UnixCredClient, UnixCredServer, default_socket


@dataclass(frozen=True)
class UnixCredTransport(Transport):
    """Listens on a Unix socket, not on a TCP port."""

    def default_listen(self, local_only: bool) -> str:
        return f"unix:{default_socket()}"

    def local_listen(self, directory: Path) -> str:
        return f"unix:{directory / 'octo.sock'}"


TRANSPORT = UnixCredTransport(
    name="unixcred",
    description="Unix-domain socket on this machine; the kernel vouches for the peer's "
    "user id (example plugin)",
    server=UnixCredServer,
    client=UnixCredClient,
    server_options=[
        Option("allow-uid", "Comma-separated user ids allowed to connect (default: our own)."),
    ],
)


@hookimpl
def octotwist_transports() -> list[Transport]:
    return [TRANSPORT]


@hookimpl
def octotwist_test_setup(transport: str, directory: Path) -> TestSetup | None:
    if transport != TRANSPORT.name:
        return None
    # Socket paths are limited to 107 bytes; pytest's directories are long.
    sock = Path(tempfile.mkdtemp(prefix="unixcred-")) / "octo.sock"
    return TestSetup(
        listen=f"unix:{sock}",
        address=f"unix:{sock}",
        # A server that allows only another user refuses us.
        refused_server_args=["--allow-uid", str(os.getuid() + 4242)],
        uses_secret=False,  # the kernel vouches for the user; there is no secret
    )

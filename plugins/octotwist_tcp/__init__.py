"""
octotwist's native TCP transport, as a plugin.

Registered under the C{octotwist} entry-point group in octotwist's setup.cfg,
exactly as a third-party distribution would register its own transport.
"""

from __future__ import annotations

from octotwist.hookspecs import hookimpl
from octotwist.transport import Option, Transport
from octotwist_tcp.transport import TCPTaskClient, TCPTaskServer

TRANSPORT = Transport(
    name="tcp",
    description="length-prefixed frames over any stream endpoint (tcp:, tls:, unix:), "
    "HMAC-SHA256 challenge-response on the shared secret, every frame sealed (AES-GCM)",
    server=TCPTaskServer,
    client=TCPTaskClient,
    default_port=18125,
    client_options=(
        Option(
            "insecure-tls",
            "Accept an ssl: endpoint without hostname=, which checks neither the "
            "server's certificate nor its name (the secret still protects every frame).",
            flag=True,
        ),
    ),
)


@hookimpl
def octotwist_transports() -> list[Transport]:
    return [TRANSPORT]

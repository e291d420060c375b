"""
octotwist's HTTP transport, as a plugin: sessions, long polls and streamed
bodies over twisted.web (server) and treq (client), on plain HTTP or HTTPS.

Registered under the C{octotwist} entry-point group in octotwist's setup.cfg,
exactly as a third-party distribution would register its own transport.  The
client needs treq (C{pip install octotwist[http]}); it is imported only when
a client is used, so a missing treq never breaks the other transports.
"""

from __future__ import annotations

from octotwist.hookspecs import hookimpl
from octotwist.transport import Option, Transport
from octotwist_http.wire import DEFAULT_PORT

TRANSPORT = Transport(
    name="http",
    description="HTTP(S) long polls and streamed bodies (twisted.web + treq); "
    "HMAC tokens on the shared secret; the status page on the same port",
    # Imported when the transport is used: twisted.web and treq are not
    # every command's business.
    server="octotwist_http.server:HTTPTaskServer",
    client="octotwist_http.client:HTTPTaskClient",
    default_port=DEFAULT_PORT,
    client_options=(
        Option(
            "ca-file",
            "PEM file of the CA certificate(s) an https:// server's certificate must "
            "chain to (default: the system's trusted CAs).",
        ),
    ),
)


@hookimpl
def octotwist_transports() -> list[Transport]:
    return [TRANSPORT]

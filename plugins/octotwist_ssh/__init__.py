"""
octotwist's SSH transport, as a plugin: workers log in to a Twisted Conch
SSH server with keys (or the shared secret) and open its C{octo} subsystem,
which carries the same frames as the TCP transport.

Registered under the C{octotwist} entry-point group in octotwist's setup.cfg,
exactly as a third-party distribution would register its own transport.
The user's guide is docs/ssh.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from octotwist.hookspecs import hookimpl
from octotwist.transport import Option, TestSetup, Transport

#: The port C{octo server -t ssh} listens on by default.
DEFAULT_PORT = 18122

TRANSPORT = Transport(
    name="ssh",
    description="an SSH server (Twisted Conch) with an `octo` subsystem; workers log in "
    "with keys (authorized_keys, known_hosts) or the shared secret",
    # Imported when the transport is used: Conch and cryptography are not
    # every command's business.
    server="octotwist_ssh.server:SSHTaskServer",
    client="octotwist_ssh.client:SSHTaskClient",
    default_port=DEFAULT_PORT,
    server_options=(
        Option(
            "host-key",
            "SSH host key file (OpenSSH format, no passphrase). Default: "
            "~/.config/octotwist/ssh_host_ed25519_key, generated on first use.",
        ),
        Option(
            "authorized-keys",
            "OpenSSH authorized_keys file: only these keys may log in. Without it, "
            "clients log in with the shared secret.",
        ),
    ),
    client_options=(
        Option("identity", "Private key to log in with (ed25519, RSA, ECDSA; OpenSSH format)."),
        Option(
            "identity-passphrase-file",
            "File holding the --identity key's passphrase (else ssh-agent is used).",
        ),
        Option(
            "known-hosts",
            "OpenSSH known_hosts file that must list the server's host key "
            "([HOST]:PORT or HOST lines).",
        ),
        Option(
            "host-key-fingerprint",
            "The server's host key fingerprint, SHA256:... (as ssh-keygen -lf prints it); "
            "several may be given, comma-separated.",
        ),
    ),
)


@hookimpl
def octotwist_transports() -> list[Transport]:
    return [TRANSPORT]


@hookimpl
def octotwist_test_setup(transport: str, directory: Path) -> TestSetup | None:
    """
    Keys for the conformance tests: a host key, a client ed25519 key and an
    authorized_keys file listing it; a stranger's key and an authorized_keys
    file without the client's, for the refusals.  The client pins the host
    key by fingerprint: a known_hosts line would need the port, which the
    tests pick later.
    """
    if transport != "ssh":
        return None
    from octotwist_ssh import keys

    host_key = _new_key(directory / "ssh_host_ed25519_key")
    client_key = _new_key(directory / "id_ed25519")
    stranger_key = _new_key(directory / "id_stranger")
    authorized = directory / "authorized_keys"
    authorized.write_text(keys.public_line(client_key, "octotwist-test") + "\n")
    others = directory / "authorized_keys_others"
    others.write_text(keys.public_line(stranger_key, "someone-else") + "\n")
    return TestSetup(
        server_args=[
            "--host-key",
            str(directory / "ssh_host_ed25519_key"),
            "--authorized-keys",
            str(authorized),
        ],
        client_args=[
            "--identity",
            str(directory / "id_ed25519"),
            "--host-key-fingerprint",
            keys.fingerprint(host_key),
        ],
        refused_client_args=["--identity", str(directory / "id_stranger")],
        refused_server_args=["--authorized-keys", str(others)],
        uses_secret=False,  # with --authorized-keys, only keys count
    )


def _new_key(path: Path) -> Any:
    from octotwist_ssh import keys

    key = keys.generate_ed25519()
    keys.write_private_key(key, path)
    return key

"""
The shared secret, and the HMAC-SHA256 proofs built on it.

Every transport that authenticates with the shared secret (TCP, HTTP) uses
these helpers, so the rules are the same everywhere:

  - C{--secret-file PATH} or the C{OCTO_SECRET} environment variable configure
    a secret explicitly;
  - otherwise a server generates one and stores it, mode 0600, in
    L{default_secret_path}, where a client on the same machine finds it, so a
    one-machine job needs no flags;
  - a server asked to accept connections from other machines refuses to start
    without an explicitly configured secret (a generated one would only be
    known to this machine anyway).

The proofs are challenge-response: each side sends a fresh random nonce and
answers the other's with C{HMAC(secret, role + their_nonce + my_nonce)}, so a
recorded exchange cannot be replayed and neither side learns anything about
the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from octotwist.errors import UsageError

SECRET_ENV = "OCTO_SECRET"
NONCE_SIZE = 32
DIGEST_SIZE = hashlib.sha256().digest_size


def default_secret_path() -> Path:
    """C{$XDG_CONFIG_HOME/octotwist/secret}, or C{~/.config/octotwist/secret}."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "octotwist" / "secret"


def configured_secret(secret_file: str | None) -> bytes | None:
    """
    The secret the user configured (C{--secret-file}, else C{$OCTO_SECRET}),
    or C{None}.

    @raise UsageError: the file cannot be read or is empty.
    """
    if secret_file:
        try:
            secret = Path(secret_file).read_bytes().strip()
        except OSError as e:
            raise UsageError(f"cannot read secret file {secret_file!r}: {e.strerror}") from None
        if not secret:
            raise UsageError(f"secret file {secret_file!r} is empty")
        return secret
    env = os.environ.get(SECRET_ENV, "").strip()
    return env.encode() if env else None


def server_secret(secret_file: str | None) -> bytes:
    """
    The configured secret, or the local default one, created (0600) on first use.
    """
    secret = configured_secret(secret_file)
    if secret is not None:
        return secret
    path = default_secret_path()
    if path.exists():
        return _read_default(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token + b"\n")
    return token


def client_secret(secret_file: str | None) -> bytes:
    """
    The configured secret, or the local default one a server stored.

    @raise UsageError: there is neither.
    """
    secret = configured_secret(secret_file)
    if secret is not None:
        return secret
    path = default_secret_path()
    if path.exists():
        return _read_default(path)
    raise UsageError(
        f"no shared secret: pass --secret-file PATH or set {SECRET_ENV} to the "
        f"server's secret (a server on this machine stores its own in {path})"
    )


def _read_default(path: Path) -> bytes:
    secret = path.read_bytes().strip()
    if not secret:
        raise UsageError(f"{path} is empty; delete it and start the server again")
    return secret


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def proof(secret: bytes, role: bytes, challenge: bytes, response_nonce: bytes) -> bytes:
    """C{HMAC-SHA256(secret, role || challenge || response_nonce)}."""
    return hmac.new(secret, role + challenge + response_nonce, hashlib.sha256).digest()


def check_proof(
    secret: bytes, role: bytes, challenge: bytes, response_nonce: bytes, got: bytes
) -> bool:
    """Whether C{got} is the right proof, compared in constant time."""
    return hmac.compare_digest(proof(secret, role, challenge, response_nonce), got)

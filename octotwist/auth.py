"""
The shared secret, and the HMAC-SHA256 proofs built on it.

Every transport that authenticates with the shared secret (TCP, HTTP, SSH
without keys) gets it from here, so the rules are the same everywhere:

  - C{--secret-file PATH} or the C{OCTO_SECRET} environment variable configure
    a secret explicitly;
  - otherwise a server generates one and stores it, mode 0600, in
    L{default_secret_path}, where a client on the same machine finds it, so a
    one-machine job needs no flags;
  - a server asked to accept connections from other machines refuses to start
    without an explicitly configured secret (a generated one would only be
    known to this machine anyway);
  - a secret shorter than L{MIN_SECRET_LENGTH} characters is refused, and so
    is a secret file that group or others may read or change (as OpenSSH
    refuses such a private key): see L{check_secret} and L{check_file_mode}.

The proofs are challenge-response: each side sends a fresh random nonce and
answers the other's with C{HMAC(secret, role + their_nonce + my_nonce)}, so a
recorded exchange cannot be replayed.  But the client proves itself first, so
whoever poses as the server (a DNS entry, an address taken over) gets one such
HMAC and can test guesses of the secret against it offline, as fast as his
hardware allows: a 3-character secret falls in well under a second.  A long
random secret (L{new_secret}, C{octo secret}) makes that hopeless.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shlex
import stat
from pathlib import Path

from octotwist.errors import UsageError

SECRET_ENV = "OCTO_SECRET"
NONCE_SIZE = 32
DIGEST_SIZE = hashlib.sha256().digest_size

#: The shortest secret accepted, in characters.  Sixteen characters a person
#: chose are still weak against an offline search; the point of the limit is
#: to refuse the obviously guessable ("x", "secret"), and the error offers
#: L{new_secret}'s 43 random characters (256 bits) instead.
MIN_SECRET_LENGTH = 16

#: The command that makes a good secret file, for error messages and help.
MAKE_SECRET = "octo secret -o octo-secret"


def new_secret() -> str:
    """A fresh random secret: 32 bytes from L{secrets}, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def default_secret_path() -> Path:
    """C{$XDG_CONFIG_HOME/octotwist/secret}, or C{~/.config/octotwist/secret}."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "octotwist" / "secret"


def check_secret(secret: bytes, where: str, fix: str | None = None) -> bytes:
    """
    Return C{secret} if it is long enough to be worth having.

    @param where: where it came from, for the message (C{"$OCTO_SECRET"},
        C{"secret file 'x'"}).
    @param fix: what to do about it, if not the usual advice.
    @raise UsageError: it is shorter than L{MIN_SECRET_LENGTH} characters.
    """
    length = len(secret.decode("utf-8", "replace"))
    if length >= MIN_SECRET_LENGTH:
        return secret
    fix = fix or (
        f"make a good one with `{MAKE_SECRET}` and pass --secret-file octo-secret "
        "to the server and every worker"
    )
    raise UsageError(
        f"the secret in {where} is too short: {length} character{'s' if length != 1 else ''}, "
        f"at least {MIN_SECRET_LENGTH} are needed (a fake server could guess a short one "
        f"offline from a single connection attempt); {fix}"
    )


def check_file_mode(path: Path | str, mode: int) -> None:
    """
    Refuse a secret file that group or others may read or change: whoever
    reads it can run code on the server and on every worker.  Only regular
    files are checked (a pipe, as from C{--secret-file <(pass show octo)},
    is read once and gone); on systems without Unix modes nothing is.

    @param mode: the file's C{st_mode}.
    @raise UsageError: the file is open to group or others.
    """
    if os.name != "posix" or not stat.S_ISREG(mode) or not mode & 0o077:
        return
    raise UsageError(
        f"secret file {str(path)!r} has mode {stat.S_IMODE(mode):04o}: group or others "
        "may read or change it, and whoever reads it can run code on the server and on "
        f"every worker. Make it private with: chmod 600 {_quote(path)}"
    )


def _quote(path: Path | str) -> str:
    return shlex.quote(str(path))


def _read_secret_file(path: Path | str) -> bytes:
    """
    The contents of a secret file, stripped, once its mode checked out.

    @raise UsageError: it cannot be read, or group or others may read it.
    """
    try:
        with open(path, "rb") as f:
            check_file_mode(path, os.fstat(f.fileno()).st_mode)
            return f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read secret file {str(path)!r}: {e.strerror}") from None


def configured_secret(secret_file: str | None) -> bytes | None:
    """
    The secret the user configured (C{--secret-file}, else C{$OCTO_SECRET}),
    or C{None}.

    @raise UsageError: the file cannot be read, is empty, is open to group
        or others, or the secret is too short (L{MIN_SECRET_LENGTH}).
    """
    if secret_file:
        secret = _read_secret_file(secret_file)
        if not secret:
            raise UsageError(
                f"secret file {secret_file!r} is empty; make a good one with `{MAKE_SECRET}`"
            )
        return check_secret(secret, f"secret file {secret_file!r}")
    env = os.environ.get(SECRET_ENV, "").strip()
    return check_secret(env.encode(), f"${SECRET_ENV}") if env else None


def create_secret_file(path: Path) -> bytes:
    """
    Write a L{new_secret} to C{path}, a new file, mode 0600 from the start
    (never readable by others, whatever the umask), and return it.

    @raise FileExistsError: C{path} exists; it is left alone.
    @raise OSError: it cannot be created.
    """
    secret = new_secret().encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return secret


def server_secret(secret_file: str | None) -> bytes:
    """
    The configured secret, or the local default one, created (0600) on first use.

    @raise UsageError: see L{configured_secret}; or the default file is
        empty, too short or open to group or others.
    """
    secret = configured_secret(secret_file)
    if secret is not None:
        return secret
    path = default_secret_path()
    if path.exists():
        return _read_default(path)
    make_private_directories(path.parent)
    try:
        return create_secret_file(path)
    except FileExistsError:  # another server on this machine was quicker
        return _read_default(path)


def make_private_directories(directory: Path) -> None:
    """
    Make C{directory} and its missing parents, each 0700 whatever the umask
    (C{mkdir(parents=True, mode=...)} applies the mode to the last one only,
    and the umask to all: under umask 000, C{~/.config} came out 0777).
    """
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another process made it first: its mode is its business
        os.chmod(d, 0o700)


def client_secret(secret_file: str | None) -> bytes:
    """
    The configured secret, or the local default one a server stored.

    @raise UsageError: there is neither, or the one there is was refused
        (see L{server_secret}).
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
    """The generated secret in C{path}, held to the same rules as a configured one."""
    secret = _read_secret_file(path)
    again = f"delete it (rm {_quote(path)}) and start the server again: it makes a new one"
    if not secret:
        raise UsageError(f"{path} is empty; {again}")
    return check_secret(secret, str(path), fix=again)


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

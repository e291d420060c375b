"""
Keys and the files that hold them: host keys, identities, authorized_keys
and known_hosts, all in OpenSSH's formats so that keys made with
C{ssh-keygen} work unchanged and a real OpenSSH client can talk to the server.

Fingerprints are written as OpenSSH prints them (C{SHA256:} + unpadded
base64 of the key blob), so what C{ssh-keygen -lf KEY} shows is what
C{--host-key-fingerprint} takes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch.ssh.keys import BadKeyError, EncryptedKeyError, Key
from twisted.logger import Logger

from octotwist.auth import make_private_directories
from octotwist.errors import UsageError

_log = Logger()

#: File name of the host key generated when C{--host-key} is not given.
DEFAULT_HOST_KEY_NAME = "ssh_host_ed25519_key"
#: Modes of the files we write, whatever the umask: a private key only its
#: owner reads; a public key anyone reads and only its owner changes (a
#: writable one lets another user swap the fingerprint people trust).
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

#: Key types an authorized_keys or known_hosts line may name.
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
    }
)


def fingerprint(key: Key) -> str:
    """The key's SHA256 fingerprint, exactly as OpenSSH prints it."""
    digest = hashlib.sha256(key.blob()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def normalize_fingerprint(text: str) -> str:
    """
    C{SHA256:abc} with or without base64 padding, in OpenSSH's form.

    @raise ValueError: C{text} is not a SHA256 fingerprint.
    """
    text = text.strip()
    if not text.startswith("SHA256:"):
        raise ValueError(
            f"{text!r} is not a SHA256 fingerprint (it looks like SHA256:4c2rTn..., "
            "as `ssh-keygen -lf KEY.pub` prints it)"
        )
    body = text[len("SHA256:") :].rstrip("=")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{text!r} is not a SHA256 fingerprint (bad base64 or length)")
    return "SHA256:" + body


def public_line(key: Key, comment: str = "") -> str:
    """The one-line OpenSSH public key (what a C{.pub} file holds)."""
    line = key.public().toString("openssh").decode("ascii")
    return f"{line} {comment}".rstrip()


# Host keys


def default_host_key_path() -> Path:
    """C{$XDG_CONFIG_HOME/octotwist/ssh_host_ed25519_key} (default C{~/.config/...})."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "octotwist" / DEFAULT_HOST_KEY_NAME


def load_host_key(path: str | None) -> tuple[Key, Path]:
    """
    The server's private host key: from C{path}, or from the default location,
    where one is generated (0600) on first use.

    @raise UsageError: C{path} is missing, unreadable, encrypted or not a key.
    """
    if path is None:
        default = default_host_key_path()
        if not default.exists():
            key = generate_ed25519()
            write_private_key(key, default)
            _log.info(
                "generated SSH host key {path} ({fingerprint})",
                path=str(default),
                fingerprint=fingerprint(key),
            )
        key = _read_private(default, "host key", None)
        _repair_modes(key, default)
        return key, default
    given = Path(path).expanduser()
    if not given.exists():
        raise UsageError(
            f"--host-key {path}: no such file. Create one with "
            f"`ssh-keygen -t ed25519 -N '' -f {path}`, or leave --host-key out to use "
            f"(and on first use generate) {default_host_key_path()}"
        )
    return _read_private(given, "--host-key", None), given


def generate_ed25519() -> Key:
    return Key(ed25519.Ed25519PrivateKey.generate())


def generate_rsa(bits: int = 3072) -> Key:
    return Key(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def write_private_key(key: Key, path: Path, passphrase: bytes | None = None) -> None:
    """
    Write C{key} in OpenSSH's format, mode 0600, and its public half to
    C{PATH.pub}, mode 0644, whatever the umask; missing directories are
    made 0700.  Atomically: two servers starting at once both end up with
    the same key, never a half-written one.
    """
    _make_directories(path.parent)
    data = key.toString("openssh", subtype="v1", passphrase=passphrase)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_new(tmp, data, PRIVATE_MODE)
    try:
        os.link(tmp, path)  # fails if another process got there first
    except FileExistsError:
        return  # theirs wins; the caller reads it back from the file
    finally:
        tmp.unlink()
    _write_public(key, path)


def _write_public(key: Key, path: Path) -> None:
    """C{PATH.pub}, mode 0644, replaced atomically."""
    public = path.with_name(path.name + ".pub")
    tmp = public.with_name(f".{public.name}.{os.getpid()}.tmp")
    _write_new(tmp, (public_line(key, "octotwist") + "\n").encode("ascii"), PUBLIC_MODE)
    try:
        os.replace(tmp, public)
    except OSError:
        tmp.unlink()
        raise


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create C{path} afresh with exactly C{mode} (never through a symlink)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a leftover of a crashed run with our pid
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask only ever narrows the mode open() got
        f.write(data)


def _make_directories(directory: Path) -> None:
    """Make C{directory} and its missing parents, each 0700 whatever the umask."""
    make_private_directories(directory)


def _repair_modes(key: Key, path: Path) -> None:
    """
    Give the generated host key and its C{.pub} their modes back if an older
    octotwist (or a umask of 000) left them open to others, and say so.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, PRIVATE_MODE)
        _log.warn(
            "SSH host key {path} was mode {mode:04o}, readable by others: made it 0600. "
            "If someone else may have read it, delete it (and its .pub) to get a new one",
            path=str(path),
            mode=mode,
        )
    public = path.with_name(path.name + ".pub")
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(public.lstat().st_mode)
        if mode & 0o022 or not stat.S_ISREG(public.lstat().st_mode):
            _write_public(key, path)
            _log.warn(
                "{public} was writable by others (mode {mode:04o}): rewrote it from the "
                "host key, mode 0644",
                public=str(public),
                mode=mode,
            )


def _read_private(path: Path, what: str, passphrase: bytes | None) -> Key:
    try:
        return Key.fromFile(str(path), passphrase=passphrase)
    except EncryptedKeyError:
        raise UsageError(
            f"{what} {path} is passphrase-protected; a server needs a key without "
            f"passphrase (`ssh-keygen -p -N '' -f {path}` removes it)"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
    except (BadKeyError, ValueError) as e:
        raise UsageError(f"{what} {path} is not an SSH private key ({e})") from None


# Identities (the client's keys)


@dataclass(frozen=True)
class Identity:
    """
    A client key: its public half always, its private half when the file
    could be opened (else an ssh-agent has to sign with it).
    """

    path: Path
    public: Key
    private: Key | None


def load_identity(path: str, passphrase_file: str | None, agent_available: bool) -> Identity:
    """
    Read the key C{--identity} names.

    A passphrase-protected key is opened with C{--identity-passphrase-file};
    without one, its public half (C{PATH.pub}) is used and an ssh-agent must
    hold the key.

    @raise UsageError: the file is missing or not a key, the passphrase is
        wrong, or the key is protected and there is neither a passphrase file
        nor an agent.
    """
    key_path = Path(path).expanduser()
    passphrase = None
    if passphrase_file:
        try:
            passphrase = Path(passphrase_file).expanduser().read_bytes().rstrip(b"\r\n")
        except OSError as e:
            raise UsageError(
                f"cannot read --identity-passphrase-file {passphrase_file}: {e.strerror}"
            ) from None
    try:
        private = Key.fromFile(str(key_path), passphrase=passphrase)
    except EncryptedKeyError as e:
        if passphrase is not None:
            raise UsageError(
                f"--identity {path}: the passphrase in {passphrase_file} does not open it ({e})"
            ) from None
        public = _public_half(key_path)
        if public is None or not agent_available:
            raise UsageError(
                f"--identity {path} is passphrase-protected: pass "
                "--identity-passphrase-file FILE, or load it into an ssh-agent "
                f"(`ssh-add {path}`) and set SSH_AUTH_SOCK"
                + ("" if public is not None else f" (the agent needs {path}.pub beside it)")
            ) from None
        return Identity(key_path, public, None)
    except OSError as e:
        raise UsageError(f"cannot read --identity {path}: {e.strerror}") from None
    except (BadKeyError, ValueError) as e:
        raise UsageError(f"--identity {path} is not an SSH private key ({e})") from None
    if private.isPublic():
        raise UsageError(
            f"--identity {path} is a public key; give the private key file (without .pub)"
        )
    return Identity(key_path, private.public(), private)


def _public_half(key_path: Path) -> Key | None:
    try:
        return Key.fromFile(str(key_path) + ".pub")
    except (OSError, BadKeyError, ValueError):
        return None


# authorized_keys


def parse_key_line(line: str) -> tuple[str, Key] | None:
    """
    The options field (or C{""}) and the key of one authorized_keys line;
    C{None} for blank lines and comments.

    @raise ValueError: the line is not a key line.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    fields = _split_options(line)
    for i, field in enumerate(fields):
        if field in KEY_TYPES and i + 1 < len(fields):
            options = " ".join(fields[:i])
            try:
                key = Key.fromString(f"{field} {fields[i + 1]}".encode("ascii"))
            except (BadKeyError, ValueError, UnicodeEncodeError) as e:
                raise ValueError(f"bad {field} key ({e})") from None
            return options, key
    raise ValueError("no key type (ssh-ed25519, ssh-rsa, ecdsa-sha2-*) on the line")


def _split_options(line: str) -> list[str]:
    """Split on spaces outside double quotes (options may quote spaces)."""
    fields, current, quoted = [], "", False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        if ch in " \t" and not quoted:
            if current:
                fields.append(current)
            current = ""
        else:
            current += ch
    if current:
        fields.append(current)
    return fields


class AuthorizedKeys:
    """
    The keys in an OpenSSH authorized_keys file, re-read whenever the file
    changes, so adding a worker's key takes effect without a restart.

    Lines with options (C{from=}, C{command=}, C{restrict}...) are skipped
    with a warning: octotwist cannot enforce them, and ignoring a C{from=}
    restriction would let in more than the line allows.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        self._stamp: tuple[float, int] | None = None
        self._keys: frozenset[bytes] = frozenset()
        self.load()

    def load(self) -> None:
        """
        @raise UsageError: the file cannot be read.
        """
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UsageError(f"cannot read --authorized-keys {self.path}: {e.strerror}") from None
        blobs = set()
        for number, line in enumerate(text.splitlines(), 1):
            try:
                parsed = parse_key_line(line)
            except ValueError as e:
                _log.warn("{path}:{n}: ignored: {why}", path=str(self.path), n=number, why=e)
                continue
            if parsed is None:
                continue
            options, key = parsed
            if options:
                _log.warn(
                    "{path}:{n}: ignored: key options ({options}) are not supported",
                    path=str(self.path),
                    n=number,
                    options=options,
                )
                continue
            blobs.add(key.blob())
        if not blobs:
            _log.warn(
                "{path} lists no usable key: every client will be refused", path=str(self.path)
            )
        self._keys = frozenset(blobs)
        self._stamp = (stat.st_mtime, stat.st_size)

    def __contains__(self, key: Key) -> bool:
        try:
            stat = self.path.stat()
            if (stat.st_mtime, stat.st_size) != self._stamp:
                self.load()
        except (OSError, UsageError) as e:
            _log.warn(
                "cannot re-read {path} ({e}); using the keys read before", path=str(self.path), e=e
            )
        return key.blob() in self._keys


# known_hosts


class HostKeyError(Exception):
    """The server's host key is unknown or differs from the one on record."""


def known_host_names(host: str, port: int) -> list[str]:
    """
    The names a known_hosts line may list for C{host:port}: OpenSSH's
    C{[host]:port} (plain C{host} for port 22), and also plain C{host} for
    other ports, so that a line written before the port was known (or by
    C{ssh-keyscan host}) still pins the key.
    """
    names = [host if port == 22 else f"[{host}]:{port}"]
    if port != 22:
        names.append(host)
    return names


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            _, _, salt, digest = pattern.split("|")
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(base64.b64encode(mac).decode(), digest)
        except ValueError:
            return False
    # OpenSSH patterns know only * and ?; brackets are literal ("[host]:port").
    regex = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()
    )
    return re.fullmatch(regex, name.lower()) is not None


def _line_matches(patterns: str, name: str) -> bool:
    matched = False
    for pattern in patterns.split(","):
        if pattern.startswith("!"):
            if _pattern_matches(pattern[1:], name):
                return False
        elif _pattern_matches(pattern, name):
            matched = True
    return matched


def check_known_hosts(path: str, host: str, port: int, key: Key) -> None:
    """
    Check C{key} against the OpenSSH known_hosts file at C{path}.

    @raise HostKeyError: the host is not listed, is listed with other keys,
        or the key is marked C{@revoked}; the message says how to fix it.
    @raise UsageError: the file cannot be read.
    """
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read --known-hosts {path}: {e.strerror}") from None
    fp = fingerprint(key)
    trust = _trust_hint(path, host, port, key)
    for name in known_host_names(host, port):
        others = []
        for line in lines.splitlines():
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = ""
            if fields[0].startswith("@"):
                marker, fields = fields[0], fields[1:]
            if len(fields) < 3 or not _line_matches(fields[0], name):
                continue
            try:
                listed = Key.fromString(f"{fields[1]} {fields[2]}".encode("ascii"))
            except (BadKeyError, ValueError, UnicodeEncodeError):
                continue
            if marker == "@revoked" and listed.blob() == key.blob():
                raise HostKeyError(
                    f"the host key of {host}:{port} ({fp}) is marked @revoked in {path}"
                )
            if marker:
                continue  # @cert-authority: certificates are not supported
            if listed.blob() == key.blob():
                return
            others.append(fingerprint(listed))
        if others:
            raise HostKeyError(
                f"HOST KEY MISMATCH for {host}:{port}: the server presented {fp}, but {path} "
                f"lists {', '.join(others)} for {name}. Someone may be intercepting the "
                "connection, or the server's host key was replaced. If you know it was "
                f"replaced, remove the old line ({_remove_hint(path, host, port)}) and {trust}"
            )
    raise HostKeyError(
        f"the host key of {host}:{port} ({fp}) is not in {path}; refusing to trust it. "
        f"If that is the server's key (on the server: ssh-keygen -lf HOST_KEY.pub), {trust}"
    )


def _trust_hint(path: str, host: str, port: int, key: Key) -> str:
    name = known_host_names(host, port)[0]
    return (
        f"add this line to {path}:\n    {name} {public_line(key)}\n"
        f"or pass --host-key-fingerprint {fingerprint(key)}"
    )


def _remove_hint(path: str, host: str, port: int) -> str:
    name = known_host_names(host, port)[0]
    return f"ssh-keygen -R '{name}' -f {path}"


def check_fingerprints(allowed: Iterable[str], host: str, port: int | None, key: Key) -> None:
    """
    @raise HostKeyError: C{key}'s fingerprint is none of C{allowed}.
    """
    fp = fingerprint(key)
    allowed = list(allowed)
    if fp in allowed:
        return
    where = f"{host}:{port}" if port else host
    raise HostKeyError(
        f"HOST KEY MISMATCH for {where}: the server presented {fp}, but "
        f"{' or '.join(allowed)} was expected (--host-key-fingerprint). Someone may be "
        "intercepting the connection, or the server's host key was replaced; if you know "
        f"it was, pass --host-key-fingerprint {fp}"
    )

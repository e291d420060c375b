"""
The hosts C{--hosts} and C{--hostfile} name, read without any I/O but the
file's.

C{--hosts} takes C{[user@]host[:port]} entries separated by commas; a host
file takes one a line, each with optional settings after it::

    # hosts.txt
    alice@node1              processes=8
    node2:2222
    [fd00::3]                python=/opt/venv/bin/python

C{host} is whatever C{ssh} takes: a name from C{~/.ssh/config} works, with
everything the config says about it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from octotwist.errors import UsageError

#: Settings a host file line may give after its host.
SETTINGS = ("processes", "python")

_HOST = re.compile(
    r"""
    ^(?:(?P<user>[^@\s/]+)@)?
    (?: \[(?P<ipv6>[0-9A-Fa-f:.%\w]+)\] | (?P<name>[^@\s:\[\]/,]+) )
    (?::(?P<port>\d{1,5}))?$
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Host:
    """
    One host to start a worker on.

    @ivar host: the name or address C{ssh} is given.
    @ivar user: the user to log in as, or C{None}: ssh's choice (its config,
        else ours).
    @ivar port: the SSH port, or C{None}: ssh's choice.
    @ivar processes: task processes there, or C{None}: its CPU cores.
    @ivar python: the Python to run octotwist with there (C{PATH -m
        octotwist}), or C{None}: C{--remote-python}, else C{octo} on its
        C{PATH}.
    """

    host: str
    user: str | None = None
    port: int | None = None
    processes: int | None = None
    python: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        return f"{user}{host}{f':{self.port}' if self.port is not None else ''}"

    def ssh_arguments(self) -> list[str]:
        """What C{ssh} is given to reach this host (before the command)."""
        port = ["-p", str(self.port)] if self.port is not None else []
        return [*port, "--", f"{self.user}@{self.host}" if self.user else self.host]


def parse_host(text: str) -> Host:
    """
    One C{[user@]host[:port]}.

    @raise ValueError: it is not one; the message says what is expected.
    """
    m = _HOST.match(text.strip())
    port = int(m["port"]) if m and m["port"] else None
    if m is None or (port is not None and not 1 <= port <= 65535):
        raise ValueError(
            f"{text.strip()!r} is not a host: give [user@]host[:port], an IPv6 address "
            "in brackets ([::1]:22)"
        )
    host = m["ipv6"] or m["name"]
    if host.startswith("-"):
        raise ValueError(f"{text.strip()!r} is not a host name (it starts with -)")
    return Host(host, m["user"], port)


def parse_hosts(text: str) -> tuple[Host, ...]:
    """
    C{--hosts a,b:2222,alice@c}.

    @raise UsageError: an entry is malformed, or none is given.
    """
    entries = [e for e in text.split(",") if e.strip()]
    if not entries:
        raise UsageError("--hosts names no host: give host[,host...]")
    try:
        return _distinct([parse_host(e) for e in entries], "--hosts")
    except ValueError as e:
        raise UsageError(f"--hosts: {e}") from None


def read_hostfile(path: str | Path) -> tuple[Host, ...]:
    """
    A host file: one host a line, C{#} comments, blank lines skipped.

    @raise UsageError: it cannot be read, a line is malformed (its number
        is given), or it names no host.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UsageError(f"cannot read the host file {str(path)!r}: {reason}") from None
    hosts = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            hosts.append(_host_line(words))
        except ValueError as e:
            raise UsageError(f"host file {str(path)!r}, line {number}: {e}") from None
    if not hosts:
        raise UsageError(f"the host file {str(path)!r} names no host")
    return _distinct(hosts, f"the host file {str(path)!r}")


def _host_line(words: list[str]) -> Host:
    host = parse_host(words[0])
    settings: dict[str, str] = {}
    for word in words[1:]:
        name, equals, value = word.partition("=")
        if not equals or name not in SETTINGS:
            raise ValueError(
                f"{word!r} is not a setting: give name=value, the names being {', '.join(SETTINGS)}"
            )
        if name in settings:
            raise ValueError(f"{name} is given twice")
        settings[name] = value
    processes = None
    if "processes" in settings:
        try:
            processes = int(settings["processes"])
        except ValueError:
            processes = 0
        if processes < 1:
            raise ValueError(f"processes={settings['processes']}: give a whole number, 1 or more")
    python = settings.get("python") or None
    return Host(host.host, host.user, host.port, processes, python)


def _distinct(hosts: list[Host], where: str) -> tuple[Host, ...]:
    """The hosts, refusing one named twice (give it more processes instead)."""
    seen: set[str] = set()
    for host in hosts:
        if str(host) in seen:
            raise UsageError(
                f"{where} names {host} twice: one worker a host takes all its processes "
                "(set processes=N in a host file)"
            )
        seen.add(str(host))
    return tuple(hosts)

"""
What this installation of octotwist is, and whether another can work with it.

C{octo version} prints it; C{octo run --hosts} asks each host for its own
(C{octo version --json} over SSH) before it starts a worker there, so that a
host whose octotwist or Python cannot talk to the server is named, with both
versions, before the job starts rather than failing obscurely in the middle.

Two installations can work together when they run the same octotwist
release (the messages are checked field by field: a release that added a
field to one is another wire) and the same Python minor version (cloudpickle
ships the job's functions as that version's bytecode).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass

import octotwist
from octotwist.handshake import MAGIC

#: The handshake's protocol name and version (C{OCTOTWIST/2}).
WIRE = MAGIC.decode("ascii").strip()

#: Longest C{octo version --json} answer read from a host.
MAX_ANSWER = 4096


@dataclass(frozen=True)
class Installation:
    """
    One machine's octotwist, as C{octo version --json} reports it.

    @ivar octotwist: its release (C{octotwist.__version__}).
    @ivar wire: its handshake's protocol (L{WIRE}).
    @ivar python: its Python's version, C{"3.11.2"}.
    @ivar cpus: CPU cores it may use: the default number of task processes.
    @ivar ssh_client: the address its SSH connection came from
        (C{$SSH_CONNECTION}), when it was asked over SSH: the address at
        which the asking machine is reachable from it.
    """

    octotwist: str
    wire: str
    python: str
    cpus: int
    ssh_client: str | None = None

    @classmethod
    def here(cls) -> Installation:
        """This process's installation."""
        ssh = os.environ.get("SSH_CONNECTION", "").split()
        return cls(
            octotwist=octotwist.__version__,
            wire=WIRE,
            python=platform.python_version(),
            cpus=_cpus(),
            ssh_client=ssh[0] if len(ssh) == 4 else None,
        )

    def describe(self) -> str:
        return f"octotwist {self.octotwist} ({self.wire}) on Python {self.python}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Installation:
        """
        Read an answer of C{octo version --json}.

        @raise ValueError: it is not one (another program's output, or an
            octotwist too old to answer).
        """
        if len(text) > MAX_ANSWER:
            raise ValueError(f"an answer of {len(text)} characters, not octo version's")
        try:
            fields = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"not octo version's answer: {_excerpt(text)}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"not octo version's answer: {_excerpt(text)}")
        kinds = {"octotwist": str, "wire": str, "python": str, "cpus": int}
        for name, kind in kinds.items():
            if not isinstance(fields.get(name), kind) or isinstance(fields.get(name), bool):
                raise ValueError(f"octo version's answer lacks {name}: {_excerpt(text)}")
        client = fields.get("ssh_client")
        return cls(
            fields["octotwist"],
            fields["wire"],
            fields["python"],
            max(1, fields["cpus"]),
            client if isinstance(client, str) and client else None,
        )

    def incompatibility(self, other: Installation) -> str | None:
        """
        Why C{other} cannot work with this installation, or C{None} when it can.
        """
        mine, theirs = _minor(self.python), _minor(other.python)
        if other.wire != self.wire or other.octotwist != self.octotwist:
            why = "the messages differ between releases"
        elif theirs != mine:
            why = "cloudpickle ships the job's functions as one Python version's bytecode"
        else:
            return None
        return f"{other.describe()} cannot work for {self.describe()}: {why}"


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _excerpt(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= 120 else text[:117] + "...")

"""
One typed configuration of a job and of the server that runs it.

Every front end builds these once: C{octo run}, C{octo server} and C{twistd
octo} from their options (L{octotwist.tap.job_config}), L{octotwist.run}
from its keyword arguments.  Below them nothing reads an options dict, so
following a setting from the command line to the scheduler is one hop.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from octotwist.errors import UsageError
from octotwist.store import DEFAULT_MEMORY_LIMIT

if TYPE_CHECKING:
    from octotwist.launcher import LaunchConfig

#: The transport C{octo server} and C{octo client} use when not told.
DEFAULT_TRANSPORT = "tcp"

#: The formats results are written in (L{octotwist.output}).
FORMATS = ("tsv", "jsonl")


@dataclass(frozen=True)
class FaultPolicy:
    """
    How the server copes with failing workers (docs/guide.md, "What happens
    when things fail").

    @ivar max_attempts: attempts a task gets before the job fails (Hadoop's 4).
    @ivar heartbeat: seconds between a worker's heartbeats.
    @ivar task_timeout: seconds a worker may be silent before its tasks are
        handed to others (its lease).
    @ivar skip_bad_records: skip a map task that failed every attempt, and
        report its key, instead of failing the job.
    @ivar backup_after: seconds a task must run before an idle worker gets a
        backup copy of it; C{None} turns backup tasks off.
    """

    max_attempts: int = 4
    heartbeat: float = 2.0
    task_timeout: float = 30.0
    skip_bad_records: bool = False
    backup_after: float | None = 10.0

    def __post_init__(self) -> None:
        _check(self.max_attempts >= 1, "max_attempts must be at least 1")
        _check(_finite(self.heartbeat) and self.heartbeat > 0, "heartbeat must be more than 0")
        _check(
            _finite(self.task_timeout) and self.task_timeout > 0, "task_timeout must be more than 0"
        )
        if self.backup_after is not None:
            _check(
                _finite(self.backup_after) and self.backup_after >= 0,
                "backup_after must be 0 or more (or None: no backup tasks)",
            )
        if self.task_timeout <= self.heartbeat:
            raise UsageError(
                f"--task-timeout ({self.task_timeout:g} s) must be longer than "
                f"--heartbeat ({self.heartbeat:g} s)"
            )


@dataclass(frozen=True)
class JobConfig:
    """
    How to run one job, whoever asked.

    @ivar reduce_tasks: reduce partitions, overriding the job's own
        C{reduce_tasks}; C{None}: the job's, else a default.
    @ivar policy: retries, leases and backup tasks.
    @ivar memory_limit: bytes of map output the server keeps in memory
        before the rest waits on disk.
    @ivar output: the file, directory (a part file per partition) or URL
        results go to (jobs without C{final()}); C{None}: standard output
        for a command, the returned dict for the API.
    @ivar format: how results are written: C{"tsv"} or C{"jsonl"}.
    @ivar sort: hand C{final()} and the output the keys in sorted order, as
        octo.py did; C{False}: in partition order, written as each reduce
        task ends.
    @ivar args: the job's own arguments, its C{sys.argv[1:]} while it loads.
    @ivar state_dir: where to journal the job so that it resumes after its
        server dies (L{octotwist.resume}); C{None}: nowhere.
    """

    reduce_tasks: int | None = None
    policy: FaultPolicy = field(default_factory=FaultPolicy)
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    output: str | None = None
    format: str = "tsv"
    sort: bool = True
    args: tuple[str, ...] = ()
    state_dir: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.reduce_tasks is not None:
            _check(
                isinstance(self.reduce_tasks, int) and self.reduce_tasks >= 1,
                f"reduce_tasks must be a positive int, not {self.reduce_tasks!r}",
            )
        _check(self.memory_limit >= 0, "memory_limit must be 0 or more bytes")
        _check(
            self.format in FORMATS,
            f"format must be one of {', '.join(FORMATS)}, not {self.format!r}",
        )
        if isinstance(self.args, str):
            raise UsageError(f"args must be a list of strings, not the string {self.args!r}")
        object.__setattr__(self, "args", tuple(map(str, self.args)))

    @classmethod
    def from_keywords(
        cls, reduce_tasks: int | None, options: Mapping[str, Any], also: tuple[str, ...] = ()
    ) -> JobConfig:
        """
        The configuration L{octotwist.run}'s keyword arguments ask for: this
        class's fields and L{FaultPolicy}'s, by name.

        @param also: the caller's own keywords, named in the refusal of an
            unknown one.
        @raise UsageError: an unknown name, or a value out of range.
        """
        policy_names = set(FaultPolicy.__dataclass_fields__)
        own_names = set(cls.__dataclass_fields__) - {"policy", "reduce_tasks"}
        unknown = sorted(set(options) - policy_names - own_names)
        if unknown:
            known = sorted(own_names | policy_names | {"reduce_tasks", *also})
            close = difflib.get_close_matches(unknown[0], known, n=1)
            raise UsageError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                + (f" (did you mean {close[0]}?)" if close else "")
                + f"; octotwist.run takes {', '.join(known)}"
            )
        policy = FaultPolicy(**{k: v for k, v in options.items() if k in policy_names})
        own = {k: v for k, v in options.items() if k in own_names}
        return cls(reduce_tasks=reduce_tasks, policy=policy, **own)


@dataclass(frozen=True)
class ServiceConfig:
    """
    Where and how the server of one job listens.

    @ivar listen: the task server's endpoint (or a private address for
        local workers only).
    @ivar secret: the shared secret peers prove they hold.
    @ivar transport_options: the chosen transport's own options, defaults applied.
    @ivar web: the status page's endpoint (its interface filled in), or C{None}.
    @ivar local_workers: worker processes this service starts for itself and
        connects to its own private server (C{octo run}, L{octotwist.run});
        0 for a server that waits for C{octo client}s.
    @ivar hosts: the hosts to start workers on over SSH (C{--hosts}), or C{None}.
    """

    listen: str
    secret: bytes
    transport_options: Mapping[str, Any] = field(default_factory=dict)
    web: str | None = None
    local_workers: int = 0
    hosts: LaunchConfig | None = None


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)

"""
The job server as a Twisted service: C{twistd octo --script job.py}, and
without a script a cluster that stays, as C{octo serve} (L{build_cluster}).

L{Options} is shared with C{octo server}, so the two take the same flags;
L{makeService} builds the L{JobService} that both run (L{build_service}).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import TYPE_CHECKING, cast

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from octotwist import allocator, limits, webport
from octotwist.config import ServiceConfig
from octotwist.endpoints import check_server_endpoint
from octotwist.errors import OctotwistError
from octotwist.job import load_job
from octotwist.options import (
    FAULT_FLAGS,
    FAULT_PARAMETERS,
    MEMORY_PARAMETER,
    NO_STATE_DIR_FLAG,
    OUTPUT_FLAGS,
    OUTPUT_PARAMETERS,
    REDUCE_TASKS_PARAMETER,
    SERVER_PARAMETERS,
    STATE_DIR_PARAMETER,
    WEB_PARAMETER,
    WithTransportOptions,
    fault_policy,
    ignore_twisted_reserved_descriptor,
    job_config,
    launch_config,
    listen_settings,
    open_output,
    transport_options,
    usage_message,
)
from octotwist.output import Results
from octotwist.server import JobOutcome
from octotwist.service import JobService
from octotwist.transport import IReactor, ServerSettings

if TYPE_CHECKING:
    from octotwist.cluster import ClusterService

_log = Logger()


class Options(WithTransportOptions):
    """Options of the job server (C{octo server}, C{twistd octo})."""

    synopsis = "[options] [SCRIPT] [-- JOB ARGUMENTS...]"
    longdesc = (
        "Serve a job script to workers: map tasks first, then reduce tasks, "
        "then final() here. Start workers with `octo client HOST`. Arguments "
        "after -- are the job's own (its sys.argv[1:])."
    )
    optParameters = [
        ["script", "s", None, "The job script (may also be given as the argument)."],
        *SERVER_PARAMETERS,
        *OUTPUT_PARAMETERS,
        REDUCE_TASKS_PARAMETER,
        WEB_PARAMETER,
        MEMORY_PARAMETER,
        STATE_DIR_PARAMETER,
        *FAULT_PARAMETERS,
    ]
    optFlags = [*OUTPUT_FLAGS, NO_STATE_DIR_FLAG, *FAULT_FLAGS]

    def parseArgs(self, *positional: str) -> None:
        # With --script, every argument is the job's; without, the first
        # is the script.
        if not self["script"] and positional:
            self["script"], positional = positional[0], positional[1:]
        self["args"] = positional

    def postOptions(self) -> None:
        if self["script"]:
            if self["no-state-dir"]:
                raise usage.UsageError(
                    "--no-state-dir is a cluster's (no script); a job keeps no state "
                    "without --state-dir"
                )
            return
        if not _under_twistd(self):
            raise usage.UsageError("no job script: octo server JOB.py (or --script JOB.py)")
        # twistd octo without a script: a cluster, as octo serve; a job's
        # own options are octo submit's.
        given = [
            f"--{name}"
            for name in ("output", "reduce-tasks", "unsorted")
            if self[name] not in (None, False)
        ]
        if self["format"] != "tsv":
            given.append("--format")
        if given or self["args"]:
            raise usage.UsageError(
                f"{', '.join(given) or 'job arguments'} without a script: twistd octo without "
                "--script serves a queue of jobs (as octo serve), and each job takes its own "
                "with octo submit"
            )
        if self["no-state-dir"] and self["state-dir"]:
            raise usage.UsageError("--state-dir and --no-state-dir: give one")

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if not _under_twistd(self):
                raise  # octo reports it (exit status 2)
            # twistd would exit with 1, as for a job that failed.
            sys.stderr.write(f"{self}\nocto: {usage_message(e)}\n")
            raise SystemExit(2) from None


def _under_twistd(options: usage.Options) -> bool:
    """Whether C{options} are those of C{twistd octo} (rather than of C{octo server})."""
    from twisted.application.app import ServerOptions

    return isinstance(getattr(options, "parent", None), ServerOptions)


def build_service(
    options: usage.Options, reactor: IReactor, output: Results | None = None
) -> JobService:
    """
    Load the job and get everything ready to listen for C{octo client}s;
    nothing binds yet.

    @raise OctotwistError: the job script, the transport or the options are wrong.
    """
    from octotwist.hookspecs import get_transport

    config = job_config(options)
    job = load_job(options["script"], config.args)
    transport = get_transport(options["transport"])
    listen, secret = listen_settings(reactor, options, transport)
    before, after = limits.raise_open_file_limit()  # strangers may connect: room for them
    if after != before:
        _log.debug(
            "open files: soft limit raised from {before} to {after}", before=before, after=after
        )
    web = _web(options, reactor, listen)
    service = ServiceConfig(listen, secret, transport_options(options, transport, "server"), web)
    if output is None:
        output = open_output(config, job)
    return JobService(reactor, job, config, service, transport, output)


def build_cluster(options: usage.Options, reactor: IReactor) -> ClusterService:
    """
    C{octo serve}, and C{twistd octo} without a script: a cluster on the
    transport's port, its queue in its state directory; nothing binds yet.

    @raise OctotwistError: the transport, the options or the state
        directory are wrong (another server holds it, say).
    """
    from octotwist.cluster import ClusterServer, ClusterService, default_state_dir
    from octotwist.hookspecs import get_transport

    transport = get_transport(options["transport"])
    hosts = launch_config(options)
    listen, secret = listen_settings(reactor, options, transport, hosts is not None)
    limits.raise_open_file_limit()
    web = _web(options, reactor, listen)
    state_dir = None if options["no-state-dir"] else options["state-dir"] or default_state_dir()
    cluster = ClusterServer(
        reactor,
        policy=fault_policy(options),
        memory_limit=int(options["memory-limit"] * 2**20),
        state_dir=state_dir,
    )
    own = transport_options(options, transport, "server")
    return ClusterService(
        reactor, cluster, transport, ServerSettings(listen, secret, own), web, hosts
    )


def _web(options: usage.Options, reactor: IReactor, listen: str) -> str | None:
    """C{--web}, checked, its interface the server's unless it names one."""
    web = options["web"]
    if web is not None:
        check_server_endpoint(reactor, web, "--web")
        web = webport.web_endpoint(web, webport.listen_interface(listen))
    return web


def makeService(options: Options) -> Service:
    """
    The twistd entry point: a job's server, which stops the reactor when
    the job ends, or without a script a cluster, until twistd is stopped.
    """
    ignore_twisted_reserved_descriptor()
    from twisted.internet import reactor as installed

    reactor = cast(IReactor, installed)  # a module to mypy; the reactor twistd installed
    allocator.tune()
    try:
        if not options["script"]:
            cluster = build_cluster(options, reactor)
            cluster.listening.addErrback(_cannot_serve, reactor)
            return cluster
        service = build_service(options, reactor)
    except OctotwistError as e:
        sys.stderr.write(f"octo: {e}\n")
        raise SystemExit(2) from None
    service.outcome.addCallback(_stop_twistd, reactor)
    return service


def _cannot_serve(failure: Failure, reactor: IReactor) -> None:
    """A cluster under twistd that cannot listen: say why, stop, exit 1."""
    _log.error("{error}", error=failure.getErrorMessage())
    _stop_twistd(JobOutcome(False, failure.getErrorMessage()), reactor)


def _stop_twistd(outcome: JobOutcome, reactor: IReactor) -> None:
    if not outcome.ok:
        # twistd has no way to set its exit status; this runs after it has
        # cleaned up (pid file, final log line), as the interpreter exits.
        atexit.register(_exit_failed)
    if reactor.running:
        reactor.stop()
    else:  # it ended as twistd started it (a port that was taken)
        reactor.callWhenRunning(reactor.stop)


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

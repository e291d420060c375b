"""
The job server as a Twisted service: C{twistd octo --script job.py}.

L{Options} is shared with C{octo server}, so the two take the same flags;
L{makeService} builds the L{JobService} that both run (L{build_service}).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import cast

from twisted.logger import Logger
from twisted.python import usage

from octotwist import allocator, auth, limits, webport
from octotwist.config import DEFAULT_TRANSPORT, ServiceConfig
from octotwist.endpoints import check_server_endpoint
from octotwist.errors import OctotwistError
from octotwist.job import load_job
from octotwist.options import (
    FAULT_FLAGS,
    FAULT_PARAMETERS,
    MEMORY_PARAMETER,
    OUTPUT_FLAGS,
    OUTPUT_PARAMETERS,
    REDUCE_TASKS_PARAMETER,
    STATE_DIR_PARAMETER,
    WEB_PARAMETER,
    WithTransportOptions,
    ignore_twisted_reserved_descriptor,
    job_config,
    listen_settings,
    open_output,
    transport_options,
    usage_message,
)
from octotwist.output import Results
from octotwist.server import JobOutcome
from octotwist.service import JobService
from octotwist.transport import IReactor

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
        [
            "transport",
            "t",
            DEFAULT_TRANSPORT,
            "Transport to serve on; `octo transports` lists them.",
        ],
        [
            "listen",
            "l",
            None,
            "Twisted endpoint to listen on, e.g. tcp:18125:interface=0.0.0.0, "
            "ssl:18125:privateKey=key.pem, unix:/tmp/octo.sock. Default: port 18125 on "
            "every interface with a configured secret, on 127.0.0.1 only without one.",
        ],
        [
            "secret-file",
            None,
            None,
            f"File holding the shared secret, at least {auth.MIN_SECRET_LENGTH} characters, "
            "mode 0600 (`octo secret -o FILE` makes one; default: "
            f"${auth.SECRET_ENV}, else a secret generated once and kept in "
            "~/.config/octotwist/secret).",
        ],
        *OUTPUT_PARAMETERS,
        REDUCE_TASKS_PARAMETER,
        WEB_PARAMETER,
        MEMORY_PARAMETER,
        STATE_DIR_PARAMETER,
        *FAULT_PARAMETERS,
    ]
    optFlags = [*OUTPUT_FLAGS, *FAULT_FLAGS]

    def parseArgs(self, *positional: str) -> None:
        # With --script, every argument is the job's; without, the first
        # is the script.
        if not self["script"] and positional:
            self["script"], positional = positional[0], positional[1:]
        self["args"] = positional

    def postOptions(self) -> None:
        if not self["script"]:
            raise usage.UsageError("no job script: octo server JOB.py (or --script JOB.py)")

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
    web = options["web"]
    if web is not None:
        check_server_endpoint(reactor, web, "--web")
        web = webport.web_endpoint(web, webport.listen_interface(listen))
    service = ServiceConfig(listen, secret, transport_options(options, transport, "server"), web)
    if output is None:
        output = open_output(config, job)
    return JobService(reactor, job, config, service, transport, output)


def makeService(options: Options) -> JobService:
    """The twistd entry point: stops the reactor when the job ends."""
    ignore_twisted_reserved_descriptor()
    from twisted.internet import reactor as installed

    reactor = cast(IReactor, installed)  # a module to mypy; the reactor twistd installed
    allocator.tune()
    try:
        service = build_service(options, reactor)
    except OctotwistError as e:
        sys.stderr.write(f"octo: {e}\n")
        raise SystemExit(2) from None
    service.outcome.addCallback(_stop_twistd, reactor)
    return service


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

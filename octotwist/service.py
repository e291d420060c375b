"""
The one lifecycle of a job's server, behind every front end.

C{octo run}, C{octo server}, C{twistd octo} and L{octotwist.run} all build a
L{JobService} and wait for its L{JobService.outcome}: the status page's
port, the task server, the job server and, for a job run on this machine,
its own workers.  It is a Twisted L{Service}, so twistd starts and stops it
like any other; stopping it before the job is over cancels the job, tells
the workers why, and takes the output back.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from octotwist import resume, webport
from octotwist.config import DEFAULT_TRANSPORT, JobConfig, ServiceConfig
from octotwist.endpoints import server_is_local
from octotwist.errors import OctotwistError
from octotwist.job import Job
from octotwist.journal import Journal
from octotwist.launcher import HostWorkers, LaunchConfig, LaunchError, advertised, bound_port
from octotwist.output import Results
from octotwist.server import JobOutcome, JobServer
from octotwist.status import StatusPage, new_token
from octotwist.store import BlobStore
from octotwist.transport import ClientSettings, IReactor, ServerSettings, TaskServer, Transport

_log = Logger()

#: Seconds the task server may take to stop before the log says why it waits.
SLOW_STOP = 1.0

#: Seconds local workers retry reaching their own server (it is listening
#: before they start: only a broken transport makes them wait).
LOCAL_WAIT = 10.0


class JobService(Service):
    """
    Serves one job; when it ends, stops listening and fires L{outcome}.

    Everything that can be refused (the options, the transport's settings)
    is refused by the constructor, before anything binds or starts.

    @param job: the loaded job.
    @param config: how to run it.
    @param service: where to listen, with which secret, and how many local
        workers to start.
    @param transport: the transport to serve on.
    @param output: where results go (for a job without C{final()}).
    @ivar outcome: fires with the L{JobOutcome} once everything stopped.
    @ivar listening: fires with the task server's address once it listens.
    """

    def __init__(
        self,
        reactor: IReactor,
        job: Job,
        config: JobConfig,
        service: ServiceConfig,
        transport: Transport,
        output: Results,
    ) -> None:
        self.reactor = reactor
        self.config = service
        self.transport = transport
        self.local = service.local_workers > 0
        #: Whether the server listens for its own workers only (C{octo run}
        #: without C{--hosts}): on a private address, under a private secret.
        self.private = self.local and service.hosts is None
        self.hosts = (
            # (Every reactor starts processes; IReactor only says timers.)
            HostWorkers(
                reactor,  # type: ignore[arg-type]
                service.hosts,
                transport.name,
                service.secret,
            )
            if service.hosts is not None
            else None
        )
        #: The status pages' token (L{octotwist.status.new_token}), needed
        #: by those reachable from other machines.
        self.status_token = new_token()
        #: The state directory's journal (C{--state-dir}), held (and
        #: locked) until the service stops.
        self.journal: Journal | None = None
        try:
            if config.state_dir is not None:
                self.journal = Journal.open(config.state_dir)
            self.job_server = JobServer(
                job,
                reactor,
                reduce_tasks=config.reduce_tasks,
                output=output,
                store=BlobStore(memory_limit=config.memory_limit),
                policy=config.policy,
                sort=config.sort,
                journal=self.journal,
                fingerprint=resume.fingerprint(job, config.args) if self.journal else "",
            )
        except BaseException:
            self._close_journal()
            output.abort()  # no results file for a server that never started
            raise
        try:
            self._private = (
                tempfile.TemporaryDirectory(prefix="octo-run-") if self.private else None
            )
            listen = (
                transport.local_listen(Path(self._private.name))
                if self._private is not None
                else service.listen
            )
            # The same guard wherever the page is served: on the transport's
            # port, the token unless that port is this machine's only.
            token = None if self.private or server_is_local(listen) else self.status_token
            self.listen = listen
            self.task_server: TaskServer = transport.server_class()(
                reactor,
                ServerSettings(
                    listen,
                    service.secret,
                    service.transport_options,
                    status=StatusPage(self.job_server.status, token=token),
                ),
                self.job_server.accept,
            )
        except BaseException:
            self._close_journal()
            output.abort()
            raise
        self.address: str | None = None
        self._web_port: IListeningPort | None = None
        self._workers: Deferred[Any] | None = None
        self._run: Deferred[None] | None = None
        self._binding: Deferred[str | JobOutcome] | None = None
        self.outcome: Deferred[JobOutcome] = Deferred()
        self.listening: Deferred[str] = Deferred()

    def privilegedStartService(self) -> None:
        """
        Bind the ports now, before twistd drops privileges and reports that
        it started: a port that is taken makes C{twistd octo} fail at once,
        with exit status 1 (daemon or not), rather than run on, listening
        on nothing.
        """
        super().privilegedStartService()
        self._binding = Deferred.fromCoroutine(self._bind())
        failed: list[JobOutcome] = []

        def check(bound: str | JobOutcome) -> str | JobOutcome:
            if isinstance(bound, JobOutcome):
                failed.append(bound)
            return bound

        self._binding.addCallback(check)
        if failed:
            raise CannotServe(failed[0].error or "cannot listen")

    def startService(self) -> None:
        super().startService()
        self._run = Deferred.fromCoroutine(self._serve())

    def stopService(self) -> Deferred[None]:
        """
        Cancel the job if it is not over (the workers hear why), and fire
        once the task server, the status page and the local workers are down.
        """
        super().stopService()
        if self.address is not None:  # else it never started, or could not listen
            # With a state directory the job is not over: the same command
            # resumes it (what twistd's SIGTERM, or Ctrl-C, mean there).
            self.job_server.cancel("the job was cancelled: its server was stopped", resumable=True)
        done: Deferred[None] = Deferred()
        self.outcome.addBoth(lambda _: done.callback(None))
        return done

    async def _serve(self) -> None:
        outcome = None
        try:
            outcome = await self._serve_job()
        except Exception as e:
            error = f"the server failed: {type(e).__name__}: {e}"
            _log.failure("{error}", Failure(), error=error)
            self.job_server.cancel(error)
            outcome = JobOutcome(False, error)
        finally:
            self.job_server.output.abort()  # nothing to take back if it was committed
            if self._private is not None:
                self._private.cleanup()
            self._close_journal()
        self.outcome.callback(outcome)

    def _close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    async def _bind(self) -> str | JobOutcome:
        """Bind the status page's port, then the task server's: its address."""
        web = self.config.web
        if web is not None:
            try:
                self._web_port = await webport.serve_status(
                    self.reactor,
                    lambda token: StatusPage(self.job_server.status, token=token),
                    web,
                    self.status_token,
                )
            except Exception as e:
                return self._cannot_listen(e, web)
        try:
            return await self.task_server.listen()
        except Exception as e:
            return self._cannot_listen(e, self.listen)

    async def _serve_job(self) -> JobOutcome:
        if self._binding is None:
            self._binding = Deferred.fromCoroutine(self._bind())
        address = await self._binding
        if isinstance(address, JobOutcome):
            return address
        self.address = address
        if self.hosts is not None:  # (under a secret only they get)
            _log.info(
                "serving job {job} on {address} for the workers on its hosts",
                job=self.job_server.job.name,
                address=address,
            )
        elif not self.private:
            _log.info(
                "serving job {job} on {address}; start workers with: octo client {hint}",
                job=self.job_server.job.name,
                address=address,
                hint=client_hint(address, self.transport, self.listen),
            )
            webport.log_transport_page(address, self.listen, self.status_token, self.transport)
        self.listening.callback(address)
        if self.local:
            self._workers = self._start_workers(address)
        self.job_server.start(workers_coming=self.local or self.hosts is not None)
        launching = ensureDeferred(self._launch(address)) if self.hosts is not None else None
        outcome = await self.job_server.result
        if self.hosts is not None:
            await self.hosts.stop()
        if launching is not None:
            await launching
        if self._workers is not None:
            await self._workers
        await self._stop_task_server()
        if self._web_port is not None:
            await webport.stop_status(self._web_port, self.reactor)
        return outcome

    async def _stop_task_server(self) -> None:
        """
        Stop the task server, saying so when that takes a while: it waits
        for each worker to hang up after reading the job's end, and one that
        cannot be reached (a link down) never does, until the transport
        gives up on it (10 s at most).
        """
        stopped = self.task_server.stop()
        said = self.reactor.callLater(
            SLOW_STOP,
            lambda: _log.info(
                "the job is over; waiting for the workers to hang up (one that cannot be "
                "reached did not hear the end: its connection is closed within 10 s)"
            ),
        )
        try:
            await stopped
        finally:
            if said.active():
                said.cancel()

    async def _launch(self, address: str) -> None:
        """
        Check the hosts of C{--hosts}, starting a worker on each that can
        work; fail the job if too few can.
        """
        assert self.hosts is not None
        try:
            refusal = await self.hosts.launch(bound_port(address), others_coming=self.local)
            if refusal is not None:
                raise LaunchError(refusal)
        except LaunchError as e:
            self.job_server.cancel(f"the job cannot run on its hosts: {e}")

    def _start_workers(self, address: str) -> Deferred[Any]:
        """This machine's workers, connected to our own private server."""
        from octotwist.client import run_worker

        transport = self.transport
        client = transport.client_class()(
            self.reactor,
            ClientSettings(address, self.config.secret, transport_defaults(transport, "client")),
        )
        return ensureDeferred(
            run_worker(
                self.reactor,  # type: ignore[arg-type]  # IReactor provides what workers use
                client,
                processes=self.config.local_workers,
                name="local",
                wait=LOCAL_WAIT,
                task_lines=False,  # the server's progress says it all; -v shows them
            )
        )

    def _cannot_listen(self, error: Exception, where: str) -> JobOutcome:
        message = f"cannot listen on {where}: {cannot_listen_reason(error)}"
        _log.error("{error}", error=message)
        self.listening.errback(Failure(error))
        self.listening.addErrback(lambda _: None)  # reported above
        if self._web_port is not None:
            self._web_port.stopListening()
        return JobOutcome(False, message)


class CannotServe(OctotwistError):
    """A port the service needs is taken, or cannot be bound."""


def cannot_listen_reason(error: Exception) -> str:
    """Why a port could not be bound, in a few words (twistd shows 100 characters)."""
    cause = getattr(error, "socketError", None)  # Twisted's CannotListenError
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(error)
    return text if text else type(error).__name__


def transport_defaults(transport: Transport, side: str) -> dict[str, Any]:
    """A transport's own options at their defaults (a server or workers of C{octo run})."""
    own = transport.server_options if side == "server" else transport.client_options
    return {option.name: option.default for option in own}


def client_hint(address: str, transport: Transport, listen: str = "") -> str:
    """
    What a worker types to reach a server that listens on C{address}
    (C{listen} being the endpoint it was asked to listen on: a TLS port
    takes a TLS client, which checks the server's certificate).
    """
    flag = "" if transport.name == DEFAULT_TRANSPORT else f"--transport {transport.name} "
    client = transport.client_class()
    if address.startswith("tcp:"):
        host, port = address[4:].replace("\\:", ":").rsplit(":", 1)
        if host in ("0.0.0.0", "::", ""):
            host = "SERVER_HOST"
        if listen.split(":", 1)[0].lower() in ("ssl", "tls"):
            return (
                f"{flag}--connect tls:{host.replace(':', chr(92) + ':')}:{port}:"
                "trustRoots=DIR (DIR holding the CA certificate, or the server's own, "
                "that its certificate is checked against)"
            )
        short = host if port == str(client.default_port) else f"{host}:{port}"
        try:  # the short form, where this transport's client takes it
            client.address_to_endpoint(short)
            return flag + short
        except (ValueError, OctotwistError):
            address = f"tcp:{host.replace(':', chr(92) + ':')}:{port}"
    for anywhere in ("//0.0.0.0:", "//[::]:"):  # a URL bound to every interface
        address = address.replace(anywhere, "//SERVER_HOST:")
    try:
        client.address_to_endpoint(address)
    except (ValueError, OctotwistError):
        # Not an address a client connects to (a socket behind a proxy, say).
        return f"{flag}ADDRESS (this server listens on {address})"
    return flag + shlex.quote(address)


def local_config(
    reactor: IReactor,
    transport: Transport,
    workers: int,
    web: str | None,
    hosts: LaunchConfig | None = None,
) -> ServiceConfig:
    """
    A server for this machine's own workers only: a fresh secret that never
    touches disk, on the transport's private address (L{JobService} picks
    it), and C{--web} kept to 127.0.0.1 unless it names an interface.

    With C{hosts}, also for the workers it starts on them over SSH (which
    get the secret over SSH): it listens on every interface, on the port
    C{--advertise} names or one the kernel picks.
    """
    from octotwist import auth
    from octotwist.endpoints import check_server_endpoint

    if web is not None:
        check_server_endpoint(reactor, web, "--web")
        web = webport.web_endpoint(web, "127.0.0.1")
    listen = ""
    if hosts is not None:
        port = advertised(hosts.advertise)[1] if hosts.advertise else None
        listen = f"tcp:{port or 0}"
    return ServiceConfig(
        listen=listen,
        secret=auth.new_secret().encode(),
        transport_options=transport_defaults(transport, "server"),
        web=web,
        local_workers=workers,
        hosts=hosts,
    )


async def run_here(service: JobService) -> JobOutcome:
    """
    Start C{service} and wait for its outcome; if the waiting is cancelled
    (Ctrl-C, a cancelled Deferred), stop the service first, so that its
    workers hear why and no results file is left, then raise
    C{CancelledError}.
    """
    from twisted.internet.defer import CancelledError

    watched: Deferred[JobOutcome] = Deferred()

    def relay(outcome: Any) -> Any:
        if not watched.called:
            watched.callback(outcome)
        return outcome

    service.outcome.addBoth(relay)
    service.startService()
    try:
        return await watched
    except CancelledError:
        await service.stopService()
        raise

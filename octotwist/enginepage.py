"""
The status page of a job on an engine: C{octo run job.py --engine dask
--web tcp:8080}, C{octotwist.run(job, engine="dask", web="tcp:8080")}.

An engine's client blocks its thread until the job is over, outside any
reactor (L{octotwist.engine}), so the page is served by twisted.web in the
reactor's own thread (L{octotwist.threaded}), reading the engine's
L{Progress} as the engine reports to it.  It is the page of a job on
octotwist's own server (L{octotwist.status.StatusPage}), guarded the same
way: bound to loopback unless C{--web} names an interface, the token
required beyond it, the C{Host} check.  It shows what the engine tells
(tasks done, failures, counters, workers) and links to the engine's own
pages (Dask's dashboard) for what only the engine knows.
"""

from __future__ import annotations

from twisted.internet.interfaces import IListeningPort

from octotwist import threaded
from octotwist.endpoints import check_server_endpoint
from octotwist.engine import Progress
from octotwist.service import CannotServe, cannot_listen_reason
from octotwist.status import StatusPage, new_token
from octotwist.transport import IReactor
from octotwist.webport import serve_status, stop_status, web_endpoint


class EnginePage:
    """The page of one job on an engine, while it runs and a moment after."""

    def __init__(self, port: IListeningPort) -> None:
        self.port = port

    @classmethod
    def serve(cls, progress: Progress, web: str) -> EnginePage:
        """
        Serve C{progress}'s status on C{web} (an endpoint string; its
        interface 127.0.0.1 unless it names one: the job runs from here).

        @raise UsageError: C{web} is no server endpoint string.
        @raise CannotServe: its port cannot be bound (taken, say).
        """
        token = new_token()
        endpoint = web_endpoint(web, "127.0.0.1")

        async def listen(reactor: IReactor) -> IListeningPort:
            check_server_endpoint(reactor, web, "--web")
            try:
                return await serve_status(
                    reactor,
                    lambda needed: StatusPage(progress.status, token=needed),
                    endpoint,
                    token,
                )
            except Exception as e:
                raise CannotServe(f"cannot listen on {endpoint}: {cannot_listen_reason(e)}") from e

        return cls(threaded.blocking_call(listen))

    def stop(self, linger: bool = True) -> None:
        """
        Stop serving: with C{linger}, a moment after the job ended (an
        open page shows how), which an interrupt cuts short.
        """

        async def later(reactor: IReactor) -> None:
            await stop_status(self.port, reactor)

        async def now(reactor: IReactor) -> None:
            await stop_status(self.port, reactor, linger=0)

        try:
            threaded.blocking_call(later if linger else now)
        except KeyboardInterrupt:
            threaded.blocking_call(now)

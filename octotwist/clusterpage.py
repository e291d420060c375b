"""
The status site of a cluster (C{octo serve --web}, or the http transport's
own port): C{/} lists the jobs with their state and progress, C{/jobs.json}
is the same for programs, and C{/jobs/ID/} is each job's own page, the one
C{octo server --web} serves (live while the job runs, its last figures once
it is over), with its C{status.json}.

The site is guarded as a job's is (L{GuardedRoot}: the C{Host} check, the
token beyond this machine), and rendered the same way, on the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from typing import TYPE_CHECKING, Any

from twisted.web.resource import IResource, NoResource, Resource

from octotwist.status import (
    ICON,
    GuardedRoot,
    JobEvents,
    JobJson,
    JsonResource,
    duration,
    render_document,
    render_main,
    render_page,
)

if TYPE_CHECKING:
    from twisted.web.server import Request

    from octotwist.cluster import ClusterServer


class ClusterPage(GuardedRoot):
    """The root of a cluster's status site (see the module)."""

    def __init__(self, cluster: ClusterServer, *, token: str | None) -> None:
        super().__init__(token=token)
        self.cluster = cluster
        self.putChild(b"", _Live(cluster.status, _list_view, "jobs.json"))
        self.putChild(b"jobs.json", JsonResource(cluster.status))
        self.putChild(b"favicon.svg", ICON)
        self.putChild(b"jobs", _Jobs(cluster))


class _Jobs(Resource):
    """C{/jobs/ID/}: looked up as each request comes, so that a page follows its job."""

    def __init__(self, cluster: ClusterServer) -> None:
        super().__init__()
        self.cluster = cluster

    def getChild(self, path: bytes, request: Request) -> IResource:
        if not path.isdigit() or self.cluster.job_entry(int(path)) is None:
            return NoResource("There is no such job on this cluster.")
        return _Job(self.cluster, int(path))


class _Job(Resource):
    """One job's page and JSON: its live status, its last, or what it is while queued."""

    def __init__(self, cluster: ClusterServer, number: int) -> None:
        super().__init__()
        self.cluster = cluster
        self.number = number

    def render_GET(self, request: Request) -> bytes:
        # /jobs/ID without its slash: the page's relative links need one.
        request.redirect(request.path + b"/")
        return b""

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"status.json":
            return JobJson(self._snapshot)
        if path == b"favicon.svg":
            return ICON
        if path == b"events":
            return JobEvents(self._snapshot)
        if path == b"":
            if "phase" in self._snapshot():  # it has run: octo server's page, pictures and all
                return _Live(self._snapshot, _job_view, "status.json", render_page)
            return _Live(self._snapshot, _job_view, "status.json")
        return NoResource()

    def _snapshot(self, stream_since: int | None = None) -> dict[str, Any]:
        status = self.cluster.job_status(self.number, stream_since)
        if status is not None:
            return status
        entry = self.cluster.job_entry(self.number) or {}
        return {"id": self.number, **entry}


#: What a page shows of its data: its title, its <main>, whether it is live.
View = Callable[[dict[str, Any]], tuple[str, str, bool]]


class _Live(Resource):
    """
    An HTML page of the site: the whole of it, or (C{?part=main}) the part
    that its script fetches and swaps in, rendered from C{snapshot()}.
    """

    isLeaf = True

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        view: View,
        data: str,
        whole: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.view = view
        self.data = data
        self.whole = whole

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        status = self.snapshot()
        title, main, live = self.view(status)
        if request.args.get(b"part") == [b"main"]:  # type: ignore[attr-defined]
            return main.encode()
        if self.whole is not None:
            return self.whole(status).encode()
        return render_document(title, main, live=live, data=self.data).encode()


def _job_view(status: dict[str, Any]) -> tuple[str, str, bool]:
    """A job's page: as octo server serves it once it runs; while queued, that it is."""
    if "phase" in status:
        title = f"octo: {status['job']} ({status['phase']})"
        return title, render_main(status), status["phase"] not in ("finished", "failed")
    title = f"octo: {status.get('name', '?')} ({status.get('state', '?')})"
    return title, _summary(status), True


def _summary(entry: dict[str, Any]) -> str:
    error = f'<pre class="error">{escape(entry["error"])}</pre>' if entry.get("error") else ""
    return (
        f'<h1 id="title">octo: {escape(str(entry.get("name", "?")))} '
        f"({escape(str(entry.get('state', '?')))})</h1>\n"
        f'<p>Job {entry.get("id")} is <strong id="state">{escape(str(entry.get("state")))}'
        f'</strong>.</p>{error}<p><a href="../../">All jobs</a></p>'
    )


def _list_view(status: dict[str, Any]) -> tuple[str, str, bool]:
    return _title(status), render_jobs(status), True


def _title(status: dict[str, Any]) -> str:
    running = sum(j["state"] == "running" for j in status["jobs"])
    queued = sum(j["state"] == "queued" for j in status["jobs"])
    return f"octo serve: {running} running, {queued} queued"


#: How a job's state is coloured (the job page's classes).
_STATE_CLASS = {"done": "finished", "failed": "failed", "cancelled": "failed"}


def render_jobs(status: dict[str, Any]) -> str:
    """The part of the cluster's page that changes: its workers and its jobs."""
    workers = status["workers"]
    rows = "\n".join(_row(job) for job in reversed(status["jobs"]))
    table = (
        '<div class="scroll"><table id="jobs"><thead><tr><th>ID</th><th>Job</th><th>State</th>'
        "<th>Submitted</th><th>Map</th><th>Reduce</th><th>Workers</th><th>Time</th></tr>"
        f"</thead><tbody>\n{rows}\n</tbody></table></div>"
        if status["jobs"]
        else '<p id="jobs">No jobs yet: send one with octo submit JOB.py.</p>'
    )
    return (
        f'<h1 id="title">{escape(_title(status))}</h1>\n'
        f'<p>Workers: <span id="workers-working">{workers["working"]}</span> working, '
        f'<span id="workers-waiting">{workers["waiting"]}</span> waiting for a job</p>\n'
        f"<section><h2>Jobs, newest first</h2>\n{table}</section>"
    )


def _row(job: dict[str, Any]) -> str:
    number = job["id"]
    state = job["state"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["submitted"]))
    cap = f" of {job['max_workers']}" if job["max_workers"] else ""
    why = (
        f'<br><span class="error">{escape(job["error"].splitlines()[0][:200])}</span>'
        if (job["error"])
        else ""
    )
    return (
        f'<tr id="job-{number}"><td><a href="jobs/{number}/">{number}</a></td>'
        f"<td>{escape(job['name'])}</td>"
        f'<td class="phase-{_STATE_CLASS.get(state, state)}">'
        f'<span id="job-{number}-state">{escape(state)}</span>{why}</td>'
        f"<td>{when}</td><td>{_progress(job['map'])}</td><td>{_progress(job['reduce'])}</td>"
        f"<td>{job['workers']}{cap}</td>"
        f"<td>{duration(job['seconds']) if job['seconds'] is not None else ''}</td></tr>"
    )


def _progress(phase: dict[str, Any] | None) -> str:
    if not phase:
        return ""
    total = phase.get("total")
    bar = f'<progress value="{phase["done"]}" max="{total}"></progress>' if total else ""
    return f"{bar} {phase['done']}/{'?' if total is None else total}"

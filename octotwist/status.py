"""
The live status page: C{GET /} (HTML a person leaves open) and C{GET
/status.json} (the same data for programs), served by C{--web ENDPOINT} with
any transport, and on the transport's own port by transports that speak
HTTP (L{octotwist.transport.ServerSettings.status}).

The page is rendered here, on the server, so that it reads the same in a
desktop browser, on a phone and in a terminal browser without JavaScript.
Where JavaScript runs, the page's own script follows C{/events}, a stream
of server-sent events (one a second: the fresh body, and the attempts that
ended since the last event), swaps the body in and draws the pictures of
time: the task stream (a row per worker process, a bar per attempt) and
charts of tasks per second, bytes and memory.  One rendering path for the
text, no page reloads, nothing fetched from anywhere but this server.  The
data comes from L{octotwist.server.JobServer.status}; its fields are
documented in docs/status.md.

The page shows what a stranger should not see (keys, tracebacks, host names,
process ids), so L{StatusPage} guards itself, whoever serves it:

  - it answers only to a C{Host} that is an IP address, C{localhost} or a
    name of this machine, so that a web page elsewhere cannot read it
    through DNS rebinding (421 otherwise);
  - a page reachable from beyond this machine needs a token (403 without
    it), given once as C{?token=} and then kept in a cookie;
  - every response carries headers that keep a browser from running,
    framing, caching or leaking the page where it should not
    (L{SECURITY_HEADERS}).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from collections.abc import Callable
from html import escape
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource

if TYPE_CHECKING:  # twisted.web.server costs every command 20 ms to import
    from twisted.web.server import Request

Snapshot = Callable[[], dict[str, Any]]


class JobSnapshot(Protocol):
    """A job's status (L{octotwist.server.JobServer.status}), its task stream if asked."""

    def __call__(self, stream_since: int | None = None) -> dict[str, Any]: ...


#: How often the page asks for fresh data, in milliseconds (the cluster's
#: pages), or is sent it (a job's, by L{JobEvents}).
REFRESH_MS = 1000
#: Milliseconds a browser waits before it reconnects a lost event stream.
RECONNECT_MS = 2000


def new_token() -> str:
    """
    A fresh token for a status page reachable from beyond this machine.

    It is random, one per server, rather than derived from the shared
    secret: the token travels in URLs (the log line, the browser's history,
    a proxy's log), and an HMAC of the secret there would let whoever reads
    it test guesses of the secret offline, the attack that
    L{octotwist.auth.MIN_SECRET_LENGTH} is about.  A random token tells
    nothing about the secret, and stops working when the server ends.
    """
    return secrets.token_urlsafe(32)


class GuardedRoot(Resource):
    """
    The root of a status site, which guards every request to it: each is
    first checked by L{getChildWithDefault} (C{Host}, then the token), the
    one method through which any Twisted site, or a transport's own root
    resource, reaches the children.

    @param token: the token a request must present (C{?token=TOKEN}, or the
        cookie set by a request that did), from L{new_token}; C{None} for a
        page only this machine can reach (bound to loopback, or a Unix
        socket), which needs none.
    """

    def __init__(self, *, token: str | None) -> None:
        super().__init__()
        self.token = token
        self._host_check = HostCheck()

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        host = request.getHeader(b"host")
        if host is not None and not self._host_check.accepts(host):
            return _Refusal(
                MISDIRECTED,
                "This octo status page does not answer to the name "
                f"{_printable(host)} (the request's Host). Use this machine's name or address "
                "(a name that points here without being this machine's own is how "
                "DNS rebinding attacks start).",
            )
        if self.token is not None and not self._token_ok(request):
            return _Refusal(
                FORBIDDEN,
                "This octo status page needs its token: open the URL that the server "
                "logged in its line 'status page at http://...?token=...'.",
            )
        return super().getChildWithDefault(path, request)

    def _token_ok(self, request: Request) -> bool:
        """
        Whether C{request} presents the token: in C{?token=} (then it gets
        the cookie, so that the page's own refresh and links work without
        it), else in the cookie.  Compared in constant time.
        """
        assert self.token is not None
        expected = self.token.encode()
        given = (request.args or {}).get(b"token")
        if given:
            if not hmac.compare_digest(given[-1], expected):
                return False
            request.addCookie(
                _cookie_name(request),
                expected,
                path=b"/",
                httpOnly=True,
                sameSite="Strict",
                secure=bool(request.isSecure()),
            )
            return True
        cookie = request.getCookie(_cookie_name(request))
        return cookie is not None and hmac.compare_digest(cookie, expected)


class StatusPage(GuardedRoot):
    """
    The status site of one job: C{b""} is the HTML page and
    C{b"status.json"} the JSON; anything else is 404.

    @param snapshot: returns the current status (L{JobServer.status}).
    """

    def __init__(self, snapshot: JobSnapshot, *, token: str | None) -> None:
        super().__init__(token=token)
        self.snapshot = snapshot
        add_job_pages(self, snapshot)


def add_job_pages(parent: Resource, snapshot: JobSnapshot) -> None:
    """
    Put one job's page (C{b""}), its JSON (C{b"status.json"}) and its event
    stream (C{b"events"}) under C{parent}.  C{snapshot} takes
    C{stream_since} (L{octotwist.server.JobServer.status}).
    """
    parent.putChild(b"", _Page(snapshot))
    parent.putChild(b"status.json", JobJson(snapshot))
    parent.putChild(b"events", JobEvents(snapshot))
    parent.putChild(b"favicon.svg", ICON)


def _cookie_name(request: Request) -> bytes:
    """
    The cookie's name, with the port in it: a browser sends a host's
    cookies to all its ports, and two servers on one machine have two
    tokens.
    """
    port = getattr(request.getHost(), "port", None)
    return b"octo-status" if port is None else b"octo-status-%d" % port


def _printable(value: bytes) -> str:
    return repr(value.decode("ascii", "replace")[:100])


class HostCheck:
    """
    Which C{Host} headers the page answers to: IP addresses, C{localhost},
    and the names of this machine (C{socket.gethostname()},
    C{socket.getfqdn()}), with or without a port, in any case.

    DNS rebinding points a name the attacker owns at this machine, so that
    his page, in a browser here or on this network, reads ours as if it were
    his: the browser then sends his name as C{Host}, which is refused.  An
    IP address in C{Host} cannot be rebound.  The machine's names are looked
    up once, the first time a name that is not C{localhost} arrives
    (C{getfqdn()} may ask DNS).
    """

    _LOCAL = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

    def __init__(self) -> None:
        self._names: frozenset[str] | None = None

    def accepts(self, header: bytes) -> bool:
        name = host_name(header)
        if name is None:
            return False
        if name in self._LOCAL or _is_ip(name):
            return True
        if self._names is None:
            self._names = machine_names()
        return name in self._names


def host_name(header: bytes) -> str | None:
    """
    The name in a C{Host} header, lower case, without port, brackets or a
    final dot; C{None} if it is malformed.
    """
    try:
        text = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):  # [v6]:port
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name if _is_ip(name) else None
    if text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    name = text.rstrip(".")
    if not name or any(c.isspace() or c in "/@\\" for c in name):
        return None
    return name


def machine_names() -> frozenset[str]:
    """This machine's names, lower case, as the Host check accepts them."""
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower().rstrip(".") for n in names if n)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


MISDIRECTED, FORBIDDEN = 421, 403
_REASONS = {MISDIRECTED: b"Misdirected Request", FORBIDDEN: b"Forbidden"}


class _Refusal(Resource):
    """A short plain-text refusal, for any method; it shows no job data."""

    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self.code = code
        self.message = message

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code, _REASONS[self.code])
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (self.message + "\n").encode()


class JsonResource(Resource):
    isLeaf = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.data(request), indent=1).encode()

    def data(self, request: Request) -> dict[str, Any]:
        """What the request gets: the snapshot."""
        return self.snapshot()


class _Icon(Resource):
    """The pages' icon (each links it), so that a browser's request for one finds it."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"image/svg+xml")
        return _ICON_SVG


_ICON_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect x="1" y="3" width="9" height="4" fill="#4e79a7"/>'
    b'<rect x="6" y="9" width="9" height="4" fill="#f28e2b"/></svg>'
)
ICON = _Icon()


class JobJson(JsonResource):
    """A job's JSON; with C{?since=N}, its task stream too (from attempt C{N} on)."""

    def __init__(self, snapshot: JobSnapshot) -> None:
        super().__init__(snapshot)
        self.job = snapshot

    def data(self, request: Request) -> dict[str, Any]:
        since = request.args.get(b"since")  # type: ignore[attr-defined]
        return self.job(stream_since=_number(since[-1])) if since else self.job()


def _number(value: bytes) -> int:
    return int(value) if value.isdigit() and len(value) < 12 else 0


class JobEvents(Resource):
    """
    A job's server-sent events: one a second while the job runs, each the
    fresh C{<main>} and the task stream since the last (the first of a
    connection carries all of it, C{"reset": true}), and one last when it
    is over, after which the response ends.  A browser that loses the
    stream reconnects by itself (a server that resumes a job after a
    restart is followed so); the page's script closes it once the job is
    over.
    """

    isLeaf = True

    def __init__(self, snapshot: JobSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> int:
        from twisted.internet import reactor as default
        from twisted.web.server import NOT_DONE_YET

        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        # The reactor of the site that serves the request (every Site has one).
        clock: IReactorTime = getattr(request.channel.site, "reactor", None) or default  # type: ignore[attr-defined]
        stream = _EventStream(request, self.snapshot, clock)
        request.notifyFinish().addBoth(stream.stop)
        request.write(f"retry: {RECONNECT_MS}\n\n".encode())
        stream.loop.start(REFRESH_MS / 1000, now=True)
        return NOT_DONE_YET


class _EventStream:
    """One browser's event stream (L{JobEvents})."""

    def __init__(self, request: Request, snapshot: JobSnapshot, clock: IReactorTime) -> None:
        self.request = request
        self.snapshot = snapshot
        self.next = 0  # the first attempt not sent yet
        self.loop = LoopingCall(self.send)
        self.loop.clock = clock

    def send(self) -> None:
        status = self.snapshot(stream_since=self.next)
        if "phase" not in status:
            return  # (a cluster's job that is queued again: nothing to draw yet)
        stream = status.pop("stream", None) or empty_stream(self.next)
        event = {"status": status, "main": render_main(status), "stream": stream}
        if self.next == 0:
            event["reset"] = True
        self.next = stream["next"]
        self.request.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        if status["phase"] in ("finished", "failed"):
            self.stop(None)
            self.request.finish()

    def stop(self, reason: Failure | None) -> None:
        if self.loop.running:
            self.loop.stop()


def empty_stream(since: int = 0) -> dict[str, Any]:
    """The task stream of a job whose attempts are not known (any more)."""
    return {
        "first": since,
        "next": since,
        "attempts": [],
        "running": [],
        "samples": [],
        "workers": {},
    }


class _Page(Resource):
    isLeaf = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        status = self.snapshot()
        # Twisted declares Request.args as None (its class default); by render time
        # it is the query's dict.
        if request.args.get(b"part") == [b"main"]:  # type: ignore[attr-defined]
            return render_main(status).encode()
        return render_page(status).encode()


def render_page(status: dict[str, Any]) -> str:
    """The whole HTML document."""
    title = f"octo: {status['job']} ({status['phase']})"
    final = status["phase"] in ("finished", "failed")
    return render_document(
        title,
        render_main(status, pictures=_ENGINE_PICTURES if status.get("engine") else _PICTURES),
        live=not final,
        data="status.json",
        script=_JOB_SCRIPT_TEXT,
    )


def render_document(
    title: str,
    main: str,
    *,
    live: bool,
    data: str,
    script: str | None = None,
) -> str:
    """
    A status site's HTML page: C{main} inside C{<main>}, kept fresh by the
    page's script (C{script}, else the one that polls) while C{live}, with
    a link to its JSON, C{data}.
    """
    # Without JavaScript (terminal browsers), a meta refresh keeps it live.
    refresh = '<noscript><meta http-equiv="refresh" content="5"></noscript>' if live else ""
    return _PAGE.format(
        title=escape(title),
        refresh=refresh,
        main=main,
        style=_STYLE,
        script=_SCRIPT_TEXT if script is None else script,
        data=escape(data),
    )


def render_main(status: dict[str, Any], *, pictures: str = "") -> str:
    """
    The part of the page that changes: everything inside C{<main>}.  The
    pictures of time go after the throughput: the page's first rendering
    has them (C{pictures}), its updates an empty slot, where the script
    puts back the pictures it keeps drawing.
    """
    over = status["ok"] is not None
    parts = [
        _header(status),
        _phase("Map", status["map"], over),
        _phase("Reduce", status["reduce"], over),
    ]
    parts.append(_throughput(status))
    parts.append(pictures or '<div id="pictures-slot"></div>')
    parts.append(_workers(status["workers"]))
    parts.append(_failures(status["failures"]))
    parts.append(_counters(status.get("counters", {})))
    parts.append(_printed(status.get("printed", [])))
    if status["skipped"]:
        parts.append(_skipped(status["skipped"]))
    return "\n".join(parts)


def _header(s: dict[str, Any]) -> str:
    if s["ok"] is True:
        state = "finished"
    elif s["ok"] is False:
        state = "failed"
    else:
        state = s["phase"]
    error = f'<pre class="error">{escape(s["error"])}</pre>' if s["error"] else ""
    step = (
        f' &middot; step <span id="step">{s["step"]}</span> of <span id="steps">{s["steps"]}</span>'
        if s.get("steps", 1) > 1
        else ""
    )
    return (
        f'<h1>Job <span id="job">{escape(s["job"])}</span></h1>\n'
        f'<p>Phase: <strong id="phase" class="phase-{escape(state)}">{escape(state)}</strong>'
        f'{step} &middot; elapsed <span id="elapsed">{duration(s["elapsed"])}</span></p>{error}'
        + _engine(s.get("engine"))
    )


def _engine(engine: dict[str, Any] | None) -> str:
    """
    Where a job on an engine runs (C{--engine}), and links to the engine's
    own pages: what they know (each task's worker, timings, what it
    printed) the engine does not tell us.
    """
    if engine is None:
        return ""
    links = " &middot; ".join(
        f'<a href="{escape(link["url"])}" rel="noreferrer">{escape(link["label"])}</a>'
        for link in engine["links"]
    )
    more = f": the task stream and each task's worker are on {links}" if links else ""
    return (
        f'<p id="engine">Running on the <strong>{escape(engine["name"])}</strong> engine{more}.</p>'
    )


def _phase(label: str, p: dict[str, Any], over: bool = False) -> str:
    key = label.lower()
    total = p["total"]
    shown_total = "?" if total is None else str(total)
    if total:
        bar = f'<progress id="{key}-bar" value="{p["done"]}" max="{total}"></progress>'
    elif over:  # (a phase the job never reached: no bar that seems to be busy)
        bar = f'<progress id="{key}-bar" value="0" max="1"></progress>'
    else:
        bar = f'<progress id="{key}-bar"></progress>'  # (its size not known yet)
    pending = "?" if p["pending"] is None else p["pending"]
    running = "?" if p["running"] is None else p["running"]  # (an engine's: not told)
    left = p.get("eta")
    eta = f' &middot; about <span id="{key}-eta">{duration(left)}</span> left' if left else ""
    return (
        f'<section class="phase"><h2>{label} tasks</h2>\n{bar}\n'
        f'<p><span id="{key}-done">{p["done"]}</span>/<span id="{key}-total">{shown_total}</span>'
        f' done &middot; <span id="{key}-running">{running}</span> running'
        f' &middot; <span id="{key}-pending">{pending}</span> pending{eta}</p></section>'
    )


def _throughput(s: dict[str, Any]) -> str:
    t = s["throughput"]
    rate = f'<span id="tasks-per-second">{t["tasks_per_second"]:.1f}</span> tasks/s'
    if t["bytes_received"] is None:  # (an engine moves the bytes, and does not say)
        return f"<section><h2>Throughput</h2><p>{rate}</p></section>"
    return (
        f"<section><h2>Throughput</h2><p>{rate} &middot; "
        f'<span id="bytes-received">{_mib(t["bytes_received"])}</span> received from workers '
        f'(<span id="bytes-per-second">{_mib(t["bytes_per_second"])}</span>/s)</p></section>'
    )


def _workers(workers: list[dict[str, Any]]) -> str:
    if not workers:
        return '<section><h2>Workers</h2><p id="workers">No workers connected.</p></section>'
    rows = "\n".join(
        "<tr>"
        f'<td class="name">{escape(w["name"])}</td>'
        f"<td>{escape(str(w['host'] or '?'))}</td>"
        f"<td>{w['processes'] or '?'}</td>"
        f"<td>{_running(w['running'])}</td>"
        f"<td>{'?' if w['tasks_done'] is None else w['tasks_done']}</td>"
        f"{_heard(w)}</tr>"
        for w in workers
    )
    return (
        f'<section><h2>Workers (<span id="worker-count">{len(workers)}</span>)</h2>'
        '<div class="scroll"><table id="workers"><thead><tr><th>Worker</th><th>Host</th>'
        "<th>Processes</th><th>Running</th><th>Tasks done</th><th>Last heard</th></tr></thead>"
        f"<tbody>\n{rows}\n</tbody></table></div></section>"
    )


def _running(running: list[str] | None) -> str:
    """What a worker runs (an engine's workers: not told)."""
    return "?" if running is None else escape(", ".join(running)) or "idle"


def _heard(w: dict[str, Any]) -> str:
    """When a worker was last heard from; a suspect one, said so (it gets no new task)."""
    if w["last_heard"] is None:
        return "<td>?</td>"
    if w.get("suspect"):
        return f'<td class="error">silent for {w["last_heard"]:.0f} s</td>'
    return f"<td>{w['last_heard']:.1f} s ago</td>"


def _failures(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return '<section><h2>Failures</h2><p id="failures">None.</p></section>'
    return _attempts(
        "Failures",
        ("failures", "failure"),
        failures,
        lambda f: (
            (f" at key {f['key']}" if f["key"] is not None else "") + f": {f['error']}",
            f["traceback"],
        ),
    )


def _attempts(
    title: str,
    ids: tuple[str, str],
    entries: list[dict[str, Any]],
    what: Callable[[dict[str, Any]], tuple[str, str]],
) -> str:
    """
    A list of task attempts, each a summary line to click open for its
    text (a failure's traceback, what an attempt printed).

    @param ids: the list's id, and the prefix of its items' and count's.
    @param what: an entry's summary, after its attempt, and its text.
    """
    items = []
    for i, entry in enumerate(entries):
        summary, text = what(entry)
        items.append(
            f'<li><details id="{ids[1]}-{i}"><summary>{escape(entry["task"])} attempt '
            f"{entry['attempt']} on {escape(entry['worker'])}{escape(summary)}</summary>"
            f"<pre>{escape(text)}</pre></details></li>"
        )
    return (
        f'<section><h2>{title} (<span id="{ids[1]}-count">{len(entries)}</span>)</h2>'
        f'<ol id="{ids[0]}">\n' + "\n".join(items) + "\n</ol></section>"
    )


def _counters(counters: dict[str, int]) -> str:
    if not counters:
        return '<section><h2>Counters</h2><p id="counters">None yet.</p></section>'
    rows = "\n".join(
        f'<tr><td class="name">{escape(name)}</td><td class="n">{n:,}</td></tr>'
        for name, n in counters.items()
    )
    return (
        '<section><h2>Counters</h2><div class="scroll"><table id="counters"><thead><tr>'
        f'<th>Counter</th><th class="n">Total</th></tr></thead><tbody>\n{rows}\n'
        "</tbody></table></div></section>"
    )


def _printed(printed: list[dict[str, Any]]) -> str:
    if not printed:
        return ""
    return _attempts(
        "Printed by tasks, newest last",
        ("printed", "printed"),
        printed,
        lambda p: (f": {_first_line(p['text'])}", p["text"]),
    )


def _first_line(text: str) -> str:
    line = text.split("\n", 1)[0]
    return line if len(line) <= 120 else line[:120] + "..."


def _skipped(skipped: list[dict[str, Any]]) -> str:
    items = "\n".join(
        f"<li>{escape(r['task'])} (key {escape(r['key'])}): {escape(r['error'])}</li>"
        for r in skipped
    )
    return f'<section><h2>Skipped records</h2><ul id="skipped">\n{items}\n</ul></section>'


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>{refresh}
<link rel="icon" href="favicon.svg" type="image/svg+xml">
<style>{style}</style></head>
<body><main id="main">
{main}
</main>
<footer><p><span id="contact"></span><a href="{data}">{data}</a>
&middot; octotwist</p></footer>
<script>{script}</script>
</body></html>
"""

_STREAM = """<p class="legend"><span class="key k-map"></span>map
<span class="key k-reduce"></span>reduce <span class="key k-failed"></span>failed
<span class="key k-other"></span>cancelled, lost or superseded
<span class="key k-backup"></span>backup copy &middot;
<span id="stream-count">0</span> attempts</p>
<div class="scroll"><canvas id="stream" width="900" height="60"
 aria-label="Task stream: a row per worker process, a bar per task attempt"></canvas></div>
<div id="stream-detail"><p id="stream-hint">Point at a bar for its attempt; click to keep it.</p>
</div>
"""
_TASKS_CHART = """<figure><figcaption>Tasks per second</figcaption>
<canvas id="chart-tasks" width="290" height="90"></canvas></figure>"""
_BYTES_CHART = """<figcaption>MiB/s from and to workers</figcaption>
<canvas id="chart-bytes" width="290" height="90"></canvas>"""
_MEMORY_CHART = """<figure><figcaption>Workers' task memory, MiB</figcaption>
<canvas id="chart-memory" width="290" height="90"></canvas></figure>"""

_PICTURES = f"""<section id="pictures"><h2>Task stream</h2>
{_STREAM}<div class="charts">
{_TASKS_CHART}
<figure>{_BYTES_CHART}</figure>
{_MEMORY_CHART}
</div></section>
"""

#: An engine's job (C{--engine}): its attempts, bytes and memory over time are
#: the engine's to show (its dashboard), so those pictures are there for the
#: script, hidden.
_ENGINE_PICTURES = f"""<section id="pictures"><h2>Charts</h2>
<div hidden>{_STREAM}</div><div class="charts">
{_TASKS_CHART}
<figure hidden>{_BYTES_CHART}</figure>
<div hidden>{_MEMORY_CHART}</div>
</div></section>
"""

_STYLE = """
body { font: 16px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 0 1em;
       max-width: 60em; color: #222; background: #fff; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-bottom: .3em; }
progress { width: 100%; height: 1.2em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .9em; }
th, td { text-align: left; padding: .25em .5em; border-bottom: 1px solid #ddd; }
th.n, td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { overflow-x: auto; background: #f6f6f6; padding: .5em; font-size: .85em; }
.error { color: #a00; }
.phase-failed { color: #a00; } .phase-finished { color: #070; }
#pictures canvas { display: block; }
.legend { font-size: .85em; } .key { display: inline-block; width: 1em; height: .8em;
       margin: 0 .2em 0 .6em; vertical-align: middle; }
.k-map { background: #4e79a7; } .k-reduce { background: #f28e2b; }
.k-failed { background: #d62728; } .k-other { background: #bbb; }
.k-backup { border: 2px dashed #222; height: .5em; }
#stream-detail { font-size: .9em; min-height: 3em; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.charts figure { margin: 0; } figcaption { font-size: .85em; }
"""

# Fetches the fresh <main> and swaps it in, keeping open tracebacks open;
# stops once the job is over, and backs off while the server is unreachable.
_SCRIPT = """
(function () {
  var delay = REFRESH_MS;
  function over() {
    var p = document.getElementById("phase");
    return p && (p.textContent === "finished" || p.textContent === "failed");
  }
  function poll() {
    if (over()) { return; }
    fetch("?part=main", {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error(r.status); }
      return r.text();
    }).then(function (html) {
      var main = document.getElementById("main");
      var open = Array.prototype.map.call(
        main.querySelectorAll("details[open]"), function (d) { return d.id; });
      main.innerHTML = html;
      open.forEach(function (id) {
        var d = document.getElementById(id); if (d) { d.open = true; }
      });
      var job = document.getElementById("job"), phase = document.getElementById("phase");
      var title = document.getElementById("title");
      if (job && phase) {
        document.title = "octo: " + job.textContent + " (" + phase.textContent + ")";
      } else if (title) {
        document.title = title.textContent;
      }
      delay = REFRESH_MS;
      document.getElementById("contact").textContent = "";
    }).catch(function () {
      delay = Math.min(delay * 2, 10000);
      document.getElementById("contact").textContent =
        "Lost contact with the server (has the job ended?); trying again. ";
    }).then(function () { setTimeout(poll, delay); });
  }
  setTimeout(poll, delay);
})();
"""

_SCRIPT_TEXT = _SCRIPT.replace("REFRESH_MS", str(REFRESH_MS))

# A job's page: follows its event stream (L{JobEvents}), swaps the fresh
# <main> in, and draws the task stream and the charts, in canvases, from
# what the events bring; bar details are set as text, never as HTML.  Once
# the job is over it closes the stream; while the server is unreachable it
# says so, and the browser reconnects by itself.
_JOB_SCRIPT_TEXT = """(function () {
  "use strict";
  var attempts = [], running = [], samples = [], processes = {}, elapsed = 0;
  var pinned = null, bars = [], firstDraw = null;
  var COLORS = {map: "#4e79a7", reduce: "#f28e2b"};
  var ROW = 14, LEFT = 110;
  window.octoUpdates = 0;
  function byId(id) { return document.getElementById(id); }
  function over(status) { return status.phase === "finished" || status.phase === "failed"; }
  // The fresh <main> has an empty slot where the pictures go: they move
  // there whole, with what they show.
  function swapMain(html) {
    var main = byId("main"), pictures = byId("pictures");
    var open = Array.prototype.map.call(
      main.querySelectorAll("details[open]"), function (d) { return d.id; });
    pictures.parentNode.removeChild(pictures);
    main.innerHTML = html;
    var slot = byId("pictures-slot");
    if (slot) { slot.parentNode.replaceChild(pictures, slot); } else { main.appendChild(pictures); }
    open.forEach(function (id) { var d = byId(id); if (d) { d.open = true; } });
  }
  // A row per worker process.  An attempt that ended goes in the row of the
  // process that ran it, as its worker said; one still running (which of
  // the worker's processes has it is not known yet) in the row that has
  // been free the longest.
  function rows(list) {
    var workers = {}, order = [], placed = [], first = {}, n = 0;
    list.forEach(function (a) {
      var w = workers[a.worker];
      if (!w) { w = workers[a.worker] = {procs: [], ends: {}}; order.push(a.worker); }
      var p = a.process || 0;
      if (a.end !== undefined) {
        if (!(p in w.ends)) { w.procs.push(p); w.ends[p] = 0; }
        w.ends[p] = Math.max(w.ends[p], a.end);
      }
    });
    order.sort();
    order.forEach(function (name) {
      var w = workers[name];
      w.procs.sort(function (x, y) { return x - y; });
      w.row = {};
      w.free = [];
      w.procs.forEach(function (p, i) { w.row[p] = i; w.free[i] = w.ends[p]; });
      w.count = Math.max(w.procs.length, processes[name] || 0, 1);
      for (var i = w.procs.length; i < w.count; i += 1) { w.free[i] = 0; }
      first[name] = n;
      n += w.count;
    });
    list.slice().sort(function (a, b) { return a.start - b.start; }).forEach(function (a) {
      var w = workers[a.worker], lane = 0;
      if (a.end !== undefined) {
        lane = w.row[a.process || 0];
      } else {
        for (var i = 1; i < w.count; i += 1) { if (w.free[i] < w.free[lane]) { lane = i; } }
        w.free[lane] = Infinity;
      }
      placed.push({a: a, row: first[a.worker] + lane});
    });
    return {placed: placed, count: n, first: first, order: order};
  }
  function drawStream() {
    var canvas = byId("stream"), all = attempts.concat(running);
    var layout = rows(all);
    var width = Math.max(canvas.parentNode.clientWidth || 900, 300);
    var height = Math.max(layout.count, 1) * ROW + 18;
    if (canvas.width !== width) { canvas.width = width; }
    if (canvas.height !== height) { canvas.height = height; }
    var ctx = canvas.getContext("2d"), span = Math.max(elapsed, 0.001);
    var scale = (width - LEFT - 4) / span;
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#444";
    layout.order.forEach(function (w) {
      var top = layout.first[w] * ROW;
      ctx.fillText(w.length > 16 ? w.slice(0, 15) + "\\u2026" : w, 2, top + 11);
      ctx.fillRect(0, top, width, 0.5);
    });
    bars = [];
    layout.placed.forEach(function (p) {
      var a = p.a, end = a.end === undefined ? elapsed : a.end;
      var x = LEFT + a.start * scale, w = Math.max((end - a.start) * scale, 1);
      var y = p.row * ROW + 2, h = ROW - 4;
      var colour = COLORS[a.kind] || "#888";
      if (a.state === "failed") { colour = "#d62728"; }
      else if (a.state && a.state !== "ok") { colour = "#bbb"; }
      ctx.globalAlpha = a.end === undefined ? 0.5 : 1;
      ctx.fillStyle = colour;
      ctx.fillRect(x, y, w, h);
      ctx.globalAlpha = 1;
      if (a.backup) {
        ctx.setLineDash([3, 2]); ctx.strokeStyle = "#222";
        ctx.strokeRect(x + 0.5, y + 0.5, Math.max(w - 1, 1), h - 1); ctx.setLineDash([]);
      }
      bars.push({x: x, y: y, w: w, h: h, a: a});
    });
    ctx.fillStyle = "#444";
    ctx.fillText("0 s", LEFT, height - 4);
    var label = elapsed.toFixed(1) + " s";
    ctx.fillText(label, width - 4 - ctx.measureText(label).width, height - 4);
    byId("stream-count").textContent = String(attempts.length);
    // Where each bar is, for a test or a user script to find one.
    window.octoStream = bars.map(function (b) {
      return {x: b.x, y: b.y, w: b.w, h: b.h, task: b.a.task, attempt: b.a.attempt,
              state: b.a.state || "running"};
    });
  }
  function detail(a) {
    var box = byId("stream-detail");
    box.textContent = "";
    var p = document.createElement("p"), end = a.end === undefined ? null : a.end;
    var text = a.task + " attempt " + a.attempt + " on " + a.worker + ": " +
      (a.state || "running") + (a.backup ? " (backup copy)" : "") + ", " +
      (end === null ? "running since " + a.start.toFixed(2) + " s" :
       (end - a.start).toFixed(3) + " s, from " + a.start.toFixed(2) + " s");
    if (a.records_in !== undefined) {
      text += "; " + a.records_in + " records in, " + a.records_out + " out";
    }
    if (a.key !== undefined) { text += "; key " + a.key; }
    if (a.error !== undefined) { text += "; " + a.error; }
    if (a.why !== undefined) { text += "; " + a.why; }
    p.id = "stream-attempt";
    p.textContent = text;
    box.appendChild(p);
    if (a.counters && Object.keys(a.counters).length) {
      var c = document.createElement("p");
      c.id = "stream-counters";
      c.textContent = "Counters: " + Object.keys(a.counters).sort().map(function (k) {
        return k + " " + a.counters[k]; }).join(", ");
      box.appendChild(c);
    }
    if (a.traceback !== undefined) {
      var pre = document.createElement("pre");
      pre.id = "stream-traceback";
      pre.textContent = a.traceback;
      box.appendChild(pre);
    }
    if (a.output !== undefined) {
      var out = document.createElement("pre");
      out.id = "stream-output";
      out.textContent = a.output;
      box.appendChild(out);
    }
  }
  function hit(event) {
    var r = byId("stream").getBoundingClientRect();
    var x = event.clientX - r.left, y = event.clientY - r.top;
    // Of the bars under the pointer (short ones overlap), a failure first:
    // it is what one looks for.
    var found = null;
    for (var i = bars.length - 1; i >= 0; i -= 1) {
      var b = bars[i];
      if (x >= b.x - 2 && x <= b.x + b.w + 2 && y >= b.y && y <= b.y + b.h) {
        if (b.a.state === "failed") { return b.a; }
        if (!found) { found = b.a; }
      }
    }
    return found;
  }
  function chart(id, series, colours) {
    var canvas = byId(id), ctx = canvas.getContext("2d");
    var w = canvas.width, h = canvas.height, top = 0, tmax = 0.001;
    ctx.clearRect(0, 0, w, h);
    series.forEach(function (s) { s.forEach(function (p) {
      top = Math.max(top, p[1]); tmax = Math.max(tmax, p[0]); }); });
    ctx.strokeStyle = "#ccc"; ctx.strokeRect(0.5, 0.5, w - 1, h - 1);
    series.forEach(function (s, i) {
      ctx.strokeStyle = colours[i % colours.length]; ctx.beginPath();
      s.forEach(function (p, j) {
        var x = 2 + p[0] / tmax * (w - 4), y = h - 2 - (top ? p[1] / top : 0) * (h - 16);
        if (j) { ctx.lineTo(x, y); } else { ctx.moveTo(x, y); }
      });
      ctx.stroke();
    });
    ctx.fillStyle = "#444"; ctx.font = "10px system-ui, sans-serif";
    ctx.fillText("max " + (top >= 10 ? top.toFixed(0) : top.toFixed(1)), 4, 11);
  }
  function rate(field, divisor) {
    var out = [];
    for (var i = 1; i < samples.length; i += 1) {
      var a = samples[i - 1], b = samples[i], dt = b.t - a.t;
      if (dt > 0) { out.push([b.t, (field(b) - field(a)) / dt / divisor]); }
    }
    return out;
  }
  function drawCharts() {
    chart("chart-tasks", [rate(function (s) { return s.map_done + s.reduce_done; }, 1)],
          ["#4e79a7"]);
    chart("chart-bytes", [rate(function (s) { return s.bytes_received; }, 1048576),
                          rate(function (s) { return s.bytes_sent; }, 1048576)],
          ["#4e79a7", "#f28e2b"]);
    var names = {};
    samples.forEach(function (s) { Object.keys(s.memory || {}).forEach(function (n) {
      names[n] = true; }); });
    chart("chart-memory", Object.keys(names).sort().map(function (n) {
      return samples.filter(function (s) { return s.memory && n in s.memory; })
        .map(function (s) { return [s.t, s.memory[n] / 1048576]; });
    }), ["#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"]);
  }
  function apply(event) {
    var data = JSON.parse(event.data), stream = data.stream;
    if (data.reset) { attempts = []; }
    attempts = attempts.concat(stream.attempts);
    running = stream.running;
    samples = stream.samples;
    processes = stream.workers;
    elapsed = data.status.elapsed;
    swapMain(data.main);
    document.title = "octo: " + data.status.job + " (" + data.status.phase + ")";
    byId("contact").textContent = "";
    var began = performance.now();
    drawStream();
    drawCharts();
    // How long drawing took, and when the page first drew (for
    // benchmarks/status_page.py): milliseconds.
    window.octoDrawMs = performance.now() - began;
    if (firstDraw === null) { firstDraw = window.octoFirstDrawMs = performance.now(); }
    window.octoUpdates += 1;
    if (over(data.status)) { source.close(); }
  }
  var stream = byId("stream");
  stream.addEventListener("mousemove", function (e) {
    if (pinned) { return; }
    var a = hit(e); if (a) { detail(a); }
  });
  stream.addEventListener("click", function (e) {
    var a = hit(e); pinned = a; if (a) { detail(a); }
  });
  window.addEventListener("resize", function () { drawStream(); drawCharts(); });
  var source = new EventSource("events");
  source.onmessage = apply;
  source.onerror = function () {
    if (source.readyState === EventSource.CLOSED) { return; }
    byId("contact").textContent =
      "Lost contact with the server (has the job ended?); trying again. ";
  };
})();
"""


def _sha256(text: str) -> str:
    """A CSP source that allows exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: Nothing but this server's own inline script and style (allowed by their
#: hashes, so that no injected script could run even if escaping failed),
#: fetches back to this server, and no framing, forms or base URL.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_sha256(_SCRIPT_TEXT)} {_sha256(_JOB_SCRIPT_TEXT)}; "
    f"style-src {_sha256(_STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

#: Set on every response of the status site, refusals and 404s included:
#: the policy above; no guessing of content types; no Referer (a URL with
#: the token must not leak to another site); never cached (the data goes
#: stale, and is not for a shared cache); never framed.
SECURITY_HEADERS: dict[bytes, bytes] = {
    b"content-security-policy": CONTENT_SECURITY_POLICY.encode(),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
    b"x-frame-options": b"DENY",
}

"""
The live status page: C{GET /} (HTML a person leaves open) and C{GET
/status.json} (the same data for programs), served by C{--web ENDPOINT} with
any transport, and on the transport's own port by transports that speak
HTTP (L{octotwist.transport.ServerSettings.status}).

The page is rendered here, on the server, so that it reads the same in a
desktop browser, on a phone and in a terminal browser without JavaScript.
Where JavaScript runs, a small script fetches C{/?part=main} once a second
and swaps the fresh body in: one rendering path, no page reloads, nothing
fetched from anywhere but this server.  The data comes from
L{octotwist.server.JobServer.status}; its fields are documented in
docs/status.md.

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
from typing import TYPE_CHECKING, Any

from twisted.web.resource import IResource, Resource

if TYPE_CHECKING:  # twisted.web.server costs every command 20 ms to import
    from twisted.web.server import Request

Snapshot = Callable[[], dict[str, Any]]

#: How often the page asks for fresh data, in milliseconds.
REFRESH_MS = 1000


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

    def __init__(self, snapshot: Snapshot, *, token: str | None) -> None:
        super().__init__(token=token)
        self.snapshot = snapshot
        add_job_pages(self, snapshot)


def add_job_pages(parent: Resource, snapshot: Snapshot) -> None:
    """Put one job's page (C{b""}) and JSON (C{b"status.json"}) under C{parent}."""
    parent.putChild(b"", _Page(snapshot))
    parent.putChild(b"status.json", JsonResource(snapshot))


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
        return json.dumps(self.snapshot(), indent=1).encode()


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
    return render_document(title, render_main(status), live=not final, data="status.json")


def render_document(title: str, main: str, *, live: bool, data: str) -> str:
    """
    A status site's HTML page: C{main} inside C{<main>}, kept fresh by the
    page's script while C{live}, with a link to its JSON, C{data}.
    """
    # Without JavaScript (terminal browsers), a meta refresh keeps it live.
    refresh = '<noscript><meta http-equiv="refresh" content="5"></noscript>' if live else ""
    return _PAGE.format(
        title=escape(title),
        refresh=refresh,
        main=main,
        style=_STYLE,
        script=_SCRIPT_TEXT,
        data=escape(data),
    )


def render_main(status: dict[str, Any]) -> str:
    """The part of the page that changes: everything inside C{<main>}."""
    parts = [_header(status), _phase("Map", status["map"]), _phase("Reduce", status["reduce"])]
    parts.append(_throughput(status))
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
    )


def _phase(label: str, p: dict[str, Any]) -> str:
    key = label.lower()
    total = p["total"]
    shown_total = "?" if total is None else str(total)
    bar = (
        f'<progress id="{key}-bar" value="{p["done"]}" max="{total}"></progress>'
        if total
        else f'<progress id="{key}-bar"></progress>'
    )
    pending = "?" if p["pending"] is None else p["pending"]
    return (
        f'<section class="phase"><h2>{label} tasks</h2>\n{bar}\n'
        f'<p><span id="{key}-done">{p["done"]}</span>/<span id="{key}-total">{shown_total}</span>'
        f' done &middot; <span id="{key}-running">{p["running"]}</span> running'
        f' &middot; <span id="{key}-pending">{pending}</span> pending</p></section>'
    )


def _throughput(s: dict[str, Any]) -> str:
    t = s["throughput"]
    return (
        '<section><h2>Throughput</h2><p><span id="tasks-per-second">'
        f"{t['tasks_per_second']:.1f}</span> tasks/s &middot; "
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
        f"<td>{escape(', '.join(w['running'])) or 'idle'}</td>"
        f"<td>{w['tasks_done']}</td>"
        f"{_heard(w)}</tr>"
        for w in workers
    )
    return (
        f'<section><h2>Workers (<span id="worker-count">{len(workers)}</span>)</h2>'
        '<div class="scroll"><table id="workers"><thead><tr><th>Worker</th><th>Host</th>'
        "<th>Processes</th><th>Running</th><th>Tasks done</th><th>Last heard</th></tr></thead>"
        f"<tbody>\n{rows}\n</tbody></table></div></section>"
    )


def _heard(w: dict[str, Any]) -> str:
    """When a worker was last heard from; a suspect one, said so (it gets no new task)."""
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
<style>{style}</style></head>
<body><main id="main">
{main}
</main>
<footer><p><span id="contact"></span><a href="{data}">{data}</a>
&middot; octotwist</p></footer>
<script>{script}</script>
</body></html>
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


def _sha256(text: str) -> str:
    """A CSP source that allows exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: Nothing but this server's own inline script and style (allowed by their
#: hashes, so that no injected script could run even if escaping failed),
#: fetches back to this server, and no framing, forms or base URL.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_sha256(_SCRIPT_TEXT)}; style-src {_sha256(_STYLE)}; "
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

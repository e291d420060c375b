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
"""

from __future__ import annotations

import json
from collections.abc import Callable
from html import escape
from typing import TYPE_CHECKING, Any

from twisted.web.resource import Resource

if TYPE_CHECKING:  # twisted.web.server costs every command 20 ms to import
    from twisted.web.server import Request

Snapshot = Callable[[], dict[str, Any]]

#: How often the page asks for fresh data, in milliseconds.
REFRESH_MS = 1000


class StatusPage(Resource):
    """
    The root of the status site: C{b""} is the HTML page and
    C{b"status.json"} the JSON; anything else is 404.

    @param snapshot: returns the current status (L{JobServer.status}).
    """

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.putChild(b"", _Page(snapshot))
        self.putChild(b"status.json", _Json(snapshot))


class _Json(Resource):
    isLeaf = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.snapshot(), indent=1).encode()


class _Page(Resource):
    isLeaf = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        status = self.snapshot()
        if request.args.get(b"part") == [b"main"]:
            return render_main(status).encode()
        return render_page(status).encode()


def render_page(status: dict[str, Any]) -> str:
    """The whole HTML document."""
    title = f"octo: {status['job']} ({status['phase']})"
    final = status["phase"] in ("finished", "failed")
    # Without JavaScript (terminal browsers), a meta refresh keeps it live.
    refresh = "" if final else '<noscript><meta http-equiv="refresh" content="5"></noscript>'
    return _PAGE.format(
        title=escape(title),
        refresh=refresh,
        main=render_main(status),
        style=_STYLE,
        script=_SCRIPT.replace("REFRESH_MS", str(REFRESH_MS)),
    )


def render_main(status: dict[str, Any]) -> str:
    """The part of the page that changes: everything inside C{<main>}."""
    parts = [_header(status), _phase("Map", status["map"]), _phase("Reduce", status["reduce"])]
    parts.append(_throughput(status))
    parts.append(_workers(status["workers"]))
    parts.append(_failures(status["failures"]))
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
    return (
        f'<h1>Job <span id="job">{escape(s["job"])}</span></h1>\n'
        f'<p>Phase: <strong id="phase" class="phase-{escape(state)}">{escape(state)}</strong>'
        f' &middot; elapsed <span id="elapsed">{_duration(s["elapsed"])}</span></p>{error}'
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
        f"<td>{w['last_heard']:.1f} s ago</td>"
        "</tr>"
        for w in workers
    )
    return (
        f'<section><h2>Workers (<span id="worker-count">{len(workers)}</span>)</h2>'
        '<div class="scroll"><table id="workers"><thead><tr><th>Worker</th><th>Host</th>'
        "<th>Processes</th><th>Running</th><th>Tasks done</th><th>Last heard</th></tr></thead>"
        f"<tbody>\n{rows}\n</tbody></table></div></section>"
    )


def _failures(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return '<section><h2>Failures</h2><p id="failures">None.</p></section>'
    items = "\n".join(
        f'<li><details id="failure-{i}"><summary>{escape(f["task"])} attempt {f["attempt"]} on '
        f"{escape(f['worker'])}{' at key ' + escape(f['key']) if f['key'] is not None else ''}"
        f": {escape(f['error'])}</summary><pre>{escape(f['traceback'])}</pre></details></li>"
        for i, f in enumerate(failures)
    )
    return (
        f'<section><h2>Failures (<span id="failure-count">{len(failures)}</span>)</h2>'
        f'<ol id="failures">\n{items}\n</ol></section>'
    )


def _skipped(skipped: list[dict[str, Any]]) -> str:
    items = "\n".join(
        f"<li>{escape(r['task'])} (key {escape(r['key'])}): {escape(r['error'])}</li>"
        for r in skipped
    )
    return f'<section><h2>Skipped records</h2><ul id="skipped">\n{items}\n</ul></section>'


def _duration(seconds: float) -> str:
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
<footer><p><span id="contact"></span><a href="status.json">status.json</a>
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
      document.title = "octo: " + document.getElementById("job").textContent +
        " (" + document.getElementById("phase").textContent + ")";
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

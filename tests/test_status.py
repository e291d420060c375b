"""
The live status page (HTML and JSON) read over real HTTP while a real job
runs, and the terminal progress display on a real pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from conftest import EXAMPLES, finish, free_port, gate, octo, parse_tsv, start, wait_for_port
from test_end_to_end import books_job, job

from octotwist.status import render_page

SLOW_SOURCE = {i: f"w{i} x y" for i in range(12)}
#: Map tasks done before the gate: the job is observed mid-way, deterministically.
BEFORE_GATE = 4


def slow_job(tmp_path: Path) -> tuple[Path, Path]:
    """
    Twelve keys; the map tasks of keys from L{BEFORE_GATE} on wait until the
    gate file exists, so the job is seen running with exactly that many maps
    done, however slow the machine.  Key 7 always fails, so the page has a
    failure (with --skip-bad-records the job still completes).  Returns the
    job script and the gate file (not yet created).
    """
    gate_file = tmp_path / "gate"
    text = (
        gate(gate_file)
        + f"""
import time
source = {SLOW_SOURCE!r}
def mapfn(key, value):
    time.sleep(0.1)
    if key >= {BEFORE_GATE}:
        _gate()
    if key == 7:
        raise RuntimeError("bad record seven")
    for word in value.split():
        yield word, 1
def reducefn(key, values):
    return key, sum(values)
"""
    )
    return job(tmp_path, text), gate_file


class PageParser(HTMLParser):
    """Collects the text of every element with an id, and the <progress> bars."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.progress: dict[str, dict[str, str | None]] = {}
        self.title = ""
        self._open: list[tuple[str | None, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "progress":
            self.progress[a.get("id") or "?"] = a
            return
        if tag in ("meta", "br", "input", "link"):
            return
        self._open.append((a.get("id") or ("title" if tag == "title" else None), []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "progress" or not self._open:
            return
        name, text = self._open.pop()
        joined = "".join(text)
        if name == "title":
            self.title = joined
        elif name:
            self.by_id[name] = joined
        if self._open:
            self._open[-1][1].append(joined)

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][1].append(data)


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers["content-type"], r.read()


def page(url: str) -> PageParser:
    kind, body = get(url)
    assert kind.startswith("text/html")
    parser = PageParser()
    parser.feed(body.decode())
    return parser


def status(url: str, since: int | None = None) -> dict[str, Any]:
    kind, body = get(url + "status.json" + ("" if since is None else f"?since={since}"))
    assert kind == "application/json"
    return json.loads(body)


def wait_until(predicate: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_status_page_follows_a_running_job(transport: str, env: dict, tmp_path: Path) -> None:
    port, web = free_port(), free_port()
    out = tmp_path / "out.tsv"
    script, gate_file = slow_job(tmp_path)
    server = start(
        "server", str(script), "--transport", transport,
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--web", f"tcp:{web}:interface=127.0.0.1",
        "-o", str(out), "-r", "2", "--skip-bad-records", "--max-attempts", "2", env=env,
    )  # fmt: skip
    wait_for_port(web, server)
    url = f"http://127.0.0.1:{web}/"

    # Before any worker: nothing done, everything pending, no workers.
    before = status(url)
    assert before["job"] == "job" and before["phase"] == "mapping"
    assert before["map"] == {"total": 12, "done": 0, "running": 0, "pending": 12, "eta": None}
    assert before["reduce"]["total"] == 2 and before["workers"] == []
    html = page(url)
    assert html.by_id["job"] == "job" and html.by_id["phase"] == "mapping"
    assert (html.by_id["map-done"], html.by_id["map-total"]) == ("0", "12")
    assert html.by_id["workers"] == "No workers connected."
    assert html.progress["map-bar"]["max"] == "12"
    assert html.title == "octo: job (mapping)"

    wait_for_port(port, server)
    client = start("client", f"127.0.0.1:{port}", "--transport", transport, "-n", "w1", env=env)

    # Mid-job (the maps before the gate done, the next one held at the gate):
    # the worker listed with its current task.
    mid = wait_until(lambda: (s := status(url))["map"]["done"] >= BEFORE_GATE and s)
    assert mid["map"]["done"] == BEFORE_GATE and mid["phase"] == "mapping"
    assert mid["map"]["running"] >= 1
    assert mid["map"]["running"] + mid["map"]["pending"] == 12 - BEFORE_GATE
    (worker,) = mid["workers"]
    assert worker["name"] == "w1" and worker["processes"] == 1
    assert worker["host"] and worker["pid"] and worker["last_heard"] < 10
    assert f"map {BEFORE_GATE} attempt 1" in worker["running"], worker
    html = page(url)
    assert html.by_id["map-done"] == str(BEFORE_GATE)
    assert html.progress["map-bar"]["value"] == str(BEFORE_GATE)
    assert html.by_id["worker-count"] == "1"
    assert "w1" in html.by_id["workers"]
    assert f"map {BEFORE_GATE} attempt 1" in html.by_id["workers"]
    assert float(html.by_id["tasks-per-second"]) > 0
    # Time left, at the rate so far: a figure while tasks remain, on the page too.
    assert mid["map"]["eta"] > 0 and html.by_id["map-eta"]
    # The task stream: the attempts that ended, each once, from ?since= on.
    stream = status(url, since=0)["stream"]
    done = [a for a in stream["attempts"] if a["state"] == "ok"]
    assert sorted(a["task"] for a in done) == [f"map {i}" for i in range(BEFORE_GATE)]
    assert all(a["worker"] == "w1" and 0 <= a["start"] <= a["end"] for a in done)
    assert all(a["records_in"] == 1 and a["kind"] == "map" for a in done)
    # (sent: the one at the gate, and those the worker holds ready behind it)
    sent = [a["task"] for a in stream["running"]]
    assert f"map {BEFORE_GATE}" in sent and len(sent) == mid["map"]["running"], sent
    later = status(url, since=stream["next"])["stream"]
    assert later["first"] == stream["next"] and later["attempts"] == []
    assert stream["samples"] and stream["samples"][-1]["map_done"] <= BEFORE_GATE
    gate_file.touch()

    # The failed record shows with the user's traceback, on the page too.
    failing = wait_until(lambda: (s := status(url))["failures"] and s)
    failure = failing["failures"][0]
    assert failure["task"] == "map 7" and failure["worker"] == "w1" and failure["key"] == "7"
    assert "bad record seven" in failure["error"]
    assert 'raise RuntimeError("bad record seven")' in failure["traceback"]
    html = page(url)
    assert int(html.by_id["failure-count"]) >= 1
    assert "bad record seven" in html.by_id["failure-0"]

    assert finish(client)[0] == 0
    assert finish(server)[0] == 0
    # Every record's words but the skipped key 7's, counted here.
    expected = Counter(w for k, text in SLOW_SOURCE.items() if k != 7 for w in text.split())
    assert parse_tsv(out.read_text()) == expected


def test_status_page_escapes_what_it_shows() -> None:
    evil = "<script>alert(1)</script>"
    html = render_page(
        {
            "job": evil,
            "phase": "mapping",
            "ok": None,
            "error": None,
            "elapsed": 75.2,
            "map": {"total": None, "done": 3, "running": 1, "pending": None},
            "reduce": {"total": 4, "done": 0, "running": 0, "pending": 4},
            "workers": [
                {
                    "name": evil,
                    "host": "h",
                    "pid": 1,
                    "peer": "tcp:127.0.0.1:1",
                    "processes": 2,
                    "running": ["map 3 attempt 1"],
                    "tasks_done": 3,
                    "last_heard": 0.5,
                }
            ],
            "failures": [],
            "printed": [
                {"task": "map 3", "attempt": 1, "worker": evil, "text": evil, "elapsed": 1.0}
            ],
            "counters": {evil: 7},
            "skipped": [],
            "step": 2,
            "steps": 3,
            "throughput": {"tasks_per_second": 0.1, "bytes_received": 0, "bytes_per_second": 0},
        }
    )
    assert evil not in html and "&lt;script&gt;" in html
    parser = PageParser()
    parser.feed(html)
    assert parser.by_id["map-total"] == "?" and parser.by_id["elapsed"] == "1 min 15 s"
    assert (parser.by_id["step"], parser.by_id["steps"]) == ("2", "3")
    assert parser.by_id["printed-count"] == "1"
    assert "value" not in parser.progress["map-bar"]  # unknown total: indeterminate bar
    # Nothing is fetched from elsewhere: no absolute URL in a src or href.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<script src" not in html
    # One link: the page's own icon, served by the same server.
    assert re.findall(r"<link[^>]*>", html) == [
        '<link rel="icon" href="favicon.svg" type="image/svg+xml">'
    ]


def test_web_endpoint_errors_are_usage_errors(env: dict, tmp_path: Path) -> None:
    r = octo("server", str(slow_job(tmp_path)[0]), "--web", "nonsense:1", env=env, timeout=30)
    assert r.returncode == 2 and "--web nonsense:1" in r.stderr


def run_on_a_terminal(argv: list[str], env: dict, timeout: float = 120) -> tuple[int, str]:
    """Run C{argv} with stdout and stderr on a pseudo-terminal; all it wrote."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


def test_octo_run_draws_progress_bars_on_a_terminal(
    env: dict, tmp_path: Path, expected_books: Counter
) -> None:
    out = tmp_path / "out.tsv"
    code, screen = run_on_a_terminal(
        [sys.executable, "-m", "octotwist", "run", str(books_job(tmp_path)), "-w", "2",
         "-o", str(out), "-r", "3"],
        env=dict(env, COLUMNS="120", TERM="xterm"),
    )  # fmt: skip
    assert code == 0, screen
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert re.search(r"map\s.*6/6", plain), plain[-2000:]
    assert re.search(r"reduce\s.*3/3", plain), plain[-2000:]
    # Time left, then time taken (h:mm:ss), on each bar.
    assert re.search(r"map\s.*6/6.*eta\s+\S+\s+·\s+\d+:\d\d:\d\d", plain), plain[-2000:]
    assert "\x1b[" in screen  # drawn, not logged
    assert "job job finished" in plain
    assert parse_tsv(out.read_text()) == expected_books


def test_no_control_characters_when_not_a_terminal(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "out.tsv"
    r = octo("run", str(EXAMPLES / "wordcount.py"), "-w", "2", "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr and "\r" not in r.stderr
    assert "job wordcount finished" in r.stderr

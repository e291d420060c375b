"""
The status page guards itself (security review, issue 12, finding 7): it
binds the server's interface unless told otherwise, needs a token when it is
reachable from beyond loopback, answers only to this machine's names in
C{Host} (DNS rebinding), and sends security headers with every response,
whoever serves it (C{--web}, or the http transport on its own port).

Real C{octo} processes, real HTTP.  A page may be bound to 0.0.0.0 here, but
the tests only ever connect to 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest
from conftest import free_port, octo, start, wait_for_port
from test_end_to_end import job

#: A job nobody works for (no client is started): the server waits, its
#: page stays up.  Its name is what a refused request must not show.
WAITING = """
source = {i: "secret-key-%d" % i for i in range(5)}
def mapfn(key, value):
    yield value, 1
def reducefn(key, values):
    return key, sum(values)
"""
NAME = "confidential_job"

#: Slow enough for octo run to keep its page up while the test looks.
SLOW = """
import time
source = {i: "w%d" % i for i in range(40)}
def mapfn(key, value):
    time.sleep(0.25)
    yield value, 1
def reducefn(key, values):
    return key, sum(values)
"""

#: No proxy from the environment: every request goes straight to 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, **headers: str) -> tuple[int, Message, bytes]:
    """GET C{url}: status, headers and body, for errors too."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with _opener.open(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


class Logged:
    """A started octo process whose stderr a thread reads, line by line."""

    def __init__(self, proc: object) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self.proc.stderr:
                self.lines.append(line)
        except (OSError, ValueError):  # closed under us after a failed test
            pass

    def wait_for_port(self, port: int, timeout: float = 30) -> None:
        """Wait for a listener on 127.0.0.1:PORT; if the process ends first, say what it logged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(
                    f"exited early ({self.proc.returncode}):\n{''.join(self.lines)}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"nothing listens on port {port} after {timeout} s")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first line matching C{pattern}, once it has been written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.lines)}")

    def finish(self, timeout: float = 120) -> int:
        """Wait for the process to exit by itself; its exit status."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        """Stop a server that would wait for workers for ever."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.finish(timeout=30)


def page_line(server: Logged) -> re.Match[str]:
    return server.wait_for(r"status page at (\S+) \(listening on ([^;]+); ([^)]*)\)")


def serve(tmp_path: Path, env: dict, *args: str, listen: str | None = None) -> Logged:
    """C{octo server} for L{WAITING}, on loopback unless C{listen} says otherwise."""
    port = free_port()
    server = start(
        "server", str(job(tmp_path, WAITING, f"{NAME}.py")),
        "--listen", listen or f"tcp:{port}:interface=127.0.0.1", *args, env=env,
    )  # fmt: skip
    return Logged(server)


def refused_by(address: str, port: int) -> bool:
    """Whether a connection to C{address:port} is refused (nothing listens there)."""
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((address, port)) != 0


@pytest.fixture
def other_loopback() -> str:
    """127.0.0.2: on loopback too, but a socket bound to 127.0.0.1 does not answer it."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 is not usable here")
    return "127.0.0.2"


def assert_no_job_data(body: bytes) -> None:
    text = body.decode()
    assert NAME not in text and "secret-key" not in text and "mapping" not in text
    assert len(text.splitlines()) == 1  # a one-line reason


def assert_security_headers(headers: Message) -> None:
    csp = headers["content-security-policy"]
    assert csp, headers
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["base-uri"] == "'none'" and directives["form-action"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"


def test_web_binds_the_interface_of_a_loopback_server(
    env: dict, tmp_path: Path, other_loopback: str
) -> None:
    web = free_port()
    server = serve(tmp_path, env, "--web", f"tcp:{web}")
    server.wait_for_port(web)
    # Bound to 127.0.0.1, not 0.0.0.0: another loopback address gets no answer.
    assert refused_by(other_loopback, web)
    status, _, body = fetch(f"http://127.0.0.1:{web}/status.json")  # no token on loopback
    assert status == 200 and json.loads(body)["job"] == NAME
    # And the log says so, with the real address.
    url, bound, scope = page_line(server).groups()
    assert url == f"http://127.0.0.1:{web}/" and bound == f"127.0.0.1:{web}"
    assert scope == "this machine only"
    server.stop()


def test_octo_run_serves_its_page_on_loopback(
    env: dict, tmp_path: Path, other_loopback: str
) -> None:
    web = free_port()
    run = start("run", str(job(tmp_path, SLOW)), "-w", "1", "--web", f"tcp:{web}", env=env)
    logged = Logged(run)
    wait_for_port(web, run)
    assert refused_by(other_loopback, web)
    assert fetch(f"http://127.0.0.1:{web}/status.json")[0] == 200
    url, bound, _ = page_line(logged).groups()
    assert url == f"http://127.0.0.1:{web}/" and bound == f"127.0.0.1:{web}"
    assert logged.finish() == 0, "".join(logged.lines)


def test_a_page_beyond_loopback_needs_the_token(env: dict, tmp_path: Path) -> None:
    web = free_port()
    server = serve(tmp_path, env, "--web", f"tcp:{web}:interface=0.0.0.0")
    server.wait_for_port(web)
    here = f"http://127.0.0.1:{web}/"

    # Without the token, or with a wrong one: 403, and nothing about the job.
    for path in ("", "status.json", "?part=main", "?token=wrong", "status.json?token=" + "x" * 43):
        status, headers, body = fetch(here + path)
        assert status == 403, path
        assert headers["content-type"].startswith("text/plain")
        assert "token" in body.decode()
        assert_no_job_data(body)
    assert fetch(here, Cookie=f"octo-status-{web}={'y' * 43}")[0] == 403

    # The logged URL (on 127.0.0.1): the page, and a cookie for what follows.
    url, bound, scope = page_line(server).groups()
    assert bound == f"every interface, 0.0.0.0:{web}" and "token is required" in scope
    token = re.fullmatch(rf"http://[^/]+:{web}/\?token=([A-Za-z0-9_-]{{43}})", url).group(1)
    status, headers, body = fetch(f"{here}?token={token}")
    assert status == 200 and NAME in body.decode()
    cookie = headers["set-cookie"]
    attributes = [a.strip().lower() for a in cookie.split(";")]
    assert attributes[0] == f"octo-status-{web}={token}".lower()
    assert {"httponly", "samesite=strict", "path=/"} <= set(attributes)
    jar = cookie.split(";", 1)[0]

    # The page's own refresh (fetch("?part=main")) and its status.json link
    # carry no token: the cookie lets them through.
    status, _, body = fetch(here + "?part=main", Cookie=jar)
    assert status == 200 and 'id="phase"' in body.decode()
    status, _, body = fetch(here + "status.json", Cookie=jar)
    assert status == 200 and json.loads(body)["job"] == NAME
    assert fetch(f"{here}status.json?token={token}")[0] == 200  # programs: no cookie needed
    server.stop()


def test_the_host_header_is_checked(env: dict, tmp_path: Path) -> None:
    web = free_port()
    server = serve(tmp_path, env, "--web", f"tcp:{web}:interface=127.0.0.1")
    here = f"http://127.0.0.1:{web}/"
    server.wait_for_port(web)
    refused = ["evil.example", f"evil.example:{web}", "127.0.0.1.evil.example", "localhost.evil"]
    for host in refused:
        status, headers, body = fetch(here + "status.json", Host=host)
        assert status == 421, host
        assert "Host" in body.decode() and "DNS rebinding" in body.decode()
        assert_no_job_data(body)
        assert_security_headers(headers)
    names = {socket.gethostname(), socket.getfqdn()} - {""}
    accepted = ["localhost", f"localhost:{web}", "LOCALHOST", "127.0.0.1", f"[::1]:{web}", *names]
    for host in accepted:
        status, _, body = fetch(here + "status.json", Host=host)
        assert status == 200 and json.loads(body)["job"] == NAME, host
    server.stop()


def test_the_token_does_not_get_around_the_host_check(env: dict, tmp_path: Path) -> None:
    web = free_port()
    server = serve(tmp_path, env, "--web", f"tcp:{web}:interface=0.0.0.0")
    server.wait_for_port(web)
    assert fetch(f"http://127.0.0.1:{web}/", Host="evil.example")[0] == 421  # checked first
    token = page_line(server).group(1).rsplit("=", 1)[1]
    status, _, body = fetch(f"http://127.0.0.1:{web}/?token={token}", Host="evil.example")
    assert status == 421
    assert_no_job_data(body)
    server.stop()


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_every_response_carries_the_security_headers(env: dict, tmp_path: Path) -> None:
    web = free_port()
    server = serve(tmp_path, env, "--web", f"tcp:{web}:interface=0.0.0.0")
    server.wait_for_port(web)
    here = f"http://127.0.0.1:{web}/"
    assert_security_headers(fetch(here)[1])  # refused (no token)
    token = page_line(server).group(1).rsplit("=", 1)[1]
    cases = {
        f"?token={token}": 200,
        f"status.json?token={token}": 200,
        f"?part=main&token={token}": 200,
        f"nothing-here?token={token}": 404,
        "": 403,
    }
    for path, expected in cases.items():
        status, headers, _ = fetch(here + path)
        assert status == expected, path
        assert_security_headers(headers)

    # The page's inline script and style are allowed by their hashes, so the
    # policy does not stop the page from refreshing itself.
    _, headers, body = fetch(f"{here}?token={token}")
    html = body.decode()
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert 'new EventSource("events")' in script
    csp = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
    # The job page's script, and the cluster pages' (which poll): nothing else.
    assert csp_hash(script) in csp["script-src"].split()
    assert len(csp["script-src"].split()) == 2
    assert csp["style-src"] == csp_hash(style)
    # The event stream is guarded like the page: no token, no events.
    assert fetch(f"{here}events")[0] == 403
    server.stop()


def test_the_http_transport_guards_its_status_page_too(
    transport: str, env: dict, tmp_path: Path
) -> None:
    if transport != "http":
        pytest.skip("only the http transport serves the status page on its own port")
    port = free_port()
    secret_env = dict(env, OCTO_SECRET="status-page-test-secret")
    server = serve(tmp_path, secret_env, "--transport", "http", listen=f"tcp:{port}")
    server.wait_for_port(port)
    here = f"http://127.0.0.1:{port}/"
    status, headers, body = fetch(here)
    assert status == 403
    assert_no_job_data(body)
    assert_security_headers(headers)

    url = server.wait_for(r"status page at (\S+) \(on the http transport's port").group(1)
    token = re.fullmatch(rf"http://[^/]+:{port}/\?token=([A-Za-z0-9_-]{{43}})", url).group(1)
    status, headers, body = fetch(f"{here}?token={token}")
    assert status == 200 and NAME in body.decode()
    assert_security_headers(headers)
    jar = headers["set-cookie"].split(";", 1)[0]
    assert fetch(here + "?part=main", Cookie=jar)[0] == 200
    status, _, body = fetch(f"{here}?token={token}", Host="evil.example")
    assert status == 421
    assert_no_job_data(body)

    # The API below /octo/ is not the page's: a real worker still does the job.
    worker = octo("client", f"127.0.0.1:{port}", "--transport", "http", env=secret_env)
    assert worker.returncode == 0, worker.stderr
    assert server.finish() == 0, "".join(server.lines)


def test_the_http_transport_page_on_loopback_needs_no_token(
    transport: str, env: dict, tmp_path: Path
) -> None:
    if transport != "http":
        pytest.skip("only the http transport serves the status page on its own port")
    port = free_port()
    server = serve(tmp_path, env, "--transport", "http", listen=f"tcp:{port}:interface=127.0.0.1")
    server.wait_for_port(port)
    assert fetch(f"http://127.0.0.1:{port}/", Host="evil.example")[0] == 421
    status, headers, body = fetch(f"http://127.0.0.1:{port}/status.json")
    assert status == 200 and json.loads(body)["job"] == NAME
    assert_security_headers(headers)
    server.wait_for("serving job")
    assert not any("?token=" in line for line in server.lines)
    server.stop()

"""
A real C{octo client --transport http} against a fake HTTP server that
does not know the secret: it hands out a well-formed challenge, takes the
client's proof, and answers 201 with a session and a proof of its own
that is wrong (random, made with another secret, or missing).  The client
must refuse it as a server that did not prove it knows the secret, exit
1 without retrying, and make no request after that: no poll, no upload,
so nothing the fake serves next (a pickle that would create a marker
file) is ever read.  The TCP transport's client has the same tests in
C{test_security_tcp_client.py}.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import finish, start

from octotwist import auth
from octotwist.testing.relay import evil_pickle
from octotwist_http import wire

SECRET = "the-http-client-s-secret-0123456789"
OTHER = b"the-fake-http-server-s-own-secret"

BAD_PROOFS = {
    "random proof": lambda challenge, cnonce: os.urandom(auth.DIGEST_SIZE).hex(),
    "proof made with another secret": lambda c, n: wire.server_proof(OTHER, c, n).hex(),
    "the client's own proof sent back": lambda c, n: wire.client_proof(SECRET.encode(), c, n).hex(),
    "no proof at all": lambda challenge, cnonce: None,
}


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bad: str, marker: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bad = bad
        self.marker = marker
        self.requests: list[tuple[str, str, str | None]] = []
        #: Set by any request after the session's: the client took the proof.
        self.more = threading.Event()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up mid-request is no news here


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, code: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(code)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        authorization = self.headers.get("Authorization")
        self.server.requests.append((self.command, self.path, authorization))
        if self.command == "POST" and self.path == "/octo/session" and not authorization:
            challenge = os.urandom(wire.CHALLENGE_SIZE)
            credentials = wire.format_credentials(challenge=challenge.hex()).decode()
            self._answer(401, {"WWW-Authenticate": credentials}, b"authentication required")
            return
        if self.command == "POST" and self.path == "/octo/session":
            params = wire.parse_credentials(authorization.encode()) or {}
            challenge = bytes.fromhex(params.get("challenge", ""))
            cnonce = bytes.fromhex(params.get("cnonce", ""))
            proof = BAD_PROOFS[self.server.bad](challenge, cnonce)
            headers = {wire.SESSION_HEADER.decode(): wire.new_session_id()}
            if proof is not None:
                headers[wire.PROOF_HEADER.decode()] = proof
            self._answer(201, headers)
            return
        # What a client that took the bad proof would poll and decode.
        self.server.more.set()
        evil = evil_pickle(self.server.marker)
        self._answer(
            200, {"Content-Type": "application/octet-stream"}, wire.frame_header(evil) + evil
        )

    do_GET = do_POST = do_DELETE = _handle


@pytest.fixture
def fake(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeServer]:
    server = FakeServer(request.param, tmp_path / "pwned")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("fake", sorted(BAD_PROOFS), indirect=True)
def test_an_http_server_that_fails_its_proof_is_refused_and_asked_nothing_more(
    env: dict, fake: FakeServer
) -> None:
    port = fake.server_address[1]
    # --wait 5: a client that took the refusal for a transient failure would
    # come back within it, and the fake would count its requests.
    worker = start(
        "client", f"127.0.0.1:{port}", "--transport", "http", "--wait", "5",
        env={**env, "OCTO_SECRET": SECRET},
    )  # fmt: skip
    # Until it exits or asks for more (a client that took the proof polls on
    # and on: this fails at its first poll instead of at finish's timeout).
    deadline = time.monotonic() + 60
    while worker.poll() is None and time.monotonic() < deadline:
        assert not fake.more.wait(0.1), f"the client went on: {fake.requests}"
    code, _, err = finish(worker, timeout=60)
    assert code == 1, err
    assert "the server did not prove it knows the secret" in err, err
    assert "Traceback" not in err, err
    # The challenge, the proof: nothing after (no poll, no Hello, no retry).
    assert [(m, p) for m, p, _ in fake.requests] == [("POST", "/octo/session")] * 2, fake.requests
    assert fake.requests[0][2] is None and fake.requests[1][2] is not None
    assert not fake.marker.exists(), "the client decoded what the fake server sent"

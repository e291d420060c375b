"""
The HTTP transport's session requests, against a real server on
127.0.0.1: a recorded session request (a challenge, a cnonce, a correct
proof) opens one session, and replayed as it was it opens none; a
challenge the server never issued opens none, even with a proof made for
it with the secret.  Whoever records a worker's traffic cannot make the
server hold sessions for him.  (The wire-level checks are in
C{test_http.py}; this kills the mutant of C{tests/mutation.py} whose
server never asks whether the challenge is good.)
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path

import pytest
from conftest import finish
from test_http import SECRET, serve

from octotwist_http import wire


@pytest.fixture
def secret_env(env: dict) -> dict:
    return dict(env, OCTO_SECRET=SECRET.decode())


def post_session(port: int, authorization: str | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": authorization} if authorization else {}
    conn.request("POST", "/octo/session", headers=headers)
    r = conn.getresponse()
    r.body = r.read()  # type: ignore[attr-defined]
    conn.close()
    return r


def challenge(port: int) -> bytes:
    r = post_session(port)
    assert r.status == 401
    params = wire.parse_credentials(r.getheader("WWW-Authenticate").encode())
    assert params is not None
    return bytes.fromhex(params["challenge"])


def test_a_session_request_opens_one_session_and_a_replay_none(
    tmp_path: Path, secret_env: dict
) -> None:
    server, port, _ = serve(tmp_path, secret_env)
    recorded = wire.session_credentials(SECRET, challenge(port), os.urandom(32)).decode()
    first = post_session(port, recorded)
    assert first.status == 201 and first.getheader("Octo-Session")
    again = post_session(port, recorded)
    assert again.status == 401 and b"already used" in again.body, again.body
    assert again.getheader("Octo-Session") is None
    # A challenge of the right size that this server never minted, with a
    # proof that is right for it: refused all the same.
    forged = bytearray(challenge(port))
    forged[-1] ^= 1
    made_up = wire.session_credentials(SECRET, bytes(forged), os.urandom(32)).decode()
    refused = post_session(port, made_up)
    assert refused.status == 401 and b"not issued by this server" in refused.body
    assert refused.getheader("Octo-Session") is None
    server.terminate()
    _, _, err = finish(server)
    assert "Traceback" not in err

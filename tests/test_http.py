"""
The HTTP transport: its wire format without I/O, then real servers and
clients over real sockets on 127.0.0.1, poked with hand-made requests (bad
tokens, oversized and malformed bodies, a dropped long poll, TLS), each
followed by a real worker that must still get the exact word count.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from conftest import (
    BOOKS,
    finish,
    free_port,
    octo,
    parse_tsv,
    start,
    wait_for_log,
    wait_for_port,
    word_count,
)
from test_codec_attacks import peak_rss
from test_end_to_end import books_job, gated_books_job, start_twistd
from twisted.logger import globalLogPublisher

from octotwist import codec, messages
from octotwist.transport import ClientSettings, MessageChannel, ServerSettings
from octotwist_http import wire
from octotwist_http.client import HTTPTaskClient
from octotwist_http.server import HTTPTaskServer

SECRET = b"http-test-secret"

# The wire format, without I/O.


def _body(*payloads: bytes) -> bytes:
    return b"".join(wire.frame_header(p) + p for p in payloads)


def test_frames_survive_any_cut() -> None:
    payloads = [b"", b"a", b"hello world", bytes(range(256)) * 40]
    body = _body(*payloads)
    for size in (1, 2, 3, 5, 7, 64, 1000, len(body)):
        parser = wire.FrameParser()
        got = []
        for start_ in range(0, len(body), size):
            got += parser.feed(body[start_ : start_ + size])
        parser.finish()
        assert got == payloads, size


def test_frame_over_the_limit_and_a_cut_body_are_errors() -> None:
    parser = wire.FrameParser(max_frame=10)
    with pytest.raises(wire.FramingError) as e:
        list(parser.feed(struct.pack("!I", 11)))
    assert e.value.oversized
    parser = wire.FrameParser()
    list(parser.feed(_body(b"abc")[:-1]))
    with pytest.raises(wire.FramingError, match="middle of a frame"):
        parser.finish()


def test_bodies_hold_at_least_one_frame_and_respect_the_limit() -> None:
    assert wire.fits(0, b"x" * 100, limit=10)  # the first, however large
    assert wire.fits(8, b"x" * 4, limit=16)  # 8 + 4 + 4
    assert not wire.fits(8, b"x" * 5, limit=16)


def test_credentials_round_trip_and_reject_junk() -> None:
    value = wire.format_credentials(session="ab", seq="3", mac="ff")
    assert wire.parse_credentials(value) == {"session": "ab", "seq": "3", "mac": "ff"}
    for junk in (None, b"", b"Basic abc", b'Octo a="1" b="2"', b"Octo a=1", b"Octo \xff"):
        assert wire.parse_credentials(junk) is None, junk


def test_challenges_are_single_use_unforgeable_and_expire() -> None:
    challenges = wire.Challenges()
    c = challenges.mint(1000.0)
    assert challenges.problem(c, 1010.0) is None
    challenges.use(c, 1010.0)
    assert challenges.problem(c, 1011.0) == "the challenge was already used"
    assert challenges.problem(challenges.mint(1000.0), 1000.0 + 61) == "the challenge has expired"
    forged = bytearray(challenges.mint(1000.0))
    forged[-1] ^= 1
    assert "not issued by this server" in challenges.problem(bytes(forged), 1000.0)
    assert wire.Challenges().problem(c, 1000.0) is not None  # another server's key


def test_request_tokens_bind_method_target_and_sequence() -> None:
    key, sid = os.urandom(32), wire.new_session_id()
    target = f"session/{sid}/messages?ack=3".encode()
    credentials = wire.request_credentials(key, b"GET", target, sid, 7)
    token = wire.parse_request_token(wire.parse_credentials(credentials))
    assert token is not None and wire.check_request(key, b"GET", target, token)
    assert not wire.check_request(key, b"POST", target, token)
    assert not wire.check_request(key, b"GET", target.replace(b"3", b"4"), token)
    assert not wire.check_request(os.urandom(32), b"GET", target, token)


def test_replay_window_accepts_each_number_once() -> None:
    window = wire.ReplayWindow(size=4)
    assert [window.accept(n) for n in (0, 2, 1, 2, 9)] == [True, True, True, False, True]
    assert not window.accept(5)  # too far behind 9
    assert window.accept(6)


def test_routes() -> None:
    sid = "0" * 32
    assert wire.route(b"POST", b"session").kind == "create"
    poll = wire.route(b"GET", f"session/{sid}/messages?ack=5&wait=3".encode())
    assert (
        poll.kind == "poll" and poll.session == sid and poll.query == {b"ack": b"5", b"wait": b"3"}
    )
    assert wire.route(b"DELETE", f"session/{sid}".encode()).kind == "delete"
    assert wire.route(b"GET", b"session/../etc/messages") is None
    assert wire.route(b"PUT", b"session") is None
    assert wire.split_target(b"http://example.test/octo/session") == b"session"
    assert wire.split_target(b"/status.json") is None


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080/"),
        ("localhost", "http://localhost:18126/"),
        ("[::1]:9", "http://[::1]:9/"),
        ("http://HOST:8080", "http://host:8080/"),
        ("https://h.example:443/jobs/a", "https://h.example:443/jobs/a/"),
        ("https://h.example/", "https://h.example/"),
    ],
)
def test_addresses_a_user_may_type(address: str, url: str) -> None:
    assert HTTPTaskClient.address_to_endpoint(address) == url


@pytest.mark.parametrize(
    "address", ["ftp://h/", "http://h:port/", "tcp:h:80", "h:notaport", "http://h/?q=1", "a b"]
)
def test_garbage_addresses_are_refused_with_the_forms_expected(address: str) -> None:
    with pytest.raises(ValueError, match=r"http://HOST:PORT/|speaks http"):
        HTTPTaskClient.address_to_endpoint(address)


# Real servers.


@pytest.fixture
def secret_env(env: dict) -> dict:
    return dict(env, OCTO_SECRET=SECRET.decode())


def serve(
    tmp_path: Path, env: dict, *extra: str, listen: str | None = None, script: Path | None = None
) -> tuple[object, int, Path]:
    port = free_port()
    out = tmp_path / "out.tsv"
    script = script or books_job(tmp_path)
    server = start(
        "server", str(script), "--transport", "http", "-o", str(out),
        "--listen", listen.format(port=port) if listen else f"tcp:{port}:interface=127.0.0.1",
        *extra, env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    return server, port, out


def check_job(server: object, out: Path) -> str:
    code, _, err = finish(server)
    assert code == 0, err
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))
    assert "Traceback" not in err and "Unhandled" not in err, err
    return err


def real_client(port: int, env: dict, *extra: str) -> None:
    r = octo("client", f"127.0.0.1:{port}", "--transport", "http", *extra, env=env)
    assert r.returncode == 0, r.stderr


class Session:
    """A hand-driven session: the handshake and tokens done by the test."""

    def __init__(self, port: int, secret: bytes = SECRET) -> None:
        self.port = port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/octo/session")
        r = conn.getresponse()
        r.read()
        assert r.status == 401
        params = wire.parse_credentials(r.getheader("WWW-Authenticate").encode())
        challenge, cnonce = bytes.fromhex(params["challenge"]), os.urandom(32)
        auth = wire.session_credentials(secret, challenge, cnonce).decode()
        conn.request("POST", "/octo/session", headers={"Authorization": auth})
        r = conn.getresponse()
        self.refusal = r.read()
        self.status = r.status
        conn.close()
        self.id = r.getheader("Octo-Session") or ""
        self.key = wire.session_key(secret, challenge, cnonce)
        self.channel = wire.session_channel(secret, challenge, cnonce, client=True)
        self.seq = 0
        #: Frames the server has from us (what the next upload's first= is).
        self.received = 0

    def target(self, rest: str) -> str:
        return f"session/{self.id}/{rest}".rstrip("/")

    def token(self, method: str, target: str, seq: int | None = None) -> str:
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        return wire.request_credentials(
            self.key, method.encode(), target.encode(), self.id, seq
        ).decode()

    def request(
        self, method: str, rest: str, body: bytes | None = None, token: str | None = None
    ) -> tuple[int, bytes]:
        target = self.target(rest)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        with contextlib.closing(conn):
            headers = {"Authorization": token or self.token(method, target)}
            conn.request(method, "/octo/" + target, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()

    def raw_headers(self, method: str, rest: str, length: int, token: str | None = None) -> bytes:
        """Send only the head of a request that announces C{length} body bytes."""
        target = self.target(rest)
        token = token or self.token(method, target)
        return (
            f"{method} /octo/{target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {token}\r\nContent-Length: {length}\r\n\r\n"
        ).encode()


def head_only(port: int, head: bytes) -> bytes:
    """Send a request head, no body, and return what the server answers at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        return s.recv(65536)


def frames(session: Session, body: bytes) -> list[messages.Message]:
    """The messages in a poll's body, opened with the session's channel layer."""
    parser = wire.FrameParser()
    found = [session.channel.decode(f) for f in parser.feed(body)]
    parser.finish()
    return found


def test_requests_without_a_valid_token_get_401_before_their_body(
    tmp_path: Path, secret_env: dict
) -> None:
    server, port, out = serve(tmp_path, secret_env)
    wrong = Session(port, secret=b"not the secret")
    assert wrong.status == 401 and b"wrong secret" in wrong.refusal
    s = Session(port)
    assert s.status == 201
    huge = 100 * 1024 * 1024
    # The body is never sent: the answer comes from the headers alone.
    no_token = head_only(port, s.raw_headers("POST", "messages?first=0", huge, token="Octo"))
    assert no_token.startswith(b"HTTP/1.1 401") and b"missing or malformed token" in no_token
    bad_mac = wire.format_credentials(session=s.id, seq="1000", mac="00" * 32).decode()
    forged = head_only(port, s.raw_headers("POST", "messages?first=0", huge, token=bad_mac))
    assert forged.startswith(b"HTTP/1.1 401")
    other_target = s.token("GET", s.target("messages?ack=0&wait=1"))
    assert s.request("GET", "messages?ack=99&wait=1", token=other_target)[0] == 401
    # A token is good for one request only.
    token = s.token("GET", s.target("messages?ack=0&wait=1"))
    assert s.request("GET", "messages?ack=0&wait=1", token=token)[0] == 200
    assert s.request("GET", "messages?ack=0&wait=1", token=token)[0] == 401
    assert s.request("DELETE", "")[0] == 204
    real_client(port, secret_env)
    err = check_job(server, out)
    assert "authentication failed (wrong secret)" in err and "tcp:127.0.0.1:" in err


def test_oversized_and_malformed_bodies_get_4xx_and_the_server_keeps_serving(
    tmp_path: Path, secret_env: dict
) -> None:
    server, port, out = serve(tmp_path, secret_env)
    s = Session(port)
    too_big = head_only(port, s.raw_headers("POST", "messages?first=0", wire.MAX_BODY + 1))
    assert too_big.startswith(b"HTTP/1.1 413")
    s = Session(port)
    status, text = s.request("POST", "messages?first=0", _body(b"\x80\x05not sealed"))
    assert status == 400 and b"integrity check failed on frame 0" in text
    assert s.request("GET", "messages?ack=0&wait=1")[0] == 410  # that session is over
    s = Session(port)
    status, text = s.request("POST", "messages?first=0", _body(s.channel.seal(b"\x80\x05junk")))
    assert status == 400 and b"malformed message" in text
    assert s.request("GET", "messages?ack=0&wait=1")[0] == 410  # that session is over
    s = Session(port)
    status, text = s.request("POST", "messages?first=0", _body(b"x" * 10)[:-2])
    assert status == 400 and b"middle of a frame" in text
    s = Session(port)
    header, _ = codec.message_parts(messages.Heartbeat(()))
    forbidden = header.replace(b"Heartbeat", b"Exploiter")
    status, text = s.request("POST", "messages?first=0", _body(s.channel.seal(forbidden)))
    assert status == 400 and b"unknown message type 'Exploiter'" in text
    s = Session(port)
    assert s.request("POST", "messages?first=5", _body(b"x"))[0] == 409  # frames 0-4 missing
    real_client(port, secret_env)
    err = check_job(server, out)
    assert "closing session of tcp:127.0.0.1:" in err


def test_a_dropped_long_poll_loses_nothing(tmp_path: Path, secret_env: dict) -> None:
    server, port, out = serve(tmp_path, secret_env)
    s = Session(port)
    status, body = s.request("GET", "messages?ack=0&wait=20")
    assert status == 200
    (welcome,) = frames(s, body)
    assert isinstance(welcome, messages.Welcome)
    # The answer was "lost": asking again without acknowledging gets it again.
    status, again = s.request("GET", "messages?ack=0&wait=20")
    assert status == 200 and again == body
    # Sending the same frames twice delivers them once.
    hello = _body(s.channel.encode(messages.Hello("raw", "here", 1, 1)))
    assert s.request("POST", "messages?first=0", hello)[0] == 204
    assert s.request("POST", "messages?first=0", hello)[0] == 204
    # A long poll with nothing to say is held until its wait is over...
    s = Session(port)
    assert s.request("GET", "messages?ack=0&wait=20")[0] == 200  # the Welcome
    asked = time.monotonic()
    assert s.request("GET", "messages?ack=1&wait=2") == (204, b"")
    assert time.monotonic() - asked >= 2 - 0.1  # (the server's clock: a little slack)
    # ... and its client may hang up mid-poll: the server counts the poll as
    # cut, so the session ends after the short grace of a dropped poll (a
    # poll answered at once would have left it the long one).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        target = s.target("messages?ack=1&wait=20")
        raw.sendall(
            f"GET /octo/{target} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {s.token('GET', target)}\r\n\r\n".encode()
        )
    ended = wait_for_end(s)
    assert re.fullmatch(rb"session ended: no poll from the worker for 3(\.\d)? s\n", ended), ended
    # The raw worker never works; a real one finishes the job exactly.
    real_client(port, secret_env)
    err = check_job(server, out)
    assert err.count("worker raw joined") == 1


def test_a_poll_answer_stays_open_for_what_the_server_sends_next(
    tmp_path: Path, secret_env: dict
) -> None:
    """
    The answer to a poll is a stream: what the server sends after it began
    (here, the task it hands the worker once its Hello is up) comes in the
    same answer, with no new poll.  A follow-on poll ends that answer and
    carries on from the frames no answer carried, so nothing comes twice.
    """
    server, port, _ = serve(tmp_path, secret_env)
    s = Session(port)
    target = s.target("messages?ack=0&wait=20")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/octo/" + target, headers={"Authorization": s.token("GET", target)})
    answer = conn.getresponse()
    assert answer.status == 200 and answer.getheader("Octo-First") == "0"
    assert answer.getheader("Transfer-Encoding") == "chunked"
    parser = wire.FrameParser()
    got: list[messages.Message] = []

    def read_until(done: object) -> None:
        while not done():  # type: ignore[operator]
            data = answer.read1(65536)
            assert data, "the answer ended early"
            got.extend(s.channel.decode(f) for f in parser.feed(data))

    read_until(lambda: got)
    assert isinstance(got[0], messages.Welcome)
    hello = _body(s.channel.encode(messages.Hello("raw", "here", 1, 1)))
    assert s.request("POST", "messages?first=0", hello)[0] == 204
    read_until(lambda: any(isinstance(m, messages.Assign) for m in got))
    follow = s.target("messages?ack=1&wait=20&follow=1")
    conn2 = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn2.request("GET", "/octo/" + follow, headers={"Authorization": s.token("GET", follow)})
    second = conn2.getresponse()
    got.extend(s.channel.decode(f) for f in parser.feed(answer.read()))  # it ended the first
    parser.finish()
    conn.close()
    body = second.read()
    conn2.close()
    if second.status == 200:
        # From the frame after the stream's last: the channel layer opens
        # them in order (a frame repeated or skipped fails its check).
        assert second.getheader("Octo-First") == str(len(got))
        got.extend(frames(s, body))
    else:
        assert (second.status, body) == (204, b"")  # nothing new: answered at once, not held
    assert [type(m).__name__ for m in got].count("Welcome") == 1
    server.kill()


def test_a_follow_on_poll_carries_on_where_the_stream_ended(
    tmp_path: Path, secret_env: dict
) -> None:
    """With frames the stream did not carry, the follow-on answer starts right after its last."""
    server, port, _ = serve(tmp_path, secret_env)
    s = Session(port)
    status, body = s.request("GET", "messages?ack=0&wait=20")  # ends after 1 s
    assert status == 200 and len(frames(s, body)) == 1  # the Welcome
    # The Welcome is still unacknowledged: a follow-on poll has nothing new
    # to send and is answered at once; a plain one sends it again.
    asked = time.monotonic()
    assert s.request("GET", "messages?ack=0&wait=20&follow=1") == (204, b"")
    assert time.monotonic() - asked < wire.STREAM_SECONDS
    status, again = s.request("GET", "messages?ack=0&wait=20")
    assert status == 200 and again == body
    server.kill()


@pytest.mark.slow  # waits out the grace
def test_a_worker_is_counted_lost_from_its_last_poll_not_its_answer(
    tmp_path: Path, secret_env: dict
) -> None:
    """
    A worker whose poll was held and answered, and which then never polls
    again (cut off while it waited), is lost POLL_GRACE after it polled, as a
    tcp worker is from its last heartbeat; not a hold plus a grace later.
    """
    server, port, _ = serve(tmp_path, secret_env)
    s = Session(port)
    assert s.request("GET", "messages?ack=0&wait=20")[0] == 200  # the Welcome
    polled = time.monotonic()
    assert s.request("GET", "messages?ack=1&wait=6") == (204, b"")  # held 6 s, then answered
    ended = wait_for_end(s)
    waited = time.monotonic() - polled
    assert wire.POLL_GRACE - 0.5 <= waited < wire.POLL_GRACE + 2.5, (waited, ended)
    assert re.fullmatch(rb"session ended: no poll from the worker for 1\d(\.\d)? s\n", ended)
    server.kill()


def wait_for_end(s: Session, timeout: float = 60) -> bytes:
    """
    Until C{s} has ended; its reason.  The probe, an empty upload, changes
    nothing in a live session (unlike a poll, which would be held).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, text = s.request("POST", f"messages?first={s.received}", b"")
        if status == 410:
            return text
        assert status == 204, (status, text)
        time.sleep(0.1)
    raise AssertionError(f"session {s.id} still live after {timeout} s")


def test_a_chunked_body_over_the_limit_is_refused_as_it_passes_it(
    tmp_path: Path, secret_env: dict
) -> None:
    """
    The body's length is not announced: the server counts as it reads, and
    answers 413 the moment the count passes MAX_BODY, with what it did not
    read still unsent; it never holds the body (at most one frame).  The
    frames are ones it already has (numbered below what it received), so
    none of them is decoded either way.
    """
    server, port, out = serve(tmp_path, secret_env)
    s = Session(port)
    hello = messages.Hello("raw", "here", 1, 1)
    beats = [messages.Heartbeat(()) for _ in range(40)]
    frames_ = [s.channel.encode(m) for m in [hello, *beats]]
    assert s.request("POST", "messages?first=0", _body(*frames_))[0] == 204
    s.received = len(frames_)
    # A poll held throughout keeps the session from ending for want of one.
    status, body = s.request("GET", "messages?ack=0&wait=20")
    assert status == 200
    held_target = f"messages?ack={len(frames(s, body))}&wait=60"
    held = threading.Thread(
        target=s.request, args=("GET", held_target, None, s.token("GET", s.target(held_target)))
    )
    held.start()
    before = peak_rss(server.pid)
    size = 2 * 1024 * 1024
    count = wire.MAX_BODY // (wire.HEADER.size + size) + 1  # just past the limit
    assert count < len(frames_)  # each of them one the server already has
    target = s.target("messages?first=0")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(
            f"POST /octo/{target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {s.token('POST', target)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        junk = os.urandom(size)
        for _ in range(count):
            chunk = wire.frame_header(junk) + junk
            raw.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        # Past MAX_BODY now, the last chunk not ended: the answer is due.
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"\n"):
            data = raw.recv(65536)
            if not data:
                break
            answer += data
    reason = f"a body over {wire.MAX_BODY} bytes is not accepted here"
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]
    assert answer.endswith(reason.encode() + b"\n"), answer[-300:]
    assert peak_rss(server.pid) - before < 32 * 2**20, "the server held the body"
    assert wait_for_end(s) == f"session ended: {reason}\n".encode()
    held.join(30)  # answered "410 Gone" as the session ended
    assert not held.is_alive()
    real_client(port, secret_env)
    err = check_job(server, out)
    assert "closing session of tcp:127.0.0.1:" in err and reason in err


def test_status_page_on_the_same_port(tmp_path: Path, secret_env: dict) -> None:
    server, port, out = serve(tmp_path, secret_env)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with contextlib.closing(conn):
        conn.request("GET", "/")
        page = conn.getresponse()
        assert page.status == 200 and b"<html" in page.read().lower()
        conn.request("GET", "/status.json")
        status = conn.getresponse()
        assert status.status == 200 and isinstance(json.loads(status.read()), dict)
        conn.request("POST", "/", body=b"x")
        refused = conn.getresponse()
        refused.read()
        assert refused.status == 405
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with contextlib.closing(conn):
        conn.request("GET", "/octo/nothing-here")
        assert conn.getresponse().status == 404
    real_client(port, secret_env)
    check_job(server, out)


def test_two_clients_exact_count(tmp_path: Path, secret_env: dict) -> None:
    gate_file = tmp_path / "gate"
    server, port, out = serve(tmp_path, secret_env, script=gated_books_job(tmp_path, gate_file))
    clients = [
        start("client", f"http://127.0.0.1:{port}/", "--transport", "http", "-n", f"w{i}",
              env=secret_env)
        for i in range(2)
    ]  # fmt: skip
    # Both take part: the maps wait until both have joined.
    log = wait_for_log(server, ["worker w0 joined", "worker w1 joined"])
    gate_file.touch()
    for c in clients:
        code, _, err = finish(c)
        assert code == 0, err
    err = log + check_job(server, out)
    assert "Traceback" not in err, err


def test_octo_run_over_http(env: dict, expected_books: object) -> None:
    from conftest import EXAMPLES, parse_spaced

    r = octo("run", str(EXAMPLES / "wordcount.py"), "-w", "2", "-t", "http", env=env)
    assert r.returncode == 0, r.stderr
    assert parse_spaced(r.stdout) == expected_books


def test_twistd_serves_over_http(tmp_path: Path, secret_env: dict) -> None:
    port = free_port()
    out = tmp_path / "out.tsv"
    server = start_twistd(
        books_job(tmp_path), "--transport", "http",
        "--listen", f"tcp:{port}:interface=127.0.0.1", "-o", str(out), env=secret_env,
    )  # fmt: skip
    wait_for_port(port, server)
    real_client(port, secret_env, "-p", "2")
    code, stdout, err = finish(server)
    assert code == 0, stdout + err
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    pytest.importorskip("OpenSSL", reason="HTTPS needs twisted[tls]")
    from test_endpoints import make_certificate

    certs = tmp_path / "certs"
    certs.mkdir()
    yield make_certificate(certs)


def test_https_with_a_verified_certificate(
    tmp_path: Path, secret_env: dict, certificate: tuple[Path, Path]
) -> None:
    key, cert = certificate
    server, port, out = serve(
        tmp_path, secret_env,
        listen=f"ssl:{{port}}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
    )  # fmt: skip
    url = f"https://localhost:{port}/"

    def client(*args: str) -> object:
        return octo("client", *args, "--transport", "http", "--wait", "5", env=secret_env)

    untrusting = client(url)
    assert untrusting.returncode == 1
    assert "cannot verify the TLS certificate of localhost" in untrusting.stderr
    assert "--ca-file" in untrusting.stderr and "Traceback" not in untrusting.stderr
    wrong_name = client(f"https://127.0.0.1:{port}/", "--ca-file", str(cert))
    assert wrong_name.returncode == 1 and "127.0.0.1" in wrong_name.stderr
    assert "--ca-file" in wrong_name.stderr
    plain = client(f"http://localhost:{port}/")
    assert plain.returncode == 1, plain.stderr
    assert f"gave up: no server at http://localhost:{port}/ for 5 s" in plain.stderr
    assert "the server closed the connection without answering: if it serves https, use an " \
        "https:// URL" in plain.stderr  # fmt: skip
    good = client(url, "--ca-file", str(cert), "-p", "2")
    assert good.returncode == 0, good.stderr
    check_job(server, out)


def test_ca_file_that_is_not_a_certificate_is_a_usage_error(tmp_path: Path, env: dict) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    r = octo(
        "client", "https://localhost:1/", "--transport", "http", "--ca-file", str(bogus),
        env=dict(env, OCTO_SECRET=SECRET.decode()), timeout=30,
    )  # fmt: skip
    assert r.returncode == 2
    assert f"--ca-file {bogus}: no PEM certificate" in r.stderr


# A client and a server in this process, to cut their connections at will.


class _Collect:
    def __init__(self) -> None:
        self.messages: list[messages.Message] = []
        self.lost: list[str] = []

    def message_received(self, message: messages.Message) -> None:
        self.messages.append(message)

    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)


async def _until(condition: object, what: str, timeout: float = 60) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await deferLater(reactor, 0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _connected(
    server_side: _Collect, client_side: _Collect
) -> tuple[HTTPTaskServer, MessageChannel, MessageChannel]:
    """
    A real HTTP server on 127.0.0.1 and a client session to it, in this
    process: the server, its channel to the worker, the worker's channel.
    """
    from twisted.internet import reactor

    channels: list = []

    def accept(channel: object) -> _Collect:
        channels.append(channel)
        return server_side

    server = HTTPTaskServer(reactor, ServerSettings("tcp:0:interface=127.0.0.1", SECRET), accept)
    address = await server.listen()
    client = HTTPTaskClient(reactor, ClientSettings(address, SECRET))
    channel = await client.connect(lambda _: client_side)
    return server, channels[0], channel


@pytest_twisted.ensureDeferred
async def test_polls_cut_in_a_row_after_delivering_frames_are_not_given_up() -> None:
    """
    A poll cut after it delivered frames made progress: the client polls
    again however many times in a row that happens (it gives up only after
    RETRIES failures that delivered nothing).  Each poll here is cut from
    inside the client's delivery of its first frame, so no poll ever ends
    well until the cuts stop.
    """

    server: HTTPTaskServer | None = None
    cut_after = {1, 2, 3, 4, 5}  # the 1st..5th message each starts a poll's body

    class CutOnArrival(_Collect):
        def message_received(self, message: messages.Message) -> None:
            super().message_received(message)
            if len(self.messages) in cut_after:
                assert server is not None
                for http_channel in list(server._site.channels):
                    http_channel.transport.abortConnection()

    server_side, client_side = _Collect(), CutOnArrival()
    server, to_worker, channel = await _connected(server_side, client_side)
    task = messages.TaskId(messages.TaskKind.MAP, 0)
    n, blob = 20, os.urandom(1024 * 1024)
    for i in range(n):  # 20 MiB waiting: more than one poll's batch
        to_worker.send(messages.TaskInput(task, i, blob, True))
    await _until(lambda: len(client_side.messages) == n or client_side.lost, "every message")
    assert client_side.lost == []
    assert [m.attempt for m in client_side.messages] == list(range(n))
    assert all(m.data == blob for m in client_side.messages)
    channel.close()
    await _until(lambda: server_side.lost and client_side.lost, "both ends closed")
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_messages_keep_their_order_when_connections_are_cut() -> None:

    server_side, client_side = _Collect(), _Collect()
    retries: list[str] = []

    def observe(event: dict) -> None:
        if "again" in event.get("log_format", ""):
            retries.append(event["log_format"])

    globalLogPublisher.addObserver(observe)
    server, to_worker, channel = await _connected(server_side, client_side)
    task = messages.TaskId(messages.TaskKind.MAP, 0)
    n, blob = 60, os.urandom(1024 * 1024)
    for i in range(n):  # both ways at once, big enough to be cut mid-body
        channel.send(messages.TaskOutput(task, i, 0, blob, True))
        to_worker.send(messages.TaskInput(task, i, blob, True))
    for mark in (10, 25, 40):
        await _until(
            lambda m=mark: min(len(server_side.messages), len(client_side.messages)) >= m,
            f"{mark} messages each way",
        )
        for http_channel in list(server._site.channels):
            http_channel.transport.abortConnection()
    await _until(
        lambda: len(server_side.messages) == n and len(client_side.messages) == n, "every message"
    )
    assert [m.attempt for m in server_side.messages] == list(range(n))
    assert [m.attempt for m in client_side.messages] == list(range(n))
    assert all(m.data == blob for m in server_side.messages + client_side.messages)
    assert server_side.lost == [] and client_side.lost == []
    globalLogPublisher.removeObserver(observe)
    assert any("polling again" in r for r in retries), retries  # the cuts did cut
    channel.close()
    await _until(lambda: server_side.lost and client_side.lost, "both ends closed")
    assert server_side.lost == ["the worker closed the session"]
    assert client_side.lost == ["connection closed"]
    await server.stop()

"""
The HTTP transport's server: sessions over twisted.web.

One L{_Hub} per server owns the sessions and decides, from a request's
headers alone, whether it may go on (L{_Hub.admit}).  L{_OctoRequest} asks it
as soon as the headers have arrived (C{gotLength}), before any body byte is
read, and then streams an accepted upload's body straight into its session,
frame by frame: no request body is ever stored whole, in memory or on disk.

A L{_ServerSession} is one worker's L{MessageChannel}: what the core sends is
queued as encoded frames and handed to the worker's long poll; the frames
stay queued until a later poll acknowledges them, so a poll response lost on
the way is simply sent again.
"""

from __future__ import annotations

import hmac
import urllib.parse
from collections import deque
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import _parse, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import NoResource, Resource
from zope.interface import implementer

from octotwist import limits, secure
from octotwist.endpoints import with_backlog
from octotwist.errors import RemoteProtocolError
from octotwist.flow import Backpressure
from octotwist.messages import Message
from octotwist.status import SECURITY_HEADERS
from octotwist.streams import PEER_CLOSE_TIMEOUT, peer_name, stop_serving
from octotwist.transport import (
    Accept,
    ChannelHandler,
    IReactor,
    MessageChannel,
    TaskServer,
    no_delay,
)
from octotwist_http import wire

_log = Logger()

#: Seconds an ended session is remembered, so that a late request from its
#: worker gets "410 Gone" and the reason rather than "401 unknown session".
ENDED_LINGER = 60.0
#: Seconds from a request's first line to the end of its headers: a client
#: that trickles them (one header line every 20 s) is cut off, whatever it
#: has proved.
HEAD_TIMEOUT = 15.0
#: Seconds a connection may stay open before it carries an authenticated
#: request (a status page's connections reconnect, which costs nothing).
PREAUTH_TIMEOUT = 30.0

_OCTET_STREAM = b"application/octet-stream"


class _Reject(Exception):
    """Answer the request with C{code} and C{message}; nothing else happens."""

    def __init__(self, code: int, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


class _Superseded(Exception):
    """A newer upload of the same session took over; drop this one's bytes."""


class _Upload:
    """One upload request's body, turned into frames for its session."""

    def __init__(self, session: _ServerSession, first: int) -> None:
        self.session = session
        self.next_seq = first
        self.parser = wire.FrameParser(wire.MAX_FRAME)

    def feed(self, data: bytes) -> None:
        try:
            for frame in self.parser.feed(data):
                seq, self.next_seq = self.next_seq, self.next_seq + 1
                self.session.inbound(self, seq, frame)
        except wire.FramingError as e:
            raise self.session.violation(413 if e.oversized else 400, str(e)) from None

    def finish(self) -> None:
        try:
            self.parser.finish()
        except wire.FramingError as e:
            raise self.session.violation(400, str(e)) from None


@implementer(IPushProducer)
class _Stream:
    """
    A poll's response, kept open while the session has frames to send: each
    frame is written as the core sends it (chunked), as long as the socket
    drains, until the worker's next poll arrives (it sends one as soon as
    this response's head reaches it), L{wire.BATCH_BYTES} have gone, or
    L{wire.STREAM_SECONDS} have passed.  So a message crosses the link in
    one trip, not in the wait for a poll plus a trip; the cap in time keeps
    a proxy that holds responses back to a short delay, not a stall.
    """

    def __init__(self, session: _ServerSession, request: server.Request) -> None:
        self.session = session
        self.request = request
        self.paused = False
        self.over = False
        self.sent = 0  # bytes
        request.setResponseCode(http.OK)
        request.setHeader(b"Content-Type", _OCTET_STREAM)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")  # nginx: pass it on as it comes
        request.setHeader(wire.FIRST_HEADER, b"%d" % session.sent_upto)
        request.registerProducer(self, True)
        self._timer = session.hub.reactor.callLater(wire.STREAM_SECONDS, self.end)

    def pump(self) -> None:
        """Write what the session has unsent, while the socket takes it."""
        session, request = self.session, self.request
        while not (self.paused or self.over):
            if request._disconnected or request.channel is None:
                self.stopProducing()
                return
            frame = session.next_frame()
            if frame is None:
                return
            if not wire.fits(self.sent, frame):
                self.end()  # the rest goes in the next poll's answer
                return
            session.sent_upto += 1
            self.sent += len(frame) + wire.HEADER.size
            request.write(wire.frame_header(frame))
            request.write(frame)

    def end(self) -> None:
        """Finish the response after the frames written so far."""
        if self.over:
            return
        self.over = True
        _cancel(self._timer)
        if self.session.stream is self:
            self.session.stream = None
        request = self.request
        if not (request._disconnected or request.finished):
            request.unregisterProducer()
            request.finish()

    # IPushProducer, registered on the request: the socket's backpressure.

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        """The connection is gone: what it carried unacknowledged is sent again."""
        if not self.over:
            self.over = True
            _cancel(self._timer)
            if self.session.stream is self:
                self.session.stream = None


class _ServerSession(MessageChannel):
    """
    One worker's session: the channel the core sends to, and the state of
    both message streams (numbered frames, acknowledged by the polls).
    """

    def __init__(
        self, hub: _Hub, sid: str, key: bytes, channel: secure.SecureChannel, address: IAddress
    ) -> None:
        self.hub = hub
        self.id = sid
        self.key = key
        #: Seals what we queue and opens what the worker uploads, in frame order.
        self.secure = channel
        self._address = address
        self._peer = peer_name(address)
        self.handler: ChannelHandler | None = None
        self.replay = wire.ReplayWindow()
        self.ended: str | None = None  # why, once ended
        self.done: Deferred[None] = Deferred()
        self.closing = False
        # server -> worker: _out[0] is frame number _out_base; frames below
        # sent_upto have been written in some poll response.
        self._out: deque[bytes] = deque()
        self._out_bytes = 0  # in _out
        self._out_base = 0
        self.sent_upto = 0
        #: The poll response frames are written to, while one is open.
        self.stream: _Stream | None = None
        #: Senders wait while a batch in flight and a batch ready are
        #: unacknowledged, so that the core hands us a large blob a part at
        #: a time instead of all at once.
        self._pressure = Backpressure(2 * wire.BATCH_BYTES)
        # worker -> server
        self._in_next = 0
        self._upload: _Upload | None = None
        # polls
        self._parked: server.Request | None = None
        self._hold: IDelayedCall | None = None
        self._active: set[server.Request] = set()
        #: When the latest poll arrived: the grace counts from then.
        self._polled = hub.reactor.seconds()
        self._grace: IDelayedCall | None = None
        self._start_grace()

    # MessageChannel

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def peer_address(self) -> IAddress:
        """Where the session was opened from (later requests may come from elsewhere)."""
        return self._address

    def send(self, message: Message) -> None:
        if self.ended is not None or self.closing:
            return
        frame = self.secure.encode(message)  # numbered as queued: frame number = sequence
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._pressure.update(self._out_bytes)
        if self.stream is not None:
            self.stream.pump()
        elif self._parked is not None:
            request, self._parked = self._parked, None
            self._cancel_hold()
            self._start_stream(request)

    def writable(self) -> Deferred[None]:
        return self._pressure.writable()

    def close(self) -> None:
        if self.ended is None and not self.closing:
            self.closing = True
            self._pressure.stopProducing()
            self._maybe_closed()

    def abort(self) -> None:
        self.end("dropped by the server")

    # Polls

    def poll(self, request: server.Request, ack: int, wait: float, follow: bool = False) -> None:
        """
        A poll from the worker, which has the first C{ack} frames.

        A plain poll is answered from frame C{ack} on, so that one whose
        answer was lost gets it again.  A I{follow-on} poll (C{follow}) is
        one the worker sent while the previous answer was still coming: it
        ends that answer and carries on with the frames no answer has
        carried yet.  With nothing new to send, it is answered C{204} at
        once if frames are still unacknowledged, so that the worker comes
        back with its acknowledgement instead of waiting out the hold.
        """
        if ack > self.sent_upto:
            raise self.violation(
                400,
                f"acknowledged {ack} frames, but frames {self._out_base} to "
                f"{self.sent_upto} are the ones in flight",
            )
        while self._out_base < ack:  # (an ack below it is a late poll's)
            self._out_bytes -= len(self._out.popleft())
            self._out_base += 1
        self._pressure.update(self._out_bytes)
        if self.stream is not None:
            self.stream.end()
        if self._parked is not None:  # the worker gave up on it: answer it empty
            old, self._parked = self._parked, None
            self._cancel_hold()
            _finish(old, http.NO_CONTENT)
        self._active.add(request)
        self._polled = self.hub.reactor.seconds()
        self._cancel_grace()
        request.notifyFinish().addBoth(self._poll_over, request)
        if self._maybe_closed():
            _finish(request, http.GONE, f"session ended: {self.ended}")
            return
        if not follow:
            self.sent_upto = self._out_base
        if self.sent_upto < self._out_base + len(self._out):
            self._start_stream(request)
        elif follow and self.sent_upto > self._out_base:
            _finish(request, http.NO_CONTENT)
        else:
            self._parked = request
            self._hold = self.hub.reactor.callLater(wait, self._hold_expired)

    def next_frame(self) -> bytes | None:
        """The first frame no poll answer has carried yet, if any."""
        index = self.sent_upto - self._out_base
        return self._out[index] if index < len(self._out) else None

    def _start_stream(self, request: server.Request) -> None:
        self.stream = _Stream(self, request)
        self.stream.pump()

    def _hold_expired(self) -> None:
        self._hold = None
        request, self._parked = self._parked, None
        if request is not None:
            _finish(request, http.NO_CONTENT)

    def _cancel_hold(self) -> None:
        if self._hold is not None and self._hold.active():
            self._hold.cancel()
        self._hold = None

    def _poll_over(self, result: object, request: server.Request) -> None:
        self._active.discard(request)
        if self.stream is not None and self.stream.request is request:
            self.stream.stopProducing()
        if self._parked is request:
            self._parked = None
            self._cancel_hold()
        cut = isinstance(result, Failure)
        if self.ended is None and not self._active:
            # Counted from the poll's arrival, not its answer: a worker cut
            # off while its poll was held has been silent since it sent it
            # (as a tcp worker is from its last heartbeat).  A worker that
            # reads the answer polls again at once, so even a poll held to
            # the end of its wait leaves it the short grace of a cut one.
            since = self.hub.reactor.seconds() - self._polled
            grace = max(wire.POLL_GRACE - since, wire.DROP_GRACE)
            self._start_grace(wire.DROP_GRACE if cut else grace)
        if isinstance(result, Failure):  # cut
            _log.debug("a poll from {peer} was cut: {why}", peer=self._peer, why=result.value)

    def _start_grace(self, seconds: float = wire.POLL_GRACE) -> None:
        self._cancel_grace()
        self._grace = self.hub.reactor.callLater(seconds, self._grace_expired, seconds)

    def _cancel_grace(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None

    def _grace_expired(self, seconds: float) -> None:
        self._grace = None
        silent = self.hub.reactor.seconds() - self._polled
        self.end(f"no poll from the worker for {round(silent, 1):g} s")

    def _maybe_closed(self) -> bool:
        """After L{close}: end once the worker has acknowledged every frame."""
        if self.closing and not self._out and self.ended is None:
            self.end("closed by the server")
            return True
        return self.ended is not None

    # Uploads

    def begin_upload(self, first: int) -> _Upload:
        if first > self._in_next:
            raise self.violation(
                409, f"frames {self._in_next} to {first - 1} never arrived; the session is lost"
            )
        self._upload = _Upload(self, first)
        return self._upload

    def inbound(self, upload: _Upload, seq: int, frame: bytes) -> None:
        if upload is not self._upload or self.ended is not None:
            raise _Superseded()
        if seq < self._in_next:
            return  # sent again after a cut upload; we have it
        try:
            message = self.secure.decode(frame)
        except RemoteProtocolError as e:  # IntegrityError included
            raise self.violation(400, str(e)) from None
        self._in_next += 1
        if self.handler is not None and not self.closing:  # after close(), as TCP: deaf
            self.handler.message_received(message)

    def end_upload(self, upload: _Upload) -> int:
        if upload is self._upload:
            self._upload = None
        return self._in_next

    # Ending

    def violation(self, code: int, why: str) -> _Reject:
        """The worker broke the protocol: end the session, and say so."""
        _log.warn("closing session of {peer}: {why}", peer=self._peer, why=why)
        self.end(why)
        return _Reject(code, why)

    def end(self, reason: str) -> None:
        """End the session (once): answer its poll, tell the core."""
        if self.ended is not None:
            return
        self.ended = reason
        self._cancel_grace()
        self._cancel_hold()
        self._upload = None
        if self.stream is not None:
            self.stream.end()  # the worker's next poll gets the reason
        self._out.clear()
        self._out_bytes = 0
        self._pressure.stopProducing()
        if self._parked is not None:
            request, self._parked = self._parked, None
            _finish(request, http.GONE, f"session ended: {reason}")
        self.hub.ended(self)
        if self.handler is not None:
            handler, self.handler = self.handler, None
            handler.connection_lost(reason)
        self.done.callback(None)


def _finish(
    request: server.Request,
    code: int,
    text: str = "",
    headers: dict[bytes, bytes] | None = None,
) -> None:
    """Answer C{request} with a short text, if it can still be answered."""
    if request._disconnected or request.finished:
        return
    body = (text + "\n").encode() if text else b""
    request.setResponseCode(code)
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    if body:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    if body:
        request.write(body)
    request.finish()


class _Ended:
    """
    What the hub remembers of an ended session for L{ENDED_LINGER} seconds:
    enough to check a late request's token and answer it "410 Gone" with
    the reason, rather than "401 unknown session".
    """

    __slots__ = ("ended", "id", "key", "replay")

    def __init__(self, session: _ServerSession) -> None:
        self.id = session.id
        self.key = session.key
        self.replay = session.replay
        self.ended = session.ended


class _Admission:
    """What L{_Hub.admit} let through, and what the request needs to go on."""

    def __init__(self, kind: str, session: _ServerSession | None = None, **extra: Any) -> None:
        self.kind = kind
        self.session = session
        self.extra = extra


class _Hub:
    """The sessions of one server, and the rules for admitting requests."""

    def __init__(self, reactor: IReactor, secret: bytes, accept: Accept) -> None:
        self.reactor = reactor
        self.secret = secret
        self.accept = accept
        self.challenges = wire.Challenges()
        #: Lines about refused requests and connections, rate-limited.
        self.refusals = limits.RefusalLog(reactor)
        self.sessions: dict[str, _ServerSession | _Ended] = {}
        self._forget: dict[str, IDelayedCall] = {}
        #: False once the server has stopped taking new sessions.
        self.accepting = True
        self._idle: list[Deferred[None]] = []

    def _challenge_header(self) -> dict[bytes, bytes]:
        challenge = self.challenges.mint(self.reactor.seconds())
        return {b"WWW-Authenticate": wire.format_credentials(challenge=challenge.hex())}

    def _refuse(self, peer: str, why: str, log: bool = True) -> _Reject:
        if log:
            self.refusals.emit(
                LogLevel.warn, "refusing request from {peer}: {why}", peer=peer, why=why
            )
        return _Reject(http.UNAUTHORIZED, why, self._challenge_header())

    def admit(
        self, method: bytes, raw_target: bytes, headers: Headers, length: int | None, address: Any
    ) -> _Admission:
        """
        Decide, from the request line and headers only, whether a request
        from C{address} may go on.

        @raise _Reject: it may not; the code and message to answer with.
        """
        peer = peer_name(address)
        target = wire.split_target(raw_target)
        if target is None:
            if method.upper() not in (b"GET", b"HEAD"):
                raise _Reject(
                    http.NOT_ALLOWED,
                    "the status page is read-only",
                    {b"Allow": b"GET", **SECURITY_HEADERS},
                )
            return _Admission("status")
        call = wire.route(method, target)
        if call is None:
            raise _Reject(http.NOT_FOUND, f"no such API call: {method.decode()} {target.decode()}")
        credentials = parse_header(headers, b"Authorization")
        if call.kind == "create":
            return self._admit_create(credentials, length, address)
        token = wire.parse_request_token(credentials) if credentials else None
        if token is None:
            raise self._refuse(peer, "missing or malformed token")
        session = self.sessions.get(token.session)
        if token.session != call.session or session is None:
            raise self._refuse(peer, "unknown session (it may have expired)")
        if not wire.check_request(session.key, method, target, token):
            raise self._refuse(peer, "authentication failed (wrong token)")
        if not session.replay.accept(token.seq):
            raise self._refuse(peer, "replayed request")
        if session.ended is not None or not isinstance(session, _ServerSession):
            raise _Reject(http.GONE, f"session ended: {session.ended}")
        if call.kind == "upload":
            first = wire.int_param(call.query, b"first")
            if first is None:
                raise session.violation(http.BAD_REQUEST, "upload without first=N")
            if length is not None and length > wire.MAX_BODY:
                raise session.violation(
                    http.REQUEST_ENTITY_TOO_LARGE,
                    f"a body of {length} bytes is over the limit of {wire.MAX_BODY}",
                )
            return _Admission("upload", session, upload=session.begin_upload(first))
        if call.kind == "poll":
            ack = wire.int_param(call.query, b"ack")
            if ack is None:
                raise session.violation(http.BAD_REQUEST, "poll without ack=N")
            wait = wire.int_param(call.query, b"wait")
            hold = wire.DEFAULT_HOLD if wait is None else min(float(wait), wire.MAX_HOLD)
            follow = call.query.get(b"follow") == b"1"
            return _Admission("poll", session, ack=ack, wait=hold, follow=follow)
        return _Admission("delete", session)

    def _admit_create(
        self, credentials: dict[str, str] | None, length: int | None, address: IAddress
    ) -> _Admission:
        peer = peer_name(address)
        if not self.accepting:
            raise _Reject(http.SERVICE_UNAVAILABLE, "the server is shutting down")
        if credentials is None:
            # The first step of every handshake: no log.
            raise self._refuse(peer, "authentication required", log=False)
        request = wire.parse_session_request(credentials)
        if request is None:
            raise self._refuse(peer, "malformed session request")
        now = self.reactor.seconds()
        problem = self.challenges.problem(request.challenge, now)
        if problem is not None:
            raise self._refuse(peer, problem)
        expected = wire.client_proof(self.secret, request.challenge, request.cnonce)
        if not hmac.compare_digest(expected, request.proof):
            raise self._refuse(peer, "authentication failed (wrong secret)")
        if length != 0:
            raise _Reject(http.BAD_REQUEST, "a session request has no body")
        self.challenges.use(request.challenge, now)
        return _Admission("create", None, request=request, address=address)

    def create(self, admission: _Admission) -> tuple[_ServerSession, bytes]:
        request: wire.SessionRequest = admission.extra["request"]
        sid = wire.new_session_id()
        key = wire.session_key(self.secret, request.challenge, request.cnonce)
        channel = wire.session_channel(self.secret, request.challenge, request.cnonce, client=False)
        session = _ServerSession(self, sid, key, channel, admission.extra["address"])
        self.sessions[sid] = session
        handler = self.accept(session)
        if session.ended is None:
            session.handler = handler
        else:  # closed and acknowledged within accept(): cannot happen, but be exact
            handler.connection_lost(session.ended)
        proof = wire.server_proof(self.secret, request.challenge, request.cnonce)
        return session, proof

    def ended(self, session: _ServerSession) -> None:
        # Only what a late request needs is kept: the session's buffers, its
        # channel layer and its handler go now, not in a minute (a peer that
        # opens and ends sessions quickly would make them pile up).
        self.sessions[session.id] = _Ended(session)
        self._forget[session.id] = self.reactor.callLater(ENDED_LINGER, self._drop, session.id)
        if self._idle and not self.live():
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def idle(self) -> Deferred[None]:
        """Fires when no session is live any more."""
        d: Deferred[None] = Deferred()
        if self.live():
            self._idle.append(d)
        else:
            d.callback(None)
        return d

    def _drop(self, sid: str) -> None:
        self._forget.pop(sid, None)
        self.sessions.pop(sid, None)

    def live(self) -> list[_ServerSession]:
        return [
            s for s in self.sessions.values() if isinstance(s, _ServerSession) and s.ended is None
        ]

    def shutdown(self) -> None:
        for timer in self._forget.values():
            if timer.active():
                timer.cancel()
        self._forget.clear()
        self.refusals.flush()


def parse_header(headers: Headers, name: bytes) -> dict[str, str] | None:
    values = headers.getRawHeaders(name)
    return wire.parse_credentials(values[0]) if values else None


class _OctoRequest(server.Request):
    """
    A request that is admitted (or refused) on its headers, and whose body
    is streamed to its session instead of being stored.
    """

    # What Site and the channel set (declared for mypy: Request's are a
    # Site | None and an HTTPChannel).
    site: _Site
    channel: _Channel

    admission: _Admission | None = None
    rejection: _Reject | None = None
    answered_early = False
    _received = 0
    _limit = wire.MAX_SMALL_BODY

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        hub: _Hub = channel.site.hub
        # The request line is parsed but not yet stored on the request: the
        # channel keeps it until the body has arrived.
        method = getattr(channel, "_command", b"")
        raw_target = getattr(channel, "_path", b"")
        try:
            self.admission = hub.admit(
                method, raw_target, self.requestHeaders, length, channel.getPeer()
            )
            if self.admission.kind != "status":  # its credentials checked out
                channel.authenticated()
        except _Reject as rejection:
            self.rejection = rejection
            if length != 0:
                self._answer_now(rejection)
        # Nothing is stored: uploads stream into their session, the few
        # bytes other requests may carry are dropped.
        # Twisted declares Request.content as None (its class default); it is
        # the file the body goes to.
        self.content = BytesIO()  # type: ignore[assignment]
        if self.admission is not None and self.admission.kind == "upload":
            self._limit = wire.MAX_BODY

    def handleContentChunk(self, data: bytes) -> None:
        if self.answered_early or self.rejection is not None:
            return
        self._received += len(data)
        admission = self.admission
        assert admission is not None
        if self._received > self._limit:
            rejection = _Reject(
                http.REQUEST_ENTITY_TOO_LARGE,
                f"a body over {self._limit} bytes is not accepted here",
            )
            if admission.session is not None:
                rejection = admission.session.violation(rejection.code, rejection.message)
            self._answer_now(rejection)
            return
        if admission.kind == "upload":
            try:
                admission.extra["upload"].feed(data)
            except _Reject as rejection:
                self._answer_now(rejection)
            except _Superseded:
                self._answer_now(_Reject(http.CONFLICT, "superseded by a newer upload"))

    def _answer_now(self, rejection: _Reject) -> None:
        """
        Answer before the body has been read, and close the connection: the
        rest of the body will never be read, so the connection cannot carry
        another request.
        """
        self.answered_early = True
        body = (rejection.message + "\n").encode()
        code = rejection.code
        lines = [
            b"HTTP/1.1 %d %s" % (code, http.RESPONSES.get(code, b"Error")),
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        lines += [name + b": " + value for name, value in rejection.headers.items()]
        channel = self.channel
        channel.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.answered_early:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if self.rejection is not None:
            self.site = self.channel.site
            rejection = self.rejection
            _finish(self, rejection.code, rejection.message, rejection.headers)
            return
        admission = self.admission
        assert admission is not None
        if admission.kind == "status":
            super().process()
            return
        self.site = self.channel.site
        try:
            self._process_api(admission)
        except _Reject as rejection:
            _finish(self, rejection.code, rejection.message, rejection.headers)
        except Exception:
            self.processingFailed(Failure())

    def _process_api(self, admission: _Admission) -> None:
        hub: _Hub = self.site.hub
        session = admission.session
        if admission.kind == "create":
            session, proof = hub.create(admission)
            _log.debug("session {sid} for {peer}", sid=session.id, peer=session.peer)
            _finish(
                self,
                http.CREATED,
                headers={
                    wire.SESSION_HEADER: session.id.encode(),
                    wire.PROOF_HEADER: proof.hex().encode(),
                },
            )
            return
        assert session is not None
        if session.ended is not None:
            raise _Reject(http.GONE, f"session ended: {session.ended}")
        if admission.kind == "poll":
            extra = admission.extra
            session.poll(self, extra["ack"], extra["wait"], extra["follow"])
        elif admission.kind == "upload":
            upload: _Upload = admission.extra["upload"]
            if upload is not session._upload:
                raise _Reject(http.CONFLICT, "superseded by a newer upload")
            upload.finish()
            received = session.end_upload(upload)
            _finish(self, http.NO_CONTENT, headers={wire.RECEIVED_HEADER: b"%d" % received})
        else:
            session.end("the worker closed the session")
            _finish(self, http.NO_CONTENT)

    def connectionLost(self, reason: Failure) -> None:
        admission = self.admission
        if admission is not None and admission.kind == "upload":
            admission.session.end_upload(admission.extra["upload"])  # type: ignore[union-attr]
        super().connectionLost(reason)


class _Channel(http.HTTPChannel):
    """
    HTTP/1.1 only, known to the site so that L{HTTPTaskServer.stop} can
    close it, and held to deadlines: a request head must be complete within
    L{HEAD_TIMEOUT} seconds of its first line, and a connection must carry
    an authenticated request within L{PREAUTH_TIMEOUT} seconds or go
    (twisted.web's own idle timeout restarts with every byte, which a
    trickling client exploits).
    """

    slot: limits.Slot | None = None
    _head_deadline: IDelayedCall | None = None
    _preauth_deadline: IDelayedCall | None = None

    # Set by the site's buildProtocol (declared for mypy): the site; the
    # reactor's callLater, which passes arguments on to the call (unlike
    # TimeoutMixin's, which it replaces); and, when connected, a TCP or TLS
    # transport.
    site: _Site
    callLater: Callable[..., IDelayedCall]
    transport: ITCPTransport

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)
        self.closed: Deferred[None] = Deferred()
        self.site.channels.add(self)
        self._preauth_deadline = self.callLater(
            PREAUTH_TIMEOUT,
            self._too_slow,
            f"no authenticated request within {PREAUTH_TIMEOUT:g} s",
        )

    def authenticated(self) -> None:
        """A request on this connection proved its credentials: no more pre-auth limits."""
        if self.slot is not None:
            self.slot.release()
        _cancel(self._preauth_deadline)
        self._preauth_deadline = None

    def lineReceived(self, line: bytes) -> None:
        if self._head_deadline is None:  # the first line of a request
            self._head_deadline = self.callLater(
                HEAD_TIMEOUT, self._too_slow, f"request head not complete within {HEAD_TIMEOUT:g} s"
            )
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        _cancel(self._head_deadline)
        self._head_deadline = None
        super().allHeadersReceived()

    def _too_slow(self, why: str) -> None:
        self._head_deadline = self._preauth_deadline = None
        self.site.hub.refusals.emit(
            LogLevel.info,
            "closing connection from {peer}: {why}",
            peer=peer_name(self.getPeer()),
            why=why,
        )
        self.transport.abortConnection()

    # What stop_serving needs (streams.Served).  A session outlives its
    # requests, so no connection holds a peer the core serves: once the
    # sessions have ended, each is closed when what it wrote is sent.
    serving = False

    def close(self) -> None:
        self.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for timer in (self._head_deadline, self._preauth_deadline):
            _cancel(timer)
        self._head_deadline = self._preauth_deadline = None
        if self.slot is not None:
            self.slot.release()
        super().connectionLost(reason)
        self.site.channels.discard(self)
        self.closed.callback(None)


def _cancel(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()


class _Root(Resource):
    """Everything outside the API: the status page, if the core gave one."""

    def __init__(self, status: Any) -> None:
        super().__init__()
        self.status = status

    def getChild(self, path: bytes, request: server.Request) -> Any:
        if self.status is None:
            return NoResource("this octo server has no status page")
        return self.status.getChildWithDefault(path, request)


class _Site(limits.SlottedFactory, server.Site):
    # No HTTP/2 negotiation: requests must be _OctoRequests.  (twisted.web types
    # Site.protocol as its HTTP/1.1-or-2 wrapper; any channel class works.)
    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _OctoRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, hub: _Hub, status: Any) -> None:
        super().__init__(_Root(status), requestFactory=_OctoRequest, reactor=hub.reactor)
        self.hub = hub
        self.channels: set[_Channel] = set()
        self.pending = limits.PreAuthLimit(hub.refusals)

    def log(self, request: http.Request) -> None:
        """No access log: a busy worker polls several times a second."""


class HTTPTaskServer(TaskServer):
    """
    Serves the octo API (and the status page) on C{settings.listen}, any
    Twisted stream server endpoint: C{tcp:} for http, C{ssl:} for https.
    """

    _port: IListeningPort | None = None
    _site: _Site | None = None
    _hub: _Hub | None = None

    def listen(self) -> Deferred[str]:
        self._hub = _Hub(self.reactor, self.settings.secret, self.accept)
        self._site = _Site(self._hub, self.settings.status)
        try:
            endpoint = serverFromString(self.reactor, with_backlog(self.settings.listen))
        except Exception as e:
            return fail(e)
        d = endpoint.listen(self._site)
        d.addCallback(self._listening)
        return d

    def _listening(self, port: IListeningPort) -> str:
        self._port = port
        addr = port.getHost()
        args, _ = _parse(self.settings.listen)
        scheme = "https" if str(args[0]).lower() == "ssl" else "http"
        if isinstance(addr, IPv6Address):
            return f"{scheme}://[{addr.host}]:{addr.port}/"
        if isinstance(addr, IPv4Address):
            return f"{scheme}://{addr.host}:{addr.port}/"
        # A Unix socket serves a reverse proxy in front of it; this is the
        # usual way to write its URL, for the log.
        name = getattr(addr, "name", b"")
        name = name.decode() if isinstance(name, bytes) else str(name)
        return f"{scheme}+unix://{urllib.parse.quote(name, safe='')}/"

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """
        Let every worker fetch what it was sent (the final Shutdown) and hang
        up, for up to L{PEER_CLOSE_TIMEOUT} seconds; then end what is left and
        stop as every stream server does (L{stop_serving}).  Listening goes on
        until then, since a worker may need a new connection for its last poll.
        """
        hub, site = self._hub, self._site
        if hub is not None:
            # A worker that arrives now still gets a session: the core tells
            # it the job is over, so it exits instead of retrying.
            timer = self.reactor.callLater(PEER_CLOSE_TIMEOUT, lambda: _end_all(hub.live()))
            await hub.idle()
            if timer.active():
                timer.cancel()
            hub.accepting = False
            _end_all(hub.live())
            hub.shutdown()
        port, self._port = self._port, None
        await stop_serving(self.reactor, port, site.channels if site is not None else ())


def _end_all(sessions: list[_ServerSession]) -> None:
    for session in sessions:
        session.end("the server stopped")

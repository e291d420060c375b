"""
The HTTP transport's client, on treq with its own connection pool.

L{HTTPTaskClient.connect} opens a session (the handshake in
L{octotwist_http.wire}) and returns a L{_ClientChannel}.  Its answers and
uploads stream: a poll's answer stays open while the server has frames, and
the next poll goes out as soon as that answer starts, so one always waits at
the server; an upload's body stays open while the core sends
(L{_StreamingBody}).  Across a link with a 100 ms round trip a message so
takes one trip, not a wait for the next request and then a trip.  A poll or
an upload that fails on the network is tried again once (frames are
numbered, so nothing is delivered twice); a second failure, or any refusal
from the server, loses the channel, and the core reconnects with a new
session.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import re
import urllib.parse
from collections import deque
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from octotwist import auth, secure
from octotwist.endpoints import split_host_port
from octotwist.errors import (
    AuthenticationError,
    OctotwistError,
    RemoteProtocolError,
    UsageError,
)
from octotwist.flow import Backpressure
from octotwist.messages import Message
from octotwist.transport import (
    Accept,
    ChannelHandler,
    ClientSettings,
    IReactor,
    MessageChannel,
    TaskClient,
    no_delay,
)
from octotwist_http import wire

_log = Logger()

#: Seconds to wait for a TCP (and TLS) connection.
CONNECT_TIMEOUT = 15.0
#: Seconds the client asks the server to hold a poll; the request itself
#: times out L{POLL_SLACK} seconds later.
POLL_WAIT = 25
POLL_SLACK = 20.0
#: Seconds an upload or a small request may take before its answer starts.
REQUEST_TIMEOUT = 120.0
#: Bytes per second an upload may crawl at before it times out.
SLOW_LINK = 100 * 1024
#: Network failures in a row a poll or an upload survives (tried again).
RETRIES = 1
#: Seconds before a poll or an upload that failed is tried again.
RETRY_PAUSE = 0.2

_OPEN, _CLOSING, _CLOSED = "open", "closing", "closed"


@implementer(IBodyProducer)
class _StreamingBody:
    """
    An upload's body, open while the core sends: each frame queued in the
    channel is written as it comes (chunked), as the socket drains, until
    L{wire.BATCH_BYTES} have gone or L{wire.STREAM_SECONDS} have passed, or
    the channel closes with everything written.  The server reads it frame
    by frame as it arrives, so a message reaches the server in one trip.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, reactor: IReactor, channel: _ClientChannel) -> None:
        self._reactor = reactor
        self._channel = channel
        self.written = 0  # frames, from the front of the channel's queue
        self._bytes = 0
        self._consumer: Any = None
        self._paused = False
        self._done: Deferred[None] = Deferred()
        self._timer: Any = None

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        self._timer = self._reactor.callLater(wire.STREAM_SECONDS, self.end)
        self.pump()
        return self._done

    def pump(self) -> None:
        """Write what is queued and not yet in this body."""
        queue = self._channel.queued
        while self._consumer is not None and not self._paused and not self._done.called:
            if self.written == len(queue):
                if self._channel.state is not _OPEN:
                    self.end()  # closing: what is queued is all there will be
                return
            frame = queue[self.written]
            if not wire.fits(self._bytes, frame):
                self.end()
                return
            self.written += 1
            self._bytes += len(frame) + wire.HEADER.size
            self._consumer.write(wire.frame_header(frame))
            self._consumer.write(frame)

    def end(self) -> None:
        if not self._done.called:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.pump()

    def stopProducing(self) -> None:
        # The request failed or was cancelled: twisted.web drops our Deferred.
        self._consumer = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


class _Lost(Exception):
    """The channel cannot go on; the message says why."""


async def _text(response: Any, limit: int = 2000) -> str:
    try:
        body = await response.content()
    except Exception:
        return ""
    return body[:limit].decode("utf-8", "replace").strip()


def _refusal(what: str, code: int, text: str) -> str:
    return f"the server refused {what}: {code} {text or '(no reason given)'}"


class _ClientChannel(MessageChannel):
    """The worker's side of one session."""

    def __init__(
        self,
        reactor: IReactor,
        http: Any,
        pool: HTTPConnectionPool,
        base: str,
        session: str,
        key: bytes,
        channel: secure.SecureChannel,
    ) -> None:
        self._reactor = reactor
        self._http = http
        self._pool = pool
        self._base = base
        self._session = session
        self._key = key
        #: Seals what we queue and opens what the polls bring, in frame order.
        self._secure = channel
        self._seq = itertools.count()
        self.handler: ChannelHandler | None = None
        self.state = _OPEN
        # worker -> server: _out[0] is frame number _out_next
        self._out: deque[bytes] = deque()
        self._out_bytes = 0  # in _out
        self._out_next = 0
        #: Senders wait while more than a batch is unconfirmed.
        self._pressure = Backpressure(wire.BATCH_BYTES)
        self._posting: Deferred[None] | None = None
        self._body: _StreamingBody | None = None  # the upload being written
        self._drained: list[Deferred[None]] = []
        # server -> worker
        self._in_next = 0
        self._polling: Deferred[None] | None = None
        #: Polls sent and bodies being read: what closing cancels.
        self._in_flight: set[Deferred[Any]] = set()

    @property
    def peer(self) -> str:
        return self._base

    def start(self) -> None:
        self._polling = ensureDeferred(self._poll_loop())
        self._polling.addErrback(self._crashed, "polling")

    # Sending.

    @property
    def queued(self) -> deque[bytes]:
        """The frames the server has not confirmed; the first is number C{_out_next}."""
        return self._out

    def send(self, message: Message) -> None:
        if self.state is not _OPEN:
            return
        frame = self._secure.encode(message)  # numbered as queued: frame number = sequence
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._pressure.update(self._out_bytes)
        if self._body is not None:
            self._body.pump()
        elif self._posting is None:
            self._posting = ensureDeferred(self._post_loop())
            self._posting.addErrback(self._crashed, "sending")

    async def _post_loop(self) -> None:
        try:
            while self._out and self.state is not _CLOSED:
                count = await self._upload(self._out_next)
                for _ in range(count):
                    self._out_bytes -= len(self._out.popleft())
                self._out_next += count
                self._pressure.update(self._out_bytes)
        except _Lost as e:
            self._posting = None  # running: _finish must not cancel it
            self._finish(str(e))
        except CancelledError:
            pass
        finally:
            self._posting = None
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)
            if self.state is not _OPEN:
                self._pressure.stopProducing()

    def writable(self) -> Deferred[None]:
        """Backpressure: wait while more than a batch is unconfirmed."""
        return self._pressure.writable()

    async def _upload(self, first: int) -> int:
        """One upload, from frame C{first} (the front of the queue); how many frames it carried."""
        target = f"session/{self._session}/messages?first={first}"
        # The answer comes once the whole body is up: allow for slow links.
        timeout = REQUEST_TIMEOUT + wire.STREAM_SECONDS + wire.BATCH_BYTES / SLOW_LINK
        failures = 0
        reached = 0  # frames the furthest failed attempt had written
        while True:
            body = self._body = _StreamingBody(self._reactor, self)
            try:
                response = await self._request(b"POST", target, data=body, timeout=timeout)
            except CancelledError:
                raise
            except Exception as e:
                if self.state is _CLOSED:
                    raise CancelledError() from None
                # A body that got further than the last one made progress
                # (it may stream for a while): only failures in a row that
                # got no further give up.
                failures = 1 if body.written > reached else failures + 1
                reached = max(reached, body.written)
                if failures > RETRIES:
                    raise _Lost(f"sending to the server failed: {_describe(e)}") from None
                _log.debug("upload failed ({error}); trying again", error=_describe(e))
                # (After a pause: the other pooled connections a cut took
                # down with it must be seen gone first, or the retry picks
                # one of them.)
                await deferLater(self._reactor, RETRY_PAUSE)
                continue
            finally:
                if self._body is body:
                    self._body = None
            if response.code == 204:
                await _text(response)
                return body.written
            raise _Lost(_refusal("our messages", response.code, await _text(response)))

    def _request(
        self, method: bytes, target: str, data: Any = None, timeout: float | None = None
    ) -> Deferred[Any]:
        seq = next(self._seq)
        credentials = wire.request_credentials(
            self._key, method, target.encode("ascii"), self._session, seq
        )
        headers = Headers({b"Authorization": [credentials]})
        if data is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/octet-stream"])
        return self._http.request(
            method.decode("ascii"),
            self._base + "octo/" + target,
            headers=headers,
            data=data,
            allow_redirects=False,
            unbuffered=True,
            timeout=timeout,
            reactor=self._reactor,
        )

    # Receiving.

    def _poll(self, follow: bool) -> Deferred[Any]:
        """
        Ask for the server's frames from C{_in_next} on; or, C{follow}, for
        those after the answer still coming (sent as that answer starts, so
        that a poll is always waiting at the server: no round trip between
        answers).
        """
        target = f"session/{self._session}/messages?ack={self._in_next}&wait={POLL_WAIT}"
        if follow:
            target += "&follow=1"
        return self._track(self._request(b"GET", target, timeout=POLL_WAIT + POLL_SLACK))

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._in_flight.add(d)

        def untrack(result: object) -> object:
            self._in_flight.discard(d)
            return result

        return d.addBoth(untrack)

    async def _poll_loop(self) -> None:
        failures = 0
        pending: Deferred[Any] | None = None  # a poll sent, its answer not yet read
        while self.state is _OPEN:
            asked_from = self._in_next
            try:
                if pending is None:
                    pending = self._poll(follow=False)
                response = await pending
                pending = None
                if response.code == 200:
                    first = _first_frame(response)
                    if first > self._in_next:
                        # A follow-on answer past one that was cut: ask
                        # again from what we have, and drop this one.
                        pending = self._poll(follow=False)
                        await self._discard(response)
                        continue
                    pending = self._poll(follow=True)
                    await self._read_frames(response, first)
                elif response.code == 204:
                    await _text(response)
                else:
                    text = await _text(response)
                    if self.state is _OPEN:
                        self._finish(_refusal("a poll", response.code, text))
                    return
                failures = 0
            except CancelledError:
                return
            except _Lost as e:
                self._finish(str(e))
                return
            except Exception as e:
                if self.state is not _OPEN:
                    return
                if pending is not None:  # it follows what failed: ask again instead
                    _drop(pending)
                    pending = None
                # A poll cut after it delivered frames made progress: only
                # failures in a row with nothing delivered give up.
                failures = 1 if self._in_next > asked_from else failures + 1
                if failures > RETRIES:
                    self._finish(f"polling the server failed: {_describe(e)}")
                    return
                _log.debug("poll failed ({error}); polling again", error=_describe(e))
                await deferLater(self._reactor, RETRY_PAUSE)

    async def _discard(self, response: Any) -> None:
        with contextlib.suppress(Exception):
            await self._track(_treq().collect(response, lambda data: None))

    async def _read_frames(self, response: Any, first: int) -> None:
        """Decode the frames of a poll's answer as they come; skip those we have."""
        parser = wire.FrameParser(wire.MAX_FRAME)
        number = first

        def collect(data: bytes) -> None:
            nonlocal number
            try:
                frames = list(parser.feed(data))
            except wire.FramingError as e:
                raise _Lost(f"the server sent a bad body: {e}") from None
            for frame in frames:
                number += 1
                if number <= self._in_next:
                    continue  # sent again after a cut answer; we have it
                try:
                    message = self._secure.decode(frame)
                except RemoteProtocolError as e:  # IntegrityError included
                    _log.warn("closing the session with {base}: {error}", base=self._base, error=e)
                    raise _Lost(str(e)) from None
                self._in_next += 1
                if self.handler is not None:
                    self.handler.message_received(message)

        await self._track(_treq().collect(response, collect))
        if parser.pending:
            raise ConnectionError("the poll response was cut short")

    # Closing.

    def close(self) -> None:
        if self.state is _OPEN:
            self.state = _CLOSING
            self._pressure.stopProducing()
            if self._body is not None:
                self._body.pump()  # ends it once everything queued is written
            d = ensureDeferred(self._close())
            d.addErrback(self._crashed, "closing")

    async def _close(self) -> None:
        """Send what is queued, hang up the session, then report the channel closed."""
        if self._posting is not None:
            drained: Deferred[None] = Deferred()
            self._drained.append(drained)
            await drained
        if self.state is _CLOSED:
            return
        try:
            response = await self._request(
                b"DELETE", f"session/{self._session}", timeout=CONNECT_TIMEOUT
            )
            await _text(response)
        except Exception as e:
            _log.debug("could not hang up cleanly: {error}", error=_describe(e))
        self._finish("connection closed")

    def _finish(self, reason: str) -> None:
        """End the channel (once): stop requests, close the pool, tell the core."""
        if self.state is _CLOSED:
            return
        self.state = _CLOSED
        self._pressure.stopProducing()
        for d in [*self._in_flight, self._posting]:
            if d is not None and not d.called:
                _drop(d)
        handler, self.handler = self.handler, None
        ensureDeferred(self._release(reason, handler)).addErrback(self._crashed, "closing")

    async def _release(self, reason: str, handler: ChannelHandler | None) -> None:
        # Let the poll loop end first, so that its connection is back in the
        # pool (or aborted) before the pool closes what it holds.
        polling = self._polling
        if polling is not None and not polling.called:
            polling.addTimeout(CONNECT_TIMEOUT, self._reactor)
            with contextlib.suppress(Exception):
                await polling
        await self._pool.closeCachedConnections()
        if handler is not None:
            handler.connection_lost(reason)

    def _crashed(self, failure: Any, doing: str) -> None:
        _log.failure("bug while {doing}", failure, doing=doing)
        self._finish(f"internal error while {doing}: {failure.getErrorMessage()}")
        return None


def _drop(d: Deferred[Any]) -> None:
    """Cancel C{d}; whoever awaits it hears so, and no one else is told of its failure."""
    d.cancel()
    d.addErrback(lambda _: None)


def _first_frame(response: Any) -> int:
    """The number of the first frame in a poll's answer."""
    value = response.headers.getRawHeaders(wire.FIRST_HEADER, [b""])[0]
    if not value.isdigit() or len(value) > 18:
        raise _Lost(f"the server sent frames without a valid {wire.FIRST_HEADER.decode()}")
    return int(value)


def _describe(e: BaseException) -> str:
    """One line for a network error; treq wraps the real cause in a list."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _tls_problem(e: BaseException) -> BaseException | None:
    """The TLS error behind a failed request, if that is what failed."""
    for reason in getattr(e, "reasons", None) or ():
        found = _tls_problem(reason.value)
        if found is not None:
            return found
    module = type(e).__module__
    if module.startswith(("OpenSSL", "service_identity")):
        return e
    return None


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s.+?\s-----END CERTIFICATE-----", re.DOTALL)


def load_ca_file(path: str) -> Any:
    """
    The trust root for C{--ca-file PATH}: every certificate in that PEM file.

    @raise UsageError: the file cannot be read or holds no certificate.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"--ca-file {path}: cannot read it: {e.strerror}") from None
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise UsageError(
            f"--ca-file {path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
        )
    try:
        certificates = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise UsageError(f"--ca-file {path}: not a valid certificate: {e}") from None
    return ssl.trustRootFromCertificates(certificates)


class HTTPTaskClient(TaskClient):
    """
    Connects to C{settings.connect}, an C{http://} or C{https://} URL (see
    L{address_to_endpoint}).  C{settings.options["ca-file"]} names the CA
    certificates an https server's certificate must chain to; without it,
    the system's trusted CAs are used.  The host name is always checked.
    """

    default_port = wire.DEFAULT_PORT

    def __init__(self, reactor: IReactor, settings: ClientSettings) -> None:
        super().__init__(reactor, settings)
        ca_file = (settings.options or {}).get("ca-file")
        self._trust = load_ca_file(ca_file) if ca_file else None

    @classmethod
    def address_to_endpoint(cls, address: str) -> str:
        """
        C{http://HOST:PORT/} and C{https://HOST:PORT/} (a path is allowed,
        for a server behind a proxy; a URL without a port uses 80 or 443),
        or C{HOST[:PORT]}, which means C{http://HOST:PORT/} with port
        L{default_port}.  Returns the URL, normalized to end with C{/}.

        @raise ValueError: anything else; the message says what is expected.
        """
        text = address.strip()
        expected = "give http://HOST:PORT/, https://HOST:PORT/ or HOST[:PORT]"
        if "://" in text:
            parts = urllib.parse.urlsplit(text)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise ValueError(f"the http transport speaks http:// and https://, not {scheme}://")
            try:
                port = parts.port
            except ValueError:
                raise ValueError(f"bad port in {text!r}; {expected}") from None
            host = parts.hostname
            if not host or parts.query or parts.fragment or parts.username:
                raise ValueError(f"{text!r} is not a server URL; {expected}")
            path = parts.path if parts.path.endswith("/") else parts.path + "/"
            return f"{scheme}://{_url_host(host)}{f':{port}' if port else ''}{path}"
        if text.split(":", 1)[0] in ("tcp", "tls", "ssl", "unix") or "=" in text or "/" in text:
            raise ValueError(f"{text!r} is not an HTTP address; {expected}")
        try:
            host, port = split_host_port(text, cls.default_port)
        except ValueError:
            raise ValueError(f"bad port in {text!r}; {expected}") from None
        if not host or not 0 < port < 65536 or any(c.isspace() for c in host):
            raise ValueError(f"{text!r} is not a HOST[:PORT]; {expected}")
        return f"http://{_url_host(host)}:{port}/"

    def connect(self, accept: Accept) -> Deferred[MessageChannel]:
        return Deferred.fromCoroutine(self._connect(accept))

    async def _connect(self, accept: Accept) -> MessageChannel:
        base = self.address_to_endpoint(self.settings.connect)
        pool = HTTPConnectionPool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = 4
        # Twisted would send a failed GET again with the same token, which
        # the server refuses as a replay; the channel retries with a new one.
        pool.retryAutomatically = False
        policy = (
            BrowserLikePolicyForHTTPS(trustRoot=self._trust)
            if self._trust is not None
            else BrowserLikePolicyForHTTPS()
        )
        agent = Agent.usingEndpointFactory(self.reactor, _Endpoints(self.reactor, policy), pool)
        http = _treq().client.HTTPClient(agent)
        try:
            return await self._open(http, pool, base, accept)
        except BaseException as e:
            await pool.closeCachedConnections()
            problem = _tls_problem(e)
            if problem is not None:
                raise _tls_error(base, problem) from None
            if isinstance(e, (OctotwistError, ConnectionError, CancelledError)):
                raise
            if isinstance(e, Exception):
                raise ConnectionError(_connect_error(base, e)) from None
            raise

    async def _open(
        self, http: Any, pool: HTTPConnectionPool, base: str, accept: Accept
    ) -> MessageChannel:
        secret = self.settings.secret
        url = base + "octo/session"
        kwargs = {"allow_redirects": False, "timeout": REQUEST_TIMEOUT, "reactor": self.reactor}
        first = await http.request("POST", url, **kwargs)
        await _text(first)
        if first.code == 503:
            raise ConnectionError(f"the server at {base} is shutting down")
        challenge_header = first.headers.getRawHeaders(b"WWW-Authenticate", [None])[0]
        params = wire.parse_credentials(challenge_header) or {}
        challenge = bytes.fromhex(params.get("challenge", "")) if _is_hex(params) else b""
        if first.code != 401 or len(challenge) != wire.CHALLENGE_SIZE:
            raise RemoteProtocolError(
                f"{base} is not an octo server (it answered {first.code} to POST {url} "
                "without an octo challenge); check the URL and the port"
            )
        cnonce = auth.new_nonce()
        headers = Headers({b"Authorization": [wire.session_credentials(secret, challenge, cnonce)]})
        second = await http.request("POST", url, headers=headers, **kwargs)
        text = await _text(second)
        if second.code == 401:
            raise AuthenticationError(
                f"the server refused our secret ({text}): it does not have the same "
                f"secret (check --secret-file / {auth.SECRET_ENV})"
            )
        if second.code == 503:
            raise ConnectionError(f"the server at {base} is shutting down")
        sid = second.headers.getRawHeaders(wire.SESSION_HEADER, [b""])[0].decode("ascii", "replace")
        proof = second.headers.getRawHeaders(wire.PROOF_HEADER, [b""])[0].decode("ascii", "replace")
        if second.code != 201 or not sid:
            raise RemoteProtocolError(f"{base} answered {second.code} to a session request: {text}")
        expected = wire.server_proof(secret, challenge, cnonce).hex()
        if not hmac.compare_digest(expected.encode(), proof.encode()):
            raise AuthenticationError("the server did not prove it knows the secret")
        key = wire.session_key(secret, challenge, cnonce)
        sealed = wire.session_channel(secret, challenge, cnonce, client=True)
        channel = _ClientChannel(self.reactor, http, pool, base, sid, key, sealed)
        channel.handler = accept(channel)
        channel.start()
        return channel


@implementer(IStreamClientEndpoint)
class _NoDelay:
    """An endpoint whose connections have Nagle's algorithm off."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def connected(protocol: IProtocol) -> IProtocol:
            no_delay(getattr(protocol, "transport", None))
            return protocol

        return self._endpoint.connect(factory).addCallback(connected)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Twisted's own choice of endpoint (TCP for http, TLS over TCP for
    https), with Nagle's algorithm off: a streamed body's small frames
    would otherwise each wait for the acknowledgement of the one before,
    one round trip apiece across a slow link.
    """

    def __init__(self, reactor: IReactor, policy: BrowserLikePolicyForHTTPS) -> None:
        self._reactor = reactor
        self._policy = policy

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, uri.port, timeout=CONNECT_TIMEOUT
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return _NoDelay(endpoint)


def _treq() -> Any:
    """treq, imported on first use: the plugin loads without it (octotwist[http])."""
    try:
        import treq
        import treq.client
    except ImportError:
        raise UsageError(
            "the http transport's client needs treq: pip install 'octotwist[http]'"
        ) from None
    return treq


def _is_hex(params: dict[str, str]) -> bool:
    value = params.get("challenge", "")
    return bool(re.fullmatch(r"[0-9a-fA-F]+", value)) and len(value) % 2 == 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _connect_error(base: str, e: Exception) -> str:
    text = _describe(e)
    if base.startswith("http:") and getattr(e, "reasons", None):
        # Connected, then closed without an answer: an https server (or no
        # HTTP server at all) on that port.
        text += "; the server closed the connection without answering: if it serves https, "
        text += "use an https:// URL"
    return text


def _tls_error(base: str, problem: BaseException) -> Exception:
    detail = _describe(problem)
    host = urllib.parse.urlsplit(base).hostname
    if "certificate verify failed" in detail or "VerificationError" in detail:
        return AuthenticationError(
            f"cannot verify the TLS certificate of {host} ({detail}): if the server's "
            "certificate is self-signed or from a private CA, pass that CA's certificate "
            "with --ca-file PATH; the certificate must also name the host in the URL"
        )
    return RemoteProtocolError(
        f"TLS with {host} failed ({detail}); does the server listen with ssl: (https)?"
    )

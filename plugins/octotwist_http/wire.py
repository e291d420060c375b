"""
The HTTP transport's wire format, with no I/O: body framing, the tokens that
authenticate every request, and the limits.  L{octotwist_http.server} and
L{octotwist_http.client} feed bytes and headers in and get decisions out, so
everything here is tested without a reactor or a socket.

The API lives under C{/octo/} on the server (C{API_ROOT}); every other path is
the status page.  Paths below are relative to that root::

    POST   session                         create a session (see "Tokens")
    GET    session/ID/messages?ack=N&wait=S   long poll: frames N, N+1, ... (200),
                                           or nothing within S seconds (204)
    GET    session/ID/messages?ack=N&wait=S&follow=1
                                           the same, sent while the previous answer
                                           is still coming: it ends that answer and
                                           goes on with the frames no answer carried
    POST   session/ID/messages?first=N     frames N, N+1, ... from the worker (204)
    DELETE session/ID                      the worker hangs up (204)

A poll's answer and an upload's body stay open while frames come, for up to
L{STREAM_SECONDS} (chunked): a message crosses the link as soon as it is
sent, not with the next request.

Bodies (both directions) are frames: a 4-byte big-endian length, then one
message sealed by the core's channel layer (L{octotwist.secure}: encrypted
and authenticated under keys only this session has, L{session_channel}).
Frames are numbered per direction from 0, so a request or a response that
was cut can be sent again: the receiver skips the frames it already has
(TCP's trick, one level up).  The number is also the frame's sequence
number in the channel layer, so a frame that was altered, injected,
replayed, reordered or dropped fails its integrity check at the receiver,
whatever a proxy or someone on the path did to the HTTP around it.

Tokens, modelled on HTTP Digest authentication but with HMAC-SHA256 and a
proof in both directions:

  1. C{POST session} without C{Authorization} gets C{401} and
     C{WWW-Authenticate: Octo challenge="HEX"}.  The challenge is stateless
     (a time stamp and random bytes, signed with a key only this server
     process knows), so unauthenticated clients make the server store nothing.
  2. The client sends C{Authorization: Octo challenge="HEX", cnonce="HEX",
     proof="HEX"}, C{proof = HMAC(secret, "http-client" + challenge +
     cnonce)}; the server answers C{201} with C{Octo-Session: ID} and
     C{Octo-Proof: HMAC(secret, "http-server" + cnonce + challenge)}, so the
     client knows the server has the secret too.  Both sides derive the
     session key C{HMAC(secret, "http-session" + challenge + cnonce)}, and
     the keys of the session's frames from the secret, the challenge and
     the cnonce (L{session_channel}).
  3. Every later request carries C{Authorization: Octo session="ID",
     seq="N", mac="HEX"}, C{mac = HMAC(session key, method, target, ID, N)}
     over the method and the path below the API root (query included); each
     C{seq} is accepted once.

A request whose token is missing or wrong is answered C{401} as soon as its
headers have arrived: its body is never read, let alone decoded.  The
request MAC covers the request line, not the body: the body's integrity is
the channel layer's, frame by frame.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import struct
from dataclasses import dataclass

from octotwist import auth, secure
from octotwist.framing import PREFIX, FrameBuffer, FrameTooLarge

#: Every API path starts with this; all other paths are the status page.
API_ROOT = b"/octo/"

#: Port C{octo server --transport http} listens on by default.
DEFAULT_PORT = 18126

#: Frame header: the length of the encoded message that follows.
HEADER = PREFIX

#: Largest message accepted in either direction (the TCP transport's limit).
MAX_MESSAGE = 64 * 1024 * 1024
#: Largest frame: a sealed message.
MAX_FRAME = MAX_MESSAGE + secure.OVERHEAD
#: Largest request body the server reads: one maximal frame.
MAX_BODY = MAX_FRAME + HEADER.size
#: Largest body of a request that carries no frames (status page, session
#: creation, hang-up): such requests have no business sending data.
MAX_SMALL_BODY = 64 * 1024
#: A sender puts frames into one body until it holds this many bytes; a
#: larger single frame travels alone.
BATCH_BYTES = 16 * 1024 * 1024

#: Seconds a poll's answer, or an upload's body, stays open for frames that
#: come while it is on the way (see L{octotwist_http.server._Stream}); then
#: it ends, so that what it carried is acknowledged, and a proxy that holds
#: bodies back until they end delays messages this long at most.
STREAM_SECONDS = 1.0
#: Seconds a poll waits for messages when the client does not say (C{wait=}).
DEFAULT_HOLD = 25.0
#: Longest hold a client may ask for.
MAX_HOLD = 120.0
#: Seconds a session may go without an open poll before the server counts it
#: lost: a client polls again as soon as it has read an answer...
POLL_GRACE = 10.0
#: ... and within a fraction of a second when its poll was cut, which is
#: also what a killed worker looks like: that case gets a shorter grace.
DROP_GRACE = 3.0
#: Seconds a challenge stays valid.
CHALLENGE_TTL = 60.0
#: How far back a request's C{seq} may lag the highest one seen.
REPLAY_WINDOW = 1024

SCHEME = "Octo"
SESSION_HEADER = b"Octo-Session"
PROOF_HEADER = b"Octo-Proof"
RECEIVED_HEADER = b"Octo-Received"
FIRST_HEADER = b"Octo-First"

_CLIENT_ROLE = b"http-client/2"
_SERVER_ROLE = b"http-server/2"
_SESSION_ROLE = b"http-session/2"
_REQUEST_ROLE = b"octo-http/2 request"
#: Names this protocol in the keys of a session's frames.
CONTEXT = b"octotwist-http/2"

_CHALLENGE_TIME = struct.Struct("!Q")
_CHALLENGE_RANDOM = 16
_CHALLENGE_MAC = 16
CHALLENGE_SIZE = _CHALLENGE_TIME.size + _CHALLENGE_RANDOM + _CHALLENGE_MAC


class FramingError(Exception):
    """A body does not hold well-formed frames.

    @ivar oversized: the problem is a frame over the limit (HTTP 413), not
        garbage (HTTP 400).
    """

    def __init__(self, message: str, oversized: bool = False) -> None:
        super().__init__(message)
        self.oversized = oversized


# Framing.


def frame_header(frame: bytes) -> bytes:
    """The 4 bytes that precede C{frame} in a body."""
    return HEADER.pack(len(frame))


def fits(sent: int, frame: bytes, limit: int = BATCH_BYTES) -> bool:
    """
    Whether C{frame} may go in a body that holds C{sent} bytes already: the
    first frame always does (however large), the others while the body
    stays within C{limit} bytes.
    """
    return not sent or sent + HEADER.size + len(frame) <= limit


class FrameParser:
    """
    A body, fed in chunks of any size, as frames: the core's L{FrameBuffer},
    and the end of the body, which must not cut a frame.  Bytes beyond
    C{max_frame} are never buffered.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = FrameBuffer(max_frame)

    def feed(self, data: bytes) -> list[bytes]:
        """
        Every frame that C{data} completes, in order.

        @raise FramingError: a frame is longer than C{max_frame}.
        """
        self._buffer.feed(data)
        try:
            return self._buffer.frames()
        except FrameTooLarge as e:
            raise FramingError(str(e), oversized=True) from None

    @property
    def pending(self) -> bool:
        """Whether a frame has begun but not ended."""
        return self._buffer.pending

    def finish(self) -> None:
        """
        The body has ended.

        @raise FramingError: it ended in the middle of a frame.
        """
        if self._buffer.pending:
            raise FramingError("the body ends in the middle of a frame")


# Authorization headers.

_PARAM = re.compile(r'\s*([A-Za-z]+)="([^"\\]*)"\s*(?:,|$)')


def format_credentials(**params: str) -> bytes:
    """C{Octo a="1", b="2"}: an C{Authorization} or C{WWW-Authenticate} value."""
    return (SCHEME + " " + ", ".join(f'{k}="{v}"' for k, v in params.items())).encode("ascii")


def parse_credentials(value: bytes | None) -> dict[str, str] | None:
    """
    The parameters of an C{Octo ...} header value, or C{None} when it is
    missing, of another scheme, or malformed.
    """
    if not value:
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != SCHEME.lower():
        return None
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            return None
        params[m.group(1).lower()] = m.group(2)
        pos = m.end()
    return params


def _unhex(text: str | None, size: int | None = None) -> bytes | None:
    if text is None or len(text) > 256:
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    if size is not None and len(raw) != size:
        return None
    return raw


# Session creation.


class Challenges:
    """
    Mints and checks the server's challenges without storing them: a
    challenge is C{time + random + MAC(key, time + random)} under a key that
    lives only in this process.  A challenge that was used to open a session
    is remembered until it expires, so it opens only one.
    """

    def __init__(self, key: bytes | None = None, ttl: float = CHALLENGE_TTL) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self.ttl = ttl
        self._used: dict[bytes, float] = {}

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_CHALLENGE_MAC]

    def mint(self, now: float) -> bytes:
        body = _CHALLENGE_TIME.pack(int(now)) + secrets.token_bytes(_CHALLENGE_RANDOM)
        return body + self._mac(body)

    def problem(self, challenge: bytes, now: float) -> str | None:
        """Why C{challenge} cannot open a session now, or C{None} if it can."""
        if len(challenge) != CHALLENGE_SIZE:
            return "malformed challenge"
        body, mac = challenge[:-_CHALLENGE_MAC], challenge[-_CHALLENGE_MAC:]
        if not hmac.compare_digest(self._mac(body), mac):
            return "the challenge was not issued by this server"
        (issued,) = _CHALLENGE_TIME.unpack(body[: _CHALLENGE_TIME.size])
        if not -1 <= now - issued <= self.ttl:
            return "the challenge has expired"
        if challenge in self._used:
            return "the challenge was already used"
        return None

    def use(self, challenge: bytes, now: float) -> None:
        """Remember that C{challenge} opened a session."""
        for old, expires in list(self._used.items()):
            if expires < now:
                del self._used[old]
        self._used[challenge] = now + self.ttl + 1


def client_proof(secret: bytes, challenge: bytes, cnonce: bytes) -> bytes:
    return auth.proof(secret, _CLIENT_ROLE, challenge, cnonce)


def server_proof(secret: bytes, challenge: bytes, cnonce: bytes) -> bytes:
    return auth.proof(secret, _SERVER_ROLE, cnonce, challenge)


def session_key(secret: bytes, challenge: bytes, cnonce: bytes) -> bytes:
    """The key of the session's request MACs."""
    return auth.proof(secret, _SESSION_ROLE, challenge, cnonce)


def session_channel(
    secret: bytes, challenge: bytes, cnonce: bytes, *, client: bool
) -> secure.SecureChannel:
    """
    The channel layer of one session, on the client's side or the
    server's: the keys come from the secret and both sides' fresh values
    (the server's challenge, the client's cnonce).
    """
    return secure.SecureChannel.create(
        secret, initiator=client, initiator_nonce=cnonce, responder_nonce=challenge, context=CONTEXT
    )


@dataclass(frozen=True)
class SessionRequest:
    """A checked C{Authorization} header of a session-creation request."""

    challenge: bytes
    cnonce: bytes
    proof: bytes


def parse_session_request(params: dict[str, str]) -> SessionRequest | None:
    challenge = _unhex(params.get("challenge"), CHALLENGE_SIZE)
    cnonce = _unhex(params.get("cnonce"), auth.NONCE_SIZE)
    proof = _unhex(params.get("proof"), auth.DIGEST_SIZE)
    if challenge is None or cnonce is None or proof is None:
        return None
    return SessionRequest(challenge, cnonce, proof)


def session_credentials(secret: bytes, challenge: bytes, cnonce: bytes) -> bytes:
    """The C{Authorization} value that opens a session (client side)."""
    return format_credentials(
        challenge=challenge.hex(),
        cnonce=cnonce.hex(),
        proof=client_proof(secret, challenge, cnonce).hex(),
    )


# Requests within a session.


def request_mac(key: bytes, method: bytes, target: bytes, session: str, seq: int) -> bytes:
    """
    The MAC of one request: its method, its target below the API root
    (C{b"session/ID/messages?ack=3"}), the session and the sequence number.
    """
    message = b"\n".join(
        [_REQUEST_ROLE, method.upper(), target, session.encode("ascii"), b"%d" % seq]
    )
    return hmac.new(key, message, hashlib.sha256).digest()


def request_credentials(key: bytes, method: bytes, target: bytes, session: str, seq: int) -> bytes:
    """The C{Authorization} value of one request in a session (client side)."""
    mac = request_mac(key, method, target, session, seq)
    return format_credentials(session=session, seq=str(seq), mac=mac.hex())


@dataclass(frozen=True)
class RequestToken:
    session: str
    seq: int
    mac: bytes


_SESSION_ID = re.compile(r"[0-9a-f]{32}\Z")


def new_session_id() -> str:
    return secrets.token_hex(16)


def parse_request_token(params: dict[str, str]) -> RequestToken | None:
    session = params.get("session", "")
    seq = params.get("seq", "")
    mac = _unhex(params.get("mac"), hashlib.sha256().digest_size)
    if not _SESSION_ID.match(session) or not seq.isdigit() or len(seq) > 18 or mac is None:
        return None
    return RequestToken(session, int(seq), mac)


def check_request(key: bytes, method: bytes, target: bytes, token: RequestToken) -> bool:
    """Whether C{token} is the right MAC for this request (constant time)."""
    expected = request_mac(key, method, target, token.session, token.seq)
    return hmac.compare_digest(expected, token.mac)


class ReplayWindow:
    """
    Accepts each request sequence number once.  Requests of one session may
    overtake each other (a poll and an upload travel on two connections), so
    numbers up to L{REPLAY_WINDOW} below the highest seen are still accepted
    if new.
    """

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self._top = -1
        self._seen: set[int] = set()

    def accept(self, seq: int) -> bool:
        if seq <= self._top - self.size or seq in self._seen:
            return False
        self._seen.add(seq)
        if seq > self._top:
            self._top = seq
            if len(self._seen) > 2 * self.size:
                floor = self._top - self.size
                self._seen = {s for s in self._seen if s > floor}
        return True


# Paths.


def split_target(raw: bytes) -> bytes | None:
    """
    The part of a request target below the API root (C{b"session/ID"}), or
    C{None} when the target is not an API path.  An absolute-form target
    (C{http://host/octo/...}, as some proxies send) is reduced to its path.
    """
    if raw.startswith((b"http://", b"https://")):
        slash = raw.find(b"/", raw.find(b"//") + 2)
        raw = raw[slash:] if slash >= 0 else b"/"
    if raw.startswith(API_ROOT):
        return raw[len(API_ROOT) :]
    if raw == API_ROOT.rstrip(b"/"):
        return b""
    return None


@dataclass(frozen=True)
class Target:
    """What an API target asks for."""

    kind: str  # "create", "poll", "upload", "delete"
    session: str | None
    query: dict[bytes, bytes]


_ROUTES = {
    (b"POST", 1): "create",
    (b"GET", 3): "poll",
    (b"POST", 3): "upload",
    (b"DELETE", 2): "delete",
}


def route(method: bytes, target: bytes) -> Target | None:
    """Which API call C{method target} is, or C{None} if none."""
    path, _, query = target.partition(b"?")
    parts = path.split(b"/")
    if parts[0] != b"session" or (len(parts) == 3 and parts[2] != b"messages"):
        return None
    kind = _ROUTES.get((method.upper(), len(parts)))
    if kind is None:
        return None
    session = parts[1].decode("ascii", "replace") if len(parts) > 1 else None
    if session is not None and not _SESSION_ID.match(session):
        return None
    params: dict[bytes, bytes] = {}
    for item in query.split(b"&") if query else ():
        key, _, value = item.partition(b"=")
        params[key] = value
    return Target(kind, session, params)


def int_param(query: dict[bytes, bytes], name: bytes) -> int | None:
    value = query.get(name)
    if value is None or not value.isdigit() or len(value) > 18:
        return None
    return int(value)

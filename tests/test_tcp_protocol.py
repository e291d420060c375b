"""The TCP transport's handshake and framing, in memory (no sockets)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

from octotwist import codec, handshake, messages
from octotwist.errors import AuthenticationError, RemoteProtocolError
from octotwist.secure import OVERHEAD
from octotwist.testing.relay import evil_pickle
from octotwist_tcp.protocol import (
    CONTEXT,
    HANDSHAKE_TIMEOUT,
    MAGIC,
    ClientFactory,
    ServerFactory,
)

SECRET = b"s3cret-for-the-tcp-tests"


class Recorder:
    def __init__(self, channel) -> None:
        self.channel = channel
        self.messages: list = []
        self.lost: list[str] = []

    def message_received(self, message) -> None:
        self.messages.append(message)

    def connection_lost(self, reason: str) -> None:
        self.lost.append(reason)


class Accepted:
    def __init__(self) -> None:
        self.handlers: list[Recorder] = []

    def __call__(self, channel) -> Recorder:
        r = Recorder(channel)
        self.handlers.append(r)
        return r


def frame(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


def server(secret: bytes = SECRET, max_frame: int = 1024):
    accepted = Accepted()
    reactor = MemoryReactorClock()
    factory = ServerFactory(reactor, secret, accepted, max_frame)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, accepted, reactor


def challenge_of(transport: StringTransport) -> bytes:
    data = transport.value()
    (n,) = struct.unpack("!I", data[:4])
    payload = data[4 : 4 + n]
    assert payload.startswith(MAGIC)
    transport.clear()
    return payload


def test_server_accepts_a_correct_proof_and_proves_itself() -> None:
    proto, transport, accepted, _ = server()
    client = handshake.ClientHandshake(SECRET, CONTEXT)
    proto.dataReceived(frame(client.respond(challenge_of(transport))))
    assert len(accepted.handlers) == 1
    channel = client.confirm(transport.value()[4:])  # raises unless the server proved itself
    hello = messages.Hello("w", "h", 1, 1)
    proto.dataReceived(frame(channel.encode(hello)))
    assert accepted.handlers[0].messages == [hello]


def test_wrong_secret_is_dropped_before_anything_is_decoded() -> None:
    proto, transport, accepted, _ = server()
    client = handshake.ClientHandshake(b"wrong-secret-of-some-length", CONTEXT)
    proto.dataReceived(frame(client.respond(challenge_of(transport))))
    assert accepted.handlers == []
    assert transport.disconnecting or transport.disconnected
    assert transport.value() == b""  # no proof given to an impostor


@pytest.mark.parametrize(
    "payload",
    [
        codec.encode_message(messages.Hello("w", "h", 1, 1)),  # skips the handshake
        b"x" * 10,
    ],
)
def test_anything_but_a_proof_before_auth_is_dropped(payload: bytes) -> None:
    proto, transport, accepted, _ = server()
    challenge_of(transport)
    proto.dataReceived(frame(payload))
    assert accepted.handlers == [] and (transport.disconnecting or transport.disconnected)


def test_an_evil_pickle_before_auth_runs_nothing(tmp_path: Path) -> None:
    """
    A pickle in place of the proof (what octo.py and mincemeat took from
    anyone) is refused unread: the server closes, nothing ran, and the
    client, given one in place of the challenge, does the same.
    """
    marker = tmp_path / "pwned"
    evil = evil_pickle(marker)
    assert len(evil) <= handshake.MAX_FRAME  # it gets past the frame limit
    proto, transport, accepted, _ = server()
    challenge_of(transport)
    proto.dataReceived(frame(evil))
    assert accepted.handlers == [] and (transport.disconnecting or transport.disconnected)
    assert transport.value() == b""
    proto, transport, accepted, errors = client()
    proto.dataReceived(frame(evil))
    assert errors and errors[0].check(RemoteProtocolError)
    assert accepted.handlers == [] and transport.value() == b""
    assert not marker.exists(), "the pickle ran"


def test_big_frame_before_auth_is_refused_without_buffering_it() -> None:
    proto, transport, accepted, _ = server()
    challenge_of(transport)
    proto.dataReceived(struct.pack("!I", 50_000_000) + b"x" * 100)
    assert accepted.handlers == [] and (transport.disconnecting or transport.disconnected)


def test_handshake_times_out() -> None:
    _proto, transport, _accepted, reactor = server()
    reactor.advance(HANDSHAKE_TIMEOUT + 1)
    assert transport.disconnecting or transport.disconnected


def client(secret: bytes = SECRET):
    accepted = Accepted()
    reactor = MemoryReactorClock()
    proto = ClientFactory(reactor, secret, accepted, 1024).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    errors: list = []
    proto.ready.addErrback(errors.append)
    return proto, transport, accepted, errors


def test_client_refuses_a_server_that_fails_its_proof_and_decodes_nothing(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "pwned"
    proto, transport, accepted, errors = client()
    fake = handshake.ServerHandshake(b"the-fake-server-s-secret-0123", CONTEXT)
    proto.dataReceived(frame(fake.challenge()))
    assert len(transport.value()) == 4 + 64  # our nonce and proof
    transport.clear()
    after = frame(evil_pickle(marker)) + frame(codec.encode_message(messages.Shutdown(True)))
    proto.dataReceived(frame(os.urandom(32)) + after)
    assert errors and errors[0].check(AuthenticationError)
    assert "did not prove it knows the secret" in str(errors[0].value)
    assert accepted.handlers == [] and transport.value() == b""  # no Hello, nothing
    assert transport.disconnecting or transport.disconnected
    assert not marker.exists()


@pytest.mark.parametrize(
    "first",
    [codec.encode_message(messages.Shutdown(True)), MAGIC + bytes(31), b"x" * 44],
    ids=["a message in the clear", "a short challenge", "junk"],
)
def test_client_answers_nothing_but_a_challenge(first: bytes) -> None:
    proto, transport, accepted, errors = client()
    proto.dataReceived(frame(first) + frame(codec.encode_message(messages.Shutdown(True))))
    assert errors and errors[0].check(RemoteProtocolError)
    assert accepted.handlers == [] and transport.value() == b""
    assert transport.disconnecting or transport.disconnected


def authenticated_pair(client_secret: bytes = SECRET, max_frame: int = 1024):
    server_accepted, client_accepted = Accepted(), Accepted()
    reactor = MemoryReactorClock()
    sf = ServerFactory(reactor, SECRET, server_accepted, max_frame)
    cf = ClientFactory(reactor, client_secret, client_accepted, max_frame)
    sp, cp = sf.buildProtocol(None), cf.buildProtocol(None)
    pump = connect(sp, makeFakeServer(sp), cp, makeFakeClient(cp))
    return sp, cp, pump, server_accepted, client_accepted


def test_client_and_server_authenticate_each_other_and_talk() -> None:
    _sp, cp, pump, server_accepted, client_accepted = authenticated_pair()
    ready = []
    cp.ready.addCallback(ready.append)
    pump.flush()
    assert len(ready) == 1 and len(server_accepted.handlers) == 1
    ready[0].send(messages.Hello("w", "h", 1, 2))
    server_accepted.handlers[0].channel.send(messages.Shutdown(True))
    pump.flush()
    assert server_accepted.handlers[0].messages == [messages.Hello("w", "h", 1, 2)]
    assert client_accepted.handlers[0].messages == [messages.Shutdown(True)]


def test_client_with_the_wrong_secret_gets_an_authentication_error() -> None:
    _sp, cp, pump, server_accepted, _ = authenticated_pair(client_secret=b"nope")
    errors = []
    cp.ready.addErrback(errors.append)
    pump.flush()
    assert server_accepted.handlers == []
    assert errors and errors[0].check(AuthenticationError)
    assert "same secret" in str(errors[0].value)


def test_malformed_and_oversized_frames_after_auth_close_that_connection() -> None:
    sp, cp, pump, server_accepted, _ = authenticated_pair(max_frame=100)
    pump.flush()
    handler = server_accepted.handlers[0]
    sp.dataReceived(frame(cp.secure.seal(b"not a message")))  # sealed right, but junk
    pump.flush()
    assert handler.lost and "malformed message" in handler.lost[0]
    sp2, _cp2, pump2, accepted2, _ = authenticated_pair(max_frame=100)
    pump2.flush()
    sp2.dataReceived(struct.pack("!I", 100 + OVERHEAD + 1) + b"x" * 200)
    pump2.flush()
    assert accepted2.handlers[0].lost and "over the limit" in accepted2.handlers[0].lost[0]

"""
The channel layer (L{octotwist.secure}) in memory: every frame that was not
sealed, in this order, by the peer of this very connection and direction
fails its integrity check, whatever was done to it, small or large (a
large payload goes through GCM's streaming interface, a small one through
the one-shot call: both are checked).  A refused frame leaves the sequence
where it was, so the genuine frame still opens after it; and a sealed frame
that holds a pickle, the attacker's favourite, runs nothing.

These are the fast tests that kill the mutants of C{tests/mutation.py}
which skip the tag check (catching C{InvalidTag} and carrying on, or a
streaming decryption that never calls C{finalize}).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from octotwist import messages
from octotwist.errors import IntegrityError, RemoteProtocolError
from octotwist.messages import TaskId, TaskKind
from octotwist.secure import OVERHEAD, SecureChannel
from octotwist.testing.relay import evil_pickle, flip

SECRET = b"channel-test-secret-0123456789"
TASK = TaskId(TaskKind.MAP, 3)
#: Small: the one-shot AEAD call.  Large: past the streaming threshold (64 KiB).
SMALL = messages.TaskOutput(TASK, 1, 2, b"four", True)
LARGE = messages.TaskOutput(TASK, 1, 2, os.urandom(300 * 1024), False)


def pair(
    context: bytes = b"tcp/test", secret: bytes = SECRET
) -> tuple[SecureChannel, SecureChannel]:
    """Both ends of one connection: C{(worker, server)}."""
    worker_nonce, server_nonce = os.urandom(32), os.urandom(32)
    return tuple(  # type: ignore[return-value]
        SecureChannel.create(
            secret,
            initiator=initiator,
            initiator_nonce=worker_nonce,
            responder_nonce=server_nonce,
            context=context,
        )
        for initiator in (True, False)
    )


def assert_refused(channel: SecureChannel, frame: bytes) -> None:
    """C{frame} fails its integrity check and leaves the sequence where it was."""
    before = channel.opener.sequence
    with pytest.raises(IntegrityError, match="integrity check failed"):
        channel.decode(frame)
    assert channel.opener.sequence == before


@pytest.mark.parametrize("message", [SMALL, LARGE], ids=["small", "large"])
def test_frames_open_in_order_both_ways(message: messages.TaskOutput) -> None:
    worker, server = pair()
    frames = [worker.encode(message) for _ in range(3)]
    assert [server.decode(f) for f in frames] == [message] * 3
    back = server.encode(message)
    assert worker.decode(back) == message
    assert len(back) == len(frames[0]) and worker.opener.sequence == 1


@pytest.mark.parametrize("message", [SMALL, LARGE], ids=["small", "large"])
def test_a_bit_flipped_anywhere_is_refused(message: messages.TaskOutput) -> None:
    worker, server = pair()
    frame = worker.encode(message)
    if len(frame) < 200:
        positions = range(len(frame))  # every byte of a small frame
    else:  # the length, the header, the payload's start, middle and end, the tag
        positions = [*range(0, 40), len(frame) // 2, *range(len(frame) - 40, len(frame))]
    for at in positions:
        assert_refused(server, flip(frame, at))
    assert server.decode(frame) == message  # the genuine frame still opens


@pytest.mark.parametrize("message", [SMALL, LARGE], ids=["small", "large"])
def test_replayed_reordered_and_dropped_frames_are_refused(message: messages.TaskOutput) -> None:
    worker, server = pair()
    first, second, third = (worker.encode(message) for _ in range(3))
    assert_refused(server, second)  # out of order, or the first was dropped
    assert server.decode(first) == message
    assert_refused(server, first)  # replayed
    assert server.decode(second) == message
    assert_refused(server, second)
    assert server.decode(third) == message


@pytest.mark.parametrize("message", [SMALL, LARGE], ids=["small", "large"])
def test_a_frame_is_worth_nothing_elsewhere(message: messages.TaskOutput) -> None:
    worker, server = pair()
    frame = worker.encode(message)
    assert_refused(worker, frame)  # reflected back at its sender
    _, other_server = pair()
    assert_refused(other_server, frame)  # another connection, same secret
    _, http = pair(context=b"http/test")
    assert_refused(http, frame)  # another protocol
    _, stranger = pair(secret=b"another-secret-0123456789")
    assert_refused(stranger, frame)
    assert server.decode(frame) == message


@pytest.mark.parametrize("message", [SMALL, LARGE], ids=["small", "large"])
def test_cut_padded_and_relabelled_frames_are_refused(message: messages.TaskOutput) -> None:
    worker, server = pair()
    frame = worker.encode(message)
    for bad in (
        b"",
        frame[: OVERHEAD - 1],
        frame[:OVERHEAD],
        frame[:-1],  # the tag cut
        frame[:-17],  # the tag gone, the rest intact
        frame + b"\0",
        # the header's length, in the clear, changed: the header and the
        # payload would split elsewhere
        (int.from_bytes(frame[:4], "big") + 1).to_bytes(4, "big") + frame[4:],
        (int.from_bytes(frame[:4], "big") - 1).to_bytes(4, "big") + frame[4:],
        (2**32 - 1).to_bytes(4, "big") + frame[4:],
    ):
        assert_refused(server, bad)
    assert server.decode(frame) == message


def test_a_sealed_pickle_is_refused_by_the_codec_and_runs_nothing(tmp_path: Path) -> None:
    """What a peer with the key could send: the frame checks out, the message does not."""
    marker = tmp_path / "pwned"
    worker, server = pair()
    for payload in (b"", os.urandom(100 * 1024)):
        with pytest.raises(RemoteProtocolError, match="malformed message") as e:
            server.decode(worker.seal(evil_pickle(marker), payload))
        assert not isinstance(e.value, IntegrityError)
    assert not marker.exists(), "the pickle ran"

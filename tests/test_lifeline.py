"""
C{octo client --stdin} (L{octotwist.lifeline}), the worker octo run --hosts
starts over SSH: its secret is standard input's first line, and standard
input closing stops it at once, whatever it is doing.  Here the worker is
started directly, with a pipe for standard input the test closes; the
launcher's own tests (test_launch.py) do it over real SSH.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import _started, wait_for_log
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError

SECRET = "a lifeline test's secret, long enough"


def _worker(port: int, transport: str, env: dict[str, str]) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "octotwist", "client", f"127.0.0.1:{port}", "--transport",
        transport, "--stdin", "--wait", "60",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    _started.append(proc)
    assert proc.stdin is not None
    proc.stdin.write(SECRET + "\n")
    proc.stdin.flush()
    return proc


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A "server" on 127.0.0.1 that takes connections and never says a word."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        yield listening


def _closed_stops(proc: subprocess.Popen[str], seen: str) -> None:
    """Close the worker's standard input: it exits within seconds, saying why."""
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.close()
    try:
        code = proc.wait(timeout=10)  # (--wait is 60; it stops in about a second)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    err = seen + proc.stderr.read()
    assert code == 1, err
    assert "standard input closed" in err, err
    assert "Traceback" not in err, err


def test_a_worker_mid_connection_attempt_stops_when_its_stdin_closes(
    silent: socket.socket, transport: str, env: dict[str, str]
) -> None:
    """
    Its attempt hangs (the server never answers the handshake): cancelling
    it must stop the worker, not count as one more failed attempt to retry.
    """
    proc = _worker(silent.getsockname()[1], transport, env)
    silent.settimeout(30)
    connection, _ = silent.accept()  # the attempt is under way
    with connection:
        _closed_stops(proc, "")


def test_a_worker_retrying_an_absent_server_stops_when_its_stdin_closes(
    transport: str, env: dict[str, str]
) -> None:
    with socket.socket() as reserved:  # a port where nothing listens
        reserved.bind(("127.0.0.1", 0))
        proc = _worker(reserved.getsockname()[1], transport, env)
        seen = wait_for_log(proc, ["cannot reach the server"], timeout=30)
        _closed_stops(proc, seen)


def test_an_empty_first_line_is_refused(env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "octotwist", "client", "127.0.0.1:1", "--stdin"],
        env=env, input="\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "standard input's first line, the secret, is empty" in proc.stderr


class _Channel:
    closed = False

    def close(self) -> None:
        self.closed = True


def _awaiting(attempt: Deferred) -> tuple[Deferred, list]:
    """C{client._stoppable(attempt)} as a Deferred, and what it ended with."""
    from octotwist.client import _stoppable

    waiting = Deferred.fromCoroutine(_stoppable(attempt))
    ended: list = []
    waiting.addBoth(ended.append)
    return waiting, ended


def test_a_cancelled_attempt_that_fails_its_own_way_stops_the_worker() -> None:
    attempt: Deferred = Deferred(lambda d: d.errback(ConnectingCancelledError(None)))
    waiting, ended = _awaiting(attempt)
    waiting.cancel()
    [failure] = ended
    assert failure.check(CancelledError)


def test_a_cancelled_attempt_that_ends_later_closes_what_it_opened() -> None:
    """
    Its transport cleans up before it ends (a coroutine, as http's): it
    ends after we were cancelled, and a channel it opened then is closed,
    not used, nor is a second result forced onto a Deferred that fired.
    """
    connected: Deferred = Deferred()
    cleaned_up: Deferred = Deferred()
    channel = _Channel()

    async def attempting() -> _Channel:
        try:
            await connected
        except CancelledError:
            await cleaned_up  # (and then it made it after all)
        return channel

    waiting, ended = _awaiting(Deferred.fromCoroutine(attempting()))
    waiting.cancel()
    assert ended[0].check(CancelledError)
    cleaned_up.callback(None)
    assert channel.closed and len(ended) == 1


def test_a_transports_own_cancellation_is_a_failed_attempt() -> None:
    """Not ours: the retry loop retries it, rather than the worker exiting without a word."""
    attempt: Deferred = Deferred()
    _, ended = _awaiting(attempt)
    attempt.errback(CancelledError())
    [failure] = ended
    assert failure.check(ConnectionError) and "cancelled" in str(failure.value)


def test_an_attempt_that_works_gives_its_channel() -> None:
    attempt: Deferred = Deferred()
    _, ended = _awaiting(attempt)
    channel = _Channel()
    attempt.callback(channel)
    assert ended == [channel] and not channel.closed

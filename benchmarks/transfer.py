"""
Blob throughput of each transport over loopback: one process sends a large
result blob (as the 4 MiB C{TaskOutput} parts a worker sends) to a
C{TaskServer} in another process, which acknowledges once it holds every
byte.  Prints MiB/s per transport, and the ratio to TCP, all from one run.

    python benchmarks/transfer.py                      # every transport, 200 MB
    python benchmarks/transfer.py --transport ssh --transport tcp --mb 50

Transports are set up as C{octo run} sets them up: the shared secret and
the address the server's C{listen()} returned, no other options.

The row C{tcp-plain} is a reference, not a transport: the tcp transport
with the core's channel layer (L{octotwist.secure}) replaced by one that
neither encrypts nor authenticates, in this benchmark's processes only.
C{tcp} against C{tcp-plain}, from the same run, is what sealing every
frame costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import react

from octotwist import allocator, codec, messages
from octotwist.hookspecs import get_transport, transports
from octotwist.messages import TaskId, TaskKind
from octotwist.transport import ClientSettings, MessageChannel, ServerSettings

SECRET = b"transfer-benchmark-secret"
TASK = TaskId(TaskKind.MAP, 0)
#: The reference row: tcp without the channel layer.
PLAIN = "tcp-plain"


class _PlainChannel:
    """The channel layer's interface, with no crypto: only for the reference row."""

    def __init__(self) -> None:
        pass

    @classmethod
    def create(cls, *args: Any, **kwargs: Any) -> _PlainChannel:
        return cls()

    def encode(self, message: messages.Message) -> bytes:
        return codec.encode_message(message)

    def decode(self, frame: bytes) -> messages.Message:
        return codec.decode_message(frame)


def _transport(name: str) -> Any:
    """
    The transport for a row; for L{PLAIN}, tcp with the channel layer taken
    out, in this process, until the next row asks for another transport.
    """
    from octotwist import handshake, secure

    handshake.SecureChannel = (  # type: ignore[misc]
        _PlainChannel if name == PLAIN else secure.SecureChannel
    )
    return get_transport("tcp" if name == PLAIN else name)


class _Receiver:
    """Server side: count the bytes of the blob, acknowledge at its end."""

    def __init__(self, channel: MessageChannel) -> None:
        self.channel = channel
        self.received = 0

    def message_received(self, message: messages.Message) -> None:
        if isinstance(message, messages.TaskOutput):
            self.received += len(message.data)
            if message.end:
                self.channel.send(messages.Shutdown(True, str(self.received)))
                self.received = 0

    def connection_lost(self, reason: str) -> None:
        pass


async def _serve(reactor: Any, name: str) -> None:
    transport = _transport(name)
    private = tempfile.mkdtemp(prefix="octo-transfer-")
    server = transport.server_class()(
        reactor, ServerSettings(transport.local_listen(Path(private)), SECRET), _Receiver
    )
    address = await server.listen()
    print(address, flush=True)
    # The parent closes our stdin when it is done with us.
    gone: Deferred[None] = Deferred()

    class _Stdin(Protocol):
        def connectionLost(self, reason: object = None) -> None:
            gone.callback(None)

    StandardIO(_Stdin(), stdout=os.open(os.devnull, os.O_WRONLY), reactor=reactor)
    await gone
    await server.stop()
    shutil.rmtree(private, ignore_errors=True)


class _Sender:
    def __init__(self, channel: MessageChannel) -> None:
        self.channel = channel
        self.acked: Deferred[int] = Deferred()

    def message_received(self, message: messages.Message) -> None:
        if isinstance(message, messages.Shutdown):
            self.acked.callback(int(message.reason))

    def connection_lost(self, reason: str) -> None:
        if not self.acked.called:
            self.acked.errback(ConnectionError(reason))


async def _send(reactor: Any, name: str, address: str, blob: bytes, runs: int) -> list[float]:
    transport = _transport(name)
    client = transport.client_class()(reactor, ClientSettings(address, SECRET))
    senders: list[_Sender] = []

    def accept(channel: MessageChannel) -> _Sender:
        senders.append(_Sender(channel))
        return senders[-1]

    channel = await client.connect(accept)
    rates = []
    for _ in range(runs):
        sender = senders[-1]
        sender.acked = Deferred()
        started = time.perf_counter()
        for data, end in codec.parts(blob):
            await channel.writable()  # as the core does: a few parts in flight, not 200 MB
            channel.send(messages.TaskOutput(TASK, 1, 0, data, end))
        got = await sender.acked
        seconds = time.perf_counter() - started
        if got != len(blob):
            raise SystemExit(f"{name}: the server got {got} bytes, not {len(blob)}")
        rates.append(len(blob) / 2**20 / seconds)
    channel.close()
    return rates


async def _main(reactor: Any, options: argparse.Namespace) -> None:
    names = options.transport or [PLAIN, *sorted(transports())]
    # Incompressible, like a compressed shuffle blob.
    blob = os.urandom(options.mb * 10**6)
    results = {}
    for name in names:
        config = tempfile.mkdtemp(prefix="octo-transfer-config-")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # Keys a transport generates on first use stay out of ~/.config.
            env=dict(os.environ, XDG_CONFIG_HOME=config),
        )
        try:
            address = server.stdout.readline().strip()
            if not address:
                raise SystemExit(f"{name}: the server did not start")
            rates = await _send(reactor, name, address, blob, options.runs)
        finally:
            server.stdin.close()
            server.wait(timeout=30)
            shutil.rmtree(config, ignore_errors=True)
        results[name] = statistics.median(rates)
        print(
            f"{name:9} {results[name]:8.1f} MiB/s  (median of {options.runs}: "
            + ", ".join(f"{r:.0f}" for r in rates)
            + ")",
            flush=True,
        )
    if "tcp" in results:
        print()
        for name, rate in results.items():
            print(f"{name:9} {rate / results['tcp']:5.2f}x tcp")
    if PLAIN in results and "tcp" in results:
        print(
            f"\nsealing every frame (tcp against {PLAIN}): {results['tcp'] / results[PLAIN]:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--transport",
        action="append",
        help=f"a transport, or {PLAIN} (repeat; default: {PLAIN} and every transport)",
    )
    parser.add_argument("--mb", type=int, default=200, help="blob size in MB (default 200)")
    parser.add_argument("--runs", type=int, default=3, help="transfers per transport")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    options = parser.parse_args()
    allocator.tune()  # as every octo process does
    if options.serve:
        react(lambda reactor: Deferred.fromCoroutine(_serve(reactor, options.serve)))
    else:
        react(lambda reactor: Deferred.fromCoroutine(_main(reactor, options)))


if __name__ == "__main__":
    main()

"""
A link with a far end, for tests: a TCP relay on 127.0.0.1 that delays what
passes, stalls it now and then as a lossy link does, and can go down and
come back, without touching a byte.

The kernel of a test machine may lack C{netem}, and a test must not need
root: so the link is emulated where a worker's traffic passes anyway, in
the test process.  What a transport sees is what it sees on a real link:

  - C{delay}: every chunk read is delivered C{delay} seconds later, in
    order (each direction: the round trip is twice it);
  - C{loss}: that share of the chunks is "lost" (one in every C{1/loss},
    at a random place within each run of them), and TCP's retransmission
    is what the peer then sees: it, and what follows it, arrive an RTO
    (C{3 * delay}, at least 0.2 s) late; nothing is dropped, since TCP
    drops nothing;
  - L{SlowLink.down}: nothing passes, either way, on the connections that
    are open, and a new connection is held unanswered, until L{SlowLink.up};
    then what waited goes on, on the same connections, as it does when a
    cable is plugged back in before TCP gives up.

Each connection's two directions are threads of the test process.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time

#: The shortest retransmission timeout (Linux's TCP_RTO_MIN).
RTO_MIN = 0.2


class SlowLink:
    """
    Listens on a port of 127.0.0.1 (L{port}) and forwards each connection to
    C{upstream} (a port of 127.0.0.1) over the emulated link (see the module).

    @param seed: where in each run of C{1/loss} chunks the lost one falls,
        so that a test's run is repeatable.
    """

    def __init__(
        self, upstream: int, *, delay: float = 0.0, loss: float = 0.0, seed: int = 0
    ) -> None:
        self.upstream = upstream
        self.delay = delay
        self.loss = loss
        self._random = random.Random(seed)
        self._chunks = 0
        self._run = max(1, round(1 / loss)) if loss else 1
        self._next_loss = self._pick_loss(0)
        self._count_lock = threading.Lock()
        self._up = threading.Event()
        self._up.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        #: Chunks that were "lost" (and delivered an RTO late), both ways.
        self.stalls = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        """The link goes down: nothing passes until L{up}."""
        self._up.clear()

    def up(self) -> None:
        self._up.set()

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    def close(self) -> None:
        self._closed = True
        self._up.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._up.wait()  # a connection made while the link is down waits for it
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        self._sockets += [client, server]
        for src, dst in ((client, server), (server, client)):
            _Direction(self, src, dst).start()

    def _pick_loss(self, start: int) -> int:
        """The chunk to lose in the run of C{1/loss} chunks that starts at C{start}."""
        return start + self._random.randrange(self._run) if self.loss else -1

    def _lost(self) -> bool:
        with self._count_lock:
            n, self._chunks = self._chunks, self._chunks + 1
            if n != self._next_loss:
                return False
            self.stalls += 1
            self._next_loss = self._pick_loss(n - n % self._run + self._run)
            return True


class _Direction:
    """One direction of one connection: a reader that stamps, a writer that waits."""

    def __init__(self, link: SlowLink, src: socket.socket, dst: socket.socket) -> None:
        self.link = link
        self.src = src
        self.dst = dst
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._ready = threading.Condition()
        self._last = 0.0  # when the last chunk is due: order is kept
        self._eof = False

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        link = self.link
        try:
            while data := self.src.recv(1 << 16):
                link._up.wait()  # (what is read while down waits, as if never sent)
                due = time.monotonic() + link.delay
                if link._lost():
                    due += max(RTO_MIN, 3 * link.delay)
                with self._ready:
                    self._last = max(self._last, due)
                    self._queue.append((self._last, data))
                    self._ready.notify()
        except OSError:
            pass
        with self._ready:
            self._eof = True
            self._ready.notify()

    def _write(self) -> None:
        try:
            while True:
                with self._ready:
                    while not self._queue and not self._eof:
                        self._ready.wait()
                    if not self._queue:
                        break
                    due, data = self._queue.popleft()
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                self.link._up.wait()
                self.dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (self.src, self.dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

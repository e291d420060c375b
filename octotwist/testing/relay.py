"""
A man in the middle for tests: a relay on 127.0.0.1 (or a Unix socket) that
forwards every connection to the real server and may rewrite what passes,
as an attacker on the path would, without knowing any secret.

Part of the testing kit so that a transport's author can check, as
octotwist's own tests do for tcp, http, ssh and the unixcred example, that a
frame altered, dropped, replayed, reordered or injected after the handshake
closes the connection and runs nothing.

The relay runs in threads of the test process.  Each direction of each
connection goes through an L{Editor}, which is fed the bytes read and
returns the bytes to forward; L{Frames} cuts a 4-byte length-prefixed
stream into frames (tcp, unixcred) and L{HTTPMessages} cuts HTTP/1.1 into
requests or responses with their bodies, so that a test can rewrite one
frame, or one body, and forward the rest untouched.

Only the first connection (or the first few) is tampered with; later ones
pass through, so a worker that noticed and reconnected can finish the job,
and the test checks that the result is still exact.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from octotwist import messages

_PREFIX = struct.Struct("!I")


class Editor:
    """One direction of one connection: bytes in, bytes out."""

    def feed(self, data: bytes) -> bytes:
        return data


class Frames(Editor):
    """
    Length-prefixed frames; C{edit(index, frame)} returns the frames to
    send in its place (none: dropped; two: one injected or replayed).
    """

    def __init__(self, edit: Callable[[int, bytes], list[bytes]]) -> None:
        self.edit = edit
        self.index = 0
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while len(self._buffer) >= 4:
            (n,) = _PREFIX.unpack_from(self._buffer)
            if len(self._buffer) < 4 + n:
                break
            frame, self._buffer = self._buffer[4 : 4 + n], self._buffer[4 + n :]
            for replacement in self.edit(self.index, frame):
                out.append(_PREFIX.pack(len(replacement)) + replacement)
            self.index += 1
        return b"".join(out)


class HTTPMessages(Editor):
    """
    HTTP/1.1 requests or responses, with a Content-Length body or a chunked
    one (all the octotwist HTTP transport sends); C{edit(head, body)}
    returns the body to send instead (the Content-Length is fixed up).  A
    chunked body, which streams, is edited frame by frame as it passes:
    C{body} is then the complete frames (a 4-byte length, then that many
    bytes) that have arrived, and what C{edit} returns goes on as a chunk.
    """

    def __init__(self, edit: Callable[[bytes, bytes], bytes]) -> None:
        self.edit = edit
        self._buffer = b""
        self._chunked_head: bytes | None = None  # in a chunked body: its head
        self._frames = b""  # its data, de-chunked, not yet whole frames

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out: list[bytes] = []
        while True:
            if self._chunked_head is not None:
                if not self._chunk(out):
                    break
                continue
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self._buffer[:end]
            length = 0
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                self._buffer = self._buffer[end + 4 :]
                self._chunked_head = head
                out.append(head + b"\r\n\r\n")
                continue
            if len(self._buffer) < end + 4 + length:
                break
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            new = self.edit(head, body)
            if new != body:
                lines = [
                    line
                    for line in head.split(b"\r\n")
                    if not line.lower().startswith(b"content-length:")
                ]
                head = b"\r\n".join([*lines, b"Content-Length: %d" % len(new)])
            out.append(head + b"\r\n\r\n" + new)
        return b"".join(out)

    def _chunk(self, out: list[bytes]) -> bool:
        """One chunk of the chunked body, if it is all here; C{False}: wait for more."""
        line_end = self._buffer.find(b"\r\n")
        if line_end < 0:
            return False
        size = int(self._buffer[:line_end].split(b";")[0], 16)
        if size == 0:  # the last chunk (no trailers: the transport sends none)
            if len(self._buffer) < line_end + 4:
                return False
            if self._frames:
                out.append(b"%x\r\n%s\r\n" % (len(self._frames), self._frames))
            self._frames = b""
            self._buffer = self._buffer[line_end + 4 :]
            self._chunked_head = None
            out.append(b"0\r\n\r\n")
            return True
        if len(self._buffer) < line_end + 2 + size + 2:
            return False
        self._frames += self._buffer[line_end + 2 : line_end + 2 + size]
        self._buffer = self._buffer[line_end + 2 + size + 2 :]
        whole = 0
        while len(self._frames) >= whole + 4:
            length = int.from_bytes(self._frames[whole : whole + 4], "big")
            if len(self._frames) < whole + 4 + length:
                break
            whole += 4 + length
        if whole:
            assert self._chunked_head is not None
            body, self._frames = self._frames[:whole], self._frames[whole:]
            new = self.edit(self._chunked_head, body)
            if new:
                out.append(b"%x\r\n%s\r\n" % (len(new), new))
        return True


EditorFactory = Callable[[int], tuple[Editor, Editor]]


def pass_through(connection: int) -> tuple[Editor, Editor]:
    return Editor(), Editor()


class Relay:
    """
    Listens on C{listen} (a port on 127.0.0.1, or a Unix socket path),
    forwards each connection to C{upstream}, through the editors that
    C{editors(n)} returns for the C{n}-th connection:
    C{(client -> server, server -> client)}.
    """

    def __init__(self, upstream: int | str, editors: EditorFactory = pass_through) -> None:
        self.upstream = upstream
        self.editors = editors
        self.connections = 0
        if isinstance(upstream, str):
            self.path = upstream + ".relay"
            self._listener = socket.socket(socket.AF_UNIX)
            self._listener.bind(self.path)
        else:
            self._listener = socket.socket()
            self._listener.bind(("127.0.0.1", 0))
            self.port = self._listener.getsockname()[1]
        self._listener.listen(64)
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.upstream)
            return s
        return socket.create_connection(("127.0.0.1", self.upstream))

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = self._connect_upstream()
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            upward, downward = self.editors(self.connections)
            self.connections += 1
            for src, dst, editor in ((client, server, upward), (server, client, downward)):
                threading.Thread(target=_pump, args=(src, dst, editor), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        if isinstance(self.upstream, str):
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _pump(src: socket.socket, dst: socket.socket, editor: Editor) -> None:
    try:
        while data := src.recv(1 << 16):
            out = editor.feed(data)
            if out:
                dst.sendall(out)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class _Evil:
    """Unpickling this runs a shell command: what an attacker would ship."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def evil_pickle(marker: Path) -> bytes:
    """A pickle that, if anyone ever unpickles it, creates C{marker}."""
    return pickle.dumps(_Evil(f"touch {marker}"), protocol=5)


def evil_welcome(marker: Path) -> bytes:
    """
    A Welcome as the review's attacker wrote it for octotwist before the
    channel layer (a pickled message): a worker that took it would run the
    "functions", and so C{marker} would appear.
    """
    welcome = messages.Welcome("pwned", evil_pickle(marker), 2, 1.0)
    return pickle.dumps(welcome, protocol=5)


def evil_reduce_output(marker: Path) -> bytes:
    """A reduce task's result in the old pickled form; the server would unpickle its data."""
    task = messages.TaskId(messages.TaskKind.REDUCE, 0)
    return pickle.dumps(messages.TaskOutput(task, 1, 0, evil_pickle(marker), True), protocol=5)


def flip(frame: bytes, at: int | None = None) -> bytes:
    """C{frame} with one bit changed (in the middle, by default)."""
    i = len(frame) // 2 if at is None else at
    return frame[:i] + bytes([frame[i] ^ 0x01]) + frame[i + 1 :]


# A peer that has authenticated and then sends a pickle.

#: The environment variable that names L{EVIL_OCTO}'s marker file.
EVIL_MARKER = "OCTO_EVIL_MARKER"

#: C{python -c EVIL_OCTO ARGS...} is C{octo ARGS...} (an C{octo client}, in
#: the kit) whose first message has a pickle for its header, one that
#: creates the file C{$OCTO_EVIL_MARKER} if anyone unpickles it
#: (L{corrupt_first_message}).
EVIL_OCTO = (
    "import os, pathlib\n"
    "from octotwist.testing.relay import EVIL_MARKER, corrupt_first_message\n"
    "corrupt_first_message(pathlib.Path(os.environ[EVIL_MARKER]))\n"
    "from octotwist.cli import main\n"
    "main()\n"
)


def corrupt_first_message(marker: Path) -> None:
    """
    Make this process's first message, whatever it is, carry an evil
    pickle (L{evil_pickle}) for its header; every later one is honest.

    This plays a peer that has authenticated -- a transport's own client,
    with good credentials -- and then sends what only such a peer can get to
    the other end's decoder.  The kit needs that on every transport,
    whatever its framing and however it authenticates, so rather than speak
    any transport it replaces the core's encoder,
    L{octotwist.codec.message_parts}, which every transport's frames go
    through (L{octotwist.secure.SecureChannel.encode}, and
    L{octotwist.codec.encode_message} for SSH).  Honest afterwards, so that
    the same process then shows that the other end dropped that one
    connection and goes on serving: it reconnects and works.
    """
    from octotwist import codec

    honest = codec.message_parts
    sent = False

    def message_parts(message: messages.Message) -> tuple[bytes, bytes]:
        nonlocal sent
        if sent:
            return honest(message)
        sent = True
        _header, payload = honest(message)
        return evil_pickle(marker), payload

    codec.message_parts = message_parts

"""
Bytes in, objects out: the only module that pickles or unpickles what crosses
a process boundary.

Three kinds of payload, three functions each way:

  - control messages (L{octotwist.messages}) -> L{encode_message} /
    L{decode_message}.  Decoding uses an unpickler that only admits the
    message classes, so even an authenticated peer cannot make us build an
    arbitrary object, and a corrupt frame raises L{RemoteProtocolError}.
  - user data (map inputs, shuffle runs, results) -> L{pack} / L{unpack}:
    pickle protocol 5, compressed with zstandard.  The server packs map
    inputs and unpacks only final results; everything in between stays opaque.
  - the job's functions -> L{dump_functions} / L{load_functions} (cloudpickle,
    by value), decoded only inside worker processes.

Transports call these only after their peer has authenticated.
"""

from __future__ import annotations

import io
import pickle
import types
from collections.abc import Iterator
from typing import Any

import zstandard

from octotwist import messages
from octotwist.errors import RemoteProtocolError

#: Largest data part put in one message.  Blobs larger than this are sent in
#: several L{TaskInput}/L{TaskOutput} parts, so a transport's frame limit is
#: about this size plus a small header, whatever the size of the user's data.
PART_SIZE = 4 * 1024 * 1024

#: zstd level for user data: level 1 compresses word-count output ~3.5:1 at
#: several hundred MB/s, which keeps compression off the critical path.
COMPRESSION_LEVEL = 1

_compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
_decompressor = zstandard.ZstdDecompressor()
_PICKLE_5 = bytes([pickle.PROTO[0], 5])

_MESSAGE_NAMES = frozenset(t.__name__ for t in messages.MESSAGE_TYPES) | {
    "TaskId",
    "TaskKind",
}


class _MessageUnpickler(pickle.Unpickler):
    """An unpickler that can build message objects and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "octotwist.messages" and name in _MESSAGE_NAMES:
            return getattr(messages, name)
        raise RemoteProtocolError(f"forbidden type in message: {module}.{name}")


def encode_message(message: messages.Message) -> bytes:
    """Serialize one message for the wire."""
    return pickle.dumps(message, protocol=5)


def decode_message(data: bytes) -> messages.Message:
    """
    Parse one message received from an authenticated peer.

    @raise RemoteProtocolError: C{data} is not a valid message.
    """
    try:
        message = _MessageUnpickler(io.BytesIO(data)).load()
    except RemoteProtocolError:
        raise
    except Exception as e:
        raise RemoteProtocolError(f"malformed message: {e!r}") from None
    if not isinstance(message, messages.MESSAGE_TYPES):
        raise RemoteProtocolError(f"not a message: {type(message).__name__}")
    return message


def pack(obj: Any, compress: bool = True) -> bytes:
    """
    Pickle user data into one blob, compressed unless C{compress} is false
    (for a peer on the same machine, where copying is cheaper than zstd).
    """
    data = pickle.dumps(obj, protocol=5)
    return _compressor.compress(data) if compress else data


def unpack(blob: bytes) -> Any:
    """
    Inverse of L{pack}, either way: a pickle of protocol 5 starts with
    C{PROTO 5} (C{0x80 0x05}), a zstd frame with its magic number
    (C{0x28 0xb5 0x2f 0xfd}), so the blob says which it is.
    """
    if blob[:2] == _PICKLE_5:
        return pickle.loads(blob)
    return pickle.loads(_decompressor.decompress(blob))


def parts(blob: bytes, size: int = PART_SIZE) -> Iterator[tuple[bytes, bool]]:
    """Cut a blob into C{(part, is_last)} pieces of at most C{size} bytes."""
    if len(blob) <= size:
        yield blob, True
        return
    view = memoryview(blob)
    for start in range(0, len(blob), size):
        yield bytes(view[start : start + size]), start + size >= len(blob)


def dump_functions(functions: Any) -> bytes:
    """
    Pickle the job's functions by value with cloudpickle, keeping each code
    object's file name (cloudpickle blanks it to C{<dynamic-code>}), so that a
    traceback from a worker names the user's script and line.
    """
    buffer = io.BytesIO()
    _FilenamePickler(buffer, protocol=5).dump(functions)
    return buffer.getvalue()


def load_functions(data: bytes) -> Any:
    """Inverse of L{dump_functions}; runs only in worker processes."""
    import cloudpickle  # noqa: F401  (cloudpickle's reducers must be importable)

    return pickle.loads(data)


def _named_code(code: types.CodeType, filename: str) -> types.CodeType:
    return code.replace(co_filename=filename)


def _pickler_base() -> type:
    import cloudpickle

    return cloudpickle.Pickler


class _FilenamePickler(_pickler_base()):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._copies: dict[int, types.CodeType] = {}  # kept alive so ids stay unique

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType) and id(obj) not in self._copies:
            # Reduce to _named_code(copy, filename).  A copy, because pickle
            # drops a reduce whose arguments contain the object itself.
            copy = obj.replace()
            self._copies[id(copy)] = copy
            return _named_code, (copy, obj.co_filename)
        return super().reducer_override(obj)

"""
Bytes in, objects out: the only module that turns what crosses a process
boundary into objects, and back.

Three kinds of payload, three functions each way:

  - control messages (L{octotwist.messages}) -> L{encode_message} /
    L{decode_message}: MessagePack, data only.  Decoding builds nothing but
    strings, bytes, numbers, booleans and lists, allocates at most in
    proportion to the frame (msgpack bounds every length by the input), and
    checks every field against the type the message class declares before
    the message is built, so a frame with a wrong type, a missing field or
    an unknown message raises L{RemoteProtocolError} and never reaches the
    core.  (They used to be pickles: a 9-byte pickle could make the server
    allocate gigabytes.)
  - user data (map inputs, shuffle runs, results) -> L{pack} / L{unpack}:
    pickle protocol 5 (cloudpickle for what plain pickle refuses, such as a
    class defined in the job script), compressed with zstandard.  The server
    packs map inputs and unpacks only final results; everything in between
    stays opaque.
  - the job's functions -> L{dump_functions} / L{load_functions} (cloudpickle,
    by value), decoded only inside worker processes.

The trust model, plainly: L{unpack} and L{load_functions} are C{pickle}, and
unpickling runs code.  Only peers that authenticated ever reach them, and
such a peer can run code as the user of whoever unpacks its data: a worker
on the server (which unpacks reduce results) and on other workers (which
unpack map outputs); the server on every worker (it ships the functions).
Whoever holds the shared secret or an authorized key is trusted that far
(docs/guide.md, "Security").  Control messages, by contrast, are data
whoever sends them.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import msgpack
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

#: Most steps a job may have (L{octotwist.job.Step}); a task id past it is nonsense.
MAX_STEPS = 1000

_compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
_decompressor = zstandard.ZstdDecompressor()
_PICKLE_5 = bytes([pickle.PROTO[0], 5])


# Control messages.
#
# On the wire a message is a header and a payload.  The header is a msgpack
# array: its class name, then each field in declaration order (a TaskId is
# [kind, index, step]; tuples are arrays); the message's one bytes field, if it
# has one, is the payload, and the header gives its length in its place.
# Every field is always sent, defaults included, so that a decoder checks
# the same shape whatever the sender left out.

_Check = Callable[[Any], Any]  # returns the field's value, or raises _Invalid


class _Invalid(Exception):
    pass


def _exact(kind: type) -> _Check:
    def check(value: Any) -> Any:
        if type(value) is not kind:  # bool is not an int, here
            raise _Invalid(f"{kind.__name__} expected, got {type(value).__name__}")
        return value

    return check


def _float(value: Any) -> float:
    if type(value) not in (float, int) or not math.isfinite(value):
        raise _Invalid(f"a finite number expected, got {value!r:.40}")
    return float(value)


def _task_id(value: Any) -> messages.TaskId:
    if type(value) is not list or len(value) != 3:
        raise _Invalid("a task id [kind, index, step] expected")
    kind, index, step = value
    if (
        kind not in ("map", "reduce")
        or type(index) is not int
        or index < 0
        or type(step) is not int
        or not 0 <= step < MAX_STEPS
    ):
        raise _Invalid(f"not a task id: {value!r:.60}")
    return messages.TaskId(messages.TaskKind(kind), index, step)


def _optional(check: _Check) -> _Check:
    def optional(value: Any) -> Any:
        return None if value is None else check(value)

    return optional


def _tuple_of(items: tuple[_Check, ...] | _Check) -> _Check:
    def check(value: Any) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _Invalid(f"an array expected, got {type(value).__name__}")
        if isinstance(items, tuple):
            if len(value) != len(items):
                raise _Invalid(f"{len(items)} items expected, got {len(value)}")
            return tuple(c(v) for c, v in zip(items, value, strict=True))
        return tuple(items(v) for v in value)

    return check


_SCALARS: dict[Any, _Check] = {
    str: _exact(str),
    bytes: _exact(bytes),
    int: _exact(int),
    bool: _exact(bool),
    float: _float,
    messages.TaskId: _task_id,
}


def _checker(hint: Any) -> _Check:
    """The check for a field declared as C{hint} (a type from messages.py)."""
    if hint in _SCALARS:
        return _SCALARS[hint]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and len(args) == 2 and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _optional(_checker(inner))
    if typing.get_origin(hint) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _tuple_of(_checker(args[0]))
        return _tuple_of(tuple(_checker(a) for a in args))
    raise TypeError(f"no wire form for a message field of type {hint!r}")


def _wire(value: Any) -> Any:
    """A field's value as msgpack sees it."""
    if isinstance(value, messages.TaskId):
        return [value.kind.value, value.index, value.step]
    if isinstance(value, tuple):
        return [_wire(v) for v in value]
    return value


class _Schema:
    """How one message class travels: its fields, their checks, its payload field."""

    def __init__(self, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        self.cls = cls
        self.names = [f.name for f in fields(cls)]
        self.checks = [_checker(hints[n]) for n in self.names]
        payloads = [i for i, n in enumerate(self.names) if hints[n] is bytes]
        if len(payloads) > 1:
            raise TypeError(f"{cls.__name__}: at most one bytes field may carry data")
        #: Index of the field that travels as the payload, or None.
        self.payload = payloads[0] if payloads else None


_SCHEMAS = {cls.__name__: _Schema(cls) for cls in messages.MESSAGE_TYPES}
_HEADER_LENGTH = struct.Struct("!I")
#: Longest header accepted: control fields only (a traceback is the longest).
MAX_HEADER = 1024 * 1024


def message_parts(message: messages.Message) -> tuple[bytes, bytes]:
    """
    One message as its two wire parts: the header (msgpack: its class name,
    then its fields in order, the payload field given as its length) and
    the payload (the one C{bytes} field -- a task's data, the job's
    functions -- or C{b""}).  Keeping the payload apart lets the channel
    layer encrypt a 4 MiB part without first copying it into an encoding.
    """
    name = type(message).__name__
    schema = _SCHEMAS[name]
    values = [_wire(getattr(message, n)) for n in schema.names]
    payload = b""
    if schema.payload is not None:
        payload = values[schema.payload]
        values[schema.payload] = len(payload)
    return msgpack.packb([name, *values], use_bin_type=True), payload


def message_from_parts(header: bytes, payload: bytes) -> messages.Message:
    """
    Inverse of L{message_parts}, for a message received from an
    authenticated peer, checking every field's type (and that the payload
    is as long as the header says).

    @raise RemoteProtocolError: the parts are not a valid message; the text
        says what is wrong with them.
    """
    try:
        # raw=False: strings must be valid UTF-8.  msgpack bounds every
        # length it allocates by the size of the input.
        items = msgpack.unpackb(header, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:
        raise RemoteProtocolError(f"malformed message: {type(e).__name__}: {e}"[:300]) from None
    if type(items) is not list or not items or type(items[0]) is not str:
        raise RemoteProtocolError("malformed message: not a [name, fields...] array")
    schema = _SCHEMAS.get(items[0])
    if schema is None:
        raise RemoteProtocolError(f"unknown message type {items[0][:60]!r}")
    cls, names = schema.cls, schema.names
    values = items[1:]
    if len(values) != len(names):
        raise RemoteProtocolError(
            f"malformed {cls.__name__}: {len(values)} fields, expected {len(names)}"
        )
    if schema.payload is None:
        if payload:
            raise RemoteProtocolError(f"malformed {cls.__name__}: it carries no payload")
    elif type(values[schema.payload]) is not int or values[schema.payload] != len(payload):
        raise RemoteProtocolError(
            f"malformed {cls.__name__}: a payload of {len(payload)} bytes, "
            f"the header says {values[schema.payload]!r:.20}"
        )
    else:
        values[schema.payload] = payload
    checked = []
    for name, check, value in zip(names, schema.checks, values, strict=True):
        try:
            checked.append(check(value))
        except _Invalid as e:
            raise RemoteProtocolError(f"malformed {cls.__name__}: field {name}: {e}") from None
    return cls(*checked)


def encode_message(message: messages.Message) -> bytes:
    """
    One message as one string of bytes, for a transport whose channel
    already protects its frames (SSH): a 4-byte header length, the header,
    the payload (L{message_parts}).  Transports that use the channel layer
    call L{octotwist.secure.SecureChannel.encode} instead.
    """
    header, payload = message_parts(message)
    return b"".join([_HEADER_LENGTH.pack(len(header)), header, payload])


def decode_message(data: bytes) -> messages.Message:
    """
    Inverse of L{encode_message}, for data from an authenticated peer.

    @raise RemoteProtocolError: C{data} is not a valid message.
    """
    if len(data) < _HEADER_LENGTH.size:
        raise RemoteProtocolError(f"malformed message: {len(data)} bytes")
    (n,) = _HEADER_LENGTH.unpack_from(data)
    if n > min(MAX_HEADER, len(data) - _HEADER_LENGTH.size):
        raise RemoteProtocolError(f"malformed message: a header of {n} bytes in {len(data)}")
    end = _HEADER_LENGTH.size + n
    return message_from_parts(data[_HEADER_LENGTH.size : end], data[end:])


# User data.


def pack(obj: Any, compress: bool = True) -> bytes:
    """
    Pickle user data into one blob, compressed unless C{compress} is false
    (for a peer on the same machine, where copying is cheaper than zstd).

    Plain pickle first, cloudpickle when it fails, as Dask does
    (C{distributed.protocol.pickle.dumps}): plain pickle stores a class by
    reference, and a class defined in the job script (or in a helper beside
    it, or in C{__main__}) has no importable home in a worker, which got it
    by value with the functions.  cloudpickle stores such a class by value,
    tagged with the id its class tracker gave it when the server shipped the
    functions, so that L{unpack} on the server returns instances of the
    user's own class object, not of a copy.  Data that plain pickle takes
    costs nothing more; data that neither takes raises cloudpickle's error.
    """
    try:
        data = pickle.dumps(obj, protocol=5)
    except (pickle.PicklingError, AttributeError, TypeError):
        data = _cloudpickle_dumps(obj)
    return _compressor.compress(data) if compress else data


def pack_flat(obj: Any, compress: bool = True) -> bytes:
    """
    L{pack} for data made of atoms only (strs, ints, floats, bytes, C{None}
    in lists and tuples: a shuffle run of a word count), pickled without
    the memo (C{Pickler.fast}).  The memo is what lets a pickle hold one
    object twice or hold itself; atoms need neither (a repeated C{str}
    comes back as an equal one), and skipping it makes a list of 10 000
    words a third cheaper to pickle, on the task process every map task
    waits for.  The caller checks that C{obj} is such data
    (L{octotwist.shuffle.is_flat}): anything else must go through L{pack}.
    """
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.fast = True
    pickler.dump(obj)
    data = buffer.getvalue()
    return _compressor.compress(data) if compress else data


def _cloudpickle_dumps(obj: Any) -> bytes:
    """L{pack}'s slow path; its output loads with plain C{pickle.loads}."""
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=5)


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


def load_submitted_job(data: bytes) -> Any:
    """
    Inverse of L{dump_functions} for a whole job a submitter loaded and sent
    (L{octotwist.Cluster}): only on a cluster, only from a peer that proved
    its secret, which is the power to run a job script there anyway.
    """
    return load_functions(data)


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

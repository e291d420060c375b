"""
The codec checks every field of a control message, not just its shape: a
peer that holds the key (or a broken one) can send a header of the right
length with the wrong things in it, and the core must never see a message
whose fields are not what L{octotwist.messages} declares.  These kill the
mutants of C{tests/mutation.py} that skip the field checks or the
payload's length check.
"""

from __future__ import annotations

import math

import msgpack
import pytest

from octotwist import codec, messages
from octotwist.errors import RemoteProtocolError
from octotwist.messages import TaskId, TaskKind

TASK = ["map", 3, 0]


def header(*items: object) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


#: Headers of the right length whose fields have the wrong types or values.
WRONG_FIELDS = {
    "a pid that is a string": header("Hello", "w", "h", "1", 1, 0, None),
    "slots that are a bool": header("Hello", "w", "h", 1, True, 0, None),
    "a name that is bytes": header("Hello", b"w", "h", 1, 1, 0, None),
    "a machine that is a number": header("Hello", "w", "h", 1, 1, 0, 7),
    "a task kind nobody knows": header("Assign", ["steal", 3, 0], 1),
    "a negative task index": header("Assign", ["map", -1, 0], 1),
    "a task id of four items": header("Assign", ["map", 3, 4, 5], 1),
    "a task id of two items": header("Assign", ["map", 3], 1),
    "a step past the most a job has": header("Assign", ["map", 3, 10**6], 1),
    "a negative step": header("Assign", ["map", 3, -1], 1),
    "a task id that is a string": header("Cancel", "map:3", 1),
    "an interval that is NaN": header("Welcome", "j", 0, 2, math.nan, [], False),
    "an interval that is infinite": header("Welcome", "j", 0, 2, math.inf, [], False),
    "an interval that is a string": header("Welcome", "j", 0, 2, "1.0", [], False),
    "step partitions that are a number": header("Welcome", "j", 0, 2, 1.0, 3, False),
    "a stays that is a number": header("Welcome", "j", 0, 2, 1.0, [], 1),
    "a counter that is not a pair": header("TaskDone", TASK, 1, 0, 0, 0.0, [["c"]], "", 1),
    "a counter whose count is a string": header(
        "TaskDone", TASK, 1, 0, 0, 0.0, [["c", "1"]], "", 1
    ),
    "printed output that is bytes": header("TaskDone", TASK, 1, 0, 0, 0.0, [], b"x", 1),
    "a process number that is a string": header("TaskDone", TASK, 1, 0, 0, 0.0, [], "", "1"),
    "ok that is an int": header("Shutdown", 1, "", False),
    "a heartbeat entry that is not a pair": header("Heartbeat", [[TASK]], 0),
    "a heartbeat that is a map": header("Heartbeat", {"a": 1}, 0),
    "a memory size that is a string": header("Heartbeat", [], "1"),
    "a traceback that is a list": header("TaskFailed", TASK, 1, None, "e", ["tb"], "", 1),
}


@pytest.mark.parametrize("name", sorted(WRONG_FIELDS))
def test_a_field_of_the_wrong_type_is_refused(name: str) -> None:
    with pytest.raises(RemoteProtocolError, match=r"malformed \w+: field \w+"):
        codec.message_from_parts(WRONG_FIELDS[name], b"")


def test_the_right_types_make_the_message_the_fields_declare() -> None:
    """The same headers, put right, decode: the refusals above are the field checks'."""
    hello = codec.message_from_parts(header("Hello", "w", "h", 1, 1, 0, None), b"")
    assert hello == messages.Hello("w", "h", 1, 1)
    assign = codec.message_from_parts(header("Assign", TASK, 1), b"")
    assert assign == messages.Assign(TaskId(TaskKind.MAP, 3), 1)
    assert type(assign.task) is TaskId and assign.task.kind is TaskKind.MAP
    beat = codec.message_from_parts(header("Heartbeat", [[TASK, 2]], 7), b"")
    assert beat == messages.Heartbeat(((TaskId(TaskKind.MAP, 3), 2),), 7)
    assert type(beat.running) is tuple and type(beat.running[0]) is tuple
    welcome = codec.message_from_parts(header("Welcome", "j", 3, 2, 1, [2, 0], True), b"abc")
    assert welcome == messages.Welcome("j", b"abc", 2, 1.0, (2, 0), True)
    assert type(welcome.heartbeat_interval) is float
    later = codec.message_from_parts(header("Assign", ["reduce", 3, 2], 1), b"")
    assert later == messages.Assign(TaskId(TaskKind.REDUCE, 3, step=2), 1)
    done = codec.message_from_parts(
        header("TaskDone", TASK, 1, 5, 2, 0.5, [["words", 7]], "hi\n", 2), b""
    )
    assert done.counters == (("words", 7),) and done.output == "hi\n" and done.process == 2


@pytest.mark.parametrize(
    ("fields", "payload"),
    [
        (("TaskInput", TASK, 1, 10, True), b"abc"),  # says 10, carries 3
        (("TaskInput", TASK, 1, 0, True), b"abc"),
        (("TaskInput", TASK, 1, 3, True), b""),
        (("TaskInput", TASK, 1, "3", True), b"abc"),  # a length that is no number
        (("TaskOutput", TASK, 1, 0, None, True), b"abc"),  # no length at all
    ],
    ids=["longer", "zero", "missing payload", "a string", "None"],
)
def test_a_payload_that_is_not_the_length_the_header_says_is_refused(
    fields: tuple, payload: bytes
) -> None:
    with pytest.raises(RemoteProtocolError, match="a payload of"):
        codec.message_from_parts(header(*fields), payload)


def test_a_message_without_a_payload_field_carries_none() -> None:
    with pytest.raises(RemoteProtocolError, match="it carries no payload"):
        codec.message_from_parts(header("Shutdown", True, "", False), b"smuggled")

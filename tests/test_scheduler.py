"""The scheduler as a pure state machine: events in, decisions out, no reactor."""

from __future__ import annotations

import pytest

from octotwist.messages import TaskId, TaskKind
from octotwist.scheduler import (
    _TRANSITIONS,
    NO_WORK,
    Assignment,
    AttemptFailed,
    AttemptSucceeded,
    InvalidEvent,
    Phase,
    Scheduler,
    Verdict,
    WorkerJoined,
    WorkerLeft,
)


def M(i: int) -> TaskId:
    return TaskId(TaskKind.MAP, i)


def R(i: int) -> TaskId:
    return TaskId(TaskKind.REDUCE, i)


def run_all(s: Scheduler, worker: str) -> list[Assignment]:
    """Take and succeed assignments for C{worker} until it gets no work."""
    done = []
    while (a := s.next_assignment(worker)) is not NO_WORK:
        assert s.handle(AttemptSucceeded(worker, a.task, a.attempt)) is Verdict.ACCEPTED
        done.append(a)
    return done


def test_maps_first_come_first_served_then_reduces_then_finished() -> None:
    s = Scheduler(["a", "b", "c"], reduce_tasks=2)
    s.handle(WorkerJoined("w1"))
    s.handle(WorkerJoined("w2"))
    a1 = s.next_assignment("w1")
    a2 = s.next_assignment("w2")
    assert (a1, a2) == (Assignment(M(0), 1, "a"), Assignment(M(1), 1, "b"))
    assert s.next_assignment("w1") is NO_WORK  # one slot each, both busy
    s.handle(AttemptSucceeded("w2", M(1), 1))
    assert s.next_assignment("w2") == Assignment(M(2), 1, "c")
    s.handle(AttemptSucceeded("w1", M(0), 1))
    assert s.phase is Phase.MAPPING  # map 2 still running
    assert s.next_assignment("w1") is NO_WORK  # reduces wait for every map
    s.handle(AttemptSucceeded("w2", M(2), 1))
    assert s.phase is Phase.REDUCING
    assert s.next_assignment("w1") == Assignment(R(0), 1)
    assert s.next_assignment("w2") == Assignment(R(1), 1)
    s.handle(AttemptSucceeded("w1", R(0), 1))
    assert s.phase is Phase.REDUCING
    s.handle(AttemptSucceeded("w2", R(1), 1))
    assert s.phase is Phase.FINISHED and s.done
    assert s.next_assignment("w1") is NO_WORK


def test_keys_are_drawn_one_at_a_time() -> None:
    drawn = []

    def keys():
        for k in range(100):
            drawn.append(k)
            yield k

    s = Scheduler(keys(), reduce_tasks=1)
    assert drawn == [0]  # one key of look-ahead, to know whether there is one
    s.handle(WorkerJoined("w", slots=2))
    s.next_assignment("w")
    assert drawn == [0, 1]
    s.next_assignment("w")
    assert drawn == [0, 1, 2]


def test_empty_source_finishes_at_once() -> None:
    s = Scheduler([], reduce_tasks=4)
    assert s.phase is Phase.FINISHED


def test_slots_bound_concurrent_assignments() -> None:
    s = Scheduler(range(10), reduce_tasks=1)
    s.handle(WorkerJoined("w", slots=3))
    got = [s.next_assignment("w") for _ in range(4)]
    assert [a.task for a in got[:3]] == [M(0), M(1), M(2)]
    assert got[3] is NO_WORK
    assert not s.has_free_slot("w")


def test_worker_left_requeues_its_running_tasks() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1)
    s.handle(WorkerJoined("w1"))
    s.handle(WorkerJoined("w2"))
    assert s.next_assignment("w1").task == M(0)
    s.handle(WorkerLeft("w1"))
    a = s.next_assignment("w2")
    assert a == Assignment(M(0), 2, "a")  # same task, new attempt
    assert s.workers() == ["w2"]


def test_late_result_of_a_lost_attempt_is_invalid() -> None:
    s = Scheduler(["a"], reduce_tasks=1)
    s.handle(WorkerJoined("w1"))
    s.next_assignment("w1")
    s.handle(WorkerLeft("w1"))
    with pytest.raises(InvalidEvent):
        s.handle(AttemptSucceeded("w1", M(0), 1))


def test_requeued_task_counts_its_new_attempt() -> None:
    # A task whose worker left runs again, as attempt 2, on another worker.
    s = Scheduler(["a", "b"], reduce_tasks=1)
    s.handle(WorkerJoined("w1", slots=2))
    s.next_assignment("w1")  # map 0 attempt 1
    s.handle(WorkerJoined("w2"))
    s.handle(WorkerLeft("w1"))
    s.handle(WorkerJoined("w1", slots=2))
    a = s.next_assignment("w2")
    assert a == Assignment(M(0), 2, "a")
    b = s.next_assignment("w1")
    assert b.task == M(1)
    assert s.handle(AttemptSucceeded("w2", M(0), 2)) is Verdict.ACCEPTED
    assert s.counts(TaskKind.MAP).done == 1


def test_failure_fails_the_job_with_where_and_why() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1)
    s.handle(WorkerJoined("w1"))
    a = s.next_assignment("w1")
    s.handle(AttemptFailed("w1", a.task, a.attempt, "'a'", "ValueError: bad", "Traceback..."))
    assert s.phase is Phase.FAILED
    f = s.failure
    assert (f.task, f.key, f.worker, f.error, f.attempts) == (
        M(0),
        "'a'",
        "w1",
        "ValueError: bad",
        1,
    )
    assert s.next_assignment("w1") is NO_WORK


def test_failure_is_retried_below_max_attempts() -> None:
    s = Scheduler(["a"], reduce_tasks=1, max_attempts=2)
    s.handle(WorkerJoined("w1"))
    a = s.next_assignment("w1")
    s.handle(AttemptFailed("w1", a.task, a.attempt, None, "E", "tb"))
    assert s.phase is Phase.MAPPING
    assert s.next_assignment("w1") == Assignment(M(0), 2, "a")
    s.handle(AttemptFailed("w1", M(0), 2, None, "E", "tb"))
    assert s.phase is Phase.FAILED and s.failure.attempts == 2


def test_results_after_the_job_ended_are_discarded() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1)
    s.handle(WorkerJoined("w1"))
    s.handle(WorkerJoined("w2"))
    a = s.next_assignment("w1")
    b = s.next_assignment("w2")
    s.handle(AttemptFailed("w1", a.task, a.attempt, None, "E", "tb"))
    assert s.handle(AttemptSucceeded("w2", b.task, b.attempt)) is Verdict.DISCARDED


def test_invalid_events_raise_and_change_nothing() -> None:
    s = Scheduler(["a"], reduce_tasks=1)
    s.handle(WorkerJoined("w1"))
    before = (s.phase, s.counts(TaskKind.MAP), s.workers())
    with pytest.raises(InvalidEvent):
        s.handle(WorkerJoined("w1"))
    with pytest.raises(InvalidEvent):
        s.handle(AttemptSucceeded("w1", M(0), 1))  # never assigned
    with pytest.raises(InvalidEvent):
        s.handle(WorkerLeft("nobody"))
    with pytest.raises(InvalidEvent):
        s.next_assignment("nobody")
    assert (s.phase, s.counts(TaskKind.MAP), s.workers()) == before


def test_counts_track_progress() -> None:
    s = Scheduler(iter(["a", "b", "c"]), reduce_tasks=2, total=3)
    s.handle(WorkerJoined("w", slots=2))
    s.next_assignment("w")
    c = s.counts(TaskKind.MAP)
    assert (c.done, c.running, c.pending, c.total) == (0, 1, 2, 3)
    unsized = Scheduler(iter(["a", "b"]), reduce_tasks=1)
    assert unsized.counts(TaskKind.MAP).total is None
    unsized.handle(WorkerJoined("w"))
    run_all(unsized, "w")
    assert unsized.counts(TaskKind.MAP).total == 2
    assert unsized.counts(TaskKind.REDUCE).done == 1


def test_phase_table_has_no_way_out_of_terminal_phases() -> None:
    assert _TRANSITIONS[Phase.FINISHED] == frozenset()
    assert _TRANSITIONS[Phase.FAILED] == frozenset()
    assert Phase.MAPPING not in _TRANSITIONS[Phase.REDUCING]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Scheduler([], reduce_tasks=0)
    with pytest.raises(ValueError):
        Scheduler([], reduce_tasks=1, max_attempts=0)

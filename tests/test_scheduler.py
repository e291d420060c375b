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
    Cancellation,
    Heard,
    InvalidEvent,
    Phase,
    Scheduler,
    Silence,
    SkippedRecord,
    Tick,
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
    assert (a1, a2) == (Assignment(M(0), 1, ("a",)), Assignment(M(1), 1, ("b",)))
    assert s.next_assignment("w1") is NO_WORK  # one slot each, both busy
    s.handle(AttemptSucceeded("w2", M(1), 1))
    assert s.next_assignment("w2") == Assignment(M(2), 1, ("c",))
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
    assert s.running("w") == [(M(0), 1), (M(1), 1), (M(2), 1)]


def test_worker_left_requeues_its_running_tasks() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1)
    s.handle(WorkerJoined("w1"))
    s.handle(WorkerJoined("w2"))
    assert s.next_assignment("w1").task == M(0)
    s.handle(WorkerLeft("w1"))
    a = s.next_assignment("w2")
    assert a == Assignment(M(0), 2, ("a",))  # same task, new attempt
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
    assert a == Assignment(M(0), 2, ("a",))
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
    assert s.next_assignment("w1") == Assignment(M(0), 2, ("a",))
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
    # (REDUCING -> MAPPING is the next step's map: tests/test_steps.py.)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Scheduler([], reduce_tasks=0)
    with pytest.raises(ValueError):
        Scheduler([], reduce_tasks=1, max_attempts=0)


# Fault tolerance: leases, retries, skipping, backup tasks.


def joined(s: Scheduler, *workers: str, now: float = 0.0) -> None:
    for w in workers:
        s.handle(WorkerJoined(w))
        s.handle(Heard(w, now))


def test_a_silent_worker_loses_its_attempts_after_its_lease() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1, lease=10)
    joined(s, "w1", "w2")
    a = s.next_assignment("w1")
    s.handle(Tick(5))
    s.handle(Heard("w2", 5))
    assert s.cancellations() == []
    s.handle(Tick(10.5))  # w1 silent since 0, w2 heard at 5
    assert s.cancellations() == [Cancellation("w1", a.task, 1, "worker silent for over 10 s")]
    assert s.next_assignment("w1") is NO_WORK  # suspect: no new work
    assert s.next_assignment("w2") == Assignment(M(0), 2, ("a",))  # requeued first
    # w1 wakes up (SIGCONT) and reports its stale attempt: discarded, no error.
    s.handle(Heard("w1", 11))
    assert s.handle(AttemptSucceeded("w1", M(0), 1)) is Verdict.DISCARDED
    assert s.next_assignment("w1") == Assignment(M(1), 1, ("b",))  # trusted again


def test_a_worker_silent_a_while_gets_no_new_task_but_keeps_its_own() -> None:
    """Suspect after a few missed heartbeats: no new work; its attempts keep their lease."""
    s = Scheduler(["a", "b", "c", "d"], reduce_tasks=1, lease=30, suspect_after=5)
    joined(s, "w1", "w2")
    a = s.next_assignment("w2")
    s.handle(Tick(4))
    s.handle(Heard("w1", 4))
    assert s.news() == [] and not s.is_suspect("w2")
    s.handle(Tick(5.5))  # w2 silent since 0
    assert s.news() == [Silence("w2", 5.5)] and s.is_suspect("w2")
    assert s.next_assignment("w2") is NO_WORK  # a free slot, but no new task for it
    assert s.cancellations() == []  # its own attempt goes on
    assert s.running("w2") == [(a.task, 1)]
    b = s.next_assignment("w1")
    assert b.task != a.task
    s.handle(Tick(9))
    assert s.news() == []  # said once
    s.handle(Heard("w2", 9))  # back: trusted again, its attempt still counts
    assert s.news() == [Silence("w2", 9, back=True)] and not s.is_suspect("w2")
    assert s.handle(AttemptSucceeded("w2", a.task, 1)) is Verdict.ACCEPTED
    assert isinstance(s.next_assignment("w2"), Assignment)


def test_a_suspect_workers_task_gets_a_backup_copy_as_soon_as_others_are_idle() -> None:
    """Not after backup_after, nor after the lease: its worker may never report."""
    s = Scheduler(["a", "b"], reduce_tasks=1, lease=30, suspect_after=5, backup_after=10)
    joined(s, "w1", "w2")
    a = s.next_assignment("w2")
    b = s.next_assignment("w1")
    s.handle(Tick(3))
    s.handle(Heard("w1", 3))
    assert s.next_assignment("w1") is NO_WORK  # map 0 is young, w2 heard from lately
    s.handle(AttemptSucceeded("w1", b.task, b.attempt))
    s.handle(Tick(5.5))
    s.handle(Heard("w1", 5.5))
    assert s.is_suspect("w2")
    backup = s.next_assignment("w1")
    assert backup == Assignment(a.task, 2, ("a",), backup=True)  # at 5.5 s, not 10
    assert s.handle(AttemptSucceeded("w1", a.task, 2)) is Verdict.ACCEPTED
    assert s.cancellations() == [Cancellation("w2", a.task, 1, "another attempt finished first")]


def test_an_expired_attempt_that_fails_late_costs_nothing() -> None:
    s = Scheduler(["a"], reduce_tasks=1, lease=1, max_attempts=1)
    joined(s, "w1", "w2")
    s.next_assignment("w1")
    s.handle(Heard("w2", 2))
    s.handle(Tick(2))
    s.handle(Heard("w1", 3))
    assert s.handle(AttemptFailed("w1", M(0), 1, None, "E", "tb")) is None
    assert s.phase is Phase.MAPPING


def test_retries_go_to_another_worker_when_there_is_one() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1, max_attempts=3)
    joined(s, "w1", "w2")
    a = s.next_assignment("w1")
    s.handle(AttemptFailed("w1", a.task, 1, "'a'", "E", "tb"))
    # w1 asks again: map 0 failed on it and w2 exists, so w1 gets map 1.
    assert s.next_assignment("w1").task == M(1)
    assert s.next_assignment("w2") == Assignment(M(0), 2, ("a",))


def test_a_lone_worker_retries_its_own_failures() -> None:
    s = Scheduler(["a"], reduce_tasks=1, max_attempts=2)
    joined(s, "w1")
    s.handle(AttemptFailed("w1", M(0), s.next_assignment("w1").attempt, None, "E", "tb"))
    assert s.next_assignment("w1") == Assignment(M(0), 2, ("a",))


def test_job_fails_after_max_attempts_naming_every_worker() -> None:
    s = Scheduler(["a"], reduce_tasks=1, max_attempts=3)
    joined(s, "w1", "w2", "w3")
    for worker in ("w1", "w2", "w3"):
        a = s.next_assignment(worker)
        assert a is not NO_WORK, worker
        s.handle(AttemptFailed(worker, a.task, a.attempt, "'a'", "ValueError: x", "tb"))
    assert s.phase is Phase.FAILED
    assert s.failure.attempts == 3 and s.failure.workers == ("w1", "w2", "w3")


def test_skip_bad_records_completes_without_the_bad_key() -> None:
    s = Scheduler(["good", "bad"], reduce_tasks=1, max_attempts=2, skip_bad_records=True)
    joined(s, "w1", "w2")
    good = s.next_assignment("w1")
    bad = s.next_assignment("w2")
    s.handle(AttemptSucceeded("w1", good.task, good.attempt))
    s.handle(AttemptFailed("w2", bad.task, bad.attempt, "'bad'", "E: 1", "tb"))
    retry = s.next_assignment("w1")
    assert retry.task == bad.task
    s.handle(AttemptFailed("w1", retry.task, retry.attempt, "'bad'", "E: 2", "tb"))
    assert s.phase is Phase.REDUCING
    assert s.skipped == [SkippedRecord(M(1), "'bad'", "E: 2", 2)]


def test_reduce_failures_are_never_skipped() -> None:
    s = Scheduler(["a"], reduce_tasks=1, max_attempts=1, skip_bad_records=True)
    joined(s, "w1")
    m = s.next_assignment("w1")
    s.handle(AttemptSucceeded("w1", m.task, m.attempt))
    r = s.next_assignment("w1")
    s.handle(AttemptFailed("w1", r.task, r.attempt, "'k'", "E", "tb"))
    assert s.phase is Phase.FAILED


def test_idle_worker_gets_a_backup_of_a_slow_task_and_the_first_success_wins() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1, backup_after=5)
    joined(s, "fast", "slow")
    s.handle(Tick(0))
    a = s.next_assignment("fast")
    b = s.next_assignment("slow")
    s.handle(Tick(1))
    s.handle(AttemptSucceeded("fast", a.task, a.attempt))  # took 1 s
    assert s.next_assignment("fast") is NO_WORK  # b has run 1 s only
    s.handle(Tick(4))
    assert s.next_assignment("fast") is NO_WORK  # not yet past max(5, 2 x 1)
    s.handle(Tick(6))
    backup = s.next_assignment("fast")
    assert backup == Assignment(b.task, 2, ("b",), backup=True)
    assert s.next_assignment("slow") is NO_WORK  # its one slot is busy
    assert s.handle(AttemptSucceeded("fast", b.task, 2)) is Verdict.ACCEPTED
    assert s.cancellations() == [Cancellation("slow", b.task, 1, "another attempt finished first")]
    assert s.handle(AttemptSucceeded("slow", b.task, 1)) is Verdict.DISCARDED
    assert s.phase is Phase.REDUCING


def test_no_backup_copies_without_backup_after_or_with_work_pending() -> None:
    s = Scheduler(["a", "b", "c"], reduce_tasks=1, backup_after=None)
    joined(s, "w1", "w2")
    s.next_assignment("w1")
    s.handle(Tick(100))
    assert s.next_assignment("w2").task == M(1)  # new work before any backup
    s.handle(AttemptSucceeded("w2", M(1), 1))
    assert s.next_assignment("w2").task == M(2)
    s.handle(AttemptSucceeded("w2", M(2), 1))
    assert s.next_assignment("w2") is NO_WORK  # backups are off


def test_ending_the_job_cancels_whatever_still_runs() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1)
    joined(s, "w1", "w2")
    a = s.next_assignment("w1")
    b = s.next_assignment("w2")
    s.handle(AttemptFailed("w1", a.task, a.attempt, None, "E", "tb"))
    assert s.cancellations() == [Cancellation("w2", b.task, 1, "the job is failed")]
    assert not s.is_live("w2", b.task, 1)


def test_when_every_worker_has_failed_a_task_any_of_them_may_retry_it() -> None:
    s = Scheduler(["a"], reduce_tasks=1, max_attempts=4)
    joined(s, "w1", "w2")
    a = s.next_assignment("w1")
    s.handle(AttemptFailed("w1", a.task, a.attempt, None, "E", "tb"))
    b = s.next_assignment("w2")
    s.handle(AttemptFailed("w2", b.task, b.attempt, None, "E", "tb"))
    assert s.next_assignment("w1") == Assignment(M(0), 3, ("a",))


def test_output_counts_only_from_a_live_attempt_and_is_refused_from_one_never_given() -> None:
    s = Scheduler(["a", "b"], reduce_tasks=1, lease=5.0)
    s.handle(WorkerJoined("w1"))
    s.handle(WorkerJoined("w2"))
    a = s.next_assignment("w1")
    assert s.accepts_output("w1", a.task, a.attempt)
    for worker, task, attempt in [("w2", a.task, a.attempt), ("w1", a.task, 2), ("w1", M(9), 1)]:
        with pytest.raises(InvalidEvent):
            s.accepts_output(worker, task, attempt)  # never given to that worker
    s.handle(Tick(now=10.0))  # w1's lease expires: its attempt is cancelled
    assert not s.accepts_output("w1", a.task, a.attempt)  # late: dropped, no fault
    with pytest.raises(InvalidEvent):
        s.accepts_output("nobody", a.task, a.attempt)


# Resuming: what an earlier run finished is done from the start.


class _Earlier:
    """A L{Resumed}: the origins an earlier run finished, and what was asked."""

    def __init__(self, batches: list[tuple[str, ...]], done: set[tuple[str, int, object]]) -> None:
        self.batches = batches
        self.done = done
        self.asked: list[tuple[TaskId, object]] = []

    def restore(self, task: TaskId, origin: object) -> bool:
        self.asked.append((task, origin))
        return (task.kind.value, task.step, origin) in self.done


def _origin(keys: tuple[str, ...] = (), partition: tuple[int, int] | None = None) -> object:
    from octotwist.scheduler import Origin

    return Origin(keys, partition)


def test_resumed_maps_are_done_and_their_keys_not_drawn_again() -> None:
    earlier = _Earlier([("a", "b")], {("map", 0, _origin(("a", "b")))})
    # The server leaves the batch's keys out of the source it hands over.
    s = Scheduler(["c"], reduce_tasks=2, total=3, resumed=earlier)
    s.handle(WorkerJoined("w"))
    assert s.counts(TaskKind.MAP).done == 2
    ran = run_all(s, "w")
    assert [a.keys for a in ran if a.task.kind is TaskKind.MAP] == [("c",)]
    assert [a.task for a in ran if a.task.kind is TaskKind.REDUCE] == [R(0), R(1)]
    assert s.phase is Phase.FINISHED
    assert s.origin(M(0)) == _origin(("a", "b")) and s.origin(R(1)) == _origin(partition=(0, 1))


def test_a_batch_whose_outputs_were_lost_runs_again() -> None:
    earlier = _Earlier([("a",), ("b",)], {("map", 0, _origin(("b",)))})
    s = Scheduler([], reduce_tasks=1, resumed=earlier)
    s.handle(WorkerJoined("w"))
    assert [a.keys for a in run_all(s, "w")] == [("a",), ()]
    assert s.phase is Phase.FINISHED


def test_resumed_mid_reduce_runs_only_the_reduces_not_done() -> None:
    earlier = _Earlier(
        [("a", "b"), ("c",)],
        {
            ("map", 0, _origin(("a", "b"))),
            ("map", 0, _origin(("c",))),
            ("reduce", 0, _origin(partition=(0, 0))),
            ("reduce", 0, _origin(partition=(0, 2))),
        },
    )
    s = Scheduler([], reduce_tasks=3, resumed=earlier)
    assert s.phase is Phase.REDUCING
    s.handle(WorkerJoined("w"))
    assert [a.task for a in run_all(s, "w")] == [R(1)]
    assert s.phase is Phase.FINISHED
    assert s.output_tasks() == [R(0), R(1), R(2)]


def test_a_job_done_but_for_its_end_finishes_at_once() -> None:
    earlier = _Earlier(
        [("a",)],
        {
            ("map", 0, _origin(("a",))),
            ("reduce", 0, _origin(partition=(0, 0))),
            ("map", 1, _origin(partition=(0, 0))),
            ("reduce", 1, _origin(partition=(1, 0))),
        },
    )
    s = Scheduler([], reduce_tasks=(1, 1), resumed=earlier)
    assert s.phase is Phase.FINISHED and s.step == 1


def test_a_later_steps_map_is_known_by_what_it_maps() -> None:
    # Step 1 is map-only; step 2 maps each of its map tasks' outputs.
    earlier = _Earlier(
        [("a",), ("b",)],
        {
            ("map", 0, _origin(("a",))),
            ("map", 0, _origin(("b",))),
            ("map", 1, _origin(("b",))),
        },
    )
    s = Scheduler([], reduce_tasks=(0, 1), resumed=earlier)
    assert s.step == 1 and s.phase is Phase.MAPPING
    s.handle(WorkerJoined("w"))
    ran = run_all(s, "w")
    assert [a.keys for a in ran] == [(M(0),), ()]
    asked = [origin for task, origin in earlier.asked if task.step == 1]
    assert asked == [_origin(("a",)), _origin(("b",)), _origin(partition=(1, 0))]
    assert s.phase is Phase.FINISHED

"""
The messages every transport carries, in both directions.

A transport moves these objects between a worker and the server and never
looks inside them; L{octotwist.codec} turns them into bytes and back.  They are
frozen, slotted dataclasses so that a message cannot change after it was sent
and a typo'd attribute fails at once.

User data never appears here as Python objects: map inputs, map outputs and
reduce outputs travel as opaque, compressed C{bytes} parts (see
L{octotwist.shuffle}), which is what lets the server store and forward them
without unpickling anything a user wrote.

A conversation, after the transport has authenticated the peer::

    server -> worker  Welcome         job name and the pickled job functions
    worker -> server  Hello           who the worker is, how many tasks it runs at once
    server -> worker  TaskInput*      the task's input, in parts
    server -> worker  Assign          run this task now
    worker -> server  TaskOutput*     the task's output, in parts, per partition
    worker -> server  TaskDone | TaskFailed
    worker -> server  Heartbeat       now and then, from the worker's I/O side
    server -> worker  Cancel          drop an attempt that is no longer wanted
    server -> worker  Shutdown        the job is over; disconnect and exit
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TaskKind(enum.Enum):
    MAP = "map"
    REDUCE = "reduce"


@dataclass(frozen=True, slots=True, order=True)
class TaskId:
    """
    A task of the job: map task C{index} of the first step reads a batch
    of source keys, map task C{index} of a later step reads the output of
    one task of the step before, and reduce task C{index} reduces
    partition C{index} of its step's map output.  Steps count from 0 here
    and from 1 where a user reads them (L{__str__}).
    """

    kind: TaskKind
    index: int
    step: int = 0

    def __str__(self) -> str:
        task = f"{self.kind.value} {self.index}"
        return task if self.step == 0 else f"step {self.step + 1} {task}"


@dataclass(frozen=True, slots=True)
class Welcome:
    """The job, sent by the server to each authenticated worker."""

    job_name: str
    functions: bytes  # cloudpickled JobFunctions; decoded only inside worker processes
    reduce_tasks: int  # the first step's partitions (at least 1)
    heartbeat_interval: float
    # Each step's partitions of its map output, when the job has several
    # steps; 0 for a map-only step.  Empty: one step of reduce_tasks.
    partitions: tuple[int, ...] = ()
    # The server outlives the job (a cluster, octo serve): a worker that
    # loses it keeps trying to reach it, rather than taking the job for over.
    stays: bool = False


@dataclass(frozen=True, slots=True)
class Hello:
    """A worker introduces itself."""

    name: str
    host: str
    pid: int
    slots: int  # how many tasks it runs at once
    # How many more it wants queued, so that a process never waits for the
    # network between two tasks; they count as running for the scheduler.
    prefetch: int = 0
    # octotwist.machine.machine_id() of the worker's machine: a server on the
    # same machine sends it map inputs uncompressed.
    machine: str | None = None


@dataclass(frozen=True, slots=True)
class TaskInput:
    """One part of a task's input; C{end} closes one input blob."""

    task: TaskId
    attempt: int
    data: bytes
    end: bool = True


@dataclass(frozen=True, slots=True)
class Assign:
    """Start attempt C{attempt} of C{task} with the inputs sent before it."""

    task: TaskId
    attempt: int


@dataclass(frozen=True, slots=True)
class TaskOutput:
    """One part of a task's output for one partition; C{end} closes one blob."""

    task: TaskId
    attempt: int
    partition: int
    data: bytes
    end: bool = True


@dataclass(frozen=True, slots=True)
class TaskDone:
    """The attempt finished; every output part was sent before this message."""

    task: TaskId
    attempt: int
    records_in: int = 0
    records_out: int = 0
    seconds: float = 0.0
    # octotwist.counters.add() totals of this attempt, by name
    counters: tuple[tuple[str, int], ...] = ()
    output: str = ""  # what the user's code printed (the end of it, if long)
    # Which of the worker's task processes ran it, numbered from 1 in the
    # order the worker started them (a replaced one gets a new number); 0:
    # not known.  The status page's task stream draws a row per process.
    process: int = 0


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """A user function raised, or the process running it died."""

    task: TaskId
    attempt: int
    key: str | None  # repr() of the key being processed, if known
    error: str  # one line: exception type and message
    traceback: str  # as formatted on the worker
    output: str = ""  # what the user's code printed (the end of it, if long)
    process: int = 0  # as in TaskDone


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """
    The worker is alive; C{running} lists the attempts it is working on,
    C{rss} the bytes of memory its task processes hold (for the status page).
    """

    running: tuple[tuple[TaskId, int], ...] = ()
    rss: int = 0


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop working on an attempt; its output is no longer wanted."""

    task: TaskId
    attempt: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The job is over (C{ok}: it succeeded); the worker disconnects and exits."""

    ok: bool
    reason: str = ""
    #: The server stays for more jobs (C{octo serve}): reconnect for the next.
    more: bool = False


# A cluster's submitters (octo submit) and the server (octo serve).


@dataclass(frozen=True, slots=True)
class Submit:
    """
    Submitter -> cluster: run this job script (its bytes, under its file
    name) with these arguments; results in this format, sorted or not.

    A job built in Python (L{octotwist.Cluster}) comes C{pickled}: C{script}
    is then the cloudpickled L{octotwist.job.Job}, and its results come
    back pickled too (C{format} C{"pickle"}, as L{ResultBatch}es).  Either
    may take several messages: every one but the last has C{end} false and
    carries a part of C{script}; the other fields are the last one's.

    @ivar reduce_tasks: partitions, overriding the job's; 0: the job's.
    @ivar max_workers: the most workers the job takes, so that another job
        runs beside it on the rest; 0: as many as come.
    @ivar progress: send L{JobProgress} while the job runs (for bars).
    """

    name: str
    script: bytes
    args: tuple[str, ...] = ()
    format: str = "tsv"
    sort: bool = True
    pickled: bool = False
    reduce_tasks: int = 0
    max_workers: int = 0
    end: bool = True
    progress: bool = False


@dataclass(frozen=True, slots=True)
class JobAccepted:
    """Cluster -> submitter: the job loaded and is queued, with C{ahead} jobs before it."""

    job: int
    ahead: int


@dataclass(frozen=True, slots=True)
class JobRefused:
    """Cluster -> submitter: the job cannot run (a broken script); nothing was queued."""

    error: str


@dataclass(frozen=True, slots=True)
class JobStarted:
    """Cluster -> submitter: the job is running now."""

    job: int


@dataclass(frozen=True, slots=True)
class JobProgress:
    """
    Cluster -> submitter that asked: the job's progress now, as JSON (the
    fields of L{octotwist.progress.bar_status}).
    """

    status: str


@dataclass(frozen=True, slots=True)
class ResultText:
    """Cluster -> submitter: whole lines of the job's results (UTF-8), in order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ResultBatch:
    """
    Cluster -> submitter: a pickled job's results, in order, a part of one
    L{octotwist.codec.pack}ed C{(keys, values)} batch; the batch is whole at
    the part with C{end}.
    """

    data: bytes
    end: bool = True


@dataclass(frozen=True, slots=True)
class JobEnded:
    """
    Cluster -> submitter: the job is over; its results were all sent before
    this.  C{status} is the status page's figures at its end, as JSON.
    """

    job: int
    ok: bool
    error: str = ""
    results: int = 0
    seconds: float = 0.0
    counters: tuple[tuple[str, int], ...] = ()
    status: str = ""


@dataclass(frozen=True, slots=True)
class ListJobs:
    """Asker -> cluster (octo jobs): what jobs it has, the newest C{limit}."""

    limit: int = 100


@dataclass(frozen=True, slots=True)
class JobList:
    """
    Cluster -> asker: jobs, oldest first, as (id, name, state, submitted
    (Unix time), error or "").
    """

    jobs: tuple[tuple[int, str, str, float, str], ...]


@dataclass(frozen=True, slots=True)
class CancelJob:
    """Asker -> cluster (octo cancel): end this job; the answer is its L{JobList} entry."""

    job: int


@dataclass(frozen=True, slots=True)
class FetchResults:
    """
    Asker -> cluster (octo results): the results of this job, once it is
    done: L{ResultText}s, then its L{JobEnded} (or a L{JobRefused}).
    """

    job: int


Message = (
    Welcome
    | Hello
    | TaskInput
    | Assign
    | TaskOutput
    | TaskDone
    | TaskFailed
    | Heartbeat
    | Cancel
    | Shutdown
    | Submit
    | JobAccepted
    | JobRefused
    | JobStarted
    | JobProgress
    | ResultText
    | ResultBatch
    | JobEnded
    | ListJobs
    | JobList
    | CancelJob
    | FetchResults
)

MESSAGE_TYPES: tuple[type, ...] = (
    Welcome,
    Hello,
    TaskInput,
    Assign,
    TaskOutput,
    TaskDone,
    TaskFailed,
    Heartbeat,
    Cancel,
    Shutdown,
    Submit,
    JobAccepted,
    JobRefused,
    JobStarted,
    JobProgress,
    ResultText,
    ResultBatch,
    JobEnded,
    ListJobs,
    JobList,
    CancelJob,
    FetchResults,
)

__all__ = [
    "MESSAGE_TYPES",
    "Assign",
    "Cancel",
    "CancelJob",
    "FetchResults",
    "Heartbeat",
    "Hello",
    "JobAccepted",
    "JobEnded",
    "JobList",
    "JobProgress",
    "JobRefused",
    "JobStarted",
    "ListJobs",
    "Message",
    "ResultBatch",
    "ResultText",
    "Shutdown",
    "Submit",
    "TaskDone",
    "TaskFailed",
    "TaskId",
    "TaskInput",
    "TaskKind",
    "TaskOutput",
    "Welcome",
]

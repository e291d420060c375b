"""
octotwist from Python: L{run} a job on this machine and get its results
back, from a script, a notebook or a Twisted program.

    >>> import octotwist
    >>> counts = octotwist.run("examples/wordcount.py")        # a job script
    >>> counts = octotwist.run(octotwist.Job(source=..., mapfn=..., reducefn=...))

A job is a job script's path, a module, or a L{Job}; its functions may be
defined anywhere, a notebook cell included: they travel to the worker
processes by value.  C{workers=0} runs it all in this process, for
C{breakpoint()} in a C{mapfn}.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
from twisted.internet.defer import Deferred

from octotwist import job as jobs
from octotwist.config import DEFAULT_TRANSPORT, JobConfig
from octotwist.errors import JobScriptError, OctotwistError, UsageError
from octotwist.inline import run_inline
from octotwist.job import Step
from octotwist.launcher import LaunchConfig
from octotwist.output import Collected, Results, open_results
from octotwist.server import MAX_SLOTS, JobOutcome
from octotwist.service import JobService, local_config, run_here
from octotwist.threaded import blocking_call, global_reactor
from octotwist.transport import IReactor, Transport


@dataclass
class Job:
    """
    A job written in Python rather than as a script: octo.py's names as
    fields.

    @ivar source: a dict, or an object with C{__iter__} (its keys) and
        C{__getitem__} (L{octotwist.sources} makes them from files).
    @ivar mapfn: C{mapfn(key, value)} yields C{(key, value)} pairs.
    @ivar reducefn: C{reducefn(key, values)} returns C{(key, value)}, or the value.
    @ivar final: if given, called here with each result, instead of the
        results being returned.
    @ivar steps: instead of C{mapfn} and C{reducefn}, a list of
        L{octotwist.Step}: each maps the one before's results.
    @ivar setupfn: called once in each task process, before its first task.
    """

    source: Any
    mapfn: Callable[[Any, Any], Any] | None = None
    reducefn: Callable[[Any, list[Any]], Any] | None = None
    combinefn: Callable[[Any, list[Any]], Any] | None = None
    partitionfn: Callable[[Any, int], int] | None = None
    final: Callable[[Any, Any], Any] | None = None
    reduce_tasks: int | None = None
    name: str = "job"
    steps: Sequence[Step] | None = None
    setupfn: Callable[[], Any] | None = None


class JobResult(dict[Any, Any]):
    """
    The results of a job, a C{dict} in key order (empty when the job has
    a C{final()}, which got them instead), and how the job went.

    @ivar job: the job's name.
    @ivar results: how many results the job produced.
    @ivar seconds: how long it ran.
    @ivar status: the status page's figures at its end (docs/status.md):
        tasks, workers, failures, bytes moved.
    @ivar counters: the job's counters (L{octotwist.counters}), by name,
        octotwist's own (C{octotwist.*}) among them.
    """

    job: str
    results: int
    seconds: float
    status: dict[str, Any]
    counters: dict[str, int]

    def __repr__(self) -> str:
        return f"JobResult({dict.__repr__(self)}, job={self.job!r}, seconds={self.seconds:.3f})"


class JobFailed(OctotwistError):
    """
    The job ran and failed: a task failed every attempt, C{final()}
    raised, or it was cancelled.  The message says where and why, with the
    user's traceback.

    @ivar outcome: the server's L{JobOutcome}.
    """

    def __init__(self, job: str, outcome: JobOutcome) -> None:
        super().__init__(f"job {job} failed: {outcome.error}")
        self.outcome = outcome


def run(
    job: str | os.PathLike[str] | types.ModuleType | Job,
    *,
    workers: int | None = None,
    transport: str | None = None,
    reduce_tasks: int | None = None,
    web: str | None = None,
    hosts: str | Sequence[str] | LaunchConfig | None = None,
    engine: str | None = None,
    scheduler: str | None = None,
    **options: Any,
) -> JobResult:
    """
    Run C{job} on this machine (or on C{hosts}, or on an C{engine}) and
    return its results.

    @param job: a job script's path, a module with a job's names, or a L{Job}.
    @param workers: worker processes here (default 2, none with C{hosts});
        0 without C{hosts} runs everything in this process (no pickling:
        C{breakpoint()} works in C{mapfn}).
    @param transport: run the workers over this transport (C{"tcp"}, ...)
        rather than in-process channels, to try it.
    @param hosts: also start a worker on each of these hosts over SSH, as
        C{octo run --hosts} does: C{"node1,alice@node2:2222"}, a list of
        such, or a L{LaunchConfig} (for its ssh command, C{remote_python},
        C{advertise}, C{require_all}).
    @param engine: run the tasks on this engine instead (C{"dask"}: a
        LocalCluster of C{workers} processes, or the cluster whose
        C{scheduler} is given, C{"tcp://HOST:8786"}); C{octo engines}
        lists those installed.
    @param reduce_tasks: reduce partitions (default: the job's, else 8).
    @param web: serve the live status page on this endpoint (C{"tcp:8080"}).
    @param options: C{args} (the job's own arguments), C{sort} (default
        True: results in key order), C{output} (a file to write them to
        instead of returning them), C{format} (C{"tsv"}, C{"jsonl"}),
        C{memory_limit} (bytes), C{state_dir} (keep the job's progress
        there: run again after a crash, it resumes; see L{octotwist.resume}),
        and the fault policy: C{max_attempts},
        C{task_timeout}, C{heartbeat}, C{backup_after},
        C{skip_bad_records}.
    @raise JobFailed: the job failed.
    @raise OctotwistError: the job or an option is wrong (L{UsageError},
        L{octotwist.errors.JobScriptError}).
    """
    config, loaded = _prepare(job, reduce_tasks, options)
    launch = _hosts(hosts)
    if engine is not None or scheduler is not None:
        return _on_engine(loaded, config, engine, scheduler, workers, transport, web, launch)
    if workers == 0 and launch is None:
        return _inline(loaded, config)
    return blocking_call(
        lambda reactor: _run(reactor, loaded, config, workers, transport, web, launch)
    )


def run_deferred(
    job: str | os.PathLike[str] | types.ModuleType | Job,
    *,
    workers: int | None = None,
    transport: str | None = None,
    reduce_tasks: int | None = None,
    web: str | None = None,
    hosts: str | Sequence[str] | LaunchConfig | None = None,
    reactor: IReactor | None = None,
    **options: Any,
) -> Deferred[JobResult]:
    """
    L{run} for a Twisted program: returns a L{Deferred} that fires with the
    L{JobResult} (or fails with L{JobFailed}) while the reactor goes on.
    Cancelling it cancels the job.

    @param reactor: the reactor to use (default: the installed one).
    """
    try:
        if "engine" in options or "scheduler" in options:
            raise UsageError(
                "run_deferred takes no engine=: an engine's client blocks until the job is "
                "over; call octotwist.run(job, engine=...) (in a thread, from a Twisted program)"
            )
        config, loaded = _prepare(job, reduce_tasks, options)
        launch = _hosts(hosts)
        if workers == 0 and launch is None:
            return Deferred.fromCoroutine(_async(_inline(loaded, config)))
    except Exception as e:
        failed: Deferred[JobResult] = Deferred()
        failed.errback(e)
        return failed
    return Deferred.fromCoroutine(
        _run(reactor or global_reactor(), loaded, config, workers, transport, web, launch)
    )


#: What run() takes besides the configuration's names.
_OWN_KEYWORDS = ("workers", "transport", "web", "hosts", "engine", "scheduler", "reactor")


def _on_engine(
    loaded: Any,
    config: JobConfig,
    engine: str | None,
    scheduler: str | None,
    workers: int | None,
    transport: str | None,
    web: str | None,
    hosts: LaunchConfig | None,
) -> JobResult:
    """run(job, engine=...): in the calling thread, as the engine's client blocks."""
    from octotwist.engine import run_on_engine

    if engine is None:
        raise UsageError("scheduler= is an engine's: give engine= too (engine='dask')")
    others = [n for n, v in (("transport", transport), ("hosts", hosts)) if v]
    if others:
        raise UsageError(
            f"engine= runs the tasks elsewhere than on octotwist's own workers: it takes no "
            f"{', '.join(others)}="
        )
    if workers is not None and not 1 <= workers <= MAX_SLOTS:
        raise UsageError(f"workers must be 1 to {MAX_SLOTS} with an engine, not {workers!r}")
    output = _output(config, loaded)
    outcome = run_on_engine(
        engine,
        loaded,
        config,
        output,
        workers=workers or 2,
        scheduler=scheduler,
        quiet=True,
        web=web,
    )
    return _result(loaded, outcome, output)


def _hosts(hosts: str | Sequence[str] | LaunchConfig | None) -> LaunchConfig | None:
    """C{hosts=}, checked: a L{LaunchConfig} with the defaults of C{octo run --hosts}."""
    if hosts is None or isinstance(hosts, LaunchConfig):
        return hosts
    from octotwist.hosts import parse_hosts

    text = hosts if isinstance(hosts, str) else ",".join(hosts)
    return LaunchConfig.from_command(parse_hosts(text))


async def _async(result: JobResult) -> JobResult:
    return result


def _prepare(job: Any, reduce_tasks: int | None, options: dict[str, Any]) -> tuple[JobConfig, Any]:
    config = JobConfig.from_keywords(reduce_tasks, options, _OWN_KEYWORDS)
    return config, load(job, config.args)


def load(job: str | os.PathLike[str] | types.ModuleType | Job, args: Sequence[str] = ()) -> Any:
    """
    The checked, ready to ship form of C{job} (L{octotwist.job.Job}).

    @raise JobScriptError: it lacks a name, or a function cannot be pickled.
    """
    if isinstance(job, (str, os.PathLike)):
        return jobs.load_job(job, args)
    if isinstance(job, Job):
        if args:
            raise UsageError(
                "args= is a job script's sys.argv; an octotwist.Job takes its parameters "
                "from the code that builds it"
            )
        if job.steps is None:
            # (A Job's unset mapfn and reducefn are None, not missing.)
            for name in ("mapfn", "reducefn"):
                if getattr(job, name) is None:
                    raise JobScriptError(
                        f"job {job.name!r}: octotwist.Job needs {name} (or steps=[Step(...)])"
                    )
        functions = [job.setupfn, job.mapfn, job.reducefn, job.combinefn, job.partitionfn]
        for step in job.steps or ():
            functions += [getattr(step, "mapfn", None), getattr(step, "reducefn", None)]
        _ship_own_modules(job, functions)
        return jobs.job_from_namespace(job, job.name, None, f"job {job.name!r}")
    if isinstance(job, types.ModuleType):
        file = getattr(job, "__file__", None)
        if file is not None and "site-packages" not in file:
            # A module of the user's own: its workers may not find it.
            cloudpickle.register_pickle_by_value(job)
        _ship_own_modules(job, [getattr(job, "mapfn", None), getattr(job, "reducefn", None)])
        name = job.__name__.rpartition(".")[2]
        return jobs.job_from_namespace(job, name, Path(file) if file else None, job.__name__)
    raise UsageError(
        f"octotwist.run() takes a job script's path, a module or an octotwist.Job, "
        f"not {type(job).__name__}"
    )


def _ship_own_modules(job: Any, functions: list[Any]) -> None:
    """
    Send the modules beside the job's code by value, as a job script's are
    (L{octotwist.job}): a helper that a script run from another directory,
    or a module job, imported from its own folder is not importable where
    the workers run.
    """
    from octotwist.shipping import job_directory

    directory = job_directory(getattr(job, "__file__", None) or "", [f for f in functions if f])
    if directory is None:
        return
    inside = str(directory) + os.sep
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None) or ""
        if (
            os.path.abspath(file).startswith(inside)
            and module.__name__ != "__main__"
            and not module.__name__.startswith("octotwist")
        ):
            cloudpickle.register_pickle_by_value(module)


def _output(config: JobConfig, loaded: Any) -> Results:
    if config.output is None or loaded.final is not None:
        return Collected()
    try:
        return open_results(config.output, config.format)
    except OSError as e:
        raise UsageError(f"cannot write {config.output!r}: {e.strerror}") from None


def _result(loaded: Any, outcome: JobOutcome, output: Results) -> JobResult:
    if not outcome.ok:
        raise JobFailed(loaded.name, outcome)
    collected = output.results if isinstance(output, Collected) else {}
    if isinstance(output, Collected) and loaded.final is None and len(collected) < outcome.results:
        # Only a map-only last step can give a key twice.
        raise JobFailed(
            loaded.name,
            JobOutcome(
                False,
                f"its last step is map-only and gave {outcome.results} results for "
                f"{len(collected)} distinct keys, which a dict cannot hold: give the last step "
                "a reducefn, or take the results with final= or output=",
                outcome.results,
                outcome.seconds,
                outcome.stats,
                outcome.counters,
            ),
        )
    result = JobResult(collected)
    result.job = loaded.name
    result.results = outcome.results
    result.seconds = outcome.seconds
    result.status = outcome.stats
    result.counters = outcome.counters
    return result


def _inline(loaded: Any, config: JobConfig) -> JobResult:
    output = _output(config, loaded)
    return _result(loaded, run_inline(loaded, config, output), output)


async def _run(
    reactor: IReactor,
    loaded: Any,
    config: JobConfig,
    workers: int | None,
    transport_name: str | None,
    web: str | None,
    hosts: LaunchConfig | None = None,
) -> JobResult:
    if workers is None:
        workers = 0 if hosts is not None else 2
    if not (0 if hosts is not None else 1) <= workers <= MAX_SLOTS:
        raise UsageError(f"workers must be 0 to {MAX_SLOTS}, not {workers!r}")
    if transport_name is None and hosts is not None:
        transport_name = DEFAULT_TRANSPORT  # the hosts' workers need a network
    transport = _transport(transport_name)
    output = _output(config, loaded)
    service = JobService(
        reactor,
        loaded,
        config,
        local_config(reactor, transport, workers, web, hosts),
        transport,
        output,
    )
    return _result(loaded, await run_here(service), output)


def _transport(name: str | None) -> Transport:
    if name is None:
        from octotwist import embedded

        return embedded.TRANSPORT
    from octotwist.hookspecs import get_transport

    return get_transport(name)


__all__ = ["Job", "JobFailed", "JobResult", "load", "run", "run_deferred"]

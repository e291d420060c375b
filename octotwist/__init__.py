"""
octotwist: octo.py's MapReduce for a handful of machines, on Twisted.

A job is a Python script with module-level C{source}, C{mapfn},
C{reducefn} and optionally C{final}, C{combinefn}, C{partitionfn},
C{reduce_tasks} and C{setupfn}, or C{source} and C{steps}, a list of
L{Step}; see docs/guide.md.  Inside the job's functions,
C{octotwist.counters.add(name, n)} counts; C{octotwist.sources} reads
files; C{octotwist.aggregate} names the common combiners and reducers
(C{reducefn = octotwist.aggregate.sum}).  Run it with C{octo run job.py},
or C{octo server job.py} plus
C{octo client HOST} on each worker machine, or from Python:
C{octotwist.run(job)} returns its results (docs/api.md), and
C{octotwist.Cluster("HOST:PORT").run(job)} runs it on a cluster that
stays (C{octo serve}).

Public modules: L{octotwist.transport} (the L{TaskServer}/L{TaskClient} a
transport subclasses), L{octotwist.hookspecs} (plugin hooks and discovery),
L{octotwist.messages} (what transports carry), L{octotwist.secure} (the
channel layer every frame after authentication goes through),
L{octotwist.handshake} (the shared secret's handshake, without I/O),
L{octotwist.limits} (limits before authentication), L{octotwist.streams}
(the base of a transport over a stream connection), L{octotwist.flow}
(backpressure), L{octotwist.codec} and L{octotwist.framing} (bytes), and
L{octotwist.testing} (the conformance kit, and a relay for tampering
tests).  Everything else is internal.
"""

from typing import Any

__version__ = "0.1.0"

#: The public API (L{octotwist.api}), imported when first used: a worker's
#: task process imports this package too, and needs none of it.
_API = ("run", "run_deferred", "Job", "JobResult", "JobFailed")
#: Modules a job's own code uses, as C{octotwist.counters.add(...)} after a
#: bare C{import octotwist}.
_MODULES = ("aggregate", "counters", "sources")

__all__ = ["__version__", "Cluster", "Step", *_API, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _API:
        from octotwist import api

        return getattr(api, name)
    if name == "Cluster":
        from octotwist.remote import Cluster

        return Cluster
    if name == "Step":
        from octotwist.job import Step

        return Step
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"octotwist.{name}")
    raise AttributeError(f"module 'octotwist' has no attribute {name!r}")

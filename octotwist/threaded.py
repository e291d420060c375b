"""
The reactor in a thread of its own, for L{octotwist.run} called from
plain code: a script, C{python -c}, a Jupyter kernel (whose own event
loop holds the main thread).

Twisted's reactor runs once per process, so it is started once, in a
daemon thread, and every call hands it work and blocks until that work is
done, as crochet does.  Without signal handlers (only the main thread may
install them) nothing would reap the worker processes that end, so a timer
does, as crochet's does.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.python.failure import Failure

from octotwist.errors import UsageError
from octotwist.transport import IReactor

T = TypeVar("T")


class _ThreadedReactor(IReactor, IReactorThreads):
    """The installed reactor, as this module uses it (for type checking)."""


_lock = threading.Lock()
_thread: threading.Thread | None = None

#: Seconds to wait for a cancelled job to clean up after Ctrl-C.
CANCEL_GRACE = 30.0


def global_reactor() -> IReactor:
    """The installed reactor (installing the default one if none is)."""
    from twisted.internet import reactor

    return cast(IReactor, reactor)


def _ensure_running(reactor: IReactor) -> None:
    global _thread
    with _lock:
        if reactor.running or (_thread is not None and _thread.is_alive()):
            return
        from twisted.internet.process import reapAllProcesses
        from twisted.internet.task import LoopingCall

        reaper = LoopingCall(reapAllProcesses)
        reaper.clock = reactor
        reactor.callWhenRunning(reaper.start, 0.1, now=False)
        _thread = threading.Thread(
            # Only the main thread may install signal handlers.
            target=lambda: reactor.run(installSignalHandlers=False),  # type: ignore[call-arg]
            name="octotwist reactor",
            daemon=True,
        )
        _thread.start()


def blocking_call(work: Callable[[IReactor], Coroutine[Any, Any, T]]) -> T:
    """
    Run the coroutine C{work(reactor)} in the reactor's thread and wait for
    its result.
    A KeyboardInterrupt while waiting cancels the work, waits (a while)
    for it to clean up, and goes on up.

    In a Twisted program's own thread (C{deferToThread}), the work goes to
    its running reactor, as C{blockingCallFromThread} sends it.

    @raise UsageError: we are in the running reactor's thread (where
        waiting would block the reactor).
    """
    from twisted.internet.threads import blockingCallFromThread
    from twisted.python.threadable import isInIOThread

    reactor = cast(_ThreadedReactor, global_reactor())
    ours = _thread is not None and _thread.is_alive()
    if reactor.running and isInIOThread():
        raise UsageError(
            "octotwist.run() waits for the job, and cannot from inside the running "
            "reactor; use octotwist.run_deferred() there (it returns a Deferred), or "
            "call run() in a thread (deferToThread)"
        )
    if reactor.running and not ours:

        def begin() -> Deferred[Any]:
            return Deferred.fromCoroutine(work(reactor))

        return cast(T, blockingCallFromThread(reactor, begin))
    _ensure_running(reactor)
    results: queue.Queue[Any] = queue.Queue()
    started: list[Deferred[T]] = []

    def start() -> None:
        d = Deferred.fromCoroutine(work(reactor))
        started.append(d)
        d.addBoth(results.put)

    def cancel() -> None:
        for d in started:
            d.cancel()

    reactor.callFromThread(start)
    try:
        result = results.get()
    except KeyboardInterrupt:
        reactor.callFromThread(cancel)
        with contextlib.suppress(queue.Empty):
            results.get(timeout=CANCEL_GRACE)
        raise
    if isinstance(result, Failure):
        result.raiseException()
    return cast(T, result)

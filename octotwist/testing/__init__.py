"""
The conformance kit: the scenarios a transport must pass, runnable against
any installed transport, as real processes.

Use it from a transport's own test suite::

    # tests/test_conformance.py
    from octotwist.testing.conformance import *  # noqa: F403

    $ pytest --octo-transport NAME

If the transport needs keys or certificates, its plugin implements the
C{octotwist_test_setup} hook (see L{octotwist.hookspecs}); the kit calls it
for a fresh directory per test.  docs/developers.md walks through it.
"""

from octotwist.testing.harness import Octo, Process, Server

__all__ = ["Octo", "Process", "Server"]

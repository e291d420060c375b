"""
The Dask engine, as a plugin: C{octo run job.py --engine dask}.

Registered under the C{octotwist} entry-point group in octotwist's setup.cfg,
exactly as a third-party distribution would register its own engine.  Dask
itself is imported only when a job runs on it: C{pip install
'octotwist[dask]'} installs it.
"""

from __future__ import annotations

from octotwist.engine import Engine
from octotwist.hookspecs import hookimpl

ENGINE = Engine(
    name="dask",
    description="a Dask distributed cluster: a LocalCluster of -w workers, or --scheduler "
    "tcp://HOST:PORT; the job's own shuffle, its partitions moved as bytes",
    run="octotwist_dask.engine:run",
)


@hookimpl
def octotwist_engines() -> list[Engine]:
    return [ENGINE]

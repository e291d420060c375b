"""
The pluggy hooks a transport or engine plugin implements, and how plugins
are found.

A plugin is any importable module or object with C{@hookimpl} functions,
registered under the C{octotwist} entry-point group of its distribution::

    [options.entry_points]
    octotwist =
        mytransport = my_package.plugin

The built-in transports are registered the same way, from octotwist's own
setup.cfg.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import pluggy

from octotwist.engine import Engine
from octotwist.errors import PluginError, UnknownEngineError, UnknownTransportError
from octotwist.transport import TestSetup, Transport

PROJECT = "octotwist"
ENTRY_POINT_GROUP = "octotwist"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def octotwist_transports() -> Sequence[Transport]:  # type: ignore[empty-body]  # a spec: never run
    """
    Return the transports this plugin provides.

    Called once per process, when a transport is first looked up.  Every
    plugin's list is collected; two transports with the same name are an
    error.

    @return: a sequence of L{Transport} records.
    """


@hookspec
def octotwist_engines() -> Sequence[Engine]:  # type: ignore[empty-body]  # a spec: never run
    """
    Return the engines this plugin provides: where else than on octotwist's
    own server and workers a job's tasks can run (L{octotwist.engine}).

    Called once per process, when an engine is first looked up.  Two
    engines with the same name are an error.

    @return: a sequence of L{Engine} records.
    """


@hookspec(firstresult=True)
def octotwist_test_setup(transport: str, directory: Path) -> TestSetup | None:
    """
    Prepare what the conformance tests need to run C{transport}'s server
    and clients as real processes (keys, certificates, known hosts), under
    C{directory}; return C{None} for a transport this plugin does not
    provide.  A transport that needs nothing beyond the shared secret need
    not implement this hook.

    @return: the extra arguments and environment, or C{None}.
    """


def plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """
    A plugin manager with octotwist's hook specs and, by default, every
    plugin installed under the C{octotwist} entry-point group.

    @raise PluginError: a plugin fails to import, naming its distribution and
        entry point, or implements a hook octotwist does not define.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(sys.modules[__name__])
    if load_entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as e:
                raise PluginError(
                    f"transport plugin {ep.name} = {ep.value} (distribution {dist}) "
                    f"failed to import: {type(e).__name__}: {e}"
                ) from e
            pm.register(plugin, name=ep.name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(str(e)) from e
    return pm


@functools.cache
def installed_plugins() -> pluggy.PluginManager:
    """
    L{plugin_manager} with every installed plugin, built once per process:
    reading the entry points is file I/O, and a command looks transports up
    several times as it starts (its options, then the transport itself).
    """
    return plugin_manager()


def transports(pm: pluggy.PluginManager | None = None) -> dict[str, Transport]:
    """
    Every installed transport, by name.

    @raise PluginError: two plugins claim the same name, or a plugin returns
        something that is not a valid L{Transport}.
    """
    return _provided(
        pm if pm is not None else installed_plugins(), "octotwist_transports", "transport"
    )


def _provided(pm: pluggy.PluginManager, hook: str, kind: str) -> dict[str, Any]:
    """
    What every plugin's implementation of C{hook} returned, by name; each
    implementation is called on its own, so that a clash names both
    plugins (calling the hook would merge the results).

    @raise PluginError: two plugins provide the same name, or one returns
        something that is not a record of C{kind}.
    """
    found: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for impl in getattr(pm.hook, hook).get_hookimpls():
        owner = impl.plugin_name
        # Whatever the plugin returned: each item is checked.
        for record in cast("Iterable[Any]", impl.function() or ()):
            if kind == "transport":
                _check_transport(record, owner)
            elif not isinstance(record, Engine):
                raise PluginError(f"plugin {owner} returned {record!r}, not an octotwist Engine")
            if record.name in found:
                raise PluginError(
                    f"two plugins provide the {kind} {record.name!r}: "
                    f"{owners[record.name]} and {owner}; uninstall one of them"
                )
            found[record.name] = record
            owners[record.name] = owner
    return found


def _check_transport(t: object, owner: str) -> None:
    """
    Check what a plugin returned.  A server or client given as a class is
    checked now; one given as C{"module:Class"} when it is first used
    (L{Transport.server_class}), so that unused transports are not imported.
    """
    if not isinstance(t, Transport):
        raise PluginError(f"plugin {owner} returned {t!r}, not an octotwist Transport")
    for role in ("server", "client"):
        ref = getattr(t, role)
        if isinstance(ref, str):
            module, colon, attr = ref.partition(":")
            if not (module and colon and attr):
                raise PluginError(
                    f"transport {t.name!r} ({owner}): {role} {ref!r} is not 'package.module:Class'"
                )
            continue
        try:
            t.server_class() if role == "server" else t.client_class()
        except PluginError as e:
            raise PluginError(f"{e} (plugin {owner})") from None


def get_transport(name: str, pm: pluggy.PluginManager | None = None) -> Transport:
    """
    The installed transport called C{name}.

    @raise UnknownTransportError: no plugin provides it; the message lists
        those installed.
    """
    available = transports(pm)
    try:
        return available[name]
    except KeyError:
        raise UnknownTransportError(name, sorted(available)) from None


def conformance_setup(
    transport: str, directory: Path, pm: pluggy.PluginManager | None = None
) -> TestSetup:
    """
    What the tests need to run C{transport} for real: the answer of the
    plugins' C{octotwist_test_setup} hook, or an empty L{TestSetup} when
    no plugin needs anything.
    """
    pm = pm if pm is not None else installed_plugins()
    return pm.hook.octotwist_test_setup(transport=transport, directory=directory) or TestSetup()


def engines(pm: pluggy.PluginManager | None = None) -> dict[str, Engine]:
    """
    Every installed engine, by name.

    @raise PluginError: two plugins claim the same name, or a plugin returns
        something that is not an L{Engine}.
    """
    return _provided(pm if pm is not None else installed_plugins(), "octotwist_engines", "engine")


def get_engine(name: str, pm: pluggy.PluginManager | None = None) -> Engine:
    """
    The installed engine called C{name}.

    @raise UnknownEngineError: no plugin provides it; the message lists those
        installed.
    """
    available = engines(pm)
    try:
        return available[name]
    except KeyError:
        raise UnknownEngineError(name, sorted(available)) from None

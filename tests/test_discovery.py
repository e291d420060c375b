"""Transports are found through the `octotwist` entry-point group, and broken
plugins are reported with names a user can act on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from octotwist.errors import PluginError, UnknownTransportError
from octotwist.hookspecs import get_transport, hookimpl, plugin_manager, transports
from octotwist.transport import TaskClient, TaskServer, Transport


def test_tcp_is_discovered_through_its_entry_point() -> None:
    pm = plugin_manager()
    assert "octotwist-tcp" in dict(pm.list_name_plugin())
    tcp = transports(pm)["tcp"]
    assert issubclass(tcp.server_class(), TaskServer) and issubclass(tcp.client_class(), TaskClient)


def test_unknown_transport_lists_the_installed_ones() -> None:
    with pytest.raises(UnknownTransportError) as e:
        get_transport("carrier-pigeon")
    assert "carrier-pigeon" in str(e.value) and "tcp" in str(e.value)
    assert isinstance(e.value, ValueError)


class _Plugin:
    def __init__(self, *ts: Transport) -> None:
        self.ts = ts

    @hookimpl
    def octotwist_transports(self):
        return list(self.ts)


def _pm_with(*plugins: object):
    pm = plugin_manager(load_entry_points=False)
    for i, p in enumerate(plugins):
        pm.register(p, name=f"plugin{i}")
    return pm


def test_two_plugins_with_one_name_is_an_error() -> None:
    tcp = get_transport("tcp")
    pm = _pm_with(_Plugin(tcp), _Plugin(tcp))
    with pytest.raises(
        PluginError, match="two plugins provide the transport 'tcp': plugin0 and plugin1"
    ):
        transports(pm)


def test_a_transport_missing_abstract_methods_is_named() -> None:
    class HalfServer(TaskServer):
        def listen(self):  # stop() is missing
            raise NotImplementedError

    broken = Transport("half", "d", HalfServer, get_transport("tcp").client_class())
    with pytest.raises(PluginError, match="HalfServer does not implement stop"):
        transports(_pm_with(_Plugin(broken)))


def test_a_lazy_class_is_imported_and_checked_when_used() -> None:
    lazy = Transport("lazy", "d", "octotwist_tcp.transport:TCPTaskServer", "no.such.module:C")
    (found,) = transports(_pm_with(_Plugin(lazy))).values()
    assert found.server_class().__name__ == "TCPTaskServer"
    with pytest.raises(PluginError, match=r"'lazy': its client 'no\.such\.module:C' failed"):
        found.client_class()
    wrong = Transport("wrong", "d", "octotwist_tcp.transport:TCPTaskClient", "x:C")
    with pytest.raises(PluginError, match="'wrong': server is not a TaskServer"):
        transports(_pm_with(_Plugin(wrong)))["wrong"].server_class()
    bad = Transport("bad", "d", "octotwist_tcp.transport", "x:C")
    with pytest.raises(PluginError, match=r"server 'octotwist_tcp\.transport' is not 'package"):
        transports(_pm_with(_Plugin(bad)))


def test_listing_the_transports_imports_none_of_their_servers_or_clients() -> None:
    code = (
        "import sys; from octotwist import cli; from octotwist.hookspecs import transports; "
        "assert {'ssh', 'http'} <= set(transports()); "
        "print(sorted(m for m in sys.modules if m.startswith(('octotwist_ssh.', "
        "'octotwist_http.server', 'octotwist_http.client', 'twisted.conch', 'treq'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_a_plugin_returning_junk_is_named() -> None:
    with pytest.raises(PluginError, match="plugin0 returned 'tcp'"):
        transports(_pm_with(_Plugin("tcp")))  # type: ignore[arg-type]


def test_a_plugin_that_fails_to_import_names_its_distribution(tmp_path: Path, monkeypatch) -> None:
    # A real installed distribution (a dist-info on sys.path) whose entry point
    # points at a module that raises on import.
    dist = tmp_path / "brokenplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[octotwist]\nbroken = brokenplug_mod\n")
    (tmp_path / "brokenplug_mod.py").write_text(textwrap.dedent("raise RuntimeError('boom')\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as e:
        plugin_manager()
    assert "broken = brokenplug_mod (distribution brokenplug)" in str(e.value)
    assert "RuntimeError: boom" in str(e.value)
    sys.modules.pop("brokenplug_mod", None)


def test_the_built_in_transports_are_all_discovered() -> None:
    pm = plugin_manager()
    plugins = dict(pm.list_name_plugin())
    for dist_name, name in [("octotwist-tcp", "tcp"), ("octotwist-http", "http"),
                            ("octotwist-ssh", "ssh")]:  # fmt: skip
        assert dist_name in plugins
        assert transports(pm)[name].name == name


def test_transport_options_are_listed_with_their_transport(env: dict) -> None:
    from conftest import octo

    server = octo("server", "--help", env=env)
    assert server.returncode == 0
    assert "--host-key" in server.stdout and "[ssh]" in server.stdout
    client = octo("client", "--help", env=env)
    assert "--identity" in client.stdout and "--ca-file" in client.stdout


def test_an_option_of_another_transport_is_a_usage_error(env: dict, tmp_path: Path) -> None:
    from conftest import octo

    script = tmp_path / "job.py"
    script.write_text("source = {1: 2}\ndef mapfn(k, v):\n    yield k, v\n"
                      "def reducefn(k, vs):\n    return k, vs\n")  # fmt: skip
    r = octo("server", str(script), "--host-key", "key", env=env, timeout=30)
    assert r.returncode == 2
    assert "--host-key is an option of the ssh transport, not of tcp" in r.stderr
    r = octo("client", "--ca-file", "ca.pem", "--wait", "1", env=env, timeout=30)
    assert r.returncode == 2 and "--ca-file is an option of the http transport" in r.stderr


class _EnginePlugin:
    def __init__(self, *es: object) -> None:
        self.es = es

    @hookimpl
    def octotwist_engines(self):
        return list(self.es)


def test_engines_are_found_like_transports_and_clashes_named() -> None:
    from octotwist.engine import Engine
    from octotwist.errors import UnknownEngineError
    from octotwist.hookspecs import engines, get_engine

    dask = get_engine("dask")  # through octotwist's own entry point, as anyone's
    assert dask.run == "octotwist_dask.engine:run"  # (imported only when a job runs)
    mine = Engine("mine", "an engine of my own", run=lambda r: None)  # type: ignore[arg-type,return-value]
    assert engines(_pm_with(_EnginePlugin(mine))) == {"mine": mine}
    with pytest.raises(
        PluginError, match="two plugins provide the engine 'mine': plugin0 and plugin1"
    ):
        engines(_pm_with(_EnginePlugin(mine), _EnginePlugin(mine)))
    with pytest.raises(PluginError, match="plugin0 returned 'x', not an octotwist Engine"):
        engines(_pm_with(_EnginePlugin("x")))
    with pytest.raises(UnknownEngineError, match="unknown engine 'ray'; installed engines: dask"):
        get_engine("ray")
    broken = Engine("broken", "", run="no_such_module:run")
    with pytest.raises(PluginError, match="engine 'broken': cannot import no_such_module:run"):
        broken.runner()

"""
What C{--hosts} and C{--hostfile} accept and refuse, how a host's answer
to the check is read (L{octotwist.launcher.explain_check}), and when two
installations can work together (L{octotwist.version}); no SSH here (see
test_launch.py for that).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import octo

import octotwist
from octotwist.errors import UsageError
from octotwist.hosts import Host, parse_host, parse_hosts, read_hostfile
from octotwist.launcher import LaunchConfig, advertised, bound_port, explain_check
from octotwist.version import Installation

HERE = Installation.here()


@pytest.mark.parametrize(
    "text, host",
    [
        ("node1", Host("node1")),
        ("alice@node1", Host("node1", "alice")),
        ("node1:2222", Host("node1", None, 2222)),
        ("alice@10.0.0.5:22", Host("10.0.0.5", "alice", 22)),
        ("[::1]", Host("::1")),
        ("bob@[fd00::3]:2200", Host("fd00::3", "bob", 2200)),
        ("  spaced  ", Host("spaced")),
    ],
)
def test_a_host_is_user_at_host_colon_port(text: str, host: Host) -> None:
    assert parse_host(text) == host
    assert parse_host(str(host)) == host  # str() gives it back as typed


@pytest.mark.parametrize(
    "text", ["", "a:b", "a:70000", "a b", "@a", "::1", "-oProxyCommand=x", "a/b"]
)
def test_what_is_not_a_host_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a host"):
        parse_host(text)


def test_ssh_is_given_the_host_after_a_double_dash() -> None:
    """So that a host name can never be read as an option of ssh's."""
    assert Host("n", "u", 2).ssh_arguments() == ["-p", "2", "--", "u@n"]
    assert Host("n").ssh_arguments() == ["--", "n"]


def test_hosts_are_separated_by_commas_and_named_once() -> None:
    assert parse_hosts("a, b:2,c@d") == (Host("a"), Host("b", None, 2), Host("d", "c"))
    with pytest.raises(UsageError, match="names a twice"):
        parse_hosts("a,b,a")
    with pytest.raises(UsageError, match="names no host"):
        parse_hosts(" , ")
    with pytest.raises(UsageError, match="--hosts: 'x:y' is not a host"):
        parse_hosts("a,x:y")


def test_a_host_file_has_a_host_a_line_with_settings(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text(
        "# the cluster\n"
        "alice@node1   processes=8   # the big one\n"
        "\n"
        "node2:2222\n"
        "[fd00::3] python=/opt/venv/bin/python processes=1\n"
    )
    assert read_hostfile(f) == (
        Host("node1", "alice", None, 8),
        Host("node2", None, 2222),
        Host("fd00::3", None, None, 1, "/opt/venv/bin/python"),
    )


@pytest.mark.parametrize(
    "line, error",
    [
        ("node1 processes=0", "line 2: processes=0: give a whole number, 1 or more"),
        ("node1 processes=many", "line 2: processes=many"),
        ("node1 cores=4", "line 2: 'cores=4' is not a setting"),
        ("node1 4", "line 2: '4' is not a setting"),
        ("node1 python=a python=b", "line 2: python is given twice"),
        ("node:port", "line 2: 'node:port' is not a host"),
    ],
)
def test_a_bad_host_file_line_is_named(tmp_path: Path, line: str, error: str) -> None:
    f = tmp_path / "hosts"
    f.write_text(f"ok\n{line}\n")
    with pytest.raises(UsageError, match=error.replace("(", r"\(").replace(")", r"\)")):
        read_hostfile(f)


def test_an_empty_or_missing_host_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(UsageError, match="names no host"):
        read_hostfile(empty)
    with pytest.raises(UsageError, match=r"cannot read the host file .*No such file"):
        read_hostfile(tmp_path / "missing")


def test_advertise_and_the_bound_port() -> None:
    assert advertised("10.0.0.5") == ("10.0.0.5", None)
    assert advertised("[fd00::1]:9000") == ("fd00::1", 9000)
    with pytest.raises(UsageError, match="no user"):
        advertised("bob@10.0.0.5")
    assert bound_port("tcp:0.0.0.0:40123") == 40123
    assert bound_port("http://[::]:8080/") == 8080
    assert bound_port("ssh://10.0.0.1:2222?host-key-fingerprint=SHA256:x") == 2222
    assert bound_port("unix:/tmp/octo.sock") is None


def test_the_installation_round_trips_as_json() -> None:
    assert Installation.from_json(HERE.to_json()) == HERE
    assert HERE.octotwist == octotwist.__version__
    assert HERE.python.startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    for bad in ("", "usage: octo ...", "[1, 2]", '{"octotwist": "1"}', "x" * 5000):
        with pytest.raises(ValueError):
            Installation.from_json(bad)


def test_the_same_release_on_the_same_python_minor_can_work_together() -> None:
    def other(**changes: object) -> Installation:
        fields = json.loads(HERE.to_json()) | changes
        return Installation.from_json(json.dumps(fields))

    major, minor, *_ = HERE.python.split(".")
    assert HERE.incompatibility(other(python=f"{major}.{minor}.99", cpus=64)) is None
    why = HERE.incompatibility(other(octotwist="0.0.9"))
    assert why is not None and "octotwist 0.0.9" in why and f"octotwist {HERE.octotwist}" in why
    why = HERE.incompatibility(other(wire="OCTOTWIST/1"))
    assert why is not None and "OCTOTWIST/1" in why
    why = HERE.incompatibility(other(python=f"{major}.{int(minor) + 1}.0"))
    assert why is not None and "bytecode" in why


CONFIG = LaunchConfig((Host("n"),))
IN_VENV = LaunchConfig((Host("n"),), remote_python="/opt/venv/bin/python")


def test_the_check_reads_a_good_answer() -> None:
    assert explain_check(Host("n"), CONFIG, 0, HERE.to_json().encode(), b"debug1: x\n") == HERE


SSH_SAYS = b"OpenSSH_9.2p1 Debian-2\ndebug1: Reading configuration data /etc/ssh/ssh_config\n"
SSH_DONE = b"Transferred: sent 3488, received 3308 bytes\nBytes per second: sent 20253.5\n"


@pytest.mark.parametrize(
    "config, code, err, log, said",
    [
        (CONFIG, 127, b"bash: line 1: octo: command not found\n", SSH_DONE, "no octo on its PATH"),
        (IN_VENV, 127, b"sh: 1: exec: /opt/venv/bin/python: not found\n", b"", "does not exist"),
        (IN_VENV, 1, b"/opt/venv/bin/python: No module named octotwist\n", b"", "has no octotwist"),
        (CONFIG, 2, b"octo: Unknown command: version\n", b"", "older than"),
        (CONFIG, 3, b"Traceback: something broke\nboom\n", SSH_SAYS + SSH_DONE, "status 3: boom"),
        # a login that cannot run anything: not taken for a missing octo
        (
            CONFIG,
            1,
            b"Could not chdir to home directory /nonexistent: No such file or directory\n"
            b"This account is currently not available.\n",
            SSH_DONE,
            "exited with status 1: This account is currently not available.",
        ),
        (
            CONFIG,
            255,
            b"",
            SSH_SAYS + b"debug1: Server host key: ssh-ed25519 SHA256:abc\nNo ED25519 host key "
            b"is known for n and you have requested strict checking.\n"
            b"Host key verification failed.\n",
            "(ssh-ed25519 SHA256:abc) is not in known_hosts",
        ),
        (
            CONFIG,
            255,
            b"",
            b"@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @\n"
            b"Host key verification failed.\n",
            "someone may be in the middle",
        ),
        (CONFIG, 255, b"", b"root@n: Permission denied (publickey).\n", "refused our keys"),
        (
            CONFIG,
            255,
            b"",
            SSH_SAYS + b"ssh: connect to host n port 22: Connection refused\n",
            "ssh cannot reach it: ssh: connect to host n port 22: Connection refused",
        ),
    ],
)
def test_the_check_says_why_a_host_cannot_work(
    config: LaunchConfig, code: int, err: bytes, log: bytes, said: str
) -> None:
    why = explain_check(Host("n"), config, code, b"", err, log)
    assert isinstance(why, str) and said in why, why
    assert "Bytes per second" not in why and "OpenSSH_" not in why


def test_the_check_reads_an_answer_that_is_not_json() -> None:
    why = explain_check(Host("n"), CONFIG, 0, b"hello\n", b"", b"")
    assert isinstance(why, str) and "answered something else" in why


def test_a_host_of_another_version_is_told_which_to_install() -> None:
    older = json.loads(HERE.to_json()) | {"octotwist": "0.0.9"}
    why = explain_check(Host("n"), CONFIG, 0, json.dumps(older).encode(), b"")
    assert isinstance(why, str)
    assert f"install octotwist {HERE.octotwist} there" in why


@pytest.mark.parametrize(
    "args, error",
    [
        (["--hosts", "a", "--hostfile", "f"], "--hosts and --hostfile: give one"),
        (["--advertise", "x:1"], "--advertise is for starting workers on hosts: add --hosts"),
        (["--require-all-hosts"], "--require-all-hosts is for starting workers"),
        (["--hosts", "a", "--inline"], "takes no --hosts"),
        (["--hosts", "a:b"], "'a:b' is not a host"),
        (["--hosts", "a", "--ssh-command", "no-such-ssh"], "no ssh client 'no-such-ssh'"),
        (["--hosts", "a", "--advertise", "u@x"], "no user"),
    ],
)
def test_bad_host_options_are_refused_before_anything_runs(
    env: dict[str, str], args: list[str], error: str
) -> None:
    done = octo("run", "examples/wordcount.py", *args, env=env, cwd=Path(__file__).parent.parent)
    assert done.returncode == 2, done.stderr
    assert error in done.stderr
    assert done.stdout == ""


def test_octo_version_says_what_a_host_is_checked_for(env: dict[str, str]) -> None:
    done = octo("version", env=env)
    assert done.returncode == 0
    assert done.stdout.strip() == HERE.describe()
    answer = octo("version", "--json", env={**env, "SSH_CONNECTION": "10.1.2.3 5000 10.1.2.4 22"})
    theirs = Installation.from_json(answer.stdout)
    assert theirs.ssh_client == "10.1.2.3"
    assert theirs.incompatibility(HERE) is None


def test_without_an_ssh_program_the_hosts_are_reached_with_conch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh there
    assert LaunchConfig.from_command((Host("n"),)).conch
    assert LaunchConfig.from_command((Host("n"),), "conch").conch
    with pytest.raises(UsageError, match=r"no ssh client 'my-ssh' on this machine.*conch"):
        LaunchConfig.from_command((Host("n"),), "my-ssh -F x")
    monkeypatch.undo()
    assert not LaunchConfig.from_command((Host("n"),)).conch  # (ssh is installed here)

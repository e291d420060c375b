"""
The SSH transport: its pieces in memory (framing, addresses, key files),
then whole jobs and refusals through real processes on 127.0.0.1, with keys
generated here, and a real OpenSSH client opening the C{octo} subsystem.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import pytest_twisted
from conftest import (
    EXAMPLES,
    finish,
    free_port,
    octo,
    parse_spaced,
    parse_tsv,
    start,
    wait_for_log,
    wait_for_port,
)
from test_end_to_end import books_job, gated_books_job, job, start_twistd
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.transport import SSHClientTransport
from twisted.conch.ssh.userauth import SSHUserAuthClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from octotwist.framing import FrameBuffer, FrameTooLarge
from octotwist.hookspecs import conformance_setup, get_transport
from octotwist.limits import REFUSAL_WINDOW, REFUSALS_LOGGED, RefusalLog
from octotwist.transport import TaskClient, TaskServer
from octotwist_ssh import keys
from octotwist_ssh.channel import (
    HIGH_WATER,
    MAGIC,
    PROOF_SIZE,
    FramedChannel,
    client_password,
    hello_frame,
    session_proof,
)
from octotwist_ssh.client import DEFAULT_PORT, SSHTaskClient, parse_address
from octotwist_ssh.server import LOGIN_TIMEOUT

SSH = shutil.which("ssh")
needs_openssh = pytest.mark.skipif(SSH is None, reason="no OpenSSH client (ssh) installed")


# In memory: discovery, interface, framing


def test_discovered_with_its_options() -> None:
    t = get_transport("ssh")
    server, client = t.server_class(), t.client_class()
    assert issubclass(server, TaskServer) and issubclass(client, TaskClient)
    assert not getattr(server, "__abstractmethods__", None)
    assert not getattr(client, "__abstractmethods__", None)
    assert {o.name for o in t.server_options} == {"host-key", "authorized-keys"}
    assert {o.name for o in t.client_options} == {
        "identity",
        "identity-passphrase-file",
        "known-hosts",
        "host-key-fingerprint",
    }


@pytest.mark.parametrize("step", [1, 3, 7, 4096])
def test_frames_survive_any_split(step: int) -> None:
    frames = [b"", b"x", os.urandom(5000), b"end", b"", os.urandom(70_000)]
    stream = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    decoder = FrameBuffer(max_frame=100_000)
    got = []
    for i in range(0, len(stream), step):
        decoder.feed(stream[i : i + step])
        got += decoder.frames()
    assert got == frames
    assert not decoder.pending


def test_oversized_frame_is_refused_before_it_arrives() -> None:
    decoder = FrameBuffer(max_frame=256)
    decoder.feed(struct.pack(">I", 257))
    with pytest.raises(FrameTooLarge, match="257 bytes"):
        decoder.next_frame()


def test_a_limit_raised_after_a_frame_holds_from_the_next_frame_of_the_same_read() -> None:
    """The handshake raises the limit; the big frame after it came in the same read."""
    big = os.urandom(1000)
    decoder = FrameBuffer(max_frame=256)
    decoder.feed(struct.pack(">I", 5) + b"hello" + struct.pack(">I", len(big)) + big)
    assert decoder.next_frame() == b"hello"
    decoder.max_frame = 2000
    assert decoder.next_frame() == big


class _Connection:
    """What a channel calls on its SSH connection, recorded."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended: list[str] = []

    def sendData(self, channel: object, data: bytes) -> None:
        self.data.append(bytes(data))

    def sendEOF(self, channel: object) -> None:
        self.ended.append("eof")

    def sendClose(self, channel: object) -> None:
        self.ended.append("close")


def test_channel_sends_within_the_window_and_drains_before_closing() -> None:
    conn = _Connection()
    channel = FramedChannel(remoteWindow=10, remoteMaxPacket=4, conn=conn)
    big = os.urandom(HIGH_WATER + 1)
    channel.send_frame(b"hello")
    channel.send_frame(big)
    # Never past the window, nor the peer's largest packet.
    assert sum(map(len, conn.data)) == 10 and max(map(len, conn.data)) == 4
    waiting = channel.writable()
    assert not waiting.called  # more than HIGH_WATER queued
    channel.close_gracefully()
    assert conn.ended == []  # not before everything is sent
    channel.remoteMaxPacket = 1 << 20
    channel.addWindowBytes(len(big) + 100)
    assert waiting.called
    wire = b"".join(conn.data)
    received = FrameBuffer(len(big))
    received.feed(wire)
    assert received.frames() == [b"hello", big]
    assert conn.ended == ["eof", "close"]


def test_proofs_are_bound_to_secret_role_and_session() -> None:
    a = session_proof(b"s", b"server", b"session-1")
    assert len(a) == PROOF_SIZE
    assert a != session_proof(b"s", b"server", b"session-2")
    assert a != session_proof(b"t", b"server", b"session-1")
    assert a != session_proof(b"s", b"client", b"session-1")
    assert hello_frame(b"s", b"session-1") == MAGIC + a
    assert client_password(b"s", b"x") == session_proof(b"s", b"client", b"x").hex().encode()


@pytest.mark.parametrize(
    ("text", "endpoint", "host", "port", "user"),
    [
        ("127.0.0.1:2222", "tcp:127.0.0.1:2222", "127.0.0.1", 2222, "octo"),
        ("example.org", f"tcp:example.org:{DEFAULT_PORT}", "example.org", DEFAULT_PORT, "octo"),
        ("alice@h:22", "tcp:h:22", "h", 22, "alice"),
        ("[::1]:2222", "tcp:\\:\\:1:2222", "::1", 2222, "octo"),
        ("ssh://bob@h:7/", "tcp:h:7", "h", 7, "bob"),
        ("tcp:h:2222", "tcp:h:2222", "h", 2222, "octo"),
        ("unix:/tmp/s", "unix:/tmp/s", "/tmp/s", None, "octo"),
    ],
)
def test_address_forms(text: str, endpoint: str, host: str, port: int | None, user: str) -> None:
    a = parse_address(text)
    assert (a.endpoint, a.host, a.port, a.user) == (endpoint, host, port, user)


def test_address_carries_a_pinned_fingerprint() -> None:
    fp = keys.fingerprint(keys.generate_ed25519())
    a = parse_address(f"ssh://127.0.0.1:5?host-key-fingerprint={fp}")
    assert a.fingerprints == (fp,)
    assert SSHTaskClient.address_to_endpoint("127.0.0.1:5") == "ssh://127.0.0.1:5"
    assert SSHTaskClient.address_to_endpoint("al@h") == f"ssh://al@h:{DEFAULT_PORT}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("h:port", "bad port"),
        ("h:70000", "out of range"),
        ("ssh://h:1?color=red", "unknown parameter"),
        ("ssh://h:1?host-key-fingerprint=MD5:aa", "not a SHA256 fingerprint"),
        ("@h", "empty user"),
        ("", "empty"),
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        SSHTaskClient.address_to_endpoint(text)


def test_fingerprint_is_openssh_s(tmp_path: Path) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("no ssh-keygen")
    key = keys.generate_ed25519()
    keys.write_private_key(key, tmp_path / "k")
    shown = subprocess.run(
        [keygen, "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert shown == keys.fingerprint(key)
    assert keys.normalize_fingerprint(shown + "=") == shown


def test_known_hosts_matching(tmp_path: Path) -> None:
    key, other = keys.generate_ed25519(), keys.generate_ed25519()
    path = tmp_path / "known_hosts"

    def check(line: str) -> None:
        path.write_text(line + "\n")
        keys.check_known_hosts(str(path), "127.0.0.1", 2222, key)

    check(f"[127.0.0.1]:2222 {keys.public_line(key)}")
    check(f"127.0.0.1 {keys.public_line(key)}")  # host-only lines pin any port
    check(f"other,[127.0.0.*]:2222 {keys.public_line(key)}")
    with pytest.raises(keys.HostKeyError, match=r"MISMATCH.*ssh-keygen -R"):
        check(f"[127.0.0.1]:2222 {keys.public_line(other)}")
    with pytest.raises(keys.HostKeyError, match=r"not in .*add this line"):
        check(f"[127.0.0.1]:2223 {keys.public_line(key)}")
    with pytest.raises(keys.HostKeyError, match="not in"):
        check(f"!127.0.0.1,127.0.0.* {keys.public_line(key)}")
    with pytest.raises(keys.HostKeyError, match="@revoked"):
        check(f"@revoked * {keys.public_line(key)}")


def test_hashed_known_hosts_line(tmp_path: Path) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("no ssh-keygen")
    key = keys.generate_ed25519()
    path = tmp_path / "known_hosts"
    path.write_text(f"[127.0.0.1]:2222 {keys.public_line(key)}\n")
    subprocess.run([keygen, "-H", "-f", str(path)], capture_output=True, check=True)
    assert path.read_text().startswith("|1|")
    keys.check_known_hosts(str(path), "127.0.0.1", 2222, key)


def test_authorized_keys_skip_lines_with_options(tmp_path: Path) -> None:
    plain, restricted = keys.generate_ed25519(), keys.generate_rsa(2048)
    path = tmp_path / "authorized_keys"
    path.write_text(
        "# workers\n"
        f"{keys.public_line(plain, 'w1')}\n"
        f'from="10.0.0.1",no-pty {keys.public_line(restricted)}\n'
        "garbage\n"
    )
    authorized = keys.AuthorizedKeys(str(path))
    assert plain in authorized
    assert restricted not in authorized
    path.write_text(keys.public_line(restricted) + "\n")  # re-read on change
    assert restricted in authorized and plain not in authorized


def test_refusals_are_logged_within_a_rate_limit_and_counted() -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        refusals = RefusalLog(clock, limit=3, window=10.0)
        for n in range(10):
            refusals.emit(LogLevel.warn, "refused {n}", n=n)
        assert [e["n"] for e in events if "n" in e and "limit" not in e] == [0, 1, 2]
        clock.advance(10)  # the window ends: the rest is counted in one line
        (summary,) = [e for e in events if "limit" in e]
        assert summary["n"] == 7 and summary["log_level"] == LogLevel.warn
        refusals.emit(LogLevel.warn, "refused {n}", n=10)  # a new window
        refusals.emit(LogLevel.warn, "refused {n}", n=11)
        refusals.flush()  # nothing held back: nothing to say
        assert [e["n"] for e in events if "n" in e and "limit" not in e][-2:] == [10, 11]
        assert len([e for e in events if "limit" in e]) == 1 and not clock.getDelayedCalls()
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_key_files_get_their_modes_whatever_the_umask(tmp_path: Path) -> None:
    key = keys.generate_ed25519()
    path = tmp_path / "new" / "dir" / "key"
    old = os.umask(0o277)  # even one that would leave us unable to write
    try:
        keys.write_private_key(key, path)
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (path.parent.parent, path.parent)}
    assert set(modes.values()) == {0o700}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pub = path.with_name("key.pub")
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert pub.read_text() == keys.public_line(key, "octotwist") + "\n"


def test_an_open_default_host_key_is_closed_again(
    env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    key, path = keys.load_host_key(None)  # generated
    pub = path.with_name(path.name + ".pub")
    path.chmod(0o644)
    pub.write_text("ssh-ed25519 AAAAsomeone-elses-key\n")
    pub.chmod(0o666)
    again, _ = keys.load_host_key(None)
    assert again == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert pub.read_text() == keys.public_line(key, "octotwist") + "\n"


# Real processes


def make_key(path: Path, kind: str = "ed25519", passphrase: bytes | None = None) -> keys.Key:
    key = keys.generate_ed25519() if kind == "ed25519" else keys.generate_rsa(2048)
    keys.write_private_key(key, path, passphrase=passphrase)
    return key


class Peers:
    """A host key, good client keys listed in authorized_keys, and a stranger's key."""

    def __init__(self, d: Path) -> None:
        d.mkdir(exist_ok=True)
        self.dir = d
        self.host = d / "host"
        self.host_key = make_key(self.host)
        self.fingerprint = keys.fingerprint(self.host_key)
        self.ed25519 = d / "id_ed25519"
        self.rsa = d / "id_rsa"
        self.protected = d / "id_protected"
        self.passphrase = d / "passphrase"
        self.passphrase.write_text("correct horse\n")
        self.stranger = d / "id_stranger"
        good = [
            make_key(self.ed25519),
            make_key(self.rsa, "rsa"),
            make_key(self.protected, passphrase=b"correct horse"),
        ]
        make_key(self.stranger)
        self.authorized = d / "authorized_keys"
        self.authorized.write_text("".join(keys.public_line(k) + "\n" for k in good))

    def server_args(self) -> list[str]:
        return ["--host-key", str(self.host), "--authorized-keys", str(self.authorized)]

    def known_hosts(self, port: int, key: keys.Key | None = None, host: str = "127.0.0.1") -> Path:
        path = self.dir / f"known_hosts_{port}"
        path.write_text(f"[{host}]:{port} {keys.public_line(key or self.host_key)}\n")
        return path


@pytest.fixture
def peers_ssh(tmp_path: Path) -> Peers:
    return Peers(tmp_path / "keys")


def start_server(script: Path, port: int, env: dict, *extra: str) -> subprocess.Popen[str]:
    """C{octo server -t ssh}; results go to a file unless C{extra} says where (a
    full stdout pipe nobody reads would stall the server)."""
    if "--output" not in extra:
        extra = (*extra, "--output", str(script.with_suffix(".tsv")))
    server = start(
        "server", str(script), "-t", "ssh", "--listen", f"tcp:{port}:interface=127.0.0.1",
        *extra, env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    return server


def client(port: int, env: dict, *extra: str, name: str = "w") -> subprocess.Popen[str]:
    return start("client", f"127.0.0.1:{port}", "-t", "ssh", "--name", name, *extra, env=env)


def test_wrong_key_is_refused_and_the_server_serves_others(
    env: dict, tmp_path: Path, peers_ssh: Peers, expected_books: Counter
) -> None:
    gate = tmp_path / "gate"
    script = gated_books_job(tmp_path, gate)
    out = tmp_path / "result.tsv"
    port = free_port()
    server = start_server(script, port, env, *peers_ssh.server_args(), "--output", str(out))
    pin = ["--host-key-fingerprint", peers_ssh.fingerprint]
    stranger_client = client(port, env, "--identity", str(peers_ssh.stranger), *pin)
    code, _, err = finish(stranger_client, timeout=60)  # refused at once, not let in to wait
    assert code == 1, err
    stranger = keys.fingerprint(keys.Key.fromFile(str(peers_ssh.stranger)))
    assert f"refused the key {stranger}" in err and "--authorized-keys" in err
    # Garbage, and a connection that says nothing, hurt no one.
    with socket.create_connection(("127.0.0.1", port)) as junk:
        junk.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(8192))
        junk.settimeout(30)
        while junk.recv(65536):
            pass  # the server hangs up
    silent = socket.create_connection(("127.0.0.1", port))
    # Workers log in with ed25519, RSA, and a passphrase-protected key.
    good = [
        client(port, env, "--identity", str(peers_ssh.ed25519), *pin, name="ed"),
        client(port, env, "--identity", str(peers_ssh.rsa), *pin, name="rsa"),
        client(
            port, env, "--identity", str(peers_ssh.protected),
            "--identity-passphrase-file", str(peers_ssh.passphrase), *pin, name="prot",
        ),
    ]  # fmt: skip
    log = wait_for_log(server, [f"worker {n} joined" for n in ("ed", "rsa", "prot")])
    gate.touch()
    code, _, err = finish(server)  # stopping, it hangs up on the silent one
    silent.close()
    err = log + err
    assert code == 0, err
    assert "refused SSH login from 127.0.0.1" in err and f"key {stranger} is not in" in err
    for c in good:
        ccode, _, cerr = finish(c)
        assert ccode == 0, cerr
    assert parse_tsv(out.read_text()) == expected_books


def test_changed_host_key_is_refused_with_how_to_trust_it(
    env: dict, tmp_path: Path, peers_ssh: Peers
) -> None:
    port = free_port()
    server = start_server(books_job(tmp_path), port, env, *peers_ssh.server_args())
    identity = ["--identity", str(peers_ssh.ed25519)]
    old = keys.generate_ed25519()
    known = peers_ssh.known_hosts(port, old)
    started = time.monotonic()
    code, _, err = finish(client(port, env, *identity, "--known-hosts", str(known)))
    assert code == 1, err
    assert "HOST KEY MISMATCH" in err and f"ssh-keygen -R '[127.0.0.1]:{port}'" in err
    assert f"--host-key-fingerprint {peers_ssh.fingerprint}" in err
    code, _, err = finish(
        client(port, env, *identity, "--host-key-fingerprint", keys.fingerprint(old))
    )
    assert code == 1, err
    assert "HOST KEY MISMATCH" in err and peers_ssh.fingerprint in err
    assert time.monotonic() - started < 60  # refused, never retried or prompted
    server.kill()


def test_unknown_host_is_refused_without_hanging(
    env: dict, tmp_path: Path, peers_ssh: Peers, expected_books: Counter
) -> None:
    port = free_port()
    script = books_job(tmp_path)
    server = start_server(script, port, env, *peers_ssh.server_args())
    identity = ["--identity", str(peers_ssh.ed25519)]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    code, _, err = finish(client(port, env, *identity, "--known-hosts", str(empty)), timeout=60)
    assert code == 1, err
    assert "is not in" in err and f"[127.0.0.1]:{port} ssh-ed25519 " in err
    # No pin at all, and a server that cannot prove our secret: refused too.
    stranger_env = {**env, "OCTO_SECRET": "not the server's"}
    code, _, err = finish(client(port, stranger_env, *identity), timeout=60)
    assert code == 1, err
    assert "is not trusted" in err and f"--host-key-fingerprint {peers_ssh.fingerprint}" in err
    # ...while the right known_hosts file lets the worker in.
    known = peers_ssh.known_hosts(port)
    code, _, err = finish(client(port, stranger_env, *identity, "--known-hosts", str(known)))
    assert code == 0, err
    code, _, err = finish(server)
    assert code == 0, err
    assert parse_tsv(script.with_suffix(".tsv").read_text()) == expected_books


def test_shared_secret_without_keys(env: dict, tmp_path: Path, expected_books: Counter) -> None:
    """No keys anywhere: the generated secret logs in, and proves the host."""
    gate_file = tmp_path / "gate"
    script = gated_books_job(tmp_path, gate_file)
    out = tmp_path / "result.tsv"
    port = free_port()
    server = start_server(script, port, env, "--output", str(out))
    workers = [client(port, env, name=f"c{i}") for i in range(2)]
    log = wait_for_log(server, ["worker c0 joined", "worker c1 joined"])
    gate_file.touch()  # both logged in with the secret before any map could finish
    code, _, err = finish(server)
    err = log + err
    assert code == 0, err
    assert "with the shared secret" in err
    for w in workers:
        assert finish(w)[0] == 0
    assert parse_tsv(out.read_text()) == expected_books
    host_key = Path(env["XDG_CONFIG_HOME"]) / "octotwist" / "ssh_host_ed25519_key"
    assert host_key.stat().st_mode & 0o777 == 0o600
    assert keys.fingerprint(keys.Key.fromFile(str(host_key))) in err


def test_keys_alone_need_no_secret(
    env: dict, tmp_path: Path, peers_ssh: Peers, expected_books: Counter
) -> None:
    """
    With --authorized-keys the server may listen on every interface without
    a configured secret, and a worker with --identity needs none either
    (each has its own, empty config directory).
    """
    script = books_job(tmp_path)
    out = tmp_path / "result.tsv"
    port = free_port()
    server = start(
        "server", str(script), "-t", "ssh", "--listen", f"tcp:{port}",
        *peers_ssh.server_args(), "--output", str(out), env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    worker_env = dict(env, XDG_CONFIG_HOME=str(tmp_path / "worker-config"))
    worker = start(
        "client", f"127.0.0.1:{port}", "-t", "ssh", "--identity", str(peers_ssh.ed25519),
        "--host-key-fingerprint", peers_ssh.fingerprint, "--wait", "10", env=worker_env,
    )  # fmt: skip
    code, _, err = finish(server)
    assert code == 0, err
    wcode, _, werr = finish(worker)
    assert wcode == 0, werr
    assert "no shared secret" not in werr and "waiting for a local server" not in werr
    assert parse_tsv(out.read_text()) == expected_books


def test_wrong_secret_is_refused(env: dict, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(books_job(tmp_path), port, env)
    wrong = {**env, "OCTO_SECRET": "not the server's"}
    host_key = Path(env["XDG_CONFIG_HOME"]) / "octotwist" / keys.DEFAULT_HOST_KEY_NAME
    fp = keys.fingerprint(keys.Key.fromFile(str(host_key)))
    code, _, err = finish(client(port, wrong, "--host-key-fingerprint", fp), timeout=60)
    assert code == 1, err
    assert "rejected our shared secret" in err
    server.kill()
    _, _, serr = finish(server)
    assert "wrong shared secret" in serr


def test_octo_run_needs_no_options(env: dict, expected_books: Counter) -> None:
    r = octo("run", str(EXAMPLES / "wordcount.py"), "-w", "2", "-t", "ssh", env=env)
    assert r.returncode == 0, r.stderr
    assert parse_spaced(r.stdout) == expected_books


def test_twistd_serves_over_ssh(
    env: dict, tmp_path: Path, peers_ssh: Peers, expected_books: Counter
) -> None:
    script = books_job(tmp_path)
    out = tmp_path / "result.tsv"
    port = free_port()
    server = start_twistd(
        script, "--transport", "ssh", "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--output", str(out), *peers_ssh.server_args(), env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    known = peers_ssh.known_hosts(port, host="localhost")  # the name the client uses
    worker = start(
        "client", f"localhost:{port}", "-t", "ssh", "-p", "2",
        "--identity", str(peers_ssh.rsa), "--known-hosts", str(known), env=env,
    )  # fmt: skip
    ccode, _, cerr = finish(worker)
    code, _, err = finish(server)
    assert ccode == 0, cerr
    assert code == 0, err
    assert parse_tsv(out.read_text()) == expected_books


def test_ssh_agent_signs_for_a_protected_key(
    env: dict, tmp_path: Path, peers_ssh: Peers, expected_books: Counter
) -> None:
    agent, add = shutil.which("ssh-agent"), shutil.which("ssh-add")
    if agent is None or add is None:
        pytest.skip("no ssh-agent / ssh-add")
    sock = tmp_path / "agent.sock"
    start("-D", "-a", str(sock), env=env, program=agent)
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\ncat {peers_ssh.passphrase}\n")
    askpass.chmod(0o700)
    agent_env = {**env, "SSH_AUTH_SOCK": str(sock)}
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    subprocess.run(
        [add, str(peers_ssh.protected)],
        env={**agent_env, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"},
        stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    gate = tmp_path / "gate"
    script = gated_books_job(tmp_path, gate)
    out = tmp_path / "result.tsv"
    port = free_port()
    server = start_server(script, port, env, *peers_ssh.server_args(), "--output", str(out))
    pin = ["--host-key-fingerprint", peers_ssh.fingerprint]
    # Without the agent the protected key cannot be used: a clear usage error.
    code, _, err = finish(client(port, env, "--identity", str(peers_ssh.protected), *pin))
    assert code == 2 and "--identity-passphrase-file" in err and "ssh-add" in err
    workers = [
        client(port, agent_env, "--identity", str(peers_ssh.protected), *pin, name="given"),
        client(port, agent_env, *pin, name="any"),  # no --identity: the agent's keys
    ]
    log = wait_for_log(server, ["worker given joined", "worker any joined"])
    gate.touch()
    code, _, err = finish(server)
    assert code == 0, log + err
    for w in workers:
        assert finish(w)[0] == 0
    assert parse_tsv(out.read_text()) == expected_books


@needs_openssh
def test_openssh_opens_the_octo_subsystem(env: dict, tmp_path: Path, peers_ssh: Peers) -> None:
    port = free_port()
    server = start_server(books_job(tmp_path), port, env, *peers_ssh.server_args())
    known = peers_ssh.known_hosts(port)

    def ssh(*args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                SSH, "-F", "/dev/null", "-s", "-p", str(port), "-i", str(peers_ssh.ed25519),
                "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", *args,
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    proc = ssh("-l", "octo", "127.0.0.1", "octo")
    try:
        (length,) = struct.unpack(">I", proc.stdout.read(4))
        hello = proc.stdout.read(length)
        assert length == len(MAGIC) + PROOF_SIZE and hello.startswith(MAGIC)
        proc.stdin.close()  # EOF: the server ends the session cleanly
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    # An unknown user is refused.
    bad = ssh("-l", "nobody", "127.0.0.1", "octo")
    _, err = bad.communicate(timeout=30)
    assert bad.returncode == 255 and b"Permission denied" in err
    server.kill()
    _, _, serr = finish(server)
    assert "unknown user 'nobody'" in serr


def test_test_setup_hook(tmp_path: Path) -> None:
    setup = conformance_setup("ssh", tmp_path)
    assert "--authorized-keys" in setup.server_args and "--identity" in setup.client_args
    assert conformance_setup("tcp", tmp_path / "tcp").server_args == []


SMALL = """
source = {i: f"a b c{i % 3}" for i in range(6)}
def mapfn(key, value):
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
"""
SMALL_EXPECTED = Counter({"a": 6, "b": 6, "c0": 2, "c1": 2, "c2": 2})


def _garbage(i: int) -> bytes:
    """What comes after the version line: never a key exchange Conch can parse."""
    kind = i % 3
    if kind == 0:  # a packet length no SSH packet has
        return b"\xff\xff\xff\xf0" + os.urandom(64)
    if kind == 1:  # a length that is not a multiple of the block size
        return struct.pack(">I", 13) + os.urandom(13)
    # A well-framed KEXINIT cut short: Conch's parser raises (struct.error).
    body = bytes([20]) + os.urandom(i % 40)
    pad = 8 - (len(body) + 5) % 8
    pad += 8 if pad < 4 else 0
    packet = bytes([pad]) + body + bytes(pad)
    return struct.pack(">I", len(packet)) + packet


def test_garbage_key_exchanges_are_one_line_each_within_a_rate_limit(
    env: dict, tmp_path: Path, peers_ssh: Peers
) -> None:
    port = free_port()
    out = tmp_path / "out.tsv"
    server = start_server(
        job(tmp_path, SMALL), port, env, *peers_ssh.server_args(), "--output", str(out)
    )
    connections, threads = 900, 6  # fewer at once than any per-address cap
    unanswered: list[int] = []

    def attack(first: int) -> None:
        for i in range(first, connections, threads):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"SSH-2.0-garbage\r\n" + _garbage(i))
                try:
                    while s.recv(65536):
                        pass  # until the server hangs up
                except TimeoutError:
                    unanswered.append(i)
                except ConnectionResetError:
                    pass

    started = time.monotonic()
    attackers = [threading.Thread(target=attack, args=(t,)) for t in range(threads)]
    for t in attackers:
        t.start()
    for t in attackers:
        t.join(300)
    seconds = time.monotonic() - started
    assert unanswered == [], f"the server never hung up on {len(unanswered)} connections"
    worker = client(
        port, env, "--identity", str(peers_ssh.ed25519),
        "--host-key-fingerprint", peers_ssh.fingerprint,
    )  # fmt: skip
    code, _, err = finish(server)
    assert code == 0, err
    assert finish(worker)[0] == 0
    assert parse_tsv(out.read_text()) == SMALL_EXPECTED
    assert "Traceback" not in err and "Unhandled" not in err, err[:3000]
    lines = [
        line
        for line in err.splitlines()
        if re.search(r"(refused|closing) SSH connection from 127\.0\.0\.1:\d+: ", line)
    ]
    counted = sum(
        int(n) for n in re.findall(r"(\d+) more lines? about refused peers not logged", err)
    )
    # Every refusal is either a line or counted, and the lines are few.
    assert len(lines) + counted == connections, err
    windows = seconds // REFUSAL_WINDOW + 2
    assert len(lines) <= REFUSALS_LOGGED * windows, err
    assert any("malformed SSH packet (struct.error" in line for line in lines) or counted, err
    assert len(err.splitlines()) < 40 + 2 * REFUSALS_LOGGED * windows, err


def test_host_key_files_are_private_under_umask_000(env: dict, tmp_path: Path) -> None:
    """A server started with umask 000 generates its host key: 0600, and 0644 for .pub."""
    env = {**env, "OCTO_SECRET": "umask-test-secret-0123456789"}
    out = tmp_path / "out.tsv"
    port = free_port()
    old = os.umask(0)
    try:
        server = start_server(job(tmp_path, SMALL), port, env, "--output", str(out))
    finally:
        os.umask(old)
    config = Path(env["XDG_CONFIG_HOME"])
    key = config / "octotwist" / keys.DEFAULT_HOST_KEY_NAME
    worker = client(port, env)  # it trusts the host by the shared secret's proof
    code, _, err = finish(server)
    assert code == 0, err
    assert finish(worker)[0] == 0
    assert parse_tsv(out.read_text()) == SMALL_EXPECTED
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (config, key.parent, key)}
    mode["pub"] = stat.S_IMODE(key.with_name(key.name + ".pub").stat().st_mode)
    assert mode == {"config": 0o700, "octotwist": 0o700, key.name: 0o600, "pub": 0o644}


# Refusals that need a hand-made client: a key offered, another one signing


class _OneKeyAuth(SSHUserAuthClient):
    """Offers one public key, once, and signs with whichever private key it was given."""

    preferredOrder = [b"publickey"]

    def __init__(self, offered: keys.Key, signer: keys.Key, instance: SSHConnection) -> None:
        super().__init__(b"octo", instance)
        self._offered: keys.Key | None = offered.public()
        self._signer = signer

    def getPublicKey(self) -> keys.Key | None:
        offered, self._offered = self._offered, None
        return offered  # then None: no more keys, so Conch gives up

    def getPrivateKey(self) -> Deferred[keys.Key]:
        return succeed(self._signer)


class _LoggedIn(SSHConnection):
    """The service after a successful login: note it, and hang up."""

    def __init__(self, outcome: Deferred[str]) -> None:
        super().__init__()
        self.outcome = outcome

    def serviceStarted(self) -> None:
        if not self.outcome.called:
            self.outcome.callback("logged in")
        self.transport.loseConnection()


class _OneKeyClient(SSHClientTransport):
    def __init__(self, fingerprint: str, offered: keys.Key, signer: keys.Key) -> None:
        self.fingerprint = fingerprint
        self.outcome: Deferred[str] = Deferred()
        self.auth = _OneKeyAuth(offered, signer, _LoggedIn(self.outcome))

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        if keys.fingerprint(keys.Key.fromString(hostKey)) != self.fingerprint:
            return fail(keys.HostKeyError("not the server we started"))
        return succeed(True)

    def connectionSecure(self) -> None:
        self.requestService(self.auth)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if not self.outcome.called:
            self.outcome.callback("refused")


async def _try_login(port: int, fingerprint: str, offered: keys.Key, signer: keys.Key) -> str:
    from twisted.internet import reactor

    protocol = _OneKeyClient(fingerprint, offered, signer)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return await protocol.outcome.addTimeout(60, reactor)


@pytest_twisted.ensureDeferred
async def test_a_signature_by_another_key_is_refused(
    env: dict, tmp_path: Path, peers_ssh: Peers
) -> None:
    """
    A client that offers an authorized public key but cannot sign for it
    (it signs with another private key, of the same type or not) is refused,
    as is a stranger's key with a good signature; the same client with the
    right private key logs in (so the refusals are the server's doing).
    """
    port = free_port()
    script = job(tmp_path, SMALL)
    server = start_server(script, port, env, *peers_ssh.server_args())
    authorized = keys.Key.fromFile(str(peers_ssh.ed25519))
    stranger = keys.Key.fromFile(str(peers_ssh.stranger))
    rsa = keys.Key.fromFile(str(peers_ssh.rsa))  # authorized too, but not for this key
    fp = peers_ssh.fingerprint
    assert await _try_login(port, fp, authorized, stranger) == "refused"
    assert await _try_login(port, fp, authorized, rsa) == "refused"
    assert await _try_login(port, fp, stranger, stranger) == "refused"
    assert await _try_login(port, fp, authorized, authorized) == "logged in"
    worker = client(port, env, "--identity", str(peers_ssh.ed25519), "--host-key-fingerprint", fp)
    code, _, err = finish(server)
    assert code == 0, err
    assert finish(worker)[0] == 0
    assert parse_tsv(script.with_suffix(".tsv").read_text()) == SMALL_EXPECTED
    bad = "refused SSH login from 127.0.0.1:"
    lines = [line for line in err.splitlines() if bad in line]
    authorized_fp = keys.fingerprint(authorized)
    assert len([x for x in lines if f"bad signature for key {authorized_fp}" in x]) == 2, err
    assert any(f"key {keys.fingerprint(stranger)} is not in" in x for x in lines), err
    assert "Traceback" not in err and "Unhandled" not in err, err


# Key files the server cannot read


def _unreadable(tmp_path: Path, how: str, good: Path) -> Path:
    path = tmp_path / "unreadable"
    if how == "a directory":
        path.mkdir()
    elif how == "mode 000":
        if os.geteuid() == 0:
            pytest.skip("root reads a file whatever its mode")
        path.write_bytes(good.read_bytes())
        path.chmod(0)
    return path  # "missing": never made


UNREADABLE = [
    ("--authorized-keys", "a directory", "Is a directory"),
    ("--authorized-keys", "mode 000", "Permission denied"),
    ("--authorized-keys", "missing", "No such file or directory"),
    ("--host-key", "a directory", "Is a directory"),
    ("--host-key", "mode 000", "Permission denied"),
]


def _serve_with(tmp_path: Path, env: dict, peers: Peers, option: str, path: Path) -> object:
    args = {"--host-key": str(peers.host), "--authorized-keys": str(peers.authorized)}
    args[option] = str(path)
    script = job(tmp_path, SMALL)
    return octo(
        "server", str(script), "-t", "ssh", "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
        *itertools.chain.from_iterable(args.items()), env=env, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(("option", "how", "why"), UNREADABLE)
def test_an_unreadable_key_file_is_named_with_the_reason(
    env: dict, tmp_path: Path, peers_ssh: Peers, option: str, how: str, why: str
) -> None:
    good = peers_ssh.host if option == "--host-key" else peers_ssh.authorized
    path = _unreadable(tmp_path, how, good)
    r = _serve_with(tmp_path, env, peers_ssh, option, path)
    assert r.returncode == 2, r.stderr  # a usage error, as for an unreadable secret file
    assert "cannot listen" not in r.stderr, r.stderr
    assert f"cannot read {option} {path}: {why}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "serving job" not in r.stderr, r.stderr


# What an SSH client may ask for besides the octo subsystem: nothing


def _openssh(port: int, peers: Peers, known: Path, *args: str) -> tuple[int, bytes, str]:
    """Run OpenSSH's C{ssh} with C{peers}' key against our server: status, stdout, stderr."""
    r = subprocess.run(
        [
            SSH, "-F", "/dev/null", "-p", str(port), "-i", str(peers.ed25519), "-l", "octo",
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", *args,
        ],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )  # fmt: skip
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


#: What OpenSSH asks for, what it says when refused, what the server logs.
REFUSED_REQUESTS = [
    (["-s", "127.0.0.1", "sftp"], "subsystem request failed", "refused subsystem 'sftp'"),
    (["-s", "127.0.0.1", "octox"], "subsystem request failed", "refused subsystem 'octox'"),
    (["127.0.0.1", "touch {marker}"], "exec request failed", "refused a command to"),
    (["-T", "127.0.0.1"], "shell request failed", "refused a shell to"),
    (["-tt", "127.0.0.1"], "PTY allocation request failed", "refused a shell to"),
    (
        ["-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9", "127.0.0.1"],
        "remote port forwarding failed",
        None,  # a global request: refused without a word
    ),
    (["-W", "127.0.0.1:9", "127.0.0.1"], "open failed: unknown channel type", None),
]


@needs_openssh
def test_openssh_gets_nothing_but_the_octo_subsystem(
    env: dict, tmp_path: Path, peers_ssh: Peers
) -> None:
    marker = tmp_path / "pwned"
    port = free_port()
    script = job(tmp_path, SMALL)
    server = start_server(script, port, env, *peers_ssh.server_args())
    known = peers_ssh.known_hosts(port)
    for args, said, _ in REFUSED_REQUESTS:
        code, out, err = _openssh(port, peers_ssh, known, *(a.format(marker=marker) for a in args))
        assert code == 255, (args, code, err)
        assert said in err, (args, err)
        assert out == b"", (args, out)
    # The same key and client do open the octo subsystem (the refusals are
    # of the requests, not of the login): its first frame is the server's hello.
    code, out, err = _openssh(port, peers_ssh, known, "-s", "127.0.0.1", "octo")
    assert code == 0, err
    # (What follows it, if the server got that far before OpenSSH's EOF, is
    # the job's Welcome: this key is authorized.)
    (length,) = struct.unpack("!I", out[:4])
    assert length == len(MAGIC) + PROOF_SIZE and out[4:].startswith(MAGIC), out[:100]
    worker = client(
        port, env, "--identity", str(peers_ssh.ed25519),
        "--host-key-fingerprint", peers_ssh.fingerprint,
    )  # fmt: skip
    code, _, err = finish(server)
    assert code == 0, err
    assert finish(worker)[0] == 0
    assert parse_tsv(script.with_suffix(".tsv").read_text()) == SMALL_EXPECTED
    assert not marker.exists(), "the server ran the command"
    for _, _, logged in REFUSED_REQUESTS:
        if logged is not None:
            assert logged in err, (logged, err)


@needs_openssh
def test_a_refused_channel_type_is_one_line_without_a_traceback(
    env: dict, tmp_path: Path, peers_ssh: Peers
) -> None:
    port = free_port()
    server = start_server(job(tmp_path, SMALL), port, env, *peers_ssh.server_args())
    known = peers_ssh.known_hosts(port)
    code, _, said = _openssh(port, peers_ssh, known, "-W", "127.0.0.1:9", "127.0.0.1")
    assert code == 255 and "open failed" in said, said
    server.kill()
    _, _, err = finish(server)
    assert "Traceback" not in err, err
    assert "refused a 'direct-tcpip' channel to " in err, err


@pytest.mark.slow
def test_a_connection_that_never_logs_in_is_dropped_after_the_login_timeout(
    env: dict, tmp_path: Path, peers_ssh: Peers
) -> None:
    """
    Conch times out user authentication only once it has begun; the server
    bounds the whole login (LOGIN_TIMEOUT) so a peer that opens the port,
    reads the version line and says nothing holds no slot for long.
    """
    port = free_port()
    script = job(tmp_path, SMALL)
    server = start_server(script, port, env, *peers_ssh.server_args())
    with socket.create_connection(("127.0.0.1", port), timeout=LOGIN_TIMEOUT * 3) as idle:
        opened = time.monotonic()
        greeting = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := idle.recv(65536):  # until the server drops us
                greeting += chunk
        held = time.monotonic() - opened
    assert greeting.startswith(b"SSH-2.0-"), greeting[:100]
    assert LOGIN_TIMEOUT - 1 <= held < LOGIN_TIMEOUT * 2, held
    worker = client(
        port, env, "--identity", str(peers_ssh.ed25519),
        "--host-key-fingerprint", peers_ssh.fingerprint,
    )  # fmt: skip
    code, _, err = finish(server)
    assert code == 0, err
    assert finish(worker)[0] == 0
    assert parse_tsv(script.with_suffix(".tsv").read_text()) == SMALL_EXPECTED
    assert re.search(
        rf"dropping SSH connection from 127\.0\.0\.1:\d+: no login within {LOGIN_TIMEOUT:.0f} s",
        err,
    ), err

"""
Endpoint strings pick how bytes move: Unix sockets and TLS work with the TCP
transport unchanged, because it hands its strings to Twisted.  And they
decide whether a server needs a configured secret: only one that accepts
connections from this machine alone (L{server_is_local}) may do without.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import time
from pathlib import Path

import pytest
from conftest import BOOKS, finish, free_port, octo, parse_tsv, start, wait_for_port, word_count
from test_end_to_end import books_job, job
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

from octotwist.endpoints import server_is_local


def wait_for_file(path: Path, proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_unix_socket(env: dict, tmp_path: Path) -> None:
    sock = tmp_path / "octo.sock"
    out = tmp_path / "out.tsv"
    server = start(
        "server", str(books_job(tmp_path)), "--listen", f"unix:{sock}", "-o", str(out), env=env
    )
    wait_for_file(sock, server)
    client = octo("client", "--connect", f"unix:{sock}", "-p", "2", env=env)
    assert client.returncode == 0, client.stderr
    assert finish(server)[0] == 0
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost, made here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_with_a_verified_certificate(env: dict, tmp_path: Path) -> None:
    pytest.importorskip("OpenSSL", reason="TLS needs twisted[tls]")
    key, cert = make_certificate(tmp_path)
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "cert.pem").write_bytes(cert.read_bytes())
    port = free_port()
    out = tmp_path / "out.tsv"
    env = dict(env, OCTO_SECRET="tls-and-secret-0123456789")
    server = start(
        "server", str(books_job(tmp_path)), "-o", str(out),
        "--listen", f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    # A client that trusts another certificate is refused, at once: it is
    # not a transient failure, so it is not retried for its --wait.
    # (It used to name a trust directory that does not exist, and "refused"
    # was the traceback of a client that could not parse its own --connect.)
    other = tmp_path / "other"
    other.mkdir()
    (other / "cert.pem").write_bytes(make_certificate(other)[1].read_bytes())
    (other / "key.pem").unlink()
    untrusting = octo(
        "client", "--connect", f"tls:localhost:{port}:trustRoots={other}",
        "--wait", "60", env=env, timeout=60,
    )  # fmt: skip
    assert untrusting.returncode == 1, untrusting.stderr
    assert untrusting.stderr == (
        "octo: the server's TLS certificate was refused (certificate verify failed): "
        "trustRoots= must name a directory holding the certificate of the CA that signed "
        "it (or the server's own), and the host name you connect to must be one it names\n"
    )
    client = octo("client", "--connect", f"tls:localhost:{port}:trustRoots={trust}", env=env)
    assert client.returncode == 0, client.stderr
    assert finish(server)[0] == 0
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))


def test_garbage_on_the_port_does_not_disturb_the_job(env: dict, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out.tsv"
    server = start(
        "server", str(books_job(tmp_path)), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "-o", str(out), env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    for junk in (
        b"GET / HTTP/1.0\r\n\r\n",
        b"\xff\xff\xff\xff" + b"x" * 1000,
        b"\x00\x00\x00\x44" + b"y" * 68,
    ):
        with (
            socket.create_connection(("127.0.0.1", port)) as s,
            contextlib.suppress(ConnectionResetError, BrokenPipeError),
        ):
            s.settimeout(10)
            s.sendall(junk)
            while s.recv(4096):  # until the server drops us
                pass
    client = octo("client", f"127.0.0.1:{port}", env=env)
    assert client.returncode == 0, client.stderr
    code, _, err = finish(server)
    assert code == 0
    assert err.count("closing connection from tcp:127.0.0.1") == 3
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))


def test_a_trust_directory_that_does_not_exist_is_a_usage_error(env: dict, tmp_path: Path) -> None:
    env = dict(env, OCTO_SECRET="tls-and-secret-0123456789")
    nowhere = tmp_path / "nowhere"
    r = octo(
        "client", "--connect", f"tls:localhost:{free_port()}:trustRoots={nowhere}",
        "--wait", "1", env=env, timeout=60,
    )  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    assert str(nowhere) in r.stderr
    assert r.returncode == 2, r.stderr


# Which servers need a configured secret


LOCAL = [
    "tcp:0:interface=127.0.0.1",
    "tcp:0:interface=127.0.0.5",  # all of 127.0.0.0/8 is loopback
    "tcp:0:127.0.0.1",  # the interface as the second positional argument
    "tcp:0:interface=127.0.0.1:backlog=5",
    "tcp:0:backlog=5:interface=127.0.0.1",
    "tcp:interface=127.0.0.1:0",
    "tcp:0:interface=0.0.0.0:interface=127.0.0.1",  # the last one counts, as for Twisted
    "tcp6:0:interface=\\:\\:1",  # ::1, escaped as endpoint strings need
    "tcp:0:interface=[\\:\\:1]",
    "tcp:0:interface=localhost",
    "tcp:0:interface=LOCALHOST",
    "tcp:0:interface=localhost.localdomain",
    "tcp:0:interface=ip6-localhost",
    "unix:/tmp/octo.sock",
    "unix:octo.sock:mode=600",
    "ssl:0:privateKey=key.pem:interface=127.0.0.1",
    "ssl:0:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem",
]
NOT_LOCAL = [
    "tcp:0",  # no interface: every interface
    "tcp:18125",
    "tcp:0:interface=",
    "tcp:0:interface=0.0.0.0",
    "tcp:0:0.0.0.0",
    "tcp:0:interface=127.0.0.1:interface=0.0.0.0",
    "tcp:0:interface=192.168.1.10",
    "tcp:0:interface=128.0.0.1",
    "tcp:0:interface=127.1",  # not an address ipaddress accepts: not trusted to be loopback
    "tcp:0:interface=127.0.0.1.example.org",  # a host name that only starts like one
    "tcp:0:interface=example.org",
    "tcp:0:interface=my-laptop",
    "tcp6:0",
    "tcp6:0:interface=\\:\\:",  # ::, every interface
    "tcp:0:interface=[::1]",  # unescaped colons: interface "[", not ::1
    "tcp:0:interface=::1",
    "tcp6:0:interface=\\:\\:ffff\\:127.0.0.1",  # IPv4-mapped: not counted as loopback
    "ssl:0:privateKey=key.pem",
    "ssl:0:interface=0.0.0.0:privateKey=key.pem",
    "systemd:domain=INET:index=0",  # a socket from elsewhere: who knows where it listens
]


@pytest.mark.parametrize("description", LOCAL)
def test_local_servers(description: str) -> None:
    assert server_is_local(description)


@pytest.mark.parametrize("description", NOT_LOCAL)
def test_servers_reachable_from_other_machines(description: str) -> None:
    assert not server_is_local(description)


def bound_interface(description: str) -> str | None:
    """The interface Twisted's server endpoint would bind; C{None} if it refuses the string."""
    try:
        return serverFromString(reactor, description)._interface
    except (ValueError, TypeError):  # octo server refuses it too (check_server_endpoint)
        return None


@pytest.mark.parametrize(
    "description",
    [
        d
        for d in LOCAL + NOT_LOCAL
        if d.startswith(("tcp:", "tcp6:")) and bound_interface(d) is not None
    ],
)
def test_local_means_what_twisted_binds_is_loopback(description: str) -> None:
    """server_is_local reads the string as Twisted does: the interface it would bind."""
    import ipaddress

    interface = bound_interface(description)
    assert interface is not None
    try:
        bound_loopback = ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        names = {"localhost", "localhost.localdomain", "ip6-localhost"}
        bound_loopback = interface.lower() in names
    assert server_is_local(description) == bound_loopback, interface


REFUSAL = (
    "octo: refusing to listen on {listen} without a configured secret: any machine that can "
    "reach it could run code here. Set OCTO_SECRET or pass --secret-file PATH (the same on the "
    "server and every client), or listen on 127.0.0.1 only\n"
)


@pytest.mark.parametrize("transport_name", ["tcp", "http", "ssh"])
@pytest.mark.parametrize("where", ["tcp:{port}:interface=0.0.0.0", "tcp:{port}"])
def test_a_server_on_every_interface_without_a_secret_is_refused(
    env: dict, tmp_path: Path, transport_name: str, where: str
) -> None:
    """(The SSH server needs no secret with --authorized-keys: test_ssh.py has that.)"""
    port = free_port()
    listen = where.format(port=port)
    script = job(tmp_path, "source = {1: 'a'}\nmapfn = lambda k, v: [(v, 1)]\nreducefn = len\n")
    r = octo("server", str(script), "--transport", transport_name, "--listen", listen, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr == REFUSAL.format(listen=listen)
    # Nothing was served, and no secret was made up for it.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not (Path(env["XDG_CONFIG_HOME"]) / "octotwist" / "secret").exists()

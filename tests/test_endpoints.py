"""
Endpoint strings pick how bytes move: Unix sockets and TLS work with the TCP
transport unchanged, because it hands its strings to Twisted.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import time
from pathlib import Path

import pytest
from conftest import BOOKS, finish, free_port, octo, parse_tsv, start, wait_for_port, word_count
from test_end_to_end import books_job


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
    # A client that does not trust the certificate is refused; it is not a
    # transient failure, but the client cannot tell, so bound its retries.
    untrusting = octo(
        "client", "--connect", f"tls:localhost:{port}:trustRoots={tmp_path / 'nowhere'}",
        "--wait", "1", env=env, timeout=60,
    )  # fmt: skip
    assert untrusting.returncode != 0
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

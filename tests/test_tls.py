"""
TLS on the tcp transport: an ssl: client endpoint that would check nothing
about the server is refused unless the user says --insecure-tls; one that
checks the certificate and the name works; either way the shared secret
still seals every frame.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import BOOKS, finish, free_port, octo, parse_tsv, start, wait_for_port, word_count
from test_end_to_end import books_job
from test_endpoints import make_certificate

SECRET = "tls-test-secret-long-enough"


def test_an_ssl_client_that_checks_nothing_is_refused_unless_asked_for(
    env: dict, tmp_path: Path
) -> None:
    pytest.importorskip("OpenSSL", reason="TLS needs twisted[tls]")
    key, cert = make_certificate(tmp_path)
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "cert.pem").write_bytes(cert.read_bytes())
    port = free_port()
    out = tmp_path / "out.tsv"
    env = dict(env, OCTO_SECRET=SECRET)
    server = start(
        "server", str(books_job(tmp_path)), "-o", str(out),
        "--listen", f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    blind = octo("client", "--connect", f"ssl:localhost:{port}", env=env, timeout=30)
    assert blind.returncode == 2
    assert "would not check the server's certificate or name" in blind.stderr
    assert "--insecure-tls" in blind.stderr and "tls:HOST:PORT:trustRoots=DIR" in blind.stderr
    checked = f"ssl:localhost:{port}:hostname=localhost:caCertsDir={trust}"
    first = start("client", "--connect", checked, env=env)
    second = start("client", "--connect", f"ssl:localhost:{port}", "--insecure-tls", env=env)
    for client in (first, second):
        code, _, err = finish(client)
        assert code == 0, err
    code, _, err = finish(server)
    assert code == 0, err
    assert err.count("joined from") == 2
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))


@pytest.mark.parametrize(
    ("trust", "why"),
    [
        ("a file that is no certificate", "Error: [('PEM routines', '', 'no start line')]"),
        ("a certificate file that does not exist", "No such file or directory"),
    ],
)
def test_a_trust_root_that_cannot_be_used_is_a_usage_error(
    env: dict, tmp_path: Path, trust: str, why: str
) -> None:
    """Named with the reason and exit 2, before any connection; no traceback."""
    roots = tmp_path / "roots"
    roots.mkdir()
    if "no certificate" in trust:
        (roots / "junk.pem").write_text("not a certificate\n")
        connect = f"tls:localhost:{free_port()}:trustRoots={roots}"
    else:
        connect = f"tls:localhost:{free_port()}:trustRoots={roots}:certificate={roots}/none.pem"
    env = dict(env, OCTO_SECRET="tls-and-secret-0123456789")
    r = octo("client", "--connect", connect, "--wait", "1", env=env, timeout=60)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.startswith(f"octo: cannot connect to {connect!r}: "), r.stderr
    assert why in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_tls_server_hints_a_tls_client_and_a_refused_certificate_is_final(
    env: dict, tmp_path: Path
) -> None:
    """
    The server's hint is a tls: client command; a worker that trusts another
    certificate stops at once with what to fix, and one that speaks plain
    TCP to the TLS port gives up within its --wait.
    """
    pytest.importorskip("OpenSSL", reason="TLS needs twisted[tls]")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    key, cert = make_certificate(ours)
    make_certificate(theirs)
    wrong = tmp_path / "wrong-trust"
    wrong.mkdir()
    (wrong / "cert.pem").write_bytes((theirs / "cert.pem").read_bytes())
    port = free_port()
    env = dict(env, OCTO_SECRET=SECRET)
    server = start(
        "server", str(books_job(tmp_path)),
        "--listen", f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    refused = octo("client", "--connect", f"tls:localhost:{port}:trustRoots={wrong}",
                   "--wait", "60", env=env, timeout=60)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "octo: the server's TLS certificate was refused (certificate verify failed): "
    ), refused.stderr
    assert "retrying" not in refused.stderr  # final, not retried for 60 s
    started = time.monotonic()
    plain = octo("client", f"127.0.0.1:{port}", "--wait", "5", env=env, timeout=60)
    assert plain.returncode == 1
    assert "gave up" in plain.stderr, plain.stderr
    assert time.monotonic() - started < 14, "the plain client did not keep to --wait 5"
    server.terminate()
    _, _, err = finish(server)
    assert (
        f"start workers with: octo client --connect tls:127.0.0.1:{port}:trustRoots=DIR " in err
    ), err

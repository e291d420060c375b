"""
Weak secrets are refused (security review, issue 12, finding 6): the client
proves itself first, so a fake server gets one HMAC of the secret and can
guess a short one offline.  Every front end (C{octo server}, C{octo client},
C{twistd octo}) refuses a secret shorter than 16 characters and a secret file
that group or others may read, with a message that says what to do; C{octo
secret} makes a good one.  Real C{octo} processes throughout, after the
rules themselves, checked directly (the quick tests that kill the mutants
of C{tests/mutation.py} that skip them).
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BOOKS, finish, free_port, octo, parse_tsv, start, wait_for_port, word_count
from test_end_to_end import books_job, start_twistd

from octotwist import auth
from octotwist.auth import MIN_SECRET_LENGTH
from octotwist.errors import UsageError

#: Exactly long enough, and one character too short.
LONG_ENOUGH = "sixteen-chars-ok"
TOO_SHORT = LONG_ENOUGH[:-1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secret_file(tmp_path: Path, text: str, file_mode: int, name: str = "octo-secret") -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(file_mode)  # whatever the umask
    return path


def assert_refused(r: object, *needles: str) -> None:
    """Exit status 2, every needle in the message, no traceback, nothing served."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)
    assert "Traceback" not in r.stderr and "serving job" not in r.stderr


def test_the_limit_is_sixteen_characters() -> None:
    assert MIN_SECRET_LENGTH == 16 and len(LONG_ENOUGH) == 16


def test_the_rules_refuse_a_short_secret_and_an_open_file(tmp_path: Path) -> None:
    assert auth.check_secret(LONG_ENOUGH.encode(), "here") == LONG_ENOUGH.encode()
    for short in (TOO_SHORT, "", "x"):
        with pytest.raises(UsageError, match="too short"):
            auth.check_secret(short.encode(), "here")
    # Characters, not bytes: fifteen two-byte characters are still too few.
    with pytest.raises(UsageError, match="15 characters"):
        auth.check_secret(("é" * 15).encode(), "here")
    private = secret_file(tmp_path, LONG_ENOUGH, 0o600, "private")
    assert auth.configured_secret(str(private)) == LONG_ENOUGH.encode()
    for file_mode in (0o644, 0o640, 0o604, 0o620, 0o660):
        path = secret_file(tmp_path, LONG_ENOUGH, file_mode, f"open-{file_mode:o}")
        with pytest.raises(UsageError, match=f"mode {file_mode:04o}"):
            auth.configured_secret(str(path))


def test_octo_secret_prints_a_new_random_secret_each_time(env: dict) -> None:
    first, second = octo("secret", env=env, timeout=30), octo("secret", env=env, timeout=30)
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    a, b = first.stdout.strip(), second.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", a) and a != b


def test_octo_secret_o_writes_a_private_file_and_never_overwrites_one(
    env: dict, tmp_path: Path
) -> None:
    path = tmp_path / "octo-secret"
    r = octo("secret", "-o", str(path), env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert mode(path) == 0o600 and r.stdout == ""  # the secret is not echoed
    assert f"--secret-file {path}" in r.stderr
    written = path.read_text()
    assert len(written.strip()) >= 43
    again = octo("secret", "-o", str(path), env=env, timeout=30)
    assert again.returncode == 2 and "exists already" in again.stderr
    assert path.read_text() == written


def test_octo_secret_warns_when_its_output_file_is_open_to_others(
    env: dict, tmp_path: Path
) -> None:
    path = secret_file(tmp_path, "", 0o644)
    with open(path, "w") as out:  # octo secret > octo-secret, with umask 022
        r = subprocess.run(
            [sys.executable, "-m", "octotwist", "secret"],
            env=env, stdout=out, stderr=subprocess.PIPE, text=True, timeout=30,
        )  # fmt: skip
    assert r.returncode == 0 and len(path.read_text().strip()) == 43
    assert "chmod 600" in r.stderr and "octo secret -o FILE" in r.stderr


def test_the_help_lists_octo_secret(env: dict) -> None:
    r = octo("--help", env=env, timeout=30)
    assert r.returncode == 0
    commands = (
        "run|server|client|serve|submit|jobs|cancel|results|secret|transports|engines|version"
    )
    assert commands in "".join(r.stdout.split())  # (the help may wrap it)
    assert re.search(r"^\s+secret\s+Make a new shared secret", r.stdout, re.M)


def test_a_file_from_octo_secret_runs_a_job(env: dict, tmp_path: Path) -> None:
    path = tmp_path / "octo-secret"
    assert octo("secret", "-o", str(path), env=env, timeout=30).returncode == 0
    port, out = free_port(), tmp_path / "out.tsv"
    server = start(
        "server", str(books_job(tmp_path)), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--secret-file", str(path), "-o", str(out), env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    client = octo("client", f"127.0.0.1:{port}", "--secret-file", str(path), env=env)
    assert client.returncode == 0, client.stderr
    assert finish(server)[0] == 0
    assert parse_tsv(out.read_text()) == word_count(sorted(BOOKS.glob("*.txt")))


@pytest.mark.parametrize("secret", ["a", "abc", TOO_SHORT])
def test_a_short_octo_secret_is_refused_by_the_server(
    env: dict, tmp_path: Path, secret: str
) -> None:
    r = octo(
        "server", str(books_job(tmp_path)), "--listen", f"tcp:{free_port()}",
        env=dict(env, OCTO_SECRET=secret), timeout=30,
    )  # fmt: skip
    assert_refused(r, "$OCTO_SECRET is too short", f"{len(secret)} character", "at least 16")
    assert "octo secret -o octo-secret" in r.stderr


def test_a_short_octo_secret_is_refused_by_the_client(env: dict) -> None:
    r = octo(
        "client", f"127.0.0.1:{free_port()}", "--wait", "1",
        env=dict(env, OCTO_SECRET="right-secret"), timeout=30,
    )  # fmt: skip
    assert_refused(r, "$OCTO_SECRET is too short", "octo secret")
    assert "retrying" not in r.stderr  # refused before it tried to connect


def test_a_short_secret_is_refused_by_twistd(env: dict, tmp_path: Path) -> None:
    twistd = start_twistd(books_job(tmp_path), env=dict(env, OCTO_SECRET="a"))
    code, out, err = finish(twistd, timeout=60)
    assert code == 2 and "too short" in out + err, out + err


def test_sixteen_characters_are_enough(env: dict, tmp_path: Path) -> None:
    secret_env = dict(env, OCTO_SECRET=LONG_ENOUGH)
    port, out = free_port(), tmp_path / "out.tsv"
    server = start(
        "server", str(books_job(tmp_path)), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "-o", str(out), env=secret_env,
    )  # fmt: skip
    wait_for_port(port, server)
    client = octo("client", f"127.0.0.1:{port}", env=secret_env)
    assert client.returncode == 0, client.stderr
    assert finish(server)[0] == 0


def test_a_short_secret_file_is_refused(env: dict, tmp_path: Path) -> None:
    path = secret_file(tmp_path, TOO_SHORT, 0o600)
    for command in (["server", str(books_job(tmp_path))], ["client", "--wait", "1"]):
        r = octo(*command, "--secret-file", str(path), env=env, timeout=30)
        assert_refused(r, f"secret file {str(path)!r} is too short", "octo secret -o")


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o620], ids="{:04o}".format)
def test_a_secret_file_open_to_group_or_others_is_refused(
    env: dict, tmp_path: Path, file_mode: int
) -> None:
    path = secret_file(tmp_path, "a-long-enough-secret-0123456789", file_mode)
    for command in (["server", str(books_job(tmp_path))], ["client", "--wait", "1"]):
        r = octo(*command, "--secret-file", str(path), env=env, timeout=30)
        assert_refused(r, str(path), f"mode {file_mode:04o}", f"chmod 600 {path}")
    assert mode(path) == file_mode  # reported, not changed behind the user's back


def test_the_generated_secret_file_is_held_to_the_same_rules(env: dict, tmp_path: Path) -> None:
    default = Path(env["XDG_CONFIG_HOME"]) / "octotwist" / "secret"
    listen = f"tcp:{free_port()}:interface=127.0.0.1"
    script = str(books_job(tmp_path))
    default.parent.mkdir(parents=True)
    secret_file(default.parent, "a-long-enough-secret-0123456789", 0o644, name="secret")
    r = octo("server", script, "--listen", listen, env=env, timeout=30)
    assert_refused(r, str(default), "mode 0644", f"chmod 600 {default}")
    client = octo("client", "--wait", "1", env=env, timeout=30)
    assert_refused(client, f"chmod 600 {default}")

    default.write_text("short\n")
    default.chmod(0o600)
    r = octo("server", script, "--listen", listen, env=env, timeout=30)
    assert_refused(r, f"the secret in {default} is too short", f"rm {default}")


def test_a_secret_file_that_is_a_pipe_is_read_once(env: dict, tmp_path: Path) -> None:
    """C{--secret-file /dev/stdin} (or C{<(pass show octo)}): no mode to check, read once."""
    secret = "a-secret-from-a-password-manager"
    port, out = free_port(), tmp_path / "out.tsv"
    server = start(
        "server", str(books_job(tmp_path)), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "-o", str(out), env=dict(env, OCTO_SECRET=secret),
    )  # fmt: skip
    wait_for_port(port, server)
    client = subprocess.run(
        [sys.executable, "-m", "octotwist", "client", f"127.0.0.1:{port}",
         "--secret-file", "/dev/stdin"],
        input=secret + "\n", env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert client.returncode == 0, client.stderr
    assert finish(server)[0] == 0

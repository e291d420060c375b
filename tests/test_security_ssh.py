"""
The SSH server's credential checkers, called as Conch calls them: a key
logs in only if it is in the authorized_keys file I{and} the signature is
its own over this session's data; the shared secret's password only if it
is this session's proof.  (C{test_ssh.py} has the same refusals over real
connections, where a checker that took any key lets the stranger in as a
worker that then waits on the job; these decide at once, and kill the
mutants of C{tests/mutation.py} that skip a check.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.conch import error as conch_error
from twisted.cred.credentials import SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin

from octotwist_ssh import keys
from octotwist_ssh.channel import client_password
from octotwist_ssh.server import KeyChecker, SecretChecker, SessionProof

USERS = frozenset({"octo"})
SIG_DATA = b"this session's data to sign"
SECRET = b"ssh-checker-secret-0123456789"


@pytest.fixture
def checker(tmp_path: Path) -> tuple[KeyChecker, keys.Key, keys.Key]:
    worker, stranger = keys.generate_ed25519(), keys.generate_ed25519()
    path = tmp_path / "authorized_keys"
    path.write_text(keys.public_line(worker.public(), "worker") + "\n")
    return KeyChecker(keys.AuthorizedKeys(str(path)), USERS), worker, stranger


def offer(key: keys.Key, signer: keys.Key | None, user: bytes = b"octo") -> SSHPrivateKey:
    signature = signer.sign(SIG_DATA) if signer is not None else None
    return SSHPrivateKey(user, key.sshType(), key.public().blob(), SIG_DATA, signature)


def test_an_authorized_key_that_signs_logs_in(checker: tuple) -> None:
    check, worker, _ = checker
    assert check.requestAvatarId(offer(worker, worker)) == "octo"
    with pytest.raises(conch_error.ValidPublicKey):  # "yes, now prove you hold it"
        check.requestAvatarId(offer(worker, None))


def test_a_key_not_in_authorized_keys_is_refused_even_with_its_own_signature(
    checker: tuple,
) -> None:
    check, _, stranger = checker
    with pytest.raises(UnauthorizedLogin, match="is not in"):
        check.requestAvatarId(offer(stranger, stranger))
    with pytest.raises(UnauthorizedLogin, match="is not in"):
        check.requestAvatarId(offer(stranger, None))


def test_an_authorized_key_signed_by_another_is_refused(checker: tuple) -> None:
    check, worker, stranger = checker
    with pytest.raises(UnauthorizedLogin, match="bad signature"):
        check.requestAvatarId(offer(worker, stranger))


def test_another_user_is_refused_whatever_the_key(checker: tuple) -> None:
    check, worker, _ = checker
    with pytest.raises(UnauthorizedLogin, match="unknown user"):
        check.requestAvatarId(offer(worker, worker, user=b"root"))


def test_the_password_must_be_this_sessions_proof_of_the_secret() -> None:
    check = SecretChecker(SECRET, USERS)
    session = b"session-id-1"
    good = client_password(SECRET, session)
    assert check.requestAvatarId(SessionProof(b"octo", good, session)) == "octo"
    for password in (
        client_password(b"another-secret-0123456789", session),
        client_password(SECRET, b"another session"),
        good[:-1],
        b"",
    ):
        with pytest.raises(UnauthorizedLogin, match="wrong shared secret"):
            check.requestAvatarId(SessionProof(b"octo", password, session))

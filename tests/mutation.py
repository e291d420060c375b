"""
Mutation checks for the security-relevant code: apply each mutant below to
a copy of the tree, run the tests that must catch it, and fail if any
mutant survives.

Why: the security tests assert that an attack fails, and a test that
passes for the wrong reason (it never reaches the check, the check's
refusal looks like any other error) is worse than none.  Each mutant puts
back one hole a reviewer would look for -- an unrestricted unpickler,
decoding before authentication, a skipped HMAC or AEAD check, a secret
check inverted, a limit that never refuses -- and the suite has to notice.

How: for each mutant, the sources (C{octotwist/}, C{plugins/}, C{tests/},
C{examples/}, C{pyproject.toml}) are copied to a temporary directory, one
exact piece of text is replaced (the script stops, loudly, if that text is
not found exactly once: a mutant must not rot silently when the code
changes), and pytest runs that mutant's tests in the copy, with the copy
first on C{PYTHONPATH}, so the test process and everything it starts
(C{octo}, C{twistd}, task processes, transports found by entry point)
import the mutated code.  Before the mutants run, the script checks that
this really is so, and runs the same tests on the unmutated copy (a test
that fails anyway kills nothing).

    python tests/mutation.py              # every mutant
    python tests/mutation.py --list       # their names and what they break
    python tests/mutation.py tcp- auth-   # those whose names start so
    tox -e mutation

A mutant is KILLED when its tests fail, SURVIVED when they pass: a survivor
is a hole the suite would let through, and the fix is a test (docs/developers.md,
"Mutation checks").  The exit status is 0 only if every mutant was killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: What a copy holds: the code, the tests that run against it, the examples
#: they use, and pytest's configuration.
COPIED = ["octotwist", "plugins", "tests", "examples", "pyproject.toml"]
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info", "dropin.cache")
UNIXCRED = "examples/octotwist-unixcred"
#: Seconds one mutant's tests may take before the run counts as broken.
TIMEOUT = 300


@dataclass(frozen=True)
class Edit:
    """Replace C{old}, which must occur exactly once in C{path}, by C{new}."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str
    edits: tuple[Edit, ...]
    #: pytest node ids (or files), relative to the tree's root.
    tests: tuple[str, ...]
    #: Extra environment (OCTO_TRANSPORT, say) and pytest arguments.
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()


def _m(name: str, why: str, edits: list[Edit] | Edit, tests: list[str], **kw) -> Mutant:
    edits = [edits] if isinstance(edits, Edit) else edits
    return Mutant(name, why, tuple(edits), tuple(tests), **kw)


CODEC = "octotwist/codec.py"
SECURE = "octotwist/secure.py"
HANDSHAKE = "octotwist/handshake.py"
AUTH = "octotwist/auth.py"
FRAMING = "octotwist/framing.py"
STREAMS = "octotwist/streams.py"
FLOW = "octotwist/flow.py"
TCP = "plugins/octotwist_tcp/protocol.py"
HTTP_WIRE = "plugins/octotwist_http/wire.py"
HTTP_SERVER = "plugins/octotwist_http/server.py"
SSH_SERVER = "plugins/octotwist_ssh/server.py"
SSH_KEYS = "plugins/octotwist_ssh/keys.py"

#: The small frame's check and decryption, and what GCM's tag guards: its
#: counter mode alone, which decrypts anything (GCM's keystream starts at
#: counter 2).
_DECRYPT = (
    " " * 16 + "plain = self._aead.decrypt(nonce, memoryview(frame)[_LENGTH.size :], frame[:4])"
)
_CTR = (
    "Cipher(algorithms.AES(self._key), modes.CTR(nonce + bytes([0, 0, 0, 2])))"
    ".decryptor().update(memoryview(frame)[_LENGTH.size : -_TAG])"
)

T_TCP = "tests/test_tcp_protocol.py::"
T_CHANNEL = "tests/test_security_channel.py::"
T_ATTACKS = "tests/test_codec_attacks.py::"
T_SECRETS = "tests/test_secrets.py::"
T_HTTP = "tests/test_http.py::"
T_SSH = "tests/test_ssh.py::"
T_STATUS = "tests/test_status_security.py::"
T_SLOW_WORKER = (
    "tests/test_conformance.py::test_a_slow_worker_does_not_make_the_server_hold_its_downloads"
)
T_LAUNCH = "tests/test_launch.py::"
T_LIFELINE = "tests/test_lifeline.py::"
T_TASK_STREAM = (
    "tests/test_browser.py::"
    "test_the_task_stream_draws_each_attempt_and_shows_a_failure_when_clicked"
)
T_STATUS_FOLLOWS = "tests/test_status.py::test_status_page_follows_a_running_job"

MUTANTS: list[Mutant] = [
    # -- codec.py: control messages are data, never pickles -----------------
    _m(
        "codec-header-pickle",
        "a message's header is unpickled instead of read as msgpack",
        Edit(
            CODEC,
            "        items = msgpack.unpackb(header, raw=False, use_list=True, "
            "strict_map_key=True)",
            "        items = pickle.loads(header)",
        ),
        [
            T_ATTACKS + "test_an_evil_pickle_from_an_authenticated_peer_runs_nothing",
            T_CHANNEL + "test_a_sealed_pickle_is_refused_by_the_codec_and_runs_nothing",
        ],
    ),
    _m(
        "codec-decode-pickle",
        "decode_message (the SSH transport's) is an unrestricted unpickler",
        Edit(
            CODEC,
            "    if len(data) < _HEADER_LENGTH.size:\n",
            "    return pickle.loads(data)\n    if len(data) < _HEADER_LENGTH.size:\n",
        ),
        [
            T_ATTACKS + "test_an_evil_pickle_from_an_authenticated_peer_runs_nothing",
            "tests/test_codec_store.py::test_decode_rejects_anything_but_messages",
        ],
    ),
    _m(
        "codec-unchecked-fields",
        "a message's fields are not checked against their declared types",
        Edit(
            CODEC, "            checked.append(check(value))", "            checked.append(value)"
        ),
        ["tests/test_security_codec.py"],
    ),
    _m(
        "codec-unchecked-payload",
        "the payload's length is not checked against the header's",
        Edit(
            CODEC,
            "    elif type(values[schema.payload]) is not int "
            "or values[schema.payload] != len(payload):",
            "    elif False:",
        ),
        ["tests/test_security_codec.py"],
    ),
    # -- secure.py: every frame after the handshake is sealed ---------------
    _m(
        "secure-no-tag-check",
        "a small frame is decrypted (GCM's counter mode) without its tag checked",
        Edit(
            SECURE,
            _DECRYPT,
            f"                plain = {_CTR}",
        ),
        [T_CHANNEL + "test_a_bit_flipped_anywhere_is_refused"],
    ),
    _m(
        "secure-invalid-tag-ignored",
        "a failed tag check is caught and the frame used anyway (small frames)",
        Edit(
            SECURE,
            _DECRYPT,
            "                try:\n"
            "                    plain = self._aead.decrypt(nonce, memoryview(frame)[4:], "
            "frame[:4])\n"
            "                except InvalidTag:\n"
            f"                    plain = {_CTR}",
        ),
        [T_CHANNEL + "test_a_bit_flipped_anywhere_is_refused"],
    ),
    _m(
        "secure-stream-no-finalize",
        "a large frame is decrypted by the streaming interface, which never checks the tag",
        Edit(
            SECURE,
            "                decryptor.finalize()\n        except InvalidTag:",
            "                pass\n        except InvalidTag:",
        ),
        [T_CHANNEL + "test_a_bit_flipped_anywhere_is_refused"],
    ),
    _m(
        "secure-no-sequence",
        "frames are not numbered (a nonce reused for every frame): replays open",
        [
            Edit(SECURE, "        self.sequence = seq + 1\n        nonce =", "        nonce ="),
            Edit(
                SECURE,
                "        self.sequence = seq + 1\n        return header",
                "        return header",
            ),
        ],
        [T_CHANNEL + "test_replayed_reordered_and_dropped_frames_are_refused"],
    ),
    _m(
        "secure-static-keys",
        "a connection's keys do not depend on its nonces: frames of one open in another",
        Edit(SECURE, "        salt=initiator_nonce + responder_nonce,", "        salt=None,"),
        [T_CHANNEL + "test_a_frame_is_worth_nothing_elsewhere"],
    ),
    _m(
        "secure-one-key",
        "both directions share one key: a frame reflected back to its sender opens",
        Edit(
            SECURE,
            "    return okm[:KEY_SIZE], okm[KEY_SIZE:]",
            "    return okm[:KEY_SIZE], okm[:KEY_SIZE]",
        ),
        [T_CHANNEL + "test_a_frame_is_worth_nothing_elsewhere"],
    ),
    # -- auth.py and handshake.py: the shared secret's proofs ---------------
    _m(
        "auth-proof-always-true",
        "check_proof accepts any proof",
        Edit(
            AUTH,
            "    return hmac.compare_digest(proof(secret, role, challenge, response_nonce), got)",
            "    return True",
        ),
        [T_TCP + "test_wrong_secret_is_dropped_before_anything_is_decoded"],
    ),
    _m(
        "auth-proof-inverted",
        "check_proof accepts every proof but the right one",
        Edit(
            AUTH,
            "    return hmac.compare_digest(proof(secret, role, challenge, response_nonce), got)",
            "    return not hmac.compare_digest("
            "proof(secret, role, challenge, response_nonce), got)",
        ),
        [T_TCP + "test_wrong_secret_is_dropped_before_anything_is_decoded"],
    ),
    _m(
        "handshake-server-skips-proof",
        "the server does not check the client's proof",
        Edit(
            HANDSHAKE,
            "        if not auth.check_proof(self._secret, role, self._nonce, client_nonce, got):",
            "        if False:",
        ),
        [T_TCP + "test_wrong_secret_is_dropped_before_anything_is_decoded"],
    ),
    _m(
        "handshake-client-skips-proof",
        "the client does not check the server's proof (a fake server gets the worker)",
        Edit(
            HANDSHAKE,
            "        if not auth.check_proof("
            "self._secret, role, self._nonce, server_nonce, frame):",
            "        if False:",
        ),
        [
            T_TCP + "test_client_refuses_a_server_that_fails_its_proof_and_decodes_nothing",
            "tests/test_security_tcp_client.py",
        ],
    ),
    _m(
        "auth-short-secret",
        "a secret shorter than MIN_SECRET_LENGTH is accepted",
        Edit(AUTH, "    if length >= MIN_SECRET_LENGTH:", "    if True:"),
        [T_SECRETS + "test_the_rules_refuse_a_short_secret_and_an_open_file"],
    ),
    _m(
        "auth-open-secret-file",
        "a secret file that group or others may read is accepted",
        Edit(
            AUTH,
            '    if os.name != "posix" or not stat.S_ISREG(mode) or not mode & 0o077:',
            "    if True:",
        ),
        [T_SECRETS + "test_the_rules_refuse_a_short_secret_and_an_open_file"],
    ),
    _m(
        "auth-secret-file-created-open",
        "a new secret file is created readable by others",
        Edit(
            AUTH,
            "os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)",
            "os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)",
        ),
        [T_SECRETS + "test_octo_secret_o_writes_a_private_file_and_never_overwrites_one"],
    ),
    # -- framing.py and the TCP transport's handshake ----------------------
    _m(
        "framing-no-limit",
        "a frame's announced length is never checked against its limit (tcp, ssh, http)",
        Edit(FRAMING, "            if length > self.max_frame:", "            if False:"),
        [
            T_TCP + "test_big_frame_before_auth_is_refused_without_buffering_it",
            T_HTTP + "test_frame_over_the_limit_and_a_cut_body_are_errors",
            T_SSH + "test_oversized_frame_is_refused_before_it_arrives",
        ],
    ),
    _m(
        "streams-big-frames-before-auth",
        "before the handshake, frames may be as large as after it",
        Edit(STREAMS, "    MAX_LENGTH = handshake.MAX_FRAME\n", "    MAX_LENGTH = MAX_FRAME\n"),
        [T_TCP + "test_big_frame_before_auth_is_refused_without_buffering_it"],
    ),
    _m(
        "streams-unpickle-before-auth",
        "a frame that arrives before the handshake is unpickled (mincemeat's hole)",
        Edit(
            STREAMS,
            "        if self.secure is None:\n            self.handshake_frame(frame)",
            "        if self.secure is None:\n"
            "            try:\n"
            '                __import__("pickle").loads(frame)\n'
            "            except Exception:\n"
            "                pass\n"
            "            self.handshake_frame(frame)",
        ),
        [T_TCP + "test_an_evil_pickle_before_auth_runs_nothing"],
    ),
    _m(
        "streams-message-before-auth",
        "a message in the clear, before the handshake, is decoded and handed to the core",
        Edit(
            STREAMS,
            "        if self.secure is None:\n            self.handshake_frame(frame)",
            "        if self.secure is None:\n"
            "            try:\n"
            '                message = __import__("octotwist.codec").codec.decode_message(frame)\n'
            "            except RemoteProtocolError:\n"
            "                self.handshake_frame(frame)\n"
            "                return\n"
            "            self.handler = self.handler or self.factory.accept(self)\n"
            "            self.handler.message_received(message)\n"
            "            return",
        ),
        [
            T_TCP + "test_anything_but_a_proof_before_auth_is_dropped",
            T_TCP + "test_client_answers_nothing_but_a_challenge",
        ],
    ),
    _m(
        "tcp-failed-proof-keeps-connection",
        "a wrong proof is logged but the connection stays open for more tries",
        Edit(
            TCP,
            "            reply, channel = self._handshake.receive(frame)\n"
            "        except RemoteProtocolError as e:\n"
            "            self.refuse(str(e))",
            "            reply, channel = self._handshake.receive(frame)\n"
            "        except RemoteProtocolError:",
        ),
        [T_TCP + "test_wrong_secret_is_dropped_before_anything_is_decoded"],
    ),
    # -- endpoints.py: which servers need an explicit secret ---------------
    _m(
        "endpoints-always-local",
        "server_is_local says yes to every endpoint (a server on every interface "
        "would run on a generated secret, and serve its status page without a token)",
        Edit(
            "octotwist/endpoints.py",
            '    if prefix == "unix":\n        return True\n',
            "    return True\n",
        ),
        ["tests/test_endpoints.py::test_servers_reachable_from_other_machines"],
    ),
    _m(
        "endpoints-any-interface-local",
        "a TCP port counts as local whatever interface it binds",
        Edit(
            "octotwist/endpoints.py",
            "        return bool(interface) and is_loopback_host(interface)",
            "        return True",
        ),
        [
            "tests/test_endpoints.py::test_servers_reachable_from_other_machines",
            "tests/test_endpoints.py::test_a_server_on_every_interface_without_a_secret_is_refused",
        ],
    ),
    # -- limits.py ----------------------------------------------------------
    _m(
        "limits-never-refuse",
        "PreAuthLimit gives every connection a slot (strangers can lock workers out)",
        [
            Edit(
                "octotwist/limits.py",
                "        if self.pending[key] >= self.per_address:",
                "        if False:",
            ),
            Edit(
                "octotwist/limits.py",
                "        elif self.count >= self.total:",
                "        elif False:",
            ),
        ],
        ["tests/test_security_limits.py"],
    ),
    # -- status.py ----------------------------------------------------------
    _m(
        "status-no-token",
        "the status page serves anyone, token or not",
        Edit(
            "octotwist/status.py",
            "        if self.token is not None and not self._token_ok(request):",
            "        if False:",
        ),
        [T_STATUS + "test_a_page_beyond_loopback_needs_the_token"],
    ),
    _m(
        "status-any-token",
        "any ?token= value is taken (and earns the cookie)",
        Edit(
            "octotwist/status.py",
            "            if not hmac.compare_digest(given[-1], expected):",
            "            if False:",
        ),
        [T_STATUS + "test_a_page_beyond_loopback_needs_the_token"],
    ),
    _m(
        "status-any-cookie",
        "any cookie value is taken for the token",
        Edit(
            "octotwist/status.py",
            "        return cookie is not None and hmac.compare_digest(cookie, expected)",
            "        return cookie is not None",
        ),
        [T_STATUS + "test_a_page_beyond_loopback_needs_the_token"],
    ),
    _m(
        "status-any-host",
        "the status page answers to any Host (a DNS rebinding page can read it)",
        Edit(
            "octotwist/status.py",
            "        if host is not None and not self._host_check.accepts(host):",
            "        if False:",
        ),
        [T_STATUS + "test_the_host_header_is_checked"],
    ),
    # -- TLS: an ssl: client endpoint that checks nothing ---------------------
    _m(
        "tcp-blind-tls-allowed",
        "an ssl: client endpoint that checks no certificate is taken without --insecure-tls",
        Edit(
            "plugins/octotwist_tcp/transport.py",
            '    if not args or str(args[0]).lower() != "ssl" or "hostname" in kwargs or insecure:',
            "    if True:",
        ),
        ["tests/test_tls.py"],
    ),
    # -- the HTTP transport -------------------------------------------------
    _m(
        "http-wrong-secret-accepted",
        "a session is opened without checking the client's proof",
        Edit(
            HTTP_SERVER,
            "        if not hmac.compare_digest(expected, request.proof):",
            "        if False:",
        ),
        [T_HTTP + "test_requests_without_a_valid_token_get_401_before_their_body"],
    ),
    _m(
        "http-request-mac-skipped",
        "a request within a session is served without checking its MAC",
        Edit(HTTP_WIRE, "    return hmac.compare_digest(expected, token.mac)", "    return True"),
        [
            T_HTTP + "test_request_tokens_bind_method_target_and_sequence",
            T_HTTP + "test_requests_without_a_valid_token_get_401_before_their_body",
        ],
    ),
    _m(
        "http-request-mac-unchecked-by-server",
        "the server never calls check_request",
        Edit(
            HTTP_SERVER,
            "        if not wire.check_request(session.key, method, target, token):",
            "        if False:",
        ),
        [T_HTTP + "test_requests_without_a_valid_token_get_401_before_their_body"],
    ),
    _m(
        "http-replay-accepted",
        "a request's sequence number may be used again (a recorded request replays)",
        Edit(HTTP_SERVER, "        if not session.replay.accept(token.seq):", "        if False:"),
        [T_HTTP + "test_requests_without_a_valid_token_get_401_before_their_body"],
    ),
    _m(
        "http-challenge-unchecked",
        "a session request's challenge is not checked (forged, expired, reused)",
        Edit(
            HTTP_SERVER,
            "        problem = self.challenges.problem(request.challenge, now)",
            "        problem = None",
        ),
        ["tests/test_security_http.py"],
    ),
    _m(
        "http-client-skips-server-proof",
        "the HTTP client does not check the server's proof (a fake server gets the worker)",
        Edit(
            "plugins/octotwist_http/client.py",
            "        if not hmac.compare_digest(expected.encode(), proof.encode()):",
            "        if False:",
        ),
        ["tests/test_security_http_client.py"],
    ),
    _m(
        "http-follow-on-poll-rewinds",
        "a follow-on poll is answered from its ack, as a plain one (every frame crosses twice)",
        Edit(HTTP_SERVER, "        if not follow:", "        if True:"),
        [T_HTTP + "test_a_follow_on_poll_carries_on_where_the_stream_ended"],
    ),
    _m(
        "silent-workers-tasks-wait-for-the-bar",
        "a silent worker's task gets a backup copy only after --backup-after, as a slow one",
        Edit("octotwist/scheduler.py", "        return stranded or best", "        return best"),
        [
            "tests/test_scheduler.py::test_a_suspect_workers_task_gets_a_backup_copy_as_soon_as_others_are_idle"
        ],
    ),
    # -- where a worker is --------------------------------------------------
    _m(
        "any-address-is-this-machine",
        "a worker in another network namespace (our boot id) gets its inputs uncompressed",
        Edit(
            "octotwist/machine.py",
            "        return False\n    return True",
            "        return True\n    return True",
        ),
        ["tests/test_server_inputs.py"],
    ),
    # -- the SSH transport ----------------------------------------------------
    _m(
        "ssh-any-password",
        "SecretChecker takes any password for the shared secret's proof",
        Edit(
            SSH_SERVER,
            "        if not hmac.compare_digest(expected, credentials.password):",
            "        if False:",
        ),
        [
            "tests/test_security_ssh.py::test_the_password_must_be_this_sessions_proof_of_the_secret",
            T_SSH + "test_wrong_secret_is_refused",
        ],
    ),
    _m(
        "ssh-any-key",
        "KeyChecker takes any public key, authorized or not",
        Edit(SSH_SERVER, "        if key not in self._authorized:", "        if False:"),
        [
            # The real connection's test lets the stranger in as a worker
            # that waits on its job: it fails, but only after minutes.
            "tests/test_security_ssh.py::"
            "test_a_key_not_in_authorized_keys_is_refused_even_with_its_own_signature",
            T_SSH + "test_wrong_key_is_refused_and_the_server_serves_others",
        ],
    ),
    _m(
        "ssh-unverified-signature",
        "KeyChecker does not verify the signature (anyone who knows a public key logs in)",
        Edit(
            SSH_SERVER,
            "        if not key.verify(credentials.signature, credentials.sigData):",
            "        if False:",
        ),
        [T_SSH + "test_a_signature_by_another_key_is_refused"],
    ),
    _m(
        "ssh-client-any-pinned-key",
        "the SSH client takes any host key, whatever --host-key-fingerprint pins",
        Edit(SSH_KEYS, "    if fp in allowed:\n        return\n", "    return\n"),
        [T_SSH + "test_changed_host_key_is_refused_with_how_to_trust_it"],
    ),
    _m(
        "ssh-client-any-known-host",
        "the SSH client takes any host key a known_hosts file names the host with",
        Edit(SSH_KEYS, "            if listed.blob() == key.blob():\n", "            if True:\n"),
        [T_SSH + "test_changed_host_key_is_refused_with_how_to_trust_it"],
    ),
    _m(
        "ssh-client-skips-server-hello-proof",
        "with no host key pinned, the SSH client takes a server that cannot prove the secret",
        Edit(
            "plugins/octotwist_ssh/client.py",
            "            if not hmac.compare_digest(frame[len(MAGIC) :], expected):",
            "            if False:",
        ),
        [T_SSH + "test_unknown_host_is_refused_without_hanging"],
    ),
    # -- the example transport -----------------------------------------------
    _m(
        "aggregate-partials-counted-again",
        "combinefn = reducefn = aggregate.count counts the map tasks' counts",
        Edit(
            "octotwist/shuffle.py",
            "partials=combinefn is reducefn",
            "partials=False",
        ),
        ["tests/test_aggregate.py"],
    ),
    _m(
        "aggregate-error-names-no-key",
        "an aggregation that raises does not say which key it failed on",
        Edit(
            "octotwist/shuffle.py",
            "            where[0] = k\n            each(",
            "            each(",
        ),
        ["tests/test_aggregate.py"],
    ),
    _m(
        "streams-pre-auth-frames-unlimited-tcp",
        "the tcp server buffers a stranger's 48 MiB frame before the handshake",
        Edit(STREAMS, "    MAX_LENGTH = handshake.MAX_FRAME\n", "    MAX_LENGTH = 2**30\n"),
        ["tests/test_conformance.py::test_a_stranger_cannot_make_the_server_hold_a_large_message"],
        args=("--octo-transport", "tcp"),
    ),
    _m(
        "streams-pre-auth-frames-unlimited-unixcred",
        "a transport on the stream base buffers a stranger's frame before it authenticated",
        Edit(STREAMS, "    MAX_LENGTH = handshake.MAX_FRAME\n", "    MAX_LENGTH = 2**30\n"),
        [
            UNIXCRED + "/tests/test_conformance.py::"
            "test_a_stranger_cannot_make_the_server_hold_a_large_message"
        ],
        args=("--octo-transport", "unixcred"),
    ),
    _m(
        "flow-never-waits-tcp",
        "a slow worker makes the tcp server queue every input it was given",
        Edit(
            FLOW,
            "        if not self.paused:\n            return succeed",
            "        if True:\n            return succeed",
        ),
        [T_SLOW_WORKER],
        args=("--octo-transport", "tcp"),
    ),
    _m(
        "flow-never-waits-http",
        "a slow worker makes the http server queue every input it was given",
        Edit(
            FLOW,
            "        if not self.paused:\n            return succeed",
            "        if True:\n            return succeed",
        ),
        [T_SLOW_WORKER],
        args=("--octo-transport", "http"),
    ),
    _m(
        "server-map-inputs-made-at-once",
        "the server makes every map input it assigns at once, however slowly its worker reads",
        Edit(
            "octotwist/server.py",
            "blobs = self._lazy_map_input(task, keys, session)",
            "blobs = list(self._lazy_map_input(task, keys, session))",
        ),
        [T_SLOW_WORKER],
        args=("--octo-transport", "tcp"),
    ),
    # -- the status page's task stream -----------------------------------------
    _m(
        "timeline-failures-drawn-as-successes",
        "the task stream records a failed attempt as one that ended well",
        Edit(
            "octotwist/server.py",
            '            "failed",\n            key=msg.key,',
            '            "ok",\n            key=msg.key,',
        ),
        [T_TASK_STREAM],
    ),
    _m(
        "timeline-since-ignored",
        "status.json?since=N and each event resend every attempt, not those since N",
        Edit("octotwist/timeline.py", "start = max(since - first, 0)", "start = 0"),
        [T_STATUS_FOLLOWS],
    ),
    # -- workers started over SSH (--hosts) --------------------------------------
    _m(
        "hosts-host-keys-accepted-unseen",
        "the launcher's ssh accepts a host key it has never seen",
        Edit("octotwist/launcher.py", '"StrictHostKeyChecking=yes"', '"StrictHostKeyChecking=no"'),
        [T_LAUNCH + "test_an_unknown_host_key_is_refused_with_its_fingerprint"],
    ),
    _m(
        "hosts-conch-host-keys-accepted-unseen",
        "the launcher's Conch client (no ssh program) accepts a host key it has never seen",
        Edit(
            "octotwist/conch_command.py",
            "            if any(self.hasHostKey(name, key) for name in names):",
            "            if True:",
        ),
        [T_LAUNCH + "test_hosts_are_reached_with_conch_where_there_is_no_ssh"],
    ),
    _m(
        "hosts-secret-in-environment",
        "the launcher hands the secret to ssh in its environment, where a listing shows it",
        Edit(
            "octotwist/launcher.py",
            "ssh, argv[0], argv, env=dict(os.environ),",
            "ssh, argv[0], argv, env={**os.environ, 'OCTO_SECRET': self._secret.decode()},",
        ),
        [T_LAUNCH + "test_the_secret_is_on_no_command_line_and_in_no_environment"],
    ),
    _m(
        "hosts-no-lifeline",
        "a worker started over SSH does not stop when its standard input closes",
        Edit(
            "octotwist/lifeline.py",
            "    StandardIO(_Lifeline(closed), stdin=fd, stdout=devnull, reactor=reactor)",
            "    pass",
        ),
        [T_LIFELINE + "test_a_worker_retrying_an_absent_server_stops_when_its_stdin_closes"],
    ),
    _m(
        "worker-stop-taken-for-a-failed-attempt",
        "a worker stopped mid-connection-attempt retries, outliving whoever stopped it",
        Edit(
            "octotwist/client.py",
            "        if cancelled:\n            raise defer.CancelledError() from None\n",
            "",
        ),
        [T_LIFELINE + "test_a_worker_mid_connection_attempt_stops_when_its_stdin_closes"],
    ),
    _m(
        "unixcred-any-uid",
        "the unixcred server does not check the peer's user id",
        Edit(
            UNIXCRED + "/octotwist_unixcred/transport.py",
            "        if self.uid not in self.allowed:",
            "        if False:",
        ),
        [UNIXCRED + "/tests/test_conformance.py::test_bad_credentials_are_refused"],
        args=("--octo-transport", "unixcred"),
    ),
]


def copy_tree(destination: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=_IGNORED, symlinks=True)
        else:
            shutil.copy2(source, destination / name)


def check_edit(tree: Path, mutant: Mutant, edit: Edit) -> str:
    """
    The text of the file C{edit} changes, once sure it can.

    @raise SystemExit: the text to replace is not there exactly once: the
        code changed under the mutant, which must be brought up to date.
    """
    text = (tree / edit.path).read_text()
    count = text.count(edit.old)
    if count != 1:
        raise SystemExit(
            f"mutation.py: mutant {mutant.name}: the text to replace occurs {count} times "
            f"in {edit.path}, not once; update the mutant along with the code:\n{edit.old}"
        )
    return text


def apply(tree: Path, mutant: Mutant) -> None:
    """Make the mutant's edits in C{tree} (@raise SystemExit: see L{check_edit})."""
    for edit in mutant.edits:
        text = check_edit(tree, mutant, edit)
        (tree / edit.path).write_text(text.replace(edit.old, edit.new))


def environment(tree: Path, extra: dict[str, str]) -> dict[str, str]:
    """The copy first on the path, for pytest and every process it starts."""
    paths = [str(tree), str(tree / "plugins"), str(tree / UNIXCRED)]
    env = dict(os.environ)
    # Unset, OCTO_TRANSPORT deselects nothing (conftest.py): each mutant's
    # tests run whatever transport they are about.
    env.pop("OCTO_TRANSPORT", None)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


#: Run in a fresh interpreter, from another directory, as C{octo} and
#: C{twistd} run: every module the mutants touch, and the transports the
#: entry points name, must come from the copy.
_PROBE = """
import importlib, importlib.metadata as md, sys
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
import twisted.plugins
names = ["octotwist", "octotwist.cli", "octotwist.tap", "octotwist.testing.plugin"]
names += [ep.value for ep in md.entry_points(group="octotwist")]
for name in names:
    print(importlib.import_module(name).__file__)
makers = [m for m in getPlugins(IServiceMaker, twisted.plugins) if m.tapname == "octo"]
for m in makers:
    print(importlib.import_module(m.module).__file__)
if not makers:
    print("no twistd plugin named octo")
"""


def check_imports(tree: Path) -> None:
    """@raise SystemExit: something would import the real tree, not the copy."""
    with tempfile.TemporaryDirectory() as elsewhere:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=environment(tree, {}),
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=120,
        )
    files = result.stdout.split()
    stray = [f for f in files if not Path(f).resolve().is_relative_to(tree.resolve())]
    if result.returncode or stray or len(files) < 5:
        raise SystemExit(
            "mutation.py: the copy is not what gets imported, so no mutant would be "
            f"tested:\n{result.stdout}{result.stderr}"
        )


def run_tests(
    tree: Path, tests: tuple[str, ...], env: dict[str, str], args: tuple[str, ...], timeout: float
) -> tuple[int | None, str]:
    """
    Run C{tests} in C{tree}: pytest's exit status (C{None} if it ran out of
    time) and what failed.  pytest runs in a process group of its own, so
    that on a timeout the servers and workers its tests started go with it.
    """
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args, *tests]
    proc = subprocess.Popen(
        command,
        cwd=tree,
        env=environment(tree, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, _summary(stdout, stderr)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever a test left running
    return proc.returncode, _summary(stdout, stderr)


def _summary(stdout: str, stderr: str) -> str:
    """What failed and why: pytest's E lines and its short summary, else the end."""
    lines = stdout.splitlines()
    errors = [line for line in lines if line.startswith("E ")][:8]
    marks = [i for i, line in enumerate(lines) if "short test summary info" in line]
    if marks:
        return "\n".join([*errors, *lines[marks[-1] + 1 :]])
    return "\n".join((stdout + stderr).strip().splitlines()[-15:])


def verdict(code: int | None) -> str:
    # 1: tests failed.  0: they passed.  Anything else (a collection error,
    # no tests found, a timeout) says nothing about the mutant.
    return {1: "KILLED", 0: "SURVIVED", None: "TIMEOUT"}.get(code, f"ERROR (pytest exit {code})")


def run(mutants: list[Mutant], timeout: float, baseline: bool, verbose: bool) -> int:
    started = time.monotonic()
    results: list[tuple[Mutant, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="octo-mutation-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        check_imports(clean)
        # Every edit must apply to today's code before anything runs.
        for mutant in mutants:
            for edit in mutant.edits:
                check_edit(clean, mutant, edit)
        if baseline:
            groups: dict[tuple, list[str]] = {}
            for mutant in mutants:
                key = (tuple(sorted(mutant.env.items())), mutant.args)
                groups.setdefault(key, []).extend(
                    t for t in mutant.tests if t not in groups.get(key, [])
                )
            for (env, args), tests in groups.items():
                t0 = time.monotonic()
                code, tail = run_tests(clean, tuple(tests), dict(env), args, timeout * 2)
                took = time.monotonic() - t0
                print(
                    f"baseline: {len(tests)} test ids{' ' + ' '.join(args) if args else ''}, "
                    f"unmutated: {'passed' if code == 0 else f'FAILED ({code})'} in {took:.1f} s",
                    flush=True,
                )
                if code != 0:
                    print(tail)
                    print("mutation.py: the tests fail without any mutant; fix that first")
                    return 2
        for i, mutant in enumerate(mutants):
            tree = Path(tmp) / f"m{i}"
            copy_tree(tree)
            apply(tree, mutant)
            t0 = time.monotonic()
            code, tail = run_tests(tree, mutant.tests, mutant.env, mutant.args, timeout)
            outcome = verdict(code)
            took = time.monotonic() - t0
            results.append((mutant, outcome, took))
            print(f"{outcome:<9} {mutant.name:<38} {took:6.1f} s  {mutant.why}", flush=True)
            if verbose or outcome != "KILLED":
                print("    " + tail.replace("\n", "\n    "))
            shutil.rmtree(tree, ignore_errors=True)
    killed = sum(1 for _, outcome, _ in results if outcome == "KILLED")
    print(
        f"\n{killed} of {len(results)} mutants killed in {time.monotonic() - started:.0f} s"
        + (
            ""
            if killed == len(results)
            else "; not killed: "
            + ", ".join(m.name for m, outcome, _ in results if outcome != "KILLED")
        )
    )
    return 0 if killed == len(results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run the mutants whose names start with these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per mutant")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the end of every mutant's test output"
    )
    options = parser.parse_args()
    mutants = [m for m in MUTANTS if not options.names or m.name.startswith(tuple(options.names))]
    if not mutants:
        parser.error(f"no mutant named {' '.join(options.names)} (see --list)")
    if options.list:
        for m in mutants:
            print(f"{m.name:<38} {m.why}\n{'':<38} {' '.join(m.tests)}")
        return 0
    return run(mutants, options.timeout, not options.no_baseline, options.verbose)


if __name__ == "__main__":
    sys.exit(main())

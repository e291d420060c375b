"""
The conformance scenarios every transport must pass, as pytest tests.

A transport author runs them against their transport with::

    # tests/test_conformance.py
    from octotwist.testing.conformance import *  # noqa: F403

    $ pytest --octo-transport NAME         # or OCTO_TRANSPORT=NAME pytest

Each test starts real C{octo server} / C{octo client} processes over the
transport (set up by its plugin's C{octotwist_test_setup} hook) and checks
the exact result against an independent computation.
"""

from __future__ import annotations

import ast
import hashlib
import signal
import struct
import textwrap
import time
from collections import Counter
from pathlib import Path

from octotwist.testing.harness import (
    Octo,
    Process,
    Server,
    connect_raw,
    hung_up,
    send_regardless,
    tasks_taken_from,
    wait_for_text,
)
from octotwist.testing.relay import EVIL_MARKER, EVIL_OCTO, evil_pickle

__all__ = [
    "test_5000_tiny_tasks",
    "test_a_200_mb_blob",
    "test_a_client_killed_mid_task_loses_nothing",
    "test_a_slow_worker_does_not_make_the_server_hold_its_downloads",
    "test_a_stranger_cannot_make_the_server_hold_a_large_message",
    "test_an_evil_pickle_from_a_peer_that_authenticated_runs_nothing",
    "test_an_evil_pickle_from_a_stranger_runs_nothing",
    "test_bad_credentials_are_refused",
    "test_clean_shutdown",
    "test_garbage_from_a_peer_does_not_disturb_the_job",
    "test_word_count_with_two_clients",
]

#: The seed's word count, reading the corpus files itself (lazily).  Map
#: tasks wait for the gate file, so that both clients join before any ends.
WORDCOUNT = """
import glob, os, time
files = sorted(glob.glob({pattern!r}))
class Files(dict):
    def __getitem__(self, path):
        with open(path) as f:
            return f.read()
source = Files.fromkeys(files)
def mapfn(key, value):
    while not os.path.exists({gate!r}):
        time.sleep(0.05)
    for line in value.splitlines():
        for word in line.split():
            yield word.lower(), 1
def reducefn(key, values):
    return key, len(values)
reduce_tasks = 3
"""


def write_job(directory: Path, body: str, name: str = "job.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def make_corpus(directory: Path, files: int = 6, words: int = 30_000) -> Counter[str]:
    """Deterministic text files under C{directory}; returns the expected count."""
    import random

    rng = random.Random(1854)
    vocabulary = [f"Word{i}" if i % 7 == 0 else f"word{i}" for i in range(3000)]
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(files):
        lines = (" ".join(rng.choices(vocabulary, k=12)) for _ in range(words // 12))
        (directory / f"part{n}.txt").write_text("\n".join(lines) + "\n")
    expected: Counter[str] = Counter()
    for path in sorted(directory.glob("*.txt")):
        expected.update(w.lower() for w in path.read_text().split())
    return expected


def results(path: Path) -> dict[str, str]:
    """
    An output file's results, each field read back as docs/guide.md says
    (the Python literal it spells, else the string itself), as text: the
    kit's jobs compare them with C{str()} of the values they expect.
    """
    out: dict[str, str] = {}
    for line in path.read_text().split("\n")[:-1]:
        key, value = (str(_field(f)) for f in line.split("\t"))
        assert key not in out, f"key {key!r} written twice"
        out[key] = value
    return out


def _field(text: str) -> object:
    if text in ("inf", "-inf", "nan"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def word_count_with_two_clients(
    octo: Octo, files: int = 6, words: int = 30_000
) -> tuple[Server, list[Process], Path, Counter[str]]:
    """
    Start a word count over a generated corpus with clients C{c0} and C{c1};
    its map tasks wait until both have joined, so that both take part.

    @return: the server, the clients, the output file and the expected count.
    """
    expected = make_corpus(octo.directory / "corpus", files, words)
    gate = octo.directory / "gate"
    pattern = str(octo.directory / "corpus" / "*.txt")
    script = write_job(octo.directory, WORDCOUNT.format(pattern=pattern, gate=str(gate)))
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out))
    clients = [octo.client(server, "--name", f"c{i}") for i in range(2)]
    wait_for_text(server, "worker c0 joined")
    wait_for_text(server, "worker c1 joined")
    gate.touch()
    return server, clients, out, expected


def quiet(process: Process) -> None:
    """A refusal is logged as one line, not as a traceback."""
    err = process.err()
    assert "Traceback" not in err and "Unhandled" not in err, err


def test_word_count_with_two_clients(octo: Octo) -> None:
    server, clients, out, expected = word_count_with_two_clients(octo)
    assert server.wait() == 0, server.err()
    for c in clients:
        assert c.wait() == 0, c.err()
    assert "worker c0 joined" in server.err() and "worker c1 joined" in server.err()
    assert results(out) == {k: str(v) for k, v in expected.items()}


BLOB = """
import hashlib, random
source = {{"blob": {size}}}
def mapfn(key, size):
    yield key, random.Random(7).randbytes(size)
def reducefn(key, values):
    (blob,) = values
    return key, "%d %s" % (len(blob), hashlib.sha256(blob).hexdigest())
reduce_tasks = 1
"""
BLOB_SIZE = 200 * 10**6


def test_a_200_mb_blob(octo: Octo) -> None:
    """A 200 MB map output (incompressible) travels worker -> server -> worker."""
    import random

    script = write_job(octo.directory, BLOB.format(size=BLOB_SIZE))
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out), "--task-timeout", "120")
    client = octo.client(server)
    assert server.wait(300) == 0, server.err()
    assert client.wait() == 0, client.err()
    digest = hashlib.sha256(random.Random(7).randbytes(BLOB_SIZE)).hexdigest()
    assert results(out) == {"blob": f"{BLOB_SIZE} {digest}"}


#: 5000 one-pair items; no map task ends before the gate file exists (the
#: test makes it once both clients joined: batched, the job is over in well
#: under a second, and a client that came after the end would wait for a
#: server that is gone).
TINY = """
import os, time
source = {i: i * i for i in range(5000)}
_opened = []
def mapfn(key, value):
    while not _opened:
        if os.path.exists(GATE):
            _opened.append(True)
        else:
            time.sleep(0.02)
    yield key % 10, value
def reducefn(key, values):
    return key, sum(values)
reduce_tasks = 2
"""


def test_5000_tiny_tasks(octo: Octo) -> None:
    gate = octo.directory / "gate"
    script = write_job(octo.directory, f"GATE = {str(gate)!r}\n" + TINY)
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out))
    clients = [octo.client(server, "-p", "2", "--name", f"c{i}") for i in range(2)]
    wait_for_text(server, "worker c0 joined")
    wait_for_text(server, "worker c1 joined")
    gate.touch()
    assert server.wait(300) == 0, server.err()
    for c in clients:
        assert c.wait() == 0, c.err()
    expected = {str(d): str(sum(i * i for i in range(5000) if i % 10 == d)) for d in range(10)}
    assert results(out) == expected


#: A small word count, and its result counted here.
SMALL = """
source = {i: "a b c d%d" % (i % 5) for i in range(16)}
def mapfn(key, value):
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
reduce_tasks = 2
"""
SMALL_EXPECTED = {
    k: str(v) for k, v in Counter(w for i in range(16) for w in f"a b c d{i % 5}".split()).items()
}
#: SMALL, but its map tasks cannot end before the test creates the gate file,
#: so that a client killed "mid-task" really holds tasks when it dies.  (A
#: task process orphaned by the kill gives up after 10 minutes.)
GATED = """
import os, time
source = {{i: "a b c d%d" % (i % 5) for i in range(16)}}
def mapfn(key, value):
    deadline = time.monotonic() + 600
    while not os.path.exists({gate!r}) and time.monotonic() < deadline:
        time.sleep(0.05)
    for w in value.split():
        yield w, 1
def reducefn(key, values):
    return key, len(values)
reduce_tasks = 2
"""
FAST_LEASE = ["--heartbeat", "0.3", "--task-timeout", "3"]


def test_a_client_killed_mid_task_loses_nothing(octo: Octo) -> None:
    gate = octo.directory / "gate"
    script = write_job(octo.directory, GATED.format(gate=str(gate)))
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out), *FAST_LEASE)
    doomed = octo.client(server, "--name", "doomed", "-p", "2", "-v")
    wait_for_text(doomed, "running map")
    doomed.kill()
    wait_for_text(server, "worker doomed left")
    # Its tasks come back whichever way the server notices first: the
    # connection lost, or (HTTP, with no connection to lose) its silence.
    assert tasks_taken_from("doomed", server.err()) >= 1, server.err()
    gate.touch()
    survivor = octo.client(server, "--name", "survivor")
    assert server.wait() == 0, server.err()
    assert survivor.wait() == 0, survivor.err()
    assert results(out) == SMALL_EXPECTED


def test_bad_credentials_are_refused(octo: Octo) -> None:
    """
    A client with wrong credentials (a wrong shared secret, and the setup's
    C{refused_client_args}) is refused, and the server goes on serving; a
    server started with C{refused_server_args} refuses the usual client.
    """
    setup = octo.setup
    if not (setup.uses_secret or setup.refused_client_args or setup.refused_server_args):
        raise AssertionError(f"{octo.transport}'s test setup gives no way to be refused")
    script = write_job(octo.directory, SMALL)
    if setup.refused_server_args:
        refusing = octo.server(script, "-o", str(octo.directory / "none.tsv"), refused=True)
        client = octo.client(refusing, "--wait", "5")
        assert client.wait(60) != 0, client.err()
        quiet(client)
        assert refusing.popen.poll() is None, "the server died of a refused client"
        assert "joined" not in refusing.err()
        refusing.kill(signal.SIGTERM)  # what it logs on the way out counts too
        refusing.wait()
        quiet(refusing)
    if setup.uses_secret or setup.refused_client_args:
        out = octo.directory / "out.tsv"
        server = octo.server(script, "-o", str(out))
        intruder = octo.client(server, "--wait", "5", refused=True)
        assert intruder.wait(60) != 0, intruder.err()
        quiet(intruder)
        assert server.popen.poll() is None, "the server died of a refused client"
        assert "joined" not in server.err()
        good = octo.client(server)
        assert good.wait() == 0, good.err()
        assert server.wait() == 0, server.err()
        quiet(server)
        assert results(out) == SMALL_EXPECTED


#: After each hostile message: enough bytes to pass the 4 KB an SSH server
#: reads looking for a version line, then a line end, so that a server that
#: reads lines (HTTP, SSH) has a complete one to refuse rather than wait for.
PAD = bytes(range(256)) * 20 + b"\r\n\r\n"


def all_refused(server: Server, hostile: dict[str, bytes]) -> None:
    """
    Send each of C{hostile}'s values on its own connection to C{server}, as
    peers that have not authenticated, all at once; the server must hang up
    on every one (well within a minute: a transport's login timeout counts
    too) and live on.
    """
    sockets = {}
    try:
        for what, data in hostile.items():
            sockets[what] = s = connect_raw(server.listen)
            send_regardless(s, data)
        for what, s in sockets.items():
            try:
                hung_up(s, timeout=90)
            except AssertionError as e:
                raise AssertionError(f"{what}: {e}") from None
    finally:
        for s in sockets.values():
            s.close()
    assert server.popen.poll() is None, f"the server died:\n{server.err()}"


def test_garbage_from_a_peer_does_not_disturb_the_job(octo: Octo) -> None:
    """
    Junk on the server's address is refused: the server closes each such
    connection, quietly, stays up, and the job's result is exact.
    """
    script = write_job(octo.directory, SMALL)
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out))
    garbage = [
        b"\x00" * 64,
        b"\xff\xff\xff\xff" + b"x" * 100,
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03",
        # A frame as long as an X25519 public key, of zeros (a low-order point).
        struct.pack("!I", 32) + bytes(32),
    ]
    all_refused(server, {f"junk starting {junk[:8]!r}": junk + PAD for junk in garbage})
    good = octo.client(server)
    assert good.wait() == 0, good.err()
    assert server.wait() == 0, server.err()
    assert results(out) == SMALL_EXPECTED
    quiet(server)


#: What a stranger offers in one message, before authenticating.
HUGE = 48 * 1024 * 1024
#: How much more memory at most the server may hold at its peak after two
#: strangers offered L{HUGE} bytes each: a transport that buffers a message
#: before it knows who sent it grows by at least L{HUGE}.
PRE_AUTH_GROWTH = 16 * 1024 * 1024


def peak_memory(pid: int) -> int:
    """The peak resident memory of process C{pid} so far, in bytes (Linux's C{VmHWM})."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_a_stranger_cannot_make_the_server_hold_a_large_message(octo: Octo) -> None:
    """
    Limits hold before authentication: a peer that has not authenticated
    announces a 48 MiB message, as a frame's length prefix and as an HTTP
    upload's Content-Length, and sends all of it.  The server must hang up
    on both without holding them (its peak memory grows by less than 16
    MiB), and then run the job exactly.
    """
    script = write_job(octo.directory, SMALL)
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out))
    before = peak_memory(server.pid)
    openings = {
        "a frame's length prefix": struct.pack("!I", HUGE),
        "an HTTP upload": (
            b"POST /octo/session/0/upload?first=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % HUGE
        ),
    }
    body = bytes(HUGE)
    for what, opening in openings.items():
        s = connect_raw(server.listen)
        try:
            s.settimeout(90)  # a server that stops reading but keeps the socket fails below
            try:
                send_regardless(s, opening + body)
            except TimeoutError:
                why = "the server stopped reading but did not hang up"
                raise AssertionError(f"{what}: {why}") from None
            try:
                hung_up(s, timeout=90)
            except AssertionError as e:
                raise AssertionError(f"{what}: {e}") from None
        finally:
            s.close()
    grew = peak_memory(server.pid) - before
    assert grew < PRE_AUTH_GROWTH, (
        f"the server's peak memory grew by {grew / 2**20:.0f} MiB while strangers offered "
        f"{HUGE >> 20} MiB messages: something buffers a message before its sender authenticated"
    )
    good = octo.client(server)
    assert good.wait() == 0, good.err()
    assert server.wait() == 0, server.err()
    assert results(out) == SMALL_EXPECTED
    quiet(server)


#: Map inputs of L{ITEM} random bytes each, made as they are read (the
#: server holds none of them before it sends them); the result is each
#: input's size and digest.
DOWNLOADS = """
import hashlib, random
class Inputs(dict):
    def __getitem__(self, key):
        return random.Random(key).randbytes({size})
source = Inputs.fromkeys(range({items}))
def mapfn(key, value):
    yield key, "%d %s" % (len(value), hashlib.sha256(value).hexdigest())
def reducefn(key, values):
    (digest,) = values
    return key, digest
reduce_tasks = 1
"""
ITEM = 24 * 1024 * 1024
#: The slow worker's slots: the tasks the server gives it at once.
SLOW_SLOTS = 6
#: How much more memory at most the server may hold at its peak while a
#: worker it gave L{SLOW_SLOTS} tasks reads none of them: a server that
#: makes, or queues in its transport, every input it assigned grows by
#: L{SLOW_SLOTS} inputs and more (the built-in transports without their
#: flow control: 11 to 18 inputs); one with backpressure holds the input it
#: is making, its pickle, and the transport's high-water mark (the built-in
#: transports: 3 to 4.5 inputs).
SLOW_READER_GROWTH = 5 * ITEM


def settled_peak(pid: int, quiet_for: float = 3.0, timeout: float = 60.0) -> int:
    """Process C{pid}'s peak memory once it has not grown for C{quiet_for} seconds."""
    deadline = time.monotonic() + timeout
    peak, since = peak_memory(pid), time.monotonic()
    while time.monotonic() - since < quiet_for and time.monotonic() < deadline:
        time.sleep(0.2)
        now = peak_memory(pid)
        if now != peak:
            peak, since = now, time.monotonic()
    return peak


def test_a_slow_worker_does_not_make_the_server_hold_its_downloads(octo: Octo) -> None:
    """
    Backpressure: a worker is given L{SLOW_SLOTS} map tasks of L{ITEM}
    bytes of input each, and stops reading (SIGSTOP) as they come.  The
    server must make and send them only as the transport can take them:
    its peak memory grows by less than 5 inputs.  Once the worker reads
    again, the job's result is exact.
    """
    items = SLOW_SLOTS + 2
    script = write_job(octo.directory, DOWNLOADS.format(size=ITEM, items=items))
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out), "--task-timeout", "300")
    before = settled_peak(server.pid, quiet_for=1.0)
    slow = octo.client(server, "--name", "slow", "-p", str(SLOW_SLOTS))
    wait_for_text(server, "worker slow joined")
    slow.kill(signal.SIGSTOP)
    try:
        grew = settled_peak(server.pid) - before
    finally:
        slow.kill(signal.SIGCONT)
    assert grew < SLOW_READER_GROWTH, (
        f"the server's peak memory grew by {grew / 2**20:.0f} MiB while a worker given "
        f"{SLOW_SLOTS} tasks of {ITEM >> 20} MiB input read none of them: the transport "
        "does not tell the core to wait (flow.Backpressure, the IPushProducer its "
        "writable() rests on)"
    )
    assert server.wait(300) == 0, server.err()
    assert slow.wait() == 0, slow.err()
    import hashlib
    import random

    expected = {}
    for key in range(items):
        value = random.Random(key).randbytes(ITEM)
        expected[str(key)] = f"{len(value)} {hashlib.sha256(value).hexdigest()}"
    assert results(out) == expected


def test_an_evil_pickle_from_a_stranger_runs_nothing(octo: Octo) -> None:
    """
    A peer that has not authenticated sends a pickle that would create a
    marker file, as it is and in the framings of the built-in transports
    (a length prefix, after a first frame, an HTTP body): the server hangs
    up, nothing runs, and the job's result is exact.
    """
    marker = octo.directory / "pwned"
    evil = evil_pickle(marker)
    framed = struct.pack("!I", len(evil)) + evil
    # A well-formed first frame: 32 bytes, a valid X25519 public key (the base point).
    first = struct.pack("!I", 32) + bytes([9]) + bytes(31)

    def post(path: bytes) -> bytes:
        head = b"POST %s HTTP/1.1\r\nHost: octo\r\nConnection: close\r\n" % path
        return head + b"Content-Length: %d\r\n\r\n" % len(framed) + framed

    script = write_job(octo.directory, SMALL)
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out))
    hostile = {
        "a bare pickle": evil + PAD,
        "a framed pickle": framed + PAD,
        "a framed pickle after a first frame": first + framed + PAD,
        "a pickle posted for a new session": post(b"/octo/session") + PAD,
        "a pickle posted to a session": (
            post(b"/octo/session/0123456789abcdef/messages?first=0") + PAD
        ),
    }
    all_refused(server, hostile)
    good = octo.client(server)
    assert good.wait() == 0, good.err()
    assert server.wait() == 0, server.err()
    assert not marker.exists(), "the server ran the stranger's pickle"
    assert results(out) == SMALL_EXPECTED
    quiet(server)


def test_an_evil_pickle_from_a_peer_that_authenticated_runs_nothing(octo: Octo) -> None:
    """
    A client with good credentials sends a pickle that would create a
    marker file where its first message's header belongs (the transport's
    own client, whose encoder L{relay.corrupt_first_message} replaces): the
    server, which decodes control messages as data only, closes that one
    connection with the codec's reason, runs nothing, and serves on.  The
    same client, honest from then on, reconnects and does the whole job.
    """
    marker = octo.directory / "pwned"
    script = write_job(octo.directory, SMALL)
    out = octo.directory / "out.tsv"
    server = octo.server(script, "-o", str(out))
    client = octo.client(
        server, "--name", "mallory", env={EVIL_MARKER: str(marker)}, python=("-c", EVIL_OCTO)
    )
    assert client.wait() == 0, client.err()
    assert server.wait() == 0, server.err()
    assert not marker.exists(), "the server ran the pickle of a peer that authenticated"
    assert "malformed message" in server.err(), (
        "the server did not refuse the pickle with the codec's reason (does the transport "
        "encode messages with octotwist.codec?):\n" + server.err()
    )
    assert "lost the connection to the server; reconnecting" in client.err(), client.err()
    assert server.err().count("worker mallory joined") == 1, server.err()
    assert results(out) == SMALL_EXPECTED
    quiet(server)


def test_clean_shutdown(octo: Octo) -> None:
    """When the job ends, the server and its clients exit 0, promptly and quietly."""
    server, clients, out, expected = word_count_with_two_clients(octo, files=2, words=2000)
    assert server.wait(120) == 0, server.err()
    # The clients have the Shutdown before the server exits: 15 s is plenty.
    deadline = time.monotonic() + 15
    for c in clients:
        try:
            code = c.wait(max(0.0, deadline - time.monotonic()))
        except AssertionError as e:
            raise AssertionError(f"a client lingered 15 s after the job ended: {e}") from None
        assert code == 0, c.err()
    for p in (server, *clients):
        quiet(p)
        assert "the server says the job is over" in p.err() or p is server
    assert results(out) == {k: str(v) for k, v in expected.items()}

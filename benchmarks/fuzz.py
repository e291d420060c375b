"""
Throw malformed frames at a real `octo server`, unauthenticated and
authenticated, then check that the job still comes out exact.

    python benchmarks/fuzz.py                         # tcp, http and ssh; 100 000+ frames each
    python benchmarks/fuzz.py --transport tcp --unauthenticated 20000 --authenticated 5000

Not part of the test suite (it takes minutes): run it by hand after touching
the handshake, the channel layer, the codec or a transport's server.  For
each transport it prints how many malformed frames were sent (before and
after authentication), the server's peak RSS, how many tracebacks and log
lines the server wrote, and whether two honest workers then finished the
job with the exact result.  It exits non-zero if the job was not exact or
the server wrote a traceback.

What is sent:

  - before authentication, over fresh connections: random bytes, oversized
    length prefixes, handshake answers with a wrong proof, truncated
    frames; for http, garbage request heads and requests with forged or
    replayed tokens; for ssh, garbage instead of (or after) the version
    line and the key exchange;
  - after authentication (the fuzzer knows the secret, or has the key):
    messages whose encoded header had bits flipped, bytes cut or inserted,
    sealed correctly (so that they reach the codec), and frames that fail
    their integrity check.  Each is a fresh session unless the server kept
    the previous one open (a mutation that still decoded).

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from octotwist import codec, handshake, messages
from octotwist.hookspecs import conformance_setup
from octotwist.messages import TaskId, TaskKind
from octotwist.transport import TestSetup

SECRET = b"fuzzing-secret-that-is-long-enough"
_PREFIX = struct.Struct("!I")

JOB = """
import os, time
source = {i: " ".join("w%d" % ((i * 13 + j) % 97) for j in range(200 + i)) for i in range(40)}
def mapfn(key, value):
    while not os.path.exists(GATE):  # until both honest workers are in
        time.sleep(0.05)
    for word in value.split():
        yield word, 1
def reducefn(key, values):
    return key, sum(values)
reduce_tasks = 4
"""


def expected() -> dict[str, int]:
    counts: Counter[str] = Counter()
    for i in range(40):
        counts.update(f"w{(i * 13 + j) % 97}" for j in range(200 + i))
    return dict(counts)


T0 = TaskId(TaskKind.MAP, 0)
SAMPLES: list[messages.Message] = [
    messages.Hello("fuzz", "host", 1, 2, prefetch=1, machine=None),
    messages.Heartbeat(((T0, 1), (TaskId(TaskKind.REDUCE, 3), 2))),
    messages.TaskOutput(T0, 1, 2, b"\x28\xb5\x2f\xfd" + b"z" * 40, True),
    messages.TaskDone(T0, 1, 10, 20, 0.5),
    messages.TaskFailed(T0, 1, "'k'", "ValueError: no", "Traceback ...\n"),
    messages.Shutdown(False, "bye"),
    messages.Cancel(T0, 1),
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few random bit flips, cuts, insertions or duplications of C{data}."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[i % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del b[i : i + rng.randint(1, 8)]
        elif op == 2:
            b[i:i] = os.urandom(rng.randint(1, 8))
        elif op == 3 and b:
            b[i % len(b)] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC3, 0xCC, 0xCD, 0xD9, 0xDC, 0xFF])
        else:
            b[i:i] = b[max(0, i - 8) : i]
    return bytes(b)


def fuzzed_message(rng: random.Random) -> tuple[bytes, bytes]:
    """A (header, payload) pair: a real message's, mutated."""
    header, payload = codec.message_parts(rng.choice(SAMPLES))
    if rng.random() < 0.8:
        header = mutate(rng, header)
    else:
        payload = mutate(rng, payload) if payload else os.urandom(rng.randint(1, 30))
    return header, payload


# The raw sockets.


def frame(data: bytes) -> bytes:
    return _PREFIX.pack(len(data)) + data


def read_frame(s: socket.socket) -> bytes | None:
    head = _recv_exactly(s, 4)
    if head is None:
        return None
    (n,) = _PREFIX.unpack(head)
    return _recv_exactly(s, n)


def _recv_exactly(s: socket.socket, n: int) -> bytes | None:
    chunks, have = [], 0
    while have < n:
        data = s.recv(n - have)
        if not data:
            return None
        chunks.append(data)
        have += len(data)
    return b"".join(chunks)


def drain(s: socket.socket, seconds: float = 2.0) -> None:
    """Read until the server closes (or C{seconds} pass)."""
    s.settimeout(seconds)
    with contextlib.suppress(OSError):
        while s.recv(65536):
            pass


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


# tcp


def tcp_unauthenticated(port: int, rng: random.Random) -> int:
    with connect(port) as s:
        challenge = read_frame(s)
        if challenge is None:
            return 0
        choice = rng.randrange(5)
        if choice == 0:
            s.sendall(frame(os.urandom(rng.randint(0, 300))))
        elif choice == 1:
            s.sendall(_PREFIX.pack(rng.randint(257, 2**32 - 1)) + os.urandom(64))
        elif choice == 2:  # the right shape, a wrong proof
            s.sendall(frame(os.urandom(64)))
        elif choice == 3:  # a proof made with another secret
            other = handshake.ClientHandshake(os.urandom(24), b"octotwist-tcp/2")
            s.sendall(frame(other.respond(challenge)))
        else:  # half a frame, then gone
            s.sendall(_PREFIX.pack(64) + os.urandom(rng.randint(0, 63)))
            return 1
        drain(s)
    return 1


def tcp_authenticated(port: int, rng: random.Random) -> int:
    sent = 0
    with connect(port) as s:
        client = handshake.ClientHandshake(SECRET, b"octotwist-tcp/2")
        challenge = read_frame(s)
        if challenge is None:
            return 0
        s.sendall(frame(client.respond(challenge)))
        proof = read_frame(s)
        if proof is None:
            return 0
        channel = client.confirm(proof)
        s.settimeout(0.05)
        for _ in range(20):  # until the server hangs up
            if rng.random() < 0.1:
                data = os.urandom(rng.randint(0, 200))  # fails its integrity check
            else:
                data = channel.seal(*fuzzed_message(rng))
            try:
                s.sendall(frame(data))
                sent += 1
                while s.recv(65536):  # the Welcome, maybe tasks; b"": closed
                    pass
                break
            except TimeoutError:
                continue  # still open: the mutation decoded; send another
            except OSError:
                break
    return sent


# http


def _http_request(s: socket.socket, method: str, target: str, headers: dict, body: bytes) -> None:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def http_unauthenticated(port: int, rng: random.Random) -> int:
    with connect(port) as s:
        choice = rng.randrange(6)
        if choice == 0:
            s.sendall(os.urandom(rng.randint(1, 400)))
        elif choice == 1:
            s.sendall(b"POST /octo/session HTTP/1.1\r\n" + mutate(rng, b"Host: a\r\n\r\n"))
        elif choice == 2:
            auth = mutate(rng, b'Octo challenge="00", cnonce="11", proof="22"').decode("latin-1")
            _http_request(s, "POST", "/octo/session", {"Authorization": auth}, b"")
        elif choice == 3:
            sid = os.urandom(16).hex()
            token = f'Octo session="{sid}", seq="{rng.randint(0, 99)}", mac="{"ab" * 32}"'
            body = frame(os.urandom(rng.randint(0, 500)))
            target = f"/octo/session/{sid}/messages?first=0"
            _http_request(s, "POST", target, {"Authorization": token}, body)
        elif choice == 4:
            s.sendall(b"POST /octo/session HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\nxx")
        else:
            s.sendall(
                b"POST /octo/session HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                + mutate(rng, b"5\r\nhello\r\n0\r\n\r\n")
            )
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)  # no more requests: the server may close after answering
        drain(s, 1.0)
    return 1


def http_authenticated(port: int, rng: random.Random) -> int:
    from octotwist_http import wire

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with contextlib.closing(conn):
        conn.request("POST", "/octo/session")
        r = conn.getresponse()
        r.read()
        params = wire.parse_credentials(r.getheader("WWW-Authenticate", "").encode()) or {}
        challenge, cnonce = bytes.fromhex(params.get("challenge", "")), os.urandom(32)
        credentials = wire.session_credentials(SECRET, challenge, cnonce).decode()
        conn.request("POST", "/octo/session", headers={"Authorization": credentials})
        r = conn.getresponse()
        r.read()
        sid = r.getheader("Octo-Session") or ""
        if r.status != 201:
            return 0
        key = wire.session_key(SECRET, challenge, cnonce)
        channel = wire.session_channel(SECRET, challenge, cnonce, client=True)
        sent = 0
        for seq in range(20):
            target = f"session/{sid}/messages?first={sent}"
            data = (
                os.urandom(rng.randint(0, 200))
                if rng.random() < 0.1
                else channel.seal(*fuzzed_message(rng))
            )
            token = wire.request_credentials(key, b"POST", target.encode(), sid, seq).decode()
            conn.request(
                "POST", "/octo/" + target, body=frame(data), headers={"Authorization": token}
            )
            r = conn.getresponse()
            r.read()
            sent += 1
            if r.status != 204:
                break
        return sent


# ssh


def ssh_unauthenticated(port: int, rng: random.Random) -> int:
    with connect(port) as s:
        s.settimeout(5)
        with contextlib.suppress(OSError):
            s.recv(256)  # the server's version line (and maybe its KEXINIT)
        choice = rng.randrange(4)
        if choice == 0:
            s.sendall(os.urandom(rng.randint(1, 300)))
        elif choice == 1:
            s.sendall(b"SSH-2.0-fuzz\r\n" + os.urandom(rng.randint(1, 600)))
        elif choice == 2:  # a packet length far too large
            s.sendall(b"SSH-2.0-fuzz\r\n" + struct.pack("!I", rng.randint(35000, 2**32 - 1)))
        else:  # a KEXINIT-shaped packet with garbage name lists
            payload = bytes([20]) + os.urandom(16) + mutate(rng, b"\x00\x00\x00\x05curve" * 10)
            pad = 8 - (len(payload) + 5) % 8 + 8
            packet = struct.pack("!IB", len(payload) + pad + 1, pad) + payload + b"\0" * pad
            s.sendall(b"SSH-2.0-fuzz\r\n" + packet)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        drain(s, 1.0)
    return 1


def ssh_authenticated(port: int, setup: TestSetup, count: int, seed: int) -> int:
    """
    Open the octo subsystem again and again on one SSH connection (logged in
    with the test key) and send each channel one fuzzed frame: a real
    worker's login, then malformed messages.
    """
    try:
        result = subprocess.run(
            [
                *(sys.executable, __file__, "--ssh-authenticated"),
                *(str(port), str(count), str(seed)),
                *setup.client_args,
            ],
            capture_output=True,
            text=True,
            timeout=60 + count / 50,
            env=dict(os.environ, **setup.env),
        )
    except subprocess.TimeoutExpired as e:
        print(
            f"ssh: the authenticated fuzzer got stuck: {e.stdout!r} {e.stderr!r}", file=sys.stderr
        )
        return 0
    match = re.search(r"sent (\d+)", result.stdout)
    if match is None:
        print(result.stdout, result.stderr, file=sys.stderr)
        return 0
    return int(match.group(1))


def _ssh_authenticated_main(argv: list[str]) -> None:
    """
    Runs in its own process, with its own reactor (see L{ssh_authenticated}):
    log in with the test key, open the octo subsystem, send one fuzzed frame
    on it, and again while the server keeps the channel; the server drops
    the whole SSH connection on a malformed message, so then log in anew.
    """
    from twisted.internet.defer import Deferred, DeferredList
    from twisted.internet.task import deferLater, react

    from octotwist.transport import ClientSettings
    from octotwist_ssh.client import SSHTaskClient

    port, count, seed = int(argv[0]), int(argv[1]), int(argv[2])
    options: dict[str, object] = {}
    rest = argv[3:]
    for flag, value in zip(rest[::2], rest[1::2], strict=True):
        options[flag.lstrip("-")] = value
    rng = random.Random(seed)
    sent = 0

    class Session:
        def __init__(self, channel: object) -> None:
            self.lost: Deferred[None] = Deferred()

        def message_received(self, message: object) -> None:
            pass

        def connection_lost(self, reason: str) -> None:
            self.lost.callback(None)

    async def loop(reactor: object) -> None:
        nonlocal sent
        client = SSHTaskClient(reactor, ClientSettings(f"127.0.0.1:{port}", b"", options))  # type: ignore[arg-type]
        sessions: list[Session] = []

        def accept(channel: object) -> Session:
            sessions.append(Session(channel))
            return sessions[-1]

        while sent < count:
            channel = await client.connect(accept)
            framed, lost = channel._channel, sessions[-1].lost  # type: ignore[attr-defined]
            while sent < count and not lost.called:
                header, payload = fuzzed_message(rng)
                framed.send_frame(struct.pack("!I", len(header)) + header + payload)
                sent += 1
                await DeferredList([lost, deferLater(reactor, 0.05)], fireOnOneCallback=True)
            if not lost.called:
                channel.close()
                await lost

    async def main(reactor: object) -> None:
        await DeferredList([Deferred.fromCoroutine(loop(reactor)) for _ in range(4)])
        print(f"sent {sent}", flush=True)

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


# Running one transport.


FUZZERS: dict[str, tuple[Callable[[int, random.Random], int], Callable | None]] = {
    "tcp": (tcp_unauthenticated, tcp_authenticated),
    "http": (http_unauthenticated, http_authenticated),
    "ssh": (ssh_unauthenticated, None),
}


def _peak_rss(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else None


def _hammer(fuzz: Callable[[int, random.Random], int], port: int, count: int, seed: int) -> int:
    """Run C{fuzz} from a few threads until C{count} frames were sent."""
    sent = 0
    lock = threading.Lock()

    def worker(n: int) -> None:
        nonlocal sent
        rng = random.Random(seed * 1000 + n)
        while True:
            with lock:
                if sent >= count:
                    return
            try:
                k = fuzz(port, rng)
            except OSError:
                k = 1  # refused or reset: it was sent
            with lock:
                sent += k

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    return sent


def run(name: str, unauthenticated: int, authenticated: int, seed: int) -> bool:
    directory = Path(tempfile.mkdtemp(prefix=f"octo-fuzz-{name}-"))
    try:
        return _run(name, directory, unauthenticated, authenticated, seed)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(name: str, directory: Path, unauthenticated: int, authenticated: int, seed: int) -> bool:
    (directory / "peers").mkdir()
    setup = conformance_setup(name, directory / "peers")
    script = directory / "job.py"
    gate = directory / "gate"
    script.write_text(f"GATE = {str(gate)!r}\n" + JOB)
    out = directory / "out.tsv"
    port, web = _free_port(), _free_port()
    env = dict(os.environ, OCTO_SECRET=SECRET.decode(), XDG_CONFIG_HOME=str(directory / "config"))
    env.update(setup.env)
    log = (directory / "server.log").open("w")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "octotwist", "server", str(script), "--transport", name),
            *("--listen", f"tcp:{port}:interface=127.0.0.1", "-o", str(out)),
            *("--web", f"tcp:{web}:interface=127.0.0.1"),
            *setup.server_args,
        ],
        env=env,
        stderr=log,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set() and server.poll() is None:
            peak = max(peak, _peak_rss(server.pid) or 0)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    unauth_fuzz, auth_fuzz = FUZZERS[name]
    sent_before = _hammer(unauth_fuzz, port, unauthenticated, seed)
    if auth_fuzz is not None:
        sent_after = _hammer(auth_fuzz, port, authenticated, seed + 1)
    else:
        sent_after = ssh_authenticated(port, setup, authenticated, seed + 1)
    fuzz_seconds = time.monotonic() - started
    address = f"http://127.0.0.1:{port}/" if name == "http" else f"127.0.0.1:{port}"
    workers = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "octotwist", "client", address, "--transport", name),
                *setup.client_args,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 120
    while _workers_in(web) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    gate.touch()
    codes = [w.wait(timeout=300) for w in workers]
    server_code = server.wait(timeout=60)
    stop.set()
    watcher.join()
    log.close()
    text = (directory / "server.log").read_text()
    exact = out.exists() and _parse(out.read_text()) == expected()
    tracebacks = text.count("Traceback (most recent call last)")
    print(
        f"{name}: {sent_before} malformed frames before authentication, {sent_after} after, "
        f"in {fuzz_seconds:.0f} s; server peak RSS {peak / 2**20:.0f} MiB; "
        f"{tracebacks} tracebacks, {text.count(chr(10))} log lines; "
        f"then the job {'was exact' if exact else 'was NOT exact'} "
        f"(server exit {server_code}, workers {codes})",
        flush=True,
    )
    if tracebacks:
        first = text.index("Traceback (most recent call last)")
        print(text[max(0, first - 300) : first + 2000], file=sys.stderr)
    return exact and tracebacks == 0 and server_code == 0 and codes == [0, 0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_in(web: int) -> int:
    """How many workers the server's status page shows (0 if it cannot be read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/status.json", timeout=5) as r:
            return len(json.load(r)["workers"])
    except (OSError, ValueError, KeyError):
        return 0


def _parse(text: str) -> dict[str, int]:
    result = {}
    for line in text.splitlines():
        key, value = line.rsplit("\t", 1)
        result[key] = int(value)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ssh-authenticated":
        _ssh_authenticated_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", action="append", choices=sorted(FUZZERS))
    parser.add_argument("--unauthenticated", type=int, default=60_000, help="frames (60 000)")
    parser.add_argument("--authenticated", type=int, default=50_000, help="frames (50 000)")
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    ok = True
    for name in options.transport or sorted(FUZZERS):
        ok &= run(name, options.unauthenticated, options.authenticated, options.seed)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""
Real C{octo} processes for tests: a server and its clients over one
transport, set up as the transport's plugin asks (L{TestSetup}), with their
output in files so that a chatty process never blocks on a full pipe.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from octotwist.hookspecs import conformance_setup
from octotwist.transport import TestSetup

#: The shared secret of the server and of every well-behaved client.
SECRET = "conformance-secret"


@dataclass
class Process:
    """A started C{octo} command and the files its output goes to."""

    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        """The exit status; fails the test (with the output) after C{timeout}."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"{' '.join(map(str, self.popen.args))} did not finish in {timeout} s:\n"
                f"{self.err()[-3000:]}"
            ) from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)


@dataclass
class Server(Process):
    """An C{octo server}, with the address its clients are given."""

    address: str = ""
    listen: str = ""


class Octo:
    """
    Runs C{octo} commands over C{transport} in C{directory}.  Call
    L{close} at the end: it kills whatever is still running.
    """

    def __init__(self, transport: str, directory: Path) -> None:
        self.transport = transport
        self.directory = directory
        (directory / "peers").mkdir(parents=True, exist_ok=True)
        self.setup: TestSetup = conformance_setup(transport, directory / "peers")
        self.env = dict(os.environ)
        self.env.pop("OCTO_SECRET", None)
        self.env.update(
            XDG_CONFIG_HOME=str(directory / "config"),
            PYTHONUNBUFFERED="1",
            OCTO_SECRET=SECRET,
            **self.setup.env,
        )
        self._processes: list[Process] = []
        self._count = 0

    def start(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        cls: type[Process] = Process,
        python: tuple[str, ...] = ("-m", "octotwist"),
    ) -> Process:
        """
        Start C{octo ARGS...}.

        @param python: what Python runs before C{ARGS}: C{("-c",
            relay.EVIL_OCTO)} is an C{octo} that misbehaves on purpose
            (L{octotwist.testing.relay.corrupt_first_message}).
        """
        self._count += 1
        name = f"{self._count:02d}-{args[0]}"
        out, err = self.directory / f"{name}.out", self.directory / f"{name}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            popen = subprocess.Popen(
                [sys.executable, *python, *args],
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})},
                cwd=self.directory,
            )
        process = cls(popen, out, err)
        self._processes.append(process)
        return process

    def server(self, script: Path, *args: str, refused: bool = False) -> Server:
        """
        Start C{octo server SCRIPT} and wait until it listens.

        @param refused: start it with the setup's C{refused_server_args}.
        """
        port = free_port()
        listen = self.setup.listen.format(port=port, directory=self.directory)
        extra = self.setup.refused_server_args if refused else []
        server = self.start(
            "server", str(script), "--transport", self.transport, "--listen", listen,
            *self.setup.server_args, *extra, *args, cls=Server,
        )  # fmt: skip
        assert isinstance(server, Server)
        server.listen = listen
        server.address = self.setup.address.format(port=port, directory=self.directory)
        wait_for_text(server, "serving job")
        return server

    def client(
        self,
        server: Server,
        *args: str,
        refused: bool = False,
        env: dict[str, str] | None = None,
        python: tuple[str, ...] = ("-m", "octotwist"),
    ) -> Process:
        """
        Start C{octo client} for C{server}.

        @param refused: present credentials the server must refuse: a wrong
            shared secret and the setup's C{refused_client_args}.
        @param env: added to its environment.
        @param python: see L{start}.
        """
        extra = self.setup.refused_client_args if refused else []
        env = {**(env or {}), **({"OCTO_SECRET": "not-the-" + SECRET} if refused else {})}
        return self.start(
            "client", server.address, "--transport", self.transport,
            *self.setup.client_args, *extra, *args, env=env, python=python,
        )  # fmt: skip

    def close(self) -> None:
        for process in self._processes:
            if process.popen.poll() is None:
                process.popen.kill()
            process.popen.wait()
        self._processes.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tasks_taken_from(worker: str, log: str) -> int:
    """
    How many running tasks the server's C{log} says it took from C{worker}:
    those that went back in the queue when it left, those whose lease ran
    out first (a transport without a connection to lose, such as HTTP,
    notices a dead worker by its silence), and those copied to another
    worker while it was silent (once nothing else was left to hand out).
    """
    name = re.escape(worker)
    left = re.findall(rf"worker {name} left \(.*\); (\d+) running tasks? go(?:es)? back", log)
    silent = re.findall(rf"cancelled \S+ \d+ attempt \d+ on {name}: worker silent", log)
    copied = re.findall(rf"\S+ \d+ is on silent worker {name}; running a backup copy", log)
    return sum(map(int, left)) + len(silent) + len(copied)


def wait_for_text(process: Process, text: str, timeout: float = 60) -> None:
    """Wait until C{process} has written C{text} to stderr (or died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in process.err():
            return
        if process.popen.poll() is not None:
            raise AssertionError(
                f"octo exited ({process.popen.returncode}) before saying {text!r}:\n{process.err()}"
            )
        time.sleep(0.05)
    raise AssertionError(f"octo did not say {text!r} in {timeout} s:\n{process.err()[-3000:]}")


def hung_up(sock: socket.socket, timeout: float = 60) -> bytes:
    """
    Wait until the other end of C{sock} closes it (or resets it), reading
    and keeping what it sends meanwhile; fail the test if it has not after
    C{timeout} seconds.

    @return: what it sent before it hung up.
    """
    deadline = time.monotonic() + timeout
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(
        f"the server kept the connection open for {timeout} s; it sent {received[:200]!r}"
    )


def send_regardless(sock: socket.socket, data: bytes) -> None:
    """Send C{data}; a peer that hangs up before the end (a reset) is no error."""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        sock.sendall(data)


def connect_raw(listen: str) -> socket.socket:
    """A plain socket to what a server C{listen} endpoint string names."""
    kind, _, rest = listen.partition(":")
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.connect(rest.split(":")[0])
        return s
    port = int(rest.split(":")[0])
    return socket.create_connection(("127.0.0.1", port), timeout=10)

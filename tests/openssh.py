"""
Real OpenSSH servers for the tests of C{--hosts}: Debian's C{sshd}, one
per "host" address (127.0.0.1, 127.0.0.2, ...), with host and user keys
generated for the test, and an ssh client configuration that knows them.

Each sshd runs commands as the user running the tests (its own key is the
one authorized), with a C{PATH} that starts with this Python's C{bin}, so
that C{octo} there is the octotwist under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD_PROGRAM = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SSHD:
    """One running sshd: a "host"."""

    address: str
    port: int
    host_key: Path
    process: subprocess.Popen[bytes]

    @property
    def name(self) -> str:
        """As --hosts names it."""
        return f"{self.address}:{self.port}"

    def fingerprint(self) -> str:
        """Its host key's SHA256 fingerprint, as ssh shows it."""
        out = subprocess.run(
            ["ssh-keygen", "-lf", f"{self.host_key}.pub"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.split()[1]

    def known_hosts_line(self) -> str:
        key = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        return f"[{self.address}]:{self.port} {key}\n"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Hosts:
    """The sshds, and an ssh configuration that reaches each with our key."""

    directory: Path
    hosts: list[SSHD]
    user_key: Path

    def ssh_config(self, known: list[SSHD] | None = None, name: str = "ssh_config") -> Path:
        """
        A client configuration (C{ssh -F}) whose known_hosts holds the host
        keys of C{known} (default: every host's).
        """
        known_hosts = self.directory / f"{name}.known_hosts"
        known_hosts.write_text("".join(h.known_hosts_line() for h in known or self.hosts))
        config = self.directory / name
        config.write_text(
            "Host *\n"
            f"  IdentityFile {self.user_key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  ConnectTimeout 10\n"
        )
        return config

    def ssh_command(self, known: list[SSHD] | None = None, name: str = "ssh_config") -> str:
        return f"ssh -F {self.ssh_config(known, name)}"

    def stop(self) -> None:
        for h in self.hosts:
            h.stop()


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _free_port(address: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def start_hosts(directory: Path, addresses: list[str]) -> Hosts:
    """
    An sshd on each address; skips the test (saying why) where sshd cannot
    run: not installed, or not allowed to.
    """
    if not os.path.exists(SSHD_PROGRAM) or shutil.which("ssh") is None:
        pytest.skip("OpenSSH's sshd and ssh are needed (apt install openssh-server openssh-client)")
    directory.mkdir(parents=True, exist_ok=True)
    user_key = directory / "user_key"
    _keygen(user_key)
    authorized = directory / "authorized_keys"
    authorized.write_text(Path(f"{user_key}.pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation directory
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    # The hosts run the code under test, also when it is not the installed
    # one (tests/mutation.py puts a mutated copy first on PYTHONPATH).
    pythonpath = os.environ.get("PYTHONPATH")
    also = f" PYTHONPATH={pythonpath}" if pythonpath else ""  # (one SetEnv line counts)
    hosts = []
    for address in addresses:
        host_key = directory / f"host_key_{address}"
        _keygen(host_key)
        port = _free_port(address)
        config = directory / f"sshd_config_{address}"
        config.write_text(
            f"ListenAddress {address}:{port}\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\n"
            f"PidFile {directory}/sshd_{address}.pid\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            f"SetEnv PATH={path}{also}\n"
        )
        log = directory / f"sshd_{address}.log"
        with log.open("wb") as log_file:  # (sshd keeps its own copy)
            process = subprocess.Popen(
                [SSHD_PROGRAM, "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        hosts.append(SSHD(address, port, host_key, process))
    everything = Hosts(directory, hosts, user_key)
    deadline = time.monotonic() + 10
    for h in hosts:
        while "Server listening" not in (directory / f"sshd_{h.address}.log").read_text():
            if h.process.poll() is not None or time.monotonic() > deadline:
                everything.stop()
                why = (directory / f"sshd_{h.address}.log").read_text().strip()
                pytest.skip(f"sshd cannot run here: {why or 'it did not start'}")
            time.sleep(0.02)
    return everything

"""
What the server sends a worker as a map task's input: compressed for a
worker on another machine, plain for one on the server's own machine.

The server here is a real L{JobServer} driven by a L{Clock}; the channel is
the core's side of a connection (what a transport hands it), recording what
the server sends, so the bytes of each input can be looked at directly.
The same choice over real sockets is covered by every end-to-end test, whose
workers share the server's machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock

from octotwist import codec, messages
from octotwist.job import load_job
from octotwist.machine import local_address, machine_id, same_machine
from octotwist.server import JobServer
from octotwist.transport import MessageChannel

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Recorder(MessageChannel):
    def __init__(self, address: IAddress | None = None) -> None:
        self.sent: list[messages.Message] = []
        self.address = address

    @property
    def peer(self) -> str:
        return "test"

    @property
    def peer_address(self) -> IAddress | None:
        return self.address

    def send(self, message: messages.Message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


def _first_input(tmp_path: Path, machine: str | None, address: IAddress | None = None) -> bytes:
    script = tmp_path / "job.py"
    script.write_text(
        "source = {'k': 'some text ' * 100}\n"
        "def mapfn(k, v):\n    yield k, 1\n"
        "def reducefn(k, vs):\n    return k, len(vs)\n"
    )
    server = JobServer(load_job(script), Clock())
    channel = _Recorder(address)
    session = server.accept(channel)
    server.start()
    session.message_received(messages.Hello("w", "h", 1, 1, machine=machine))
    (data,) = [m.data for m in channel.sent if isinstance(m, messages.TaskInput)]
    assert codec.unpack(data) == (("k",), ["some text " * 100])  # a batch of one item
    return data


@pytest.mark.skipif(machine_id() is None, reason="no machine id on this system")
def test_a_worker_on_this_machine_gets_its_input_uncompressed(tmp_path: Path) -> None:
    data = _first_input(tmp_path, machine_id())
    assert data.startswith(b"\x80\x05")  # a bare protocol-5 pickle


@pytest.mark.parametrize("machine", [None, "another-machine"])
def test_a_worker_elsewhere_gets_its_input_compressed(tmp_path: Path, machine: str | None) -> None:
    data = _first_input(tmp_path, machine)
    assert data.startswith(ZSTD_MAGIC)


LOOPBACK = IPv4Address("TCP", "127.0.0.1", 5000)
#: TEST-NET-1 (RFC 5737): never an address of this machine.
ELSEWHERE = IPv4Address("TCP", "192.0.2.7", 5000)


@pytest.mark.skipif(machine_id() is None, reason="no machine id on this system")
@pytest.mark.parametrize("address", [LOOPBACK, UNIXAddress(b"/run/octo.sock"), None])
def test_a_worker_on_this_machine_by_its_address_gets_its_input_uncompressed(
    tmp_path: Path, address: IAddress | None
) -> None:
    assert _first_input(tmp_path, machine_id(), address).startswith(b"\x80\x05")


@pytest.mark.skipif(machine_id() is None, reason="no machine id on this system")
def test_a_worker_with_our_boot_id_from_another_address_gets_its_input_compressed(
    tmp_path: Path,
) -> None:
    """A container or a namespace on this host: the same kernel, another network stack."""
    assert _first_input(tmp_path, machine_id(), ELSEWHERE).startswith(ZSTD_MAGIC)


def test_local_addresses() -> None:
    assert local_address(LOOPBACK) is True
    assert local_address(IPv4Address("TCP", "127.3.4.5", 1)) is True
    assert local_address(IPv6Address("TCP", "::1", 1)) is True
    assert local_address(IPv6Address("TCP", "::ffff:127.0.0.1", 1)) is True
    assert local_address(UNIXAddress(b"/tmp/s")) is True
    assert local_address(ELSEWHERE) is False
    assert local_address(IPv6Address("TCP", "2001:db8::5", 1)) is False  # documentation prefix
    assert local_address(None) is None


def test_machine_ids() -> None:
    assert not same_machine(None)
    assert not same_machine("another-machine")
    if machine_id() is not None:
        assert same_machine(machine_id())
        assert machine_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.mark.parametrize("value", [("k", "v" * 1000), b"", None, {"a": [1, 2]}])
@pytest.mark.parametrize("compress", [True, False])
def test_packed_blobs_say_whether_they_are_compressed(value: object, compress: bool) -> None:
    blob = codec.pack(value, compress=compress)
    assert blob.startswith(ZSTD_MAGIC) == compress
    assert codec.unpack(blob) == value

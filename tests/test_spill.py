"""
A spill directory that is full fails the job, once, with a message that
names the directory and the error and says what to do (security review,
issue 12, finding 8).  It used to requeue the task at no cost, forever,
with a traceback each time.

For real: a 1 MiB tmpfs, all but a few pages of it taken, as the server's
TMPDIR; C{--memory-limit 0} sends every map output to the spill file.
Mounting needs root (as in CI); without it the test says so and skips.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import finish, free_port, start, wait_for_port
from test_end_to_end import job

SECRET = "spill-test-secret-0123456789"

# Map outputs that zstd cannot shrink: 300 kB each, far past what is left.
BIG_OUTPUTS = """
import os
source = {i: i for i in range(8)}
def mapfn(key, value):
    yield key, os.urandom(300_000)
def reducefn(key, values):
    return key, len(values[0])
"""


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs with 64 KiB left: room for tempfile's probe, not for a spill."""
    directory = tmp_path / "spill"
    directory.mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command to make a small tmpfs")
    r = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {r.stderr.strip()}")
    try:
        (directory / "filler").write_bytes(b"\0" * (1024 - 64) * 1024)
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_full_spill_directory_fails_the_job_once_with_what_to_do(
    env: dict, tmp_path: Path, full_tmpfs: Path
) -> None:
    env = {**env, "OCTO_SECRET": SECRET}
    port = free_port()
    out = tmp_path / "out.tsv"
    out.write_text("previous\t1\n")
    server = start(
        "server", str(job(tmp_path, BIG_OUTPUTS)), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--memory-limit", "0", "-o", str(out), env={**env, "TMPDIR": str(full_tmpfs)},
    )  # fmt: skip
    wait_for_port(port, server)
    worker = start("client", f"127.0.0.1:{port}", "-p", "2", env=env)
    code, _, err = finish(server, timeout=60)  # it used to loop forever
    wcode, _, werr = finish(worker, timeout=60)
    assert code == 1, err
    assert f"cannot spill to {full_tmpfs}: no space left on device" in err, err
    assert "point TMPDIR at" in err and "--memory-limit" in err
    assert err.count("job job failed") == 1, err
    assert "Traceback" not in err and "Unhandled" not in err, err
    assert "goes back in the queue" not in err and "go back in the queue" not in err, err
    assert wcode != 0 and "cannot spill to" in werr, werr
    assert out.read_text() == "previous\t1\n"  # no partial results

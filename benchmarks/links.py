"""
The map phase across a slow link, against the LAN (issue 17): a job of many
small map tasks, served by C{octo server}, worked by two C{octo client}s
(two processes each) whose traffic crosses an emulated link
(L{octotwist.testing.link.SlowLink}) of 0 ms and of 50 ms one way (a
100 ms round trip).  Prints each transport's map-phase time, measured from
the status page (the first task running to the phase's end), and the ratio
of the slow link's to the LAN's, medians of the runs, all in one process
tree.

    python benchmarks/links.py                          # tcp and http, 3 runs each
    python benchmarks/links.py --transport tcp --runs 5 --delay 0.05

With C{--outage SECONDS}, it also times the whole job when one of the two
workers' link goes down one second after both joined, for that long, against
the same job undisturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from octotwist.testing.link import SlowLink

JOB = """
import time
source = {i: i for i in range(KEYS)}
def mapfn(key, value):
    time.sleep(PAUSE)
    yield key % 10, 1
def reducefn(key, values):
    return key, len(values)
reduce_tasks = 2
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def octo(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "octotwist", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def status(web: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/status.json", timeout=2) as r:
            return json.load(r)
    except OSError:
        return None


def run(
    transport: str, delay: float, keys: int, work: Path, pause: float = 0.0, outage: float = 0.0
) -> tuple[float, float]:
    """
    One job: its map phase's seconds, and the whole job's (from both
    workers' joining to the server's exit).

    @param pause: seconds each map item takes.
    @param outage: seconds the second worker's link is down, from 1 s
        after both workers joined.
    """
    env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"), OCTO_SECRET="b" * 43)
    script = work / "linkjob.py"
    script.write_text(JOB.replace("KEYS", str(keys)).replace("PAUSE", str(pause)))
    port, web = free_port(), free_port()
    started = time.monotonic()
    server = octo(
        "server", str(script), "--transport", transport, "-q", "-o", str(work / "out.tsv"),
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--web", f"tcp:{web}", env=env,
    )  # fmt: skip
    wait_for_port(port)
    links = [SlowLink(port, delay=delay) for _ in range(2)]
    workers = [
        octo("client", f"127.0.0.1:{link.port}", "--transport", transport, "-p", "2", env=env)
        for link in links
    ]
    first = end = joined = None
    cut = False
    while server.poll() is None:
        s = status(web)
        now = time.monotonic()
        if joined is None and s is not None and len(s["workers"]) == 2:
            joined = now  # the clock of the outage and of the whole job
        if outage and joined is not None and not cut and now - joined > 1.0:
            links[1].down()
            cut = True
        if cut and not links[1].is_up and now - joined > 1.0 + outage:
            links[1].up()
        if s is not None:
            if first is None and s["map"]["running"]:
                first = now
            if first is not None and end is None and s["phase"] != "mapping":
                end = now
        time.sleep(0.02)
    total = time.monotonic() - (joined or started)
    for w in workers:
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
    for link in links:
        link.close()
    if server.returncode != 0:
        raise SystemExit(f"{transport}: the job failed (exit {server.returncode})")
    if first is None or end is None:
        raise SystemExit(f"{transport}: the status page never showed the map phase")
    return end - first, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", action="append", help="tcp, http (default: both)")
    parser.add_argument("--runs", type=int, default=3, help="0: only the outage")
    parser.add_argument("--delay", type=float, default=0.05, help="one way, seconds")
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--pause", type=float, default=0.001, help="seconds a map item takes")
    parser.add_argument("--outage", type=float, default=0.0, help="seconds; 0: none")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="octo-links-"))
    try:
        print(
            f"{args.keys} map items of {args.pause * 1000:g} ms, 2 workers x 2 processes, "
            f"medians of {args.runs} runs"
        )
        for transport in args.transport or ["tcp", "http"]:
            lan, slow = [], []
            for _ in range(args.runs):  # alternated, so that drift hits both alike
                lan.append(run(transport, 0.0, args.keys, work, args.pause)[0])
                slow.append(run(transport, args.delay, args.keys, work, args.pause)[0])
            if args.runs:
                a, b = statistics.median(lan), statistics.median(slow)
                print(
                    f"{transport:5} map phase: LAN {a:.2f} s, {args.delay * 1000:.0f} ms link "
                    f"{b:.2f} s, ratio {b / a:.2f}x"
                )
            if args.outage:
                # Items of 20 ms: the job is still running when the link goes.
                calm = run(transport, 0.0, args.keys, work, pause=0.02)[1]
                cut = run(transport, 0.0, args.keys, work, pause=0.02, outage=args.outage)[1]
                print(
                    f"{transport:5} whole job: undisturbed {calm:.2f} s, with a {args.outage:g} s "
                    f"outage of one worker at 1 s {cut:.2f} s, ratio {cut / calm:.2f}x"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

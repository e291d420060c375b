"""
How the status page copes with a job of many tasks, in a real browser.

Runs ``octo run -w WORKERS`` on a job of ``--tasks`` map items (each sleeps
``--task-ms``: longer than the scheduler's 0.1 s batch target, so that each
item is a task of its own, and the job lasts long enough to be watched)
with ``--web``, opens its page in headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through selenium) as soon as it listens, and prints:

- the time to first render: from the start of navigation to the page's
  first drawing of the task stream (its script's own ``performance.now()``);
- what drawing costs: the task stream and the charts, per update (the
  median and the worst), as the job grows;
- the page's own CPU while it followed the job: Chromium's ``TaskDuration``
  (all the renderer's main-thread work: script, layout, paint) over the
  time the page was open, as a fraction of one core;
- that the page drew a bar for every attempt the server recorded.

    python benchmarks/status_page.py --tasks 10000

Figures vary with the machine; the fraction of a core is the one to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

JOB = """
import time
source = {{i: "w%d x" % (i % 97) for i in range({tasks})}}
def mapfn(key, value):
    time.sleep({seconds})
    if key % {fail_every} == {fail_every} - 1:
        raise ValueError("record %d is bad (one in {fail_every} is, on purpose)" % key)
    for word in value.split():
        yield word, 1
def reducefn(key, values):
    return key, sum(values)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"octo run exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"nothing listens on port {port} after {timeout} s")


def browser(profile: Path):  # type: ignore[no-untyped-def]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        sys.exit("selenium is not installed: pip install -e '.[test]'")
    for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not os.access(path, os.X_OK):
            sys.exit(f"no {path}: apt-get install chromium chromium-driver")
    os.environ["SE_OFFLINE"] = "true"
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def screenshot(driver, path: Path) -> None:  # type: ignore[no-untyped-def]
    """The page with its first failed attempt's bar clicked, its details shown."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.set_window_size(1100, 1700)
    # (the finished page no longer updates: draw it again at this width)
    driver.execute_script("window.dispatchEvent(new Event('resize'));")
    time.sleep(0.5)
    bars = driver.execute_script("return window.octoStream;")
    failed = [b for b in bars if b["state"] == "failed"]
    canvas = driver.find_element(By.ID, "stream")
    if failed:
        size = canvas.size
        ActionChains(driver).move_to_element_with_offset(
            canvas,
            int(failed[0]["x"] + failed[0]["w"] / 2 - size["width"] / 2),
            int(failed[0]["y"] + failed[0]["h"] / 2 - size["height"] / 2),
        ).click().perform()
    driver.execute_script("document.getElementById('pictures').scrollIntoView();")
    driver.save_screenshot(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--task-ms", type=float, default=110.0)
    ap.add_argument("--workers", type=int, default=20, help="local task processes")
    ap.add_argument("--fail-every", type=int, default=2500, help="one item in N raises")
    ap.add_argument(
        "--screenshot", type=Path, help="save the page here (PNG), a failure's bar clicked"
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="octo-page-") as tmp:
        work = Path(tmp)
        job = work / "job.py"
        job.write_text(JOB.format(tasks=a.tasks, seconds=a.task_ms / 1000, fail_every=a.fail_every))
        port = free_port()
        octo = subprocess.Popen(
            [sys.executable, "-m", "octotwist", "run", str(job), "-w", str(a.workers), "-q",
             "--web", f"tcp:{port}:interface=127.0.0.1", "-o", str(work / "out.tsv"),
             "--skip-bad-records", "--max-attempts", "1"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        driver = browser(work / "profile")
        try:
            wait_for_port(port, octo)
            url = f"http://127.0.0.1:{port}/"
            driver.execute_cdp_cmd("Performance.enable", {})
            opened = time.monotonic()
            driver.get(url)
            draws: list[float] = []
            attempts = 0
            while True:
                state = driver.execute_script(
                    "return {first: window.octoFirstDrawMs, draw: window.octoDrawMs,"
                    " updates: window.octoUpdates,"
                    " phase: (document.getElementById('phase') || {}).textContent,"
                    " bars: (window.octoStream || []).length};"
                )
                if state["draw"] is not None:
                    draws.append(state["draw"])
                if state["phase"] in ("finished", "failed"):
                    break
                if time.monotonic() - opened > 600:
                    sys.exit("the job did not finish within 10 minutes")
                time.sleep(0.5)
            with urllib.request.urlopen(url + "status.json?since=0", timeout=30) as r:
                stream = json.load(r)["stream"]
                attempts = stream["next"]
            metrics = {
                m["name"]: m["value"]
                for m in driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
            }
            watched = time.monotonic() - opened
            if a.screenshot:
                screenshot(driver, a.screenshot)
        finally:
            driver.quit()
            octo.wait(120)
    busy = metrics.get("TaskDuration", 0.0)
    print(
        f"job: {a.tasks} map items on {a.workers} processes: "
        f"{attempts} attempts in all, reduces included"
    )
    print(f"time to first render: {state['first']:.0f} ms after navigation began")
    print(
        f"drawing the task stream and charts: median {statistics.median(draws):.1f} ms, "
        f"worst {max(draws):.1f} ms an update ({len(draws)} looked at)"
    )
    print(
        f"the page's main thread: {busy:.2f} s busy in {watched:.1f} s open "
        f"({busy / watched:.0%} of one core; script {metrics.get('ScriptDuration', 0):.2f} s)"
    )
    print(f"bars drawn: {state['bars']} for {attempts} attempts recorded")
    if state["bars"] != attempts:
        sys.exit("MISMATCH: the page did not draw a bar per attempt")


if __name__ == "__main__":
    main()

"""
The status page's JavaScript refresh, in a real browser: Debian's headless
Chromium, driven through its chromedriver with selenium, against a real
C{octo server --web} on 127.0.0.1 whose map tasks wait for gate files that
the test opens, so that the page is watched mid-job.

What the page's script (L{octotwist.status._SCRIPT}) promises, checked in the
DOM: the counts change without a reload; an opened failure stays open
across refreshes; the page says when the job finished and stops asking; it
says it lost contact when the server is killed mid-job.  All of that only
happens if the inline script runs under the page's strict
Content-Security-Policy (script and style allowed by their hashes), so these
tests also prove that the hash matches the script the page sends.

Without chromium and chromedriver (Debian's packages: .ci/run installs them)
the tests skip, saying so; in CI (CI=true) they fail instead, so that a
missing browser cannot pass silently.  No driver is ever downloaded: the
service is given /usr/bin/chromedriver, so selenium-manager is not run
(SE_OFFLINE is set too).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import finish, free_port, parse_tsv, start, wait_for_log, wait_for_port
from test_end_to_end import job

from octotwist.status import CONTENT_SECURITY_POLICY, REFRESH_MS

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:  # pragma: no cover - the test extra installs it
    webdriver = None
    _SELENIUM_ERROR = f"selenium is not installed ({e}); pip install -e '.[test]'"
else:
    _SELENIUM_ERROR = ""

CHROMIUM = os.environ.get("OCTO_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("OCTO_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: Long enough for a loaded 2-core machine; every wait ends as soon as the
#: condition holds.
DEADLINE = 60

# Twelve keys.  Keys 0 to 5 wait for the gate "first", the others for
# "second"; key 4 always fails, so the page lists failures (the job still
# completes with --skip-bad-records).
GATED = """
import os, time
GATES = {gates!r}
source = {{i: "w%d x y" % i for i in range(12)}}
def mapfn(key, value):
    gate = os.path.join(GATES, "first" if key < 6 else "second")
    while not os.path.exists(gate):
        time.sleep(0.05)
    if key == 4:
        print("about to fail on four")
        raise RuntimeError("bad record four")
    for word in value.split():
        yield word, 1
def reducefn(key, values):
    return key, sum(values)
"""


def _missing() -> str:
    """Why the browser cannot be driven here, or C{""} when it can."""
    if _SELENIUM_ERROR:
        return _SELENIUM_ERROR
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"no {path} (Debian's {package} package; .ci/run installs it)"
    return ""


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, through Debian's chromedriver."""
    why = _missing()
    if why:
        if IN_CI:
            pytest.fail(f"CI=true but the browser test cannot run: {why}", pytrace=False)
        pytest.skip(why)
    # The driver's path is given, so selenium-manager has nothing to find;
    # should it run anyway, it must not go looking on the network.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",  # root, as in CI
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, what: str, condition: Any, timeout: float = DEADLINE) -> Any:
    """Wait until C{condition(driver)} is true; fail saying C{what} and showing the page."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        main = driver.execute_script(
            "var m = document.getElementById('main'); return m ? m.innerText : '(no main)';"
        )
        refused = csp_refusals(driver)
        raise AssertionError(
            f"not in {timeout} s: {what}\nthe page shows:\n{main}"
            + (f"\nthe browser refused: {refused}" if refused else "")
        ) from None


def assert_never(driver: Any, what: str, condition: Any, during: float) -> None:
    """C{condition(driver)} stays false for C{during} seconds."""
    try:
        WebDriverWait(driver, during, poll_frequency=0.1).until(condition)
    except TimeoutException:
        return
    raise AssertionError(what)


def csp_refusals(driver: Any) -> list[str]:
    """What the browser's console says the Content-Security-Policy refused."""
    entries = driver.get_log("browser")
    return [e["message"] for e in entries if "Content Security Policy" in e["message"]]


def text(driver: Any, element_id: str) -> str | None:
    """The text of the element with this id, or C{None} if there is none."""
    return driver.execute_script(
        "var e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
        element_id,
    )


def count(driver: Any, element_id: str) -> int:
    value = text(driver, element_id)
    return int(value) if value and value.isdigit() else -1


# Run in the page by the test (chromedriver's scripts are not the page's, so
# the page's CSP does not apply to them): count the page's fetches (the
# cluster's pages poll; a job's page counts its own updates, octoUpdates),
# and mark the window, which a reload would lose.
_WATCH = """
window.octoTestMark = "still the same page";
window.octoFetches = 0;
var original = window.fetch;
window.fetch = function () { window.octoFetches += 1; return original.apply(this, arguments); };
"""


def serve_gated(
    tmp_path: Path, env: dict[str, str], *more: str
) -> tuple[Any, int, int, Path, Path]:
    """A real octo server for L{GATED}, its page on loopback (no token)."""
    gates = tmp_path / "gates"
    gates.mkdir()
    port, web = free_port(), free_port()
    out = tmp_path / "out.tsv"
    server = start(
        "server", str(job(tmp_path, GATED.format(gates=str(gates)))),
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--web", f"tcp:{web}:interface=127.0.0.1",
        "-o", str(out), "--skip-bad-records", "--max-attempts", "1", *more, env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    wait_for_port(web, server)
    return server, port, web, gates, out


def test_the_page_follows_the_job_in_a_browser_and_stops_when_it_finished(
    browser: Any, env: dict, tmp_path: Path
) -> None:
    server, port, web, gates, out = serve_gated(tmp_path, env)
    url = f"http://127.0.0.1:{web}/"
    with urllib.request.urlopen(url, timeout=10) as r:  # what the browser gets
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'sha256-" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY

    browser.get(url)
    assert text(browser, "phase") == "mapping" and count(browser, "map-done") == 0
    assert text(browser, "workers") == "No workers connected."
    browser.execute_script(_WATCH)

    # A worker joins: the page shows it without being reloaded.
    worker = start("client", f"127.0.0.1:{port}", "-n", "w1", "-p", "2", env=env)
    wait_for(browser, "the worker on the page", lambda d: text(d, "worker-count") == "1")
    assert "w1" in (text(browser, "workers") or "")
    assert count(browser, "map-done") == 0  # every task waits for its gate

    # Keys 0 to 5 may go (4 fails): the done count goes up, a failure shows.
    (gates / "first").touch()
    wait_for(browser, "map 5/12 done", lambda d: count(d, "map-done") >= 5)
    wait_for(browser, "the failure listed", lambda d: text(d, "failure-0") is not None)
    assert "bad record four" in text(browser, "failure-0")
    assert count(browser, "map-total") == 12 and text(browser, "phase") == "mapping"
    assert browser.execute_script("return window.octoTestMark;") == "still the same page"

    # Open the failure; it stays open across refreshes, which replace it.
    browser.find_element(By.CSS_SELECTOR, "#failure-0 > summary").click()
    assert browser.execute_script("return document.getElementById('failure-0').open;")
    browser.execute_script("document.getElementById('failure-0').octoOld = true;")
    seen = browser.execute_script("return window.octoUpdates;")
    wait_for(
        browser,
        "two more updates",
        lambda d: d.execute_script("return window.octoUpdates;") >= seen + 2,
    )
    wait_for(
        browser,
        "the failure replaced by a refresh",
        lambda d: d.execute_script(
            "var e = document.getElementById('failure-0'); return e && !e.octoOld;"
        ),
    )
    assert browser.execute_script("return document.getElementById('failure-0').open;")
    traceback = browser.find_element(By.CSS_SELECTOR, "#failure-0 pre")
    assert traceback.is_displayed() and 'raise RuntimeError("bad record four")' in traceback.text

    # The rest may go: the page says the job finished, with the final counts.
    (gates / "second").touch()
    wait_for(browser, "the job finished", lambda d: text(d, "phase") == "finished")
    assert count(browser, "map-done") == 12 and count(browser, "map-total") == 12
    assert count(browser, "reduce-done") == count(browser, "reduce-total") >= 1
    assert browser.title == "octo: job (finished)"
    assert browser.execute_script("return document.getElementById('failure-0').open;")
    assert browser.execute_script("return window.octoTestMark;") == "still the same page"

    # ...and stops listening: once the server is gone, no update comes and
    # the page does not say it lost contact (a stream still open would).
    updates = browser.execute_script("return window.octoUpdates;")
    code, _, err = finish(server)
    assert code == 0, err
    assert finish(worker)[0] == 0
    assert_never(
        browser,
        "the page heard from the server again after it showed the job finished",
        lambda d: d.execute_script("return window.octoUpdates;") != updates or text(d, "contact"),
        # Nothing to wait for: the absence of polls is watched for 4 periods.
        during=4 * REFRESH_MS / 1000,
    )
    assert text(browser, "phase") == "finished"

    expected = {f"w{i}": 1 for i in range(12) if i != 4} | {"x": 11, "y": 11}
    assert parse_tsv(out.read_text()) == expected
    assert_no_csp_violation(browser)


def test_the_page_says_it_lost_contact_when_the_server_is_killed(
    browser: Any, env: dict, tmp_path: Path
) -> None:
    server, port, web, _, _ = serve_gated(tmp_path, env)
    browser.get(f"http://127.0.0.1:{web}/")
    browser.execute_script(_WATCH)
    start("client", f"127.0.0.1:{port}", "-n", "w1", "--wait", "5", env=env)
    wait_for(browser, "the worker on the page", lambda d: text(d, "worker-count") == "1")
    assert text(browser, "contact") == ""

    server.send_signal(signal.SIGKILL)  # mid-job: every task still waits for its gate
    server.wait(30)
    wait_for(
        browser,
        "the page saying it lost contact",
        lambda d: "Lost contact with the server" in (text(d, "contact") or ""),
    )
    # The last state stays on the page, and the page was never reloaded.
    assert text(browser, "phase") == "mapping" and count(browser, "map-done") == 0
    assert browser.execute_script("return window.octoTestMark;") == "still the same page"
    assert_no_csp_violation(browser)


def assert_no_csp_violation(driver: Any) -> None:
    """The browser's console reported no Content-Security-Policy refusal."""
    refused = csp_refusals(driver)
    assert not refused, refused


def test_the_cluster_page_follows_its_jobs_in_a_browser(
    browser: Any, env: dict, tmp_path: Path
) -> None:
    """octo serve --web: a job's row changes state without a reload; its link opens its page."""
    gates = tmp_path / "gates"
    gates.mkdir()
    port, web = free_port(), free_port()
    server = start(
        "serve", "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--web", f"tcp:{web}:interface=127.0.0.1", env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    wait_for_port(web, server)
    address = f"127.0.0.1:{port}"
    script = job(tmp_path, GATED.format(gates=str(gates)))
    submitted = start("submit", "-c", address, str(script), env=env)  # (key 4 fails it)
    browser.get(f"http://127.0.0.1:{web}/")
    wait_for(browser, "job 1 listed", lambda d: text(d, "job-1-state") in ("queued", "running"))
    browser.execute_script(_WATCH)
    worker = start("client", address, "-p", "2", env=env)
    wait_for(browser, "its worker", lambda d: count(d, "workers-working") == 1)
    assert text(browser, "job-1-state") == "running"
    (gates / "first").touch()
    (gates / "second").touch()
    wait_for(browser, "job 1 over", lambda d: text(d, "job-1-state") in ("done", "failed"))
    assert browser.execute_script("return window.octoTestMark;") == "still the same page"
    assert browser.title.startswith("octo serve: 0 running, 0 queued"), browser.title
    assert not csp_refusals(browser)
    finish(submitted)
    browser.find_element(By.LINK_TEXT, "1").click()
    wait_for(browser, "the job's own page", lambda d: text(d, "phase") in ("finished", "failed"))
    assert count(browser, "map-total") == 12
    server.kill()
    worker.kill()


def finished_bars(driver: Any) -> list[dict[str, Any]]:
    """The task stream's bars of attempts that ended, as the page drew them."""
    bars = driver.execute_script("return window.octoStream || [];")
    return [b for b in bars if b["state"] != "running"]


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_task_stream_draws_each_attempt_and_shows_a_failure_when_clicked(
    browser: Any, env: dict, tmp_path: Path
) -> None:
    """
    A bar per finished attempt, as many as the server's own record of them;
    the bars and the counts grow while the job runs; a click on the failed
    attempt's bar shows its traceback; the charts are drawn; the console
    stays clean.
    """
    # No backup copies: every task has the one attempt this test counts.
    server, port, web, gates, out = serve_gated(tmp_path, env, "--backup-after", "0")
    url = f"http://127.0.0.1:{web}/"
    browser.get(url)
    wait_for(browser, "the page's first update", lambda d: d.execute_script(
        "return window.octoUpdates;") >= 1)  # fmt: skip
    assert finished_bars(browser) == [] and text(browser, "stream-count") == "0"
    worker = start("client", f"127.0.0.1:{port}", "-n", "w1", "-p", "2", env=env)

    # Keys 0 to 5 go (4 fails); 6 to 11 wait at the second gate, running.
    (gates / "first").touch()
    wait_for(browser, "six finished bars", lambda d: len(finished_bars(d)) == 6)
    with urllib.request.urlopen(url + "status.json?since=0", timeout=10) as r:
        stream = json.load(r)["stream"]
    recorded = sorted((a["task"], a["state"]) for a in stream["attempts"])
    drawn = sorted((b["task"], b["state"]) for b in finished_bars(browser))
    assert drawn == recorded and len(recorded) == 6
    assert ("map 4", "failed") in drawn and sum(s == "ok" for _, s in drawn) == 5
    assert text(browser, "stream-count") == "6"
    # A row per worker process: two processes, so two rows.
    assert len({b["y"] for b in finished_bars(browser)}) == 2

    (failed,) = [b for b in finished_bars(browser) if b["state"] == "failed"]
    canvas = browser.find_element(By.ID, "stream")
    size = canvas.size
    ActionChains(browser).move_to_element_with_offset(
        canvas,
        int(failed["x"] + failed["w"] / 2 - size["width"] / 2),
        int(failed["y"] + failed["h"] / 2 - size["height"] / 2),
    ).click().perform()
    wait_for(browser, "the failed attempt's traceback", lambda d: text(d, "stream-traceback"))
    assert 'raise RuntimeError("bad record four")' in text(browser, "stream-traceback")
    assert "map 4 attempt 1 on w1: failed" in text(browser, "stream-attempt")
    assert text(browser, "stream-output") == "about to fail on four\n"  # what it printed
    # The charts are drawn: some pixel of the tasks-per-second chart is set.
    assert browser.execute_script(
        "var c = document.getElementById('chart-tasks');"
        "var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "for (var i = 3; i < d.length; i += 4) { if (d[i]) { return true; } } return false;"
    )

    shot = os.environ.get("OCTO_STATUS_SCREENSHOT")
    if shot:  # docs/status.md's picture: OCTO_STATUS_SCREENSHOT=docs/status-page.png
        browser.set_window_size(1000, 1500)
        wait_for(browser, "an update at the new size", lambda d: d.execute_script(
            "return window.octoUpdates;") >= 2)  # fmt: skip
        browser.execute_script("document.getElementById('stream').scrollIntoView();")
        browser.save_screenshot(shot)

    (gates / "second").touch()
    wait_for(browser, "the job finished", lambda d: text(d, "phase") == "finished")
    reduces = count(browser, "reduce-total")
    assert len(finished_bars(browser)) == 12 + reduces
    assert text(browser, "stream-count") == str(12 + reduces)
    # The pinned failure stays shown across updates.
    assert 'raise RuntimeError("bad record four")' in text(browser, "stream-traceback")
    assert finish(server)[0] == 0 and finish(worker)[0] == 0
    expected = {f"w{i}": 1 for i in range(12) if i != 4} | {"x": 11, "y": 11}
    assert parse_tsv(out.read_text()) == expected
    assert console_errors(browser) == []


def test_the_page_follows_a_server_that_resumes_after_a_restart(
    browser: Any, env: dict, tmp_path: Path
) -> None:
    """
    Killed mid-job, the server is started again on the same ports and state
    directory: the page, never reloaded, says it lost contact, reconnects by
    itself, and follows the resumed job to its end.
    """
    state = tmp_path / "state"
    server, port, web, gates, out = serve_gated(
        tmp_path, env, "--state-dir", str(state), "--backup-after", "0"
    )
    command = server.args[3:]  # (after python -m octotwist; no --transport, no extras)
    browser.get(f"http://127.0.0.1:{web}/")
    browser.execute_script(_WATCH)
    worker = start("client", f"127.0.0.1:{port}", "-n", "w1", "-p", "2", "--wait", "120", env=env)
    (gates / "first").touch()
    wait_for(browser, "six finished bars", lambda d: len(finished_bars(d)) == 6)
    server.kill()
    server.wait(30)
    wait_for(
        browser,
        "the page saying it lost contact",
        lambda d: "Lost contact with the server" in (text(d, "contact") or ""),
    )
    again = start(*command, env=env)
    try:
        wait_for(browser, "the page back in contact", lambda d: text(d, "contact") == "")
        (gates / "second").touch()
        wait_for(browser, "the resumed job finished", lambda d: text(d, "phase") == "finished")
        assert count(browser, "map-done") == 12
        assert browser.execute_script("return window.octoTestMark;") == "still the same page"
        # The resumed run's attempts: of the first run's six, the five that
        # counted did not run again (the bad record, skipped, was tried again).
        bars = finished_bars(browser)
        assert len(bars) == 7 + count(browser, "reduce-total"), bars
        assert [b["state"] for b in bars].count("failed") == 1
    finally:
        code, _, err = finish(again)
    assert code == 0, err
    assert finish(worker)[0] == 0
    expected = {f"w{i}": 1 for i in range(12) if i != 4} | {"x": 11, "y": 11}
    assert parse_tsv(out.read_text()) == expected
    # Nothing went wrong in the page but the stream's own reconnection attempts.
    assert all("events" in e for e in console_errors(browser)), console_errors(browser)


#: L{GATED} without its failing key (on Dask a failed task fails the job).
_FAILS = """    if key == 4:
        print("about to fail on four")
        raise RuntimeError("bad record four")
"""
assert _FAILS in GATED
GATED_DASK = GATED.replace(_FAILS, "")


def test_the_status_page_follows_a_job_on_dask_in_a_browser(
    browser: Any, env: dict[str, str], tmp_path: Path
) -> None:
    """
    octo run --engine dask --web: the job's page, in headless Chromium,
    follows its map tasks as Dask finishes them (gated here), lists Dask's
    workers, links to Dask's own dashboard (which answers), and says when
    the job finished, with its counters; the results are exact.
    """
    pytest.importorskip(
        "distributed", reason="the dask engine needs Dask: pip install 'octotwist[dask]'"
    )
    gates = tmp_path / "gates"
    gates.mkdir()
    script = tmp_path / "gated.py"
    script.write_text(GATED_DASK.format(gates=str(gates)))
    web = free_port()
    proc = start(
        "run", str(script), "--engine", "dask", "-w", "2", "--web", f"tcp:{web}",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    seen = wait_for_log(proc, [f"status page at http://127.0.0.1:{web}/", "its dashboard: "])
    browser.get(f"http://127.0.0.1:{web}/")
    wait_for(browser, "map tasks listed", lambda d: count(d, "map-total") == 12)
    assert text(browser, "phase") == "mapping" and count(browser, "map-done") == 0
    assert text(browser, "worker-count") == "2"
    assert "Running on the dask engine" in (text(browser, "engine") or "")
    link = "var a = document.querySelector('#engine a'); return a && [a.textContent, a.href];"
    label, dashboard = browser.execute_script(link)
    assert label == "Dask's dashboard"
    # Dask's attempts and bytes are its dashboard's to show: no empty stream here.
    assert not browser.find_element(By.ID, "stream").is_displayed()
    assert browser.find_element(By.ID, "chart-tasks").is_displayed()
    assert dashboard == seen.split("its dashboard: ", 1)[1].split()[0]
    with urllib.request.urlopen(dashboard, timeout=30) as answer:  # Dask's own, for real
        assert answer.status == 200

    (gates / "first").touch()
    wait_for(browser, "six map tasks done", lambda d: count(d, "map-done") >= 6)
    assert count(browser, "map-done") < 12 and text(browser, "phase") == "mapping"

    (gates / "second").touch()
    wait_for(browser, "the job finished", lambda d: text(d, "phase") == "finished")
    assert count(browser, "map-done") == 12
    assert count(browser, "reduce-done") == count(browser, "reduce-total") >= 1
    assert "octotwist.records_read" in (text(browser, "counters") or "")
    assert csp_refusals(browser) == []
    code, out, err = finish(proc)
    assert code == 0, seen + err
    expected = collections.Counter(w for i in range(12) for w in f"w{i} x y".split())
    assert parse_tsv(out) == expected

"""
A cluster's status site (issue 16): C{octo serve --web} lists the jobs with
their state and progress, and serves each job's own page, live while it
runs and with its last figures once over; guarded as a job's page is.
Real C{octo serve}, C{octo client} and HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import free_port, octo, start, wait_for_log, wait_for_port
from test_cluster import held_job

from octotwist.status import CONTENT_SECURITY_POLICY


def get(url: str, host: str | None = None) -> tuple[int, Any, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def serve_with_web(
    env: dict, web_interface: str = "127.0.0.1", *extra: str
) -> tuple[Any, str, str]:
    port, web = free_port(), free_port()
    server = start(
        "serve", "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--web", f"tcp:{web}:interface={web_interface}", *extra, env=env,
    )  # fmt: skip
    wait_for_port(port, server)
    wait_for_port(web, server)
    return server, f"127.0.0.1:{port}", f"http://127.0.0.1:{web}/"


def jobs(site: str) -> list[dict[str, Any]]:
    code, _, body = get(site + "jobs.json")
    assert code == 200, body
    return json.loads(body)["jobs"]


def test_the_cluster_page_lists_the_jobs_and_serves_each_ones_page(
    env: dict, tmp_path: Path
) -> None:
    server, address, site = serve_with_web(env)
    held, gate_file = held_job(tmp_path)
    for script in (held, held):
        assert octo("submit", "--detach", "-c", address, str(script), env=env).returncode == 0
    worker = start("client", address, "-p", "2", env=env)
    wait_for_log(server, ["worker "])
    listed = jobs(site)
    assert [(j["id"], j["name"], j["state"]) for j in listed] == [
        (1, "held", "running"),
        (2, "held", "queued"),
    ], listed
    assert listed[0]["map"] == {"done": 0, "total": 30} and listed[1]["map"] is None
    code, headers, page = get(site)
    assert code == 200 and headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert '<a href="jobs/1/">1</a>' in page and "octo serve: 1 running, 1 queued" in page
    code, _, body = get(site + "jobs/1/status.json")
    running = json.loads(body)
    assert code == 200 and running["job"] == "held" and running["ok"] is None
    assert len(running["workers"]) == 1, running
    code, _, body = get(site + "jobs/2/status.json")
    assert json.loads(body)["state"] == "queued"
    code, _, page = get(site + "jobs/2/")
    assert code == 200 and 'id="state">queued<' in page
    code, headers, page = get(site + "jobs/1/")
    assert code == 200 and "Job <span" in page
    # A running job's page is octo server's: the task stream, and its events.
    assert '<canvas id="stream"' in page and 'new EventSource("events")' in page
    code, _, body = get(site + "jobs/1/status.json?since=0")
    stream = json.loads(body)["stream"]
    assert stream["workers"] and stream["running"], stream
    assert get(site + "jobs/9/")[0] == 404
    assert get(site + "jobs/x/")[0] == 404
    assert get(site, host="rebind.example")[0] == 421
    gate_file.touch()
    wait_for_log(server, ["job held finished"], count=2)
    listed = jobs(site)
    assert [j["state"] for j in listed] == ["done", "done"], listed
    assert listed[0]["map"] == {"done": 30, "total": 30} and listed[0]["results"] == 5
    code, _, body = get(site + "jobs/1/status.json")
    over = json.loads(body)
    assert over["ok"] is True and over["reduce"]["done"] == over["reduce"]["total"] > 0
    # Its page still draws its task stream: every reduce task, each once, ended well.
    code, _, body = get(site + "jobs/1/status.json?since=0")
    attempts = json.loads(body)["stream"]["attempts"]
    reduces = sorted(a["task"] for a in attempts if a["kind"] == "reduce")
    assert reduces == sorted(f"reduce {i}" for i in range(over["reduce"]["total"]))
    assert all(a["state"] == "ok" for a in attempts)
    server.kill()
    worker.kill()


def test_a_cluster_page_beyond_this_machine_needs_its_token(env: dict, tmp_path: Path) -> None:
    server, _, site = serve_with_web(env, "0.0.0.0", "--no-state-dir")
    seen = wait_for_log(server, ["status page at http://"])
    token = re.search(r"\?token=([\w-]+)", seen)
    assert token, seen
    assert get(site)[0] == 403
    assert get(site + "jobs.json")[0] == 403
    code, _, page = get(f"{site}?token={token[1]}")
    assert code == 200 and "No jobs yet" in page
    server.kill()

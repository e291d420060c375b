"""
L{octotwist.engine.Progress}: what an engine reports becomes the status
page's data (docs/status.md's schema) and renders, at every point of a job;
the page itself, served and in a browser, is in test_browser.py.
"""

from __future__ import annotations

import io
import json

import pytest

from octotwist.engine import KEPT_FAILURES, EngineWorker, Progress
from octotwist.status import render_main, render_page


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress() -> tuple[Progress, Clock]:
    clock = Clock()
    return Progress("wc", "dask", stream=io.StringIO(), quiet=True, clock=clock), clock


def test_a_job_reported_phase_by_phase() -> None:
    progress, clock = _progress()
    before = progress.status()
    assert before["phase"] == "starting" and before["ok"] is None  # (its cluster starting)
    assert before["map"] == {
        "total": None,
        "done": 0,
        "running": None,
        "pending": None,
        "eta": None,
    }
    render_page(before)  # (nothing reported yet: it renders)

    progress.workers([EngineWorker("tcp://127.0.0.1:4001", "127.0.0.1", 2, 2**20)])
    progress.link("Dask's dashboard", "http://127.0.0.1:8787/status")
    progress.start("map", 10)
    clock.now += 4
    progress.advance(4)
    mid = progress.status(stream_since=0)
    assert mid["map"] == {"total": 10, "done": 4, "running": None, "pending": 6, "eta": 6.0}
    assert mid["elapsed"] == 4.0 and mid["throughput"]["tasks_per_second"] == 1.0
    assert mid["workers"][0]["name"] == "tcp://127.0.0.1:4001"
    assert mid["workers"][0]["processes"] == 2 and mid["workers"][0]["memory"] == 2**20
    assert mid["engine"] == {
        "name": "dask",
        "links": [{"label": "Dask's dashboard", "url": "http://127.0.0.1:8787/status"}],
    }
    samples = mid["stream"]["samples"]
    assert [s["map_done"] for s in samples] == [0, 4] and samples[-1]["t"] == 4.0
    json.dumps(mid)  # (JSON-ready)
    main = render_main(mid)
    assert '<span id="map-done">4</span>/<span id="map-total">10</span>' in main
    assert '<span id="map-running">?</span> running' in main  # not told, not made up
    assert 'href="http://127.0.0.1:8787/status"' in main and "Dask&#x27;s dashboard" in main
    assert "received from workers" not in main  # no bytes to show

    progress.count({"words": 5})
    progress.advance(6)
    progress.start("reduce", 3)
    progress.advance(3)
    progress.count({"words": 2, "octotwist.records_read": 10})
    assert progress.status()["map"]["running"] == 0  # (a phase all done runs nothing)
    clock.now += 1
    progress.ended(True, None, seconds=4.5)  # (the engine's own measure of the job)
    clock.now += 60  # (a page read later shows the job's time, not the time since)
    end = progress.status()
    assert end["phase"] == "finished" and end["ok"] is True and end["elapsed"] == 4.5
    assert end["map"]["done"] == 10 and end["reduce"] == {
        "total": 3,
        "done": 3,
        "running": 0,
        "pending": 0,
        "eta": None,
    }
    assert end["counters"] == {"octotwist.records_read": 10, "words": 7}
    render_page(end)


def test_a_later_step_starts_afresh_and_failures_are_kept_to_the_last_ones() -> None:
    clock = Clock()
    progress = Progress("two", "dask", quiet=True, clock=clock, steps=2)
    assert progress.status()["steps"] == 2  # (before the first task)
    progress.start("map", 2, 1, 2)
    progress.advance(2)
    progress.start("reduce", 1, 1, 2)
    progress.advance()
    clock.now += 2
    progress.start("map", 1, 2, 2)
    second = progress.status(stream_since=0)
    assert (second["step"], second["steps"], second["phase"]) == (2, 2, "mapping")
    assert second["map"]["total"] == 1 and second["reduce"]["total"] is None
    assert 'step <span id="step">2</span> of' in render_main(second)
    # The charts count every step's tasks: a new step does not take them back.
    samples = second["stream"]["samples"]
    assert [s["map_done"] + s["reduce_done"] for s in samples][-1] == 3
    assert second["throughput"]["tasks_per_second"] == 1.5

    for n in range(KEPT_FAILURES + 5):
        progress.failed(f"map {n}", "ValueError: no", "Traceback...", key=repr(n), attempt=3)
    progress.ended(False, "map task 0 failed: ValueError: no")
    failed = progress.status()
    assert failed["phase"] == "failed" and failed["ok"] is False
    assert len(failed["failures"]) == KEPT_FAILURES
    assert failed["failures"][0]["task"] == "map 5" and failed["failures"][-1]["attempt"] == 3
    assert "ValueError: no" in render_main(failed)
    # The reduce the job never reached: a still bar, nothing said to be running.
    assert failed["reduce"]["running"] == 0
    assert '<progress id="reduce-bar" value="0" max="1">' in render_main(failed)


def test_an_engine_links_only_to_web_pages() -> None:
    progress, _ = _progress()
    with pytest.raises(ValueError, match="http"):
        progress.link("board", "javascript:alert(1)")
    assert progress.status()["engine"]["links"] == []

"""Progress lines when stderr is not a terminal: counts, units, and a resumed run's earlier work."""

from __future__ import annotations

import io
import re

from schemas.progress_report import ProgressReport

LINE = re.compile(r"^resume: (\d+)/(\d+) img \(([\d,]+) img/s, ETA \d+ s\)$")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_a_resumed_run_counts_earlier_work_as_done_but_not_in_its_rate(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("schemas.progress_report.time", clock)
    out = io.StringIO()
    report = ProgressReport(1000, "resume", stream=out, every_s=0.0, already=960)
    clock.now += 2.0
    report.update(40)
    assert LINE.match(out.getvalue().strip()).groups() == ("1000", "1000", "20")  # 40 images in 2 s, not 1,000
    assert report.rate == 20.0


def test_earlier_work_past_the_total_is_capped():
    report = ProgressReport(100, "x", stream=io.StringIO(), already=128)
    assert report.done == report.already == 100


def test_bytes_are_shown_in_megabytes():
    out = io.StringIO()
    report = ProgressReport(201_389_416, "verifying s.zarr", unit="B", stream=out, every_s=0.0)
    report.update(201_389_416)
    assert re.match(r"^verifying s\.zarr: 201\.4/201\.4 MB \([\d,.]+ MB/s, ETA 0 s\)$", out.getvalue().strip()), out.getvalue()

"""Progress for long work: a tqdm bar on a terminal, plain log lines every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from dask.callbacks import Callback


class ProgressReport:
    """Counts items (images) done out of a total and shows rate and ETA."""

    def __init__(self, total: int, desc: str, unit: str = "img", stream: TextIO | None = None, every_s: float = 10.0, already: int = 0):
        """`already`: items done by an earlier run (a resumed store): counted as done, left out of the rate."""
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.already = min(already, total)
        self.done, self.start, self._last_log = self.already, time.monotonic(), 0.0
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        if interactive:
            from tqdm import tqdm  # only a terminal shows a bar; batch jobs skip the import

            self._bar = tqdm(total=total, initial=self.already, desc=desc, unit=unit, unit_scale=True, file=self.stream)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if n and (now - self._last_log >= self.every_s or self.done >= self.total):
            self._last_log = now
            rate = (self.done - self.already) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            if self.unit == "B":  # bytes read in the millions: shown in MB
                print(f"{self.desc}: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB ({rate / 1e6:,.1f} MB/s, ETA {eta:,.0f} s)", file=self.stream, flush=True)
            else:
                print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:,.0f} {self.unit}/s, ETA {eta:,.0f} s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def rate(self) -> float:
        return (self.done - self.already) / max(time.monotonic() - self.start, 1e-9)


class DaskProgress(Callback):
    """Feeds a ProgressReport from a local Dask scheduler: tasks return receipts like {"images": n}."""

    def __init__(self, report: ProgressReport):
        super().__init__()
        self.report = report

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(result, dict) and "images" in result:
            self.report.update(result["images"])

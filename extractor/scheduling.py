"""Runs a list of delayed tasks locally (threads) or on a dask.distributed cluster, with progress.

Tasks read their input and write their output themselves and return small receipts ({"images": n, ...}),
so bulk data never travels through the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.threaded

from schemas.progress_report import DaskProgress, ProgressReport


@dataclass(frozen=True)
class SchedulerSpec:
    address: str | None = None  # tcp://host:port of a running dask scheduler; None = local threads
    workers: int = 2  # local threads: one computes while another reads or writes
    resources: tuple[tuple[str, float], ...] = ()  # e.g. (("GPU", 1),): each task needs one worker GPU


def run_tasks(tasks: list, spec: SchedulerSpec, report: ProgressReport, already_done: int = 0) -> list[dict]:
    """Compute the tasks and return their receipts (in task order); `already_done` items count as finished."""
    report.update(already_done)
    try:
        if spec.address is None:
            with DaskProgress(report):
                return list(dask.compute(*tasks, scheduler=dask.threaded.get, num_workers=spec.workers))
        return _run_distributed(tasks, spec, report)
    finally:
        report.close()


def _run_distributed(tasks: list, spec: SchedulerSpec, report: ProgressReport) -> list[dict]:
    from distributed import Client, as_completed

    with Client(spec.address) as client:
        # optimize_graph=False: graph optimisation may drop the resource annotations
        futures = client.compute(tasks, resources=dict(spec.resources) or None, optimize_graph=False)
        index = {f.key: i for i, f in enumerate(futures)}
        receipts: list[dict] = [{} for _ in futures]
        for future in as_completed(futures):
            receipt = future.result()
            receipts[index[future.key]] = receipt
            report.update(receipt.get("images", 0))
        return receipts


def parse_resources(text: str | None) -> tuple[tuple[str, float], ...]:
    """`GPU=1,MEM=10e9` → (("GPU", 1.0), ("MEM", 1e10))."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        pairs.append((name.strip(), float(value or 1)))
    return tuple(pairs)

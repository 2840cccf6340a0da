"""Runs a list of delayed tasks — on local threads, local processes, or a dask.distributed cluster — with progress.

One runner for every writer (convert, extract, generate). Tasks read their inputs and write their outputs
themselves and return small receipts (`{"images": n, ...}`), so bulk data never travels through the scheduler.
On a cluster, this process's fsspec defaults (what `--storage-options` set) are given to every worker first,
so workers reach the same object store the same way.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import dask
import dask.threaded

from schemas.errors import ImzarrError, RunFailedError, RunInterruptedError
from schemas.option_values import whole_numbers
from schemas.output_paths import url_protocol
from schemas.progress_report import DaskProgress, ProgressReport

# Schemes of a dask.distributed scheduler address reached over the network (tcp:// when none is written).
SCHEDULER_SCHEMES = ("tcp", "tls", "ws", "wss")
# How long a run waits for the scheduler's port to answer before anything is written.
SCHEDULER_PROBE_TIMEOUT_S = 10.0
# A distributed run checks every WORKER_CHECK_S seconds that its cluster still has workers that can run the tasks,
# and fails once it had some and then none for WORKERLESS_GRACE_S.
WORKERLESS_GRACE_S = 60.0
WORKER_CHECK_S = 10.0
POLL_S = 0.05


# The stop signal of the latest run on this process's threads: run_tasks makes a new one per run and sets it when
# Ctrl-C reaches it. Python stops only the main thread; a task still running on a pool thread would otherwise go on
# to its end (minutes for a generate task of 1,024 samples) and hold the process's exit until then.
_run_stop = threading.Event()


def run_stop() -> threading.Event:
    """The stop signal of the run a task belongs to: a task takes it when it starts and checks it between batches
    (`stop_if_interrupted`); one left running by an earlier, interrupted run keeps that run's signal. One per process:
    of two runs at once on threads of one process, tasks starting take the later run's. Process and cluster workers
    never see it set: Ctrl-C reaches local worker processes itself, and a cluster's tasks are cancelled."""
    return _run_stop


def stop_if_interrupted(stop: threading.Event) -> None:
    """End a task between two batches once its run was interrupted; its output aborts as on any error."""
    if stop.is_set():
        raise RunInterruptedError()


class SchedulerError(ImzarrError):
    """A scheduler address or resource list that cannot be used."""


class SchedulerUnreachableError(RunFailedError):
    """A well-formed scheduler address where no scheduler answers (checked before any output exists)."""


class SchedulerLostError(RunFailedError):
    """The scheduler went away during a run, or the cluster was left without workers that can run its tasks."""


class UnsatisfiableResourcesError(SchedulerError):
    """`--resources` that no worker of the cluster offers: its tasks would wait forever (checked before any output)."""


def scheduler_host_port(address: str) -> tuple[str, int]:
    """(host, port) of `tcp://HOST:PORT` (or tls://, ws://, wss://, or a bare HOST:PORT); SchedulerError otherwise."""
    text = address.strip() if isinstance(address, str) else ""
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    expected = "expected tcp://HOST:PORT of a running dask.distributed scheduler"
    if parts.scheme not in SCHEDULER_SCHEMES:
        raise SchedulerError(f"--scheduler {address!r}: scheme {parts.scheme!r} is not one of {', '.join(SCHEDULER_SCHEMES)}; {expected}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or not 0 < port < 65536 or parts.path not in ("", "/"):
        raise SchedulerError(f"--scheduler {address!r}: not a scheduler address; {expected}")
    return parts.hostname, port


def check_scheduler_reachable(spec: SchedulerSpec) -> None:
    """Refuse, before any output exists, a scheduler address whose port does not answer (one quick TCP connect)."""
    if spec.address is None:
        return
    host, port = scheduler_host_port(spec.address)
    try:
        socket.create_connection((host, port), timeout=SCHEDULER_PROBE_TIMEOUT_S).close()
    except socket.timeout:
        raise SchedulerUnreachableError(
            f"{spec.address}: cannot reach the dask scheduler (no answer within {SCHEDULER_PROBE_TIMEOUT_S:.0f} s); nothing was written"
        ) from None
    except OSError as exc:
        raise SchedulerUnreachableError(f"{spec.address}: cannot reach the dask scheduler ({exc.strerror or exc}); nothing was written") from None
    # Something answers the port: a dask handshake says whether it is a scheduler (a dashboard, an HTTP server or
    # a stray service would hold the run forever, or hand dask garbage to read).
    try:
        client = _connect(spec, timeout=SCHEDULER_PROBE_TIMEOUT_S)
    except SchedulerUnreachableError as exc:
        raise SchedulerUnreachableError(f"{exc}; nothing was written") from None
    with client:
        if spec.resources:
            _check_resources_offered(spec, client)


def refuse_memory_urls(spec: SchedulerSpec, urls: Iterable[str | None]) -> None:
    """memory:// lives in this process's memory: workers in other processes (a cluster's, or local processes)
    would find nothing there, or write where this process never looks. A cluster whose workers all run in this
    process (`LocalCluster(processes=False)`) shares it: asked of the scheduler only when a memory:// URL is given."""
    memory = [str(url) for url in urls if url is not None and url_protocol(str(url)) == "memory"]
    if not memory or (spec.address is None and not spec.processes):
        return
    if spec.address is not None and not spec.processes:
        with _connect(spec, timeout=SCHEDULER_PROBE_TIMEOUT_S) as client:
            worker_pids = set(client.run(os.getpid).values())
        if worker_pids <= {os.getpid()}:
            return
    raise SchedulerError(f"{memory[0]}: memory:// lives in this process's memory, which workers in other processes ({spec.describe}) cannot see; use a path or a persistent URL, or local threads")


def _check_resources_offered(spec: SchedulerSpec, client: Any, during_run: bool = False) -> None:
    """Refuse resources that the cluster's workers all lack (dask would hold every task until such a worker
    joins). A cluster without workers yet is let through before a run: they may still be starting."""
    workers = list(client.scheduler_info(n_workers=-1).get("workers", {}).values())
    if not workers and not during_run:
        return
    wanted = dict(spec.resources)
    offered = [w.get("resources") or {} for w in workers]
    if any(all(have.get(name, 0) >= amount for name, amount in wanted.items()) for have in offered):
        return
    asked = ",".join(f"{name}={amount:g}" for name, amount in spec.resources)
    kinds = sorted({",".join(f"{n}={a:g}" for n, a in sorted(have.items())) or "none" for have in offered})
    if during_run:
        raise SchedulerLostError(
            f"{spec.address}: no worker offers --resources {asked} any more (its {len(workers)} workers offer: {'; '.join(kinds) or 'nothing'}); "
            f"the output is left unfinished: start workers with `dask worker {spec.address} --resources {asked}`, then re-run the same command to resume"
        )
    raise UnsatisfiableResourcesError(
        f"{spec.address}: no worker offers --resources {asked} (its {len(workers)} workers offer: {'; '.join(kinds)}); "
        f"start workers with `dask worker {spec.address} --resources {asked}`, or ask for less; nothing was written"
    )


@dataclass(frozen=True)
class SchedulerSpec:
    """Where tasks run: local threads (default), local processes, or a running dask.distributed scheduler."""

    address: str | None = None  # tcp://host:port of a running scheduler; None = this machine
    workers: int | None = 2  # local threads or processes; None = one per core
    resources: tuple[tuple[str, float], ...] = ()  # e.g. (("GPU", 1),): each task needs one worker GPU
    processes: bool = False  # local worker processes instead of threads (ignored with an address)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", whole_numbers({"--workers": (self.workers, 1)}, SchedulerError)["--workers"])
        if self.address is not None:
            scheduler_host_port(self.address)
        elif self.resources:
            asked = ",".join(f"{name}={amount:g}" for name, amount in self.resources)
            raise SchedulerError(f"--resources {asked}: worker resources exist only on a dask.distributed cluster; give --scheduler tcp://HOST:PORT too (local runs use --workers)")

    @property
    def describe(self) -> str:
        if self.address:
            return f"dask.distributed at {self.address}"
        return f"{self.workers or os.cpu_count()} local {'processes' if self.processes else 'threads'}"


def run_tasks(tasks: list, spec: SchedulerSpec, report: ProgressReport) -> list[Any]:
    """Compute the tasks and return their receipts in task order (the report counts what earlier runs did)."""
    global _run_stop
    _run_stop = stop = threading.Event()
    try:
        if spec.address is not None:
            return _run_distributed(tasks, spec, report)
        if spec.processes:
            # Imported only on request: it brings multiprocessing and cloudpickle.
            from dask.multiprocessing import get as scheduler
        else:
            scheduler = dask.threaded.get
        with DaskProgress(report):
            # chunksize=1: the process scheduler otherwise hands out ready tasks six at a time, leaving workers
            # idle. The scheduler is passed as a function: naming it makes dask look for a distributed client.
            return list(dask.compute(*tasks, scheduler=scheduler, num_workers=spec.workers or os.cpu_count() or 1, chunksize=1))
    except KeyboardInterrupt:
        stop.set()  # the tasks still running on the pool's threads end at their next batch
        raise
    finally:
        report.close()


def _run_distributed(tasks: list, spec: SchedulerSpec, report: ProgressReport) -> list[Any]:
    import fsspec.config
    from distributed import as_completed

    with _connect(spec) as client:
        client.run(_apply_fsspec_defaults, {k: dict(v) for k, v in fsspec.config.conf.items() if isinstance(v, dict)})
        # optimize_graph=False: graph optimisation may drop the resource annotations
        futures = client.compute(tasks, resources=dict(spec.resources) or None, optimize_graph=False)
        index = {f.key: i for i, f in enumerate(futures)}
        receipts: list[Any] = [None] * len(futures)
        finished = as_completed(futures)
        watch = WorkerWatch(spec, client)
        try:
            while not finished.is_empty():
                # Polled (not a blocking wait): between results, the watch checks that the cluster can still run the
                # tasks (dask would hold them forever once the last suitable worker left).
                batch = finished.next_batch(block=False) if finished.has_ready() else []
                if not batch:
                    watch.check()
                    time.sleep(POLL_S)
                    continue
                for future in batch:
                    receipt = future.result()
                    receipts[index[future.key]] = receipt
                    report.update(receipt.get("images", 0) if isinstance(receipt, dict) else 0)
        except CancelledError as exc:  # the scheduler went away (or cancelled the run's tasks)
            raise SchedulerLostError(
                f"{spec.address}: lost the dask scheduler during the run ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); the output is left unfinished: "
                "re-run the same command once a scheduler answers there, to resume"
            ) from None
        return receipts


class WorkerWatch:
    """During a run: fails it once the cluster, having had workers that can run its tasks (those offering its
    resources, if any), has had none for WORKERLESS_GRACE_S (a nanny restarting a worker, or workers still
    queued, are waited for)."""

    def __init__(self, spec: SchedulerSpec, client: Any):
        self.spec, self.client = spec, client
        self.seen_at: float | None = None  # last time a suitable worker was there
        self.next_check = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + WORKER_CHECK_S
        try:
            workers = list(self.client.scheduler_info(n_workers=-1).get("workers", {}).values())
        except OSError as exc:
            raise SchedulerLostError(f"{self.spec.address}: lost the dask scheduler during the run ({exc}); the output is left unfinished: re-run the same command once a scheduler answers there, to resume") from None
        wanted = dict(self.spec.resources)
        if any(all((w.get("resources") or {}).get(name, 0) >= amount for name, amount in wanted.items()) for w in workers):
            self.seen_at = now
        elif self.seen_at is not None and now - self.seen_at >= WORKERLESS_GRACE_S:
            if wanted:
                _check_resources_offered(self.spec, self.client, during_run=True)
            raise SchedulerLostError(
                f"{self.spec.address}: the cluster has had no worker for {WORKERLESS_GRACE_S:.0f} s; the output is left "
                "unfinished: start workers, then re-run the same command to resume"
            )


def _connect(spec: SchedulerSpec, timeout: float = 30.0) -> Any:
    """A dask.distributed client of the scheduler at `spec.address`; SchedulerUnreachableError when none answers,
    or what answers is not a dask scheduler."""
    from distributed import Client

    try:
        return Client(spec.address, timeout=f"{timeout:g}s")
    except OSError as exc:
        raise SchedulerUnreachableError(f"{spec.address}: cannot reach the dask scheduler ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a handshake with something else fails in many ways (even MemoryError)
        if spec.address.startswith("tls://"):
            raise SchedulerUnreachableError(f"{spec.address}: cannot connect over TLS ({str(exc).splitlines()[0]}); give dask its TLS settings (distributed.comm.tls)") from None
        raise SchedulerUnreachableError(
            f"{spec.address}: something answers there, but not a dask scheduler ({type(exc).__name__}: {str(exc)[:120]}) "
            "(a scheduler listens on 8786 by default; 8787 is its dashboard)"
        ) from None


def _apply_fsspec_defaults(conf: dict[str, dict]) -> None:
    """On a worker: the driver's fsspec defaults per protocol (endpoint, credentials options), in place of an
    earlier command's (a shared cluster must not lend one command's credentials to the next)."""
    import fsspec.config

    for protocol in [p for p, options in fsspec.config.conf.items() if isinstance(options, dict) and p not in conf]:
        del fsspec.config.conf[protocol]  # an earlier command's, for a protocol this one does not name
    for protocol, options in conf.items():
        fsspec.config.conf[protocol] = dict(options)


def parse_resources(text: str | None) -> tuple[tuple[str, float], ...]:
    """`GPU=1,MEM=10e9` → (("GPU", 1.0), ("MEM", 1e10))."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            pairs.append((name.strip(), float(value or 1)))
        except ValueError:
            raise SchedulerError(f"--resources {text!r}: {item!r} is not NAME=NUMBER") from None
    return tuple(pairs)

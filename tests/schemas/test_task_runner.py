"""Runs on a dask.distributed cluster end in one line, never hang: a port where no scheduler answers, a cluster
left without the workers its tasks need."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from schemas import task_runner
from schemas.task_runner import SchedulerSpec, SchedulerUnreachableError, check_scheduler_reachable
from tests.support.commands import checkout_env


def test_a_port_where_something_else_answers_is_not_a_scheduler():
    """An HTTP server (a dashboard on 8787 instead of the scheduler's 8786): refused before any output, quickly."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"

    def answer_like_http() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer_like_http, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(SchedulerUnreachableError, match=rf"^{address}: something answers there, but not a dask scheduler \(.*\) \(a scheduler listens on 8786 by default; 8787 is its dashboard\); nothing was written$"):
            check_scheduler_reachable(SchedulerSpec(address))
    finally:
        server.close()
    assert time.monotonic() - started < 30


# The cluster tests run in a fresh interpreter: dask.distributed keeps loop runners per process, and a test
# that ran before in the same pytest worker (an event loop left current) can break an in-process LocalCluster.
CLUSTER_RUN = """
import threading, time, dask
from distributed import LocalCluster
from schemas import task_runner
from schemas.progress_report import ProgressReport
from schemas.task_runner import SchedulerLostError, SchedulerSpec, run_tasks

def slow(seconds):
    time.sleep(seconds)
    return {"images": 1}

task_runner.WORKERLESS_GRACE_S, task_runner.WORKER_CHECK_S = (1.0 if WHAT == "leave" else 60.0), 0.5
cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://", resources={"GPU": 1}, dashboard_address=":0")
address = cluster.scheduler_address
spec = SchedulerSpec(address, resources=(("GPU", 1.0),) if WHAT == "leave" else ())
tasks = [dask.delayed(slow, pure=False)(0.1 if k == 0 else 5.0) for k in range(4)]
threading.Thread(target=lambda: (time.sleep(1.5), cluster.scale(0) if WHAT == "leave" else cluster.close()), daemon=True).start()
try:
    run_tasks(tasks, spec, ProgressReport(4, "test"))
except SchedulerLostError as exc:
    print("LOST", str(exc).replace(address, "ADDRESS"))
"""


def _cluster_run(what: str) -> str:
    done = subprocess.run([sys.executable, "-c", f"WHAT = {what!r}\n" + CLUSTER_RUN], capture_output=True, text=True, timeout=120, env=checkout_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith("LOST ")]
    assert lines, done.stdout + done.stderr[-2000:]
    return lines[0].removeprefix("LOST ")


def test_a_cluster_left_without_the_workers_its_tasks_need_fails_the_run():
    """The only worker offering GPU=1 leaves mid-run: dask would hold the remaining tasks forever; the run fails
    in one line once the cluster had no such worker for the grace period."""
    line = _cluster_run("leave")
    assert line.startswith("ADDRESS: no worker offers --resources GPU=1 any more") and line.endswith("re-run the same command to resume"), line


def test_a_scheduler_lost_mid_run_is_one_line_naming_it():
    line = _cluster_run("close")
    assert line.startswith("ADDRESS: lost the dask scheduler during the run (") and "\n" not in line and line.endswith("to resume"), line


def test_workers_take_each_commands_storage_options_in_place_of_the_last(monkeypatch):
    """A shared cluster must not lend one command's credentials to the next."""
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {"s3": {"key": "first", "secret": "s"}, "gcs": {"token": "first"}})
    task_runner._apply_fsspec_defaults({"s3": {"endpoint_url": "http://127.0.0.1:9000"}})
    assert fsspec.config.conf == {"s3": {"endpoint_url": "http://127.0.0.1:9000"}}


CTRL_C_RUN = """
import io, json, signal, threading, time
import dask
from schemas import task_runner
from schemas.errors import RunInterruptedError
from schemas.progress_report import ProgressReport
from schemas.task_runner import SchedulerSpec

# Python's own Ctrl-C handler, which it skips where the parent ignores SIGINT (a pytest-xdist worker does).
signal.signal(signal.SIGINT, signal.default_int_handler)
ended = {}

def task(k):
    stop = task_runner.run_stop()
    for batch in range(2000):  # 20 s if nothing stopped it
        if k == 0 and batch == 5:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C, as the terminal sends it
        try:
            task_runner.stop_if_interrupted(stop)
        except RunInterruptedError:
            ended[k] = "stopped"
            raise
        time.sleep(0.01)
    ended[k] = "finished"
    return {"images": 1}

started = time.monotonic()
try:
    task_runner.run_tasks([dask.delayed(task)(k) for k in range(2)], SchedulerSpec(workers=2), ProgressReport(2, "test", stream=io.StringIO()))
    raised = False
except KeyboardInterrupt:
    raised = True
deadline = time.monotonic() + 5
while len(ended) < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
seconds = time.monotonic() - started
receipts = task_runner.run_tasks([dask.delayed(lambda: {"images": 1})()], SchedulerSpec(workers=1), ProgressReport(1, "test", stream=io.StringIO()))
print(json.dumps({"raised": raised, "ended": ended, "seconds": seconds, "next_run": receipts, "next_stopped": task_runner.run_stop().is_set()}))
"""


def test_ctrl_c_stops_the_tasks_still_running_on_threads_at_their_next_batch():
    """Python interrupts only the main thread: the other tasks of the run see its stop signal between batches and
    end (RunInterruptedError) instead of running to their end; a later run gets a signal of its own. In a fresh
    interpreter: the signal goes to its main thread, which in a pytest worker is not the test's to interrupt."""
    import json

    proc = subprocess.run([sys.executable, "-c", CTRL_C_RUN], capture_output=True, text=True, timeout=120, env=checkout_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"] and result["ended"] == {"0": "stopped", "1": "stopped"}, result
    assert result["seconds"] < 5 and result["next_run"] == [{"images": 1}] and not result["next_stopped"], result

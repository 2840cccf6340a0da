"""Runs the benchmark modules (`tests/benchmarks/bench_*.py`) and prints one table of all their rows.

Each module exposes `run(workdir: pathlib.Path, quick: bool = False) -> list[dict]` (`quick` is optional);
a row is a dict with the keys of `ROW_KEYS`. One module failing becomes an error row: the other modules'
rows are never lost. Also holds helpers the modules share: `make_row` and `run_child`, which runs a command
in a child process and measures its wall time and peak memory.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
BENCH_PACKAGE = "tests.benchmarks"
DEFAULT_WORK_PARENT = REPO / "data" / "bench"  # /data/ is gitignored
RESULTS_NAME = "bench-results.json"
ROW_KEYS = ("group", "name", "value", "unit", "baseline", "ratio", "goal", "met", "note")
COLUMNS = ("group", "benchmark", "value", "unit", "baseline", "ratio", "goal", "met?", "note")

Row = dict[str, Any]


# ---------------------------------------------------------------- rows


def make_row(
    group: str,
    name: str,
    value: float | None,
    unit: str,
    *,
    baseline: float | None = None,
    ratio: float | None = None,
    goal: str = "",
    met: bool | None = None,
    note: str = "",
) -> Row:
    """A table row; `ratio` defaults to value/baseline when both are known."""
    if ratio is None and value is not None and baseline:
        ratio = value / baseline
    return {
        "group": group,
        "name": name,
        "value": None if value is None else float(value),
        "unit": unit,
        "baseline": None if baseline is None else float(baseline),
        "ratio": None if ratio is None else float(ratio),
        "goal": goal,
        "met": met,
        "note": note,
    }


def error_row(group: str, name: str, exc: BaseException) -> Row:
    """What a crashed benchmark leaves in the table: the exception, never a silent gap."""
    return make_row(group, name, None, "", met=False, note=f"FAILED: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- child processes


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: exit status, output, wall time, CPU time and peak memory."""

    returncode: int
    wall_s: float
    cpu_s: float  # user + system of the child and every descendant it reaped
    others_cores: float  # mean cores busy with other work meanwhile (other users' jobs, VM steal): noise
    max_rss_bytes: int  # largest peak (VmHWM) of any one process of the tree, sampled every poll
    tree_peak_rss_bytes: int  # largest sum of current RSS over the process tree, sampled every poll
    stdout: str
    stderr: str
    killed_for: str | None  # "timeout" or "memory" when we stopped it

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_for is None

    def last_json(self) -> dict[str, Any]:
        """The JSON object a benchmark child prints as its last stdout line."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        return json.loads(lines[-1])

    def describe_failure(self) -> str:
        if self.killed_for:
            return f"stopped after {self.wall_s:.1f} s ({self.killed_for})"
        tail = (self.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return f"exit {self.returncode}: {tail}"


def run_child(
    cmd: Sequence[str],
    *,
    cwd: Path = REPO,
    timeout_s: float | None = None,
    rss_limit_bytes: int | None = None,
    poll_s: float = 0.05,
    env: dict[str, str] | None = None,
) -> ChildRun:
    """Run cmd, timing it from spawn to exit and sampling the memory of its whole process tree.

    A thread blocks in wait so the end time is exact; the main thread samples memory and stops the child's
    process group on a timeout or memory limit. Peak memory comes from each process's own high-water mark
    (VmHWM), not from getrusage/wait4: ru_maxrss of a child starts at the RSS of the (large) benchmark
    process it was forked from, which made a 100 MB conversion read 658 MB. `env` adds to our environment.
    """
    child_env = {**os.environ, **env} if env else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        machine_before, self_before = _machine_cpu_seconds(), _own_cpu_seconds()
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=out, stderr=err, start_new_session=True, env=child_env)
        waiter = _ExitWaiter(proc.pid, start)
        memory, killed_for = _watch_child(proc.pid, waiter, start, timeout_s, rss_limit_bytes, poll_s)
        waiter.done.wait()
        proc.returncode = waiter.returncode  # reaped by the waiter thread already; tell Popen
        wall = waiter.end - start
        others = _machine_cpu_seconds() - machine_before - waiter.cpu_s - (_own_cpu_seconds() - self_before)
        out.seek(0)
        err.seek(0)
        return ChildRun(
            returncode=waiter.returncode,
            wall_s=wall,
            cpu_s=waiter.cpu_s,
            others_cores=max(0.0, others / max(wall, 1e-9)),
            max_rss_bytes=memory.max_process_peak,
            tree_peak_rss_bytes=memory.max_tree_sum,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            killed_for=killed_for,
        )


class _ExitWaiter:
    """Reaps one child in a thread, keeping its exit time, status and CPU time (its ru_maxrss is not used)."""

    def __init__(self, pid: int, start: float):
        self.pid, self.end, self.returncode, self.cpu_s = pid, start, -1, 0.0
        self.done = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        _, status, usage = os.wait4(self.pid, 0)
        self.end = time.perf_counter()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.done.set()


def _machine_cpu_seconds() -> float:
    """CPU seconds the whole machine was busy (or stolen by the hypervisor) since boot."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class _TreeMemory:
    max_process_peak: int = 0
    max_tree_sum: int = 0

    def sample(self, pids: set[int]) -> None:
        readings = [_memory_of(p) for p in pids]
        self.max_tree_sum = max(self.max_tree_sum, sum(rss for rss, _ in readings))
        self.max_process_peak = max([self.max_process_peak, *(hwm for _, hwm in readings)])


def _watch_child(
    pid: int, waiter: _ExitWaiter, start: float, timeout_s: float | None, rss_limit: int | None, poll_s: float
) -> tuple[_TreeMemory, str | None]:
    memory, killed_for, tree, last_scan = _TreeMemory(), None, {pid}, 0.0
    # Popen returns after the exec, so even the first sample sees the new program, not our forked copy.
    while not waiter.done.is_set():
        now = time.perf_counter()
        if now - last_scan > 0.5:  # a full /proc scan costs CPU; new descendants appear rarely
            tree, last_scan = _descendants(pid), now
        memory.sample(tree)
        if killed_for is None and timeout_s is not None and now - start > timeout_s:
            killed_for = "timeout"
        elif killed_for is None and rss_limit is not None and memory.max_tree_sum > rss_limit:
            killed_for = "memory"
        if killed_for:
            _kill_group(pid)
        waiter.done.wait(poll_s)
    return memory, killed_for


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session (start_new_session)
    except ProcessLookupError:
        pass


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # comm may contain spaces: the fields after the last ')' are fixed
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return tree


def _memory_of(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS of its current program) in bytes; zeros once the process is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    fields[key] = int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError):
        pass
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def warm_files(url: str) -> None:
    """Read every file below `url` once, right before timing (pages unused for ~60 s are evicted on this machine)."""
    for folder, _, files in os.walk(url):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                while f.read(16 << 20):
                    pass


def others_busy_cores(window_s: float = 0.3) -> float:
    """Cores busy with anything but this process over a short window (call it while no child runs)."""
    machine, own = _machine_cpu_seconds(), _own_cpu_seconds()
    time.sleep(window_s)
    return max(0.0, (_machine_cpu_seconds() - machine - (_own_cpu_seconds() - own)) / window_s)


@dataclass
class QuietGate:
    """Waits, within a budget, for other users' jobs to leave the cores free before a timed run.

    The machine is shared: a neighbour's job holding a core halves what two workers can show. Waiting a little
    makes runs comparable; the budget keeps a permanently busy machine from stalling the benchmark.
    """

    budget_s: float = 150.0
    per_call_s: float = 30.0
    threshold_cores: float = 0.3
    waited_s: float = 0.0

    def wait(self) -> float:
        """Others' load (cores) when we go."""
        started = time.perf_counter()
        deadline = started + min(self.per_call_s, max(0.0, self.budget_s - self.waited_s))
        load = others_busy_cores()
        while load >= self.threshold_cores and time.perf_counter() < deadline:
            load = others_busy_cores()
        self.waited_s += time.perf_counter() - started
        return load


# ---------------------------------------------------------------- discovery and running


def discover_modules(only: set[str] | None = None) -> list[str]:
    """Short names (`convert` for bench_convert.py) of the benchmark modules, sorted."""
    names = sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([str(BENCH_DIR)]) if m.name.startswith("bench_"))
    if only is not None:
        unknown = only - set(names)
        if unknown:
            raise SystemExit(f"unknown benchmark module(s) {sorted(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in only]
    return names


def run_module(short: str, workdir: Path, quick: bool) -> list[Row]:
    """Import and run one module; any exception (import included) becomes an error row."""
    started = time.perf_counter()
    print(f"== bench_{short} (workdir {workdir})", file=sys.stderr, flush=True)
    try:
        module = importlib.import_module(f"{BENCH_PACKAGE}.bench_{short}")
        rows = _call_run(module.run, workdir, quick)
        _check_rows(short, rows)
    except Exception as exc:  # noqa: BLE001 - one module's failure must not lose the others' rows
        traceback.print_exc()
        rows = [error_row(short, f"bench_{short}", exc)]
    print(f"== bench_{short} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def _call_run(run: Callable[..., list[Row]], workdir: Path, quick: bool) -> list[Row]:
    # `quick` travels as an argument (not an environment variable) to modules that accept it.
    if "quick" in inspect.signature(run).parameters:
        return run(workdir, quick=quick)
    return run(workdir)


def _check_rows(short: str, rows: object) -> None:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"bench_{short}.run must return a list of dicts, got {type(rows).__name__}")
    for r in rows:
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise TypeError(f"bench_{short}: row {r.get('name')!r} lacks keys {missing}")


# ---------------------------------------------------------------- table


def format_number(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def format_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def format_met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "—"}[met]


def format_table(rows: list[Row]) -> str:
    """A plain-text table, the note column last and unpadded so long notes do not widen the others."""
    cells = [
        [
            str(r["group"]),
            str(r["name"]),
            format_number(r["value"]),
            str(r["unit"]),
            format_number(r["baseline"]),
            format_ratio(r["ratio"]),
            str(r["goal"]),
            format_met(r["met"]),
            str(r["note"]),
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [list(COLUMNS), *cells]) for i in range(len(COLUMNS) - 1)]
    right = {2, 4, 5}  # numbers align right

    def line(c: list[str]) -> str:
        parts = [c[i].rjust(w) if i in right else c[i].ljust(w) for i, w in enumerate(widths)]
        return " | ".join(parts + [c[-1]])

    rule = "-+-".join("-" * w for w in widths) + "-+-" + "-" * 4
    return "\n".join([line(list(COLUMNS)), rule, *(line(c) for c in cells)])


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks", description="Run the imzarr benchmarks and print one table.")
    p.add_argument("--only", default=None, help="comma-separated module names, e.g. convert,model (default: all bench_*.py)")
    p.add_argument("--workdir", type=Path, default=None, help=f"where data and results go (default: a new temporary folder under {DEFAULT_WORK_PARENT}); a given folder is kept and its generated inputs are reused")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a fast check that everything runs")
    p.add_argument("--keep", action="store_true", help="keep the default temporary workdir (its data) after the run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} if args.only else None
    modules = discover_modules(only)
    temporary = args.workdir is None
    workdir = _make_workdir(args.workdir)
    rows: list[Row] = []
    for short in modules:
        module_dir = workdir / short  # each module owns a folder: no clashes between their files
        module_dir.mkdir(parents=True, exist_ok=True)
        rows += run_module(short, module_dir, args.quick)
    results = workdir / RESULTS_NAME
    results.write_text(json.dumps(rows, indent=1))
    print(format_table(rows))
    if temporary and not args.keep:
        _remove_data(workdir, keep=results)
    print(f"\nrows written to {results}", file=sys.stderr)
    return 1 if any(str(r["note"]).startswith("FAILED") for r in rows) else 0


def _make_workdir(given: Path | None) -> Path:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given.resolve()
    DEFAULT_WORK_PARENT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=DEFAULT_WORK_PARENT))


def _remove_data(workdir: Path, keep: Path) -> None:
    # Generated data runs to gigabytes; the small results file stays so the numbers are not lost with it.
    for entry in workdir.iterdir():
        if entry != keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

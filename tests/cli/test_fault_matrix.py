"""SIGKILL at each named lifecycle step (and at a random instant) of convert, extract and generate: every rerun
of the same command finishes, and ends with a store identical, file by file, to an uninterrupted run's.

The killed runs, the reference runs and the reruns are child processes, as a user runs them."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.faults import KILL_AT_STEP
from tests.support.commands import checkout_env, run_imzarr

pytestmark = pytest.mark.slow

STEPS = [("after_group_create", 0), ("after_attrs", 0), ("after_shard", 2), ("after_complete", 0), ("before_consolidate", 0),
         ("before_lock_release", 0)]


def _killed_run(step: str, count: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_AT_STEP, step, str(count), *args], cwd=cwd, env=checkout_env(), capture_output=True, text=True)


GENERATION = re.compile(rb'"generation": "[0-9a-f]{32}"')


def _tree(root: Path, name: str) -> dict[str, bytes]:
    """Every file's bytes; metadata that names a store (the generator's image store, say) names it X, and a store's
    own generation id reads G: it is drawn at random when a store is created (schemas/store_identity.py), so no two
    runs share it; that a resumed run keeps its id is checked apart (`_generation`)."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "zarr.json":
                data = GENERATION.sub(b'"generation": "G"', data.replace(name.encode(), b"X"))
            files[str(p.relative_to(root))] = data
    return files


def _generation(store: Path) -> str | None:
    """The store's generation id, if its root metadata has one yet."""
    try:
        return json.loads((store / "zarr.json").read_text()).get("attributes", {}).get("generation")
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("faults")
    assert run_imzarr("sample", "src", "--per-shard", "150", "--train-shards", "2", "--val-size", "20", cwd=work).returncode == 0
    assert run_imzarr("convert", "npz", "src/train", "-o", "images.zarr", "--shard-size", "64", "--inner-chunk", "16", cwd=work).returncode == 0
    return work


COMMANDS = {
    "convert": (["convert", "npz", "src/train", "--shard-size", "64", "--inner-chunk", "16", "-o"], ["OUT"]),
    "extract": (["extract", "images.zarr", "--preset", "tiny-random", "--layers", "midblock", "--shard-size", "64", "--num-samples", "192", "--device", "cpu", "-o"], ["OUT"]),
    "generate": (["generate", "--preset", "tiny-random", "--per-class", "10", "--classes", "n01440764,n02119789,n01530575", "--shard-size", "8", "--layers", "midblock", "--device", "cpu", "--activations-out", "OUT-acts", "-o"], ["OUT", "OUT-acts"]),
}


def _args(command: str, out: str) -> tuple[list[str], list[str]]:
    args, outputs = COMMANDS[command]
    return [a.replace("OUT", out) for a in args] + [out], [o.replace("OUT", out) for o in outputs]


@pytest.fixture(scope="module")
def reference(workdir) -> dict[str, dict]:
    """Per command: the uninterrupted run's files ("trees") and how long its process took ("seconds")."""
    trees, seconds = {}, {}
    for command in COMMANDS:
        args, outputs = _args(command, f"ref-{command}.zarr")
        started = time.monotonic()
        proc = run_imzarr(*args, cwd=workdir)
        seconds[command] = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        trees[command] = {o.replace(f"ref-{command}.zarr", "X"): _tree(workdir / o, f"ref-{command}.zarr") for o in outputs}
    return {"trees": trees, "seconds": seconds}


def _rerun(args: list[str], cwd: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess:
    """The command run as a user runs it: a fresh child process. (A rerun inside this test process, after earlier
    reruns there, gave generate's activations other low bits on torch's CUDA wheel running on the CPU: a rerun
    must start as the reference run started.)"""
    return run_imzarr(*args, cwd=cwd)


PROGRESS = re.compile(r": (\d+)/(\d+) img \(")


def _check_rerun_matches(workdir: Path, command: str, out: str, reference, capsys, monkeypatch) -> str:
    """Rerun the killed command; its files must equal the uninterrupted run's. Returns what it printed."""
    args, outputs = _args(command, out)
    started_as = {o: _generation(workdir / o) for o in outputs}
    proc = _rerun(args, workdir, capsys, monkeypatch)
    code, err = proc.returncode, proc.stderr
    assert code == 0, err
    counts = [(int(a), int(b)) for a, b in PROGRESS.findall(err)]
    assert all(a <= b for a, b in counts), counts  # what earlier runs wrote is counted once, never past the total
    for o, generation in started_as.items():  # a resumed (or tidied) store keeps the id it was created with
        assert generation is None or _generation(workdir / o) == generation, (command, o)
    assert "Traceback" not in err
    got = {o.replace(out, "X"): _tree(workdir / o, out) for o in outputs}
    for name, files in reference["trees"][command].items():
        assert sorted(got[name]) == sorted(files), f"{command} {name}: file sets differ"
        differing = [f for f in files if got[name][f] != files[f]]
        assert not differing, f"{command} {name}: {differing[:5]}"
    return proc.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("step, count", STEPS)
def test_kill_at_each_lifecycle_step_then_rerun(workdir, reference, command, step, count, capsys, monkeypatch):
    out = f"{command}-{step}-{count}.zarr"
    args, _ = _args(command, out)
    killed = _killed_run(step, count, args, workdir)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    printed = _check_rerun_matches(workdir, command, out, reference, capsys, monkeypatch)
    if step == "after_shard":  # two shards were written before the kill: the summary counts them apart
        assert re.search(r"\((\d+) in this run, resuming one that had written (\d+)\)", printed), printed


@pytest.mark.parametrize("command", list(COMMANDS))
def test_kill_at_an_instant_inside_the_run_then_rerun(workdir, reference, command, capsys, monkeypatch):
    """Killed at 70 % of an uninterrupted run's time, shifted by a seeded random few per cent (a point between the
    named steps, a shard half written say): the rerun ends identical to the reference. Whether the kill landed
    depends on the machine's load; the named steps above are what is checked every time."""
    rng = random.Random(command)
    delay_ms = int(1000 * reference["seconds"][command] * (0.7 + rng.uniform(-0.05, 0.05)))
    out = f"{command}-instant-{delay_ms}.zarr"
    args, _ = _args(command, out)
    _killed_run("random", delay_ms, args, workdir)
    _check_rerun_matches(workdir, command, out, reference, capsys, monkeypatch)

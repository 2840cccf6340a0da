"""Every refusal is one line naming the file or option and the reason, with a meaningful exit code; no input is
touched, nothing foreign is replaced, nothing is left marked complete. (NPZ and JPEG contents: see
tests/converter/test_converter_bad_inputs.py.)"""

from __future__ import annotations

import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from tests.support.commands import run_imzarr

SAMPLE_WNID = "n01440764"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory, sample_shards, image_store) -> Path:
    """A small sample, its image store, an activation store, and a few hostile files."""
    work = tmp_path_factory.mktemp("bad")
    shutil.copytree(sample_shards, work / "src")  # copies: the refusals must leave these exactly as they were
    shutil.copytree(image_store, work / "images.zarr")
    made = run_imzarr("extract", "images.zarr", "-o", "acts.zarr", "--preset", "tiny-random", "--layers", "midblock", "--pool", "mean", "--device", "cpu", cwd=work)
    assert made.returncode == 0, made.stderr
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("mine")
    (work / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    (work / "evil.pkl").write_bytes(pickle.dumps(__import__("os").system, protocol=2))  # would run code if unpickled fully
    (work / "indices.txt").write_text("0\n5\n999999\n")
    (work / "killed.zarr").mkdir()  # a run killed before it wrote zarr.json leaves its writer lock
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a writer of this host that no longer runs
    (work / "killed.zarr" / ".imzarr-writer.lock").write_text(f"{gone.pid} {socket.gethostname()}\n")
    incomplete = zarr.open_group(str(work / "half.zarr"), mode="w", zarr_format=3)
    incomplete.update_attributes({"schema": "imzarr.images/1", "complete": False})
    return work


EXTRACT = ["extract", "images.zarr", "--preset", "tiny-random", "--layers", "midblock", "--device", "cpu"]

# (case, argv, exit code, text the one error line must contain)
CASES = [
    ("extract onto its input", [*EXTRACT, "-o", "images.zarr", "--overwrite"], 2, "is the input"),
    ("extract into its input", [*EXTRACT, "-o", "images.zarr/acts.zarr"], 2, "lies inside the input"),
    ("extract around its input", [*EXTRACT, "-o", ".", "--overwrite"], 2, "contains the input"),
    ("extract onto a foreign folder", [*EXTRACT, "-o", "notes", "--overwrite"], 2, "not an imzarr store"),
    ("extract onto a store of another kind", [*EXTRACT, "-o", "acts.zarr", "--sigma", "3"], 2, "other inputs or options"),
    ("extract from nothing", ["extract", "missing.zarr", "-o", "o.zarr", "--preset", "tiny-random", "--layers", "midblock"], 2, "missing.zarr"),
    ("extract from an activation store", ["extract", "acts.zarr", "-o", "o.zarr", "--preset", "tiny-random", "--layers", "midblock"], 2, "schema"),
    ("extract from an unfinished store", ["extract", "half.zarr", "-o", "o.zarr", "--preset", "tiny-random", "--layers", "midblock"], 2, "not complete"),
    ("unknown layer", ["extract", "images.zarr", "-o", "o.zarr", "--preset", "tiny-random", "--layers", "model.enc.nope"], 2, "valid layers"),
    ("sigma zero", [*EXTRACT, "-o", "o.zarr", "--sigma", "0"], 2, "σ must be > 0"),
    ("garbage checkpoint", ["extract", "images.zarr", "-o", "o.zarr", "--checkpoint", "garbage.pt", "--layers", "midblock"], 2, "garbage.pt"),
    ("missing checkpoint", ["extract", "images.zarr", "-o", "o.zarr", "--checkpoint", "nope.pt", "--layers", "midblock"], 2, "nope.pt"),
    ("pickle that runs code", ["extract", "images.zarr", "-o", "o.zarr", "--checkpoint", "evil.pkl", "--layers", "midblock"], 2, "evil.pkl"),
    ("unknown class name", [*EXTRACT, "-o", "o.zarr", "--classes", "tenchh"], 2, "tench"),
    ("indices out of range", [*EXTRACT, "-o", "o.zarr", "--indices", "indices.txt"], 2, "999999"),
    ("batch size zero", [*EXTRACT, "-o", "o.zarr", "--batch-size", "0"], 2, "--batch-size"),
    ("shard size negative", [*EXTRACT, "-o", "o.zarr", "--shard-size", "-4"], 2, "--shard-size"),
    ("fp16 on the CPU", [*EXTRACT, "-o", "o.zarr", "--compute-dtype", "fp16"], 2, "CUDA"),
    ("memory URL", [*EXTRACT, "-o", "memory://x/o.zarr"], 2, "memory://"),
    ("bad storage options", [*EXTRACT, "-o", "o.zarr", "--storage-options", "{endpoint"], 2, "--storage-options"),
    ("compare onto an input", ["compare", "acts.zarr", "acts.zarr", "--layer", "midblock", "-o", "acts.zarr", "--overwrite"], 2, "is the input"),
    ("compare onto a foreign folder", ["compare", "acts.zarr", "acts.zarr", "--layer", "midblock", "-o", "notes"], 2, "not an imzarr store"),
    ("compare onto an image store", ["compare", "acts.zarr", "acts.zarr", "--layer", "midblock", "-o", "images.zarr"], 2, "holds an imzarr.images/1 store"),
    ("compare a missing layer", ["compare", "acts.zarr", "acts.zarr", "--layer", "encoder_bottleneck"], 2, "encoder_bottleneck"),
    ("show onto a folder", ["show", "images.zarr", "-o", "notes"], 2, "is a folder"),
    ("show onto its input", ["show", "images.zarr", "-o", "images.zarr/grid.png"], 2, "lies inside the input"),
    ("show a missing store", ["show", "missing.zarr", "-o", "g.png"], 2, "missing.zarr"),
    ("generate two stores in one path", ["generate", "-o", "g.zarr", "--preset", "tiny-random", "--per-class", "1", "--layers", "midblock", "--activations-out", "g.zarr"], 2, "--activations-out must be a store apart from -o"),
    ("generate layers without a store", ["generate", "-o", "g.zarr", "--preset", "tiny-random", "--per-class", "1", "--layers", "midblock"], 2, "--activations-out"),
    ("info on a foreign folder", ["info", "notes"], 2, "notes"),
    ("info on a store killed before its metadata", ["info", "killed.zarr"], 2, "an unfinished store (the run that made it stopped before writing its metadata)"),
    ("extract from a store killed before its metadata", ["extract", "killed.zarr", "-o", "o.zarr", "--preset", "tiny-random", "--layers", "midblock"], 2, "re-run that command to resume it"),
    ("convert onto its source file", ["convert", "npz", "src/train/train_data_batch_1.npz", "-o", "src/train/train_data_batch_1.npz"], 2, "is the input"),
    ("convert into its source folder", ["convert", "npz", "src/train", "-o", "src/train/out.zarr"], 2, "lies inside the input"),
    ("convert onto an image store it did not make this way", ["convert", "npz", "src/train", "-o", "acts.zarr"], 2, "imzarr.activations"),
    ("layers of a missing checkpoint", ["layers", "--checkpoint", "nope.pt"], 2, "nope.pt"),
    ("layers of a device as checkpoint", ["layers", "--checkpoint", "/dev/null"], 2, "/dev/null: not a regular file"),
    ("layers of an empty checkpoint path", ["layers", "--checkpoint", ""], 2, "--checkpoint '': names no file"),
    ("convert into another store", ["convert", "npz", "src/train", "-o", "acts.zarr/more/o.zarr"], 2, "lies inside the Zarr store"),
    ("compare into another store", ["compare", "acts.zarr", "acts.zarr", "--layer", "midblock", "-o", "images.zarr/r.zarr"], 2, "lies inside the Zarr store"),
    ("stats below a file", ["stats", "acts.zarr", "--layer", "midblock", "-o", "garbage.pt/s.npz"], 2, "is a file, not a folder"),
]


@pytest.mark.parametrize("case, argv, code, text", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_with_nothing_touched(work, case, argv, code, text):
    before = _snapshot(work)
    proc = run_imzarr(*argv, cwd=work)
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert len(errors) == 1 and errors[0].startswith(f"imzarr {argv[0]}"), proc.stderr
    assert text in errors[0], errors[0]
    after = _snapshot(work)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing file changed"
    for new in set(after) - set(before):
        assert not new.endswith("zarr.json") or zarr.open_group(str(work / Path(new).parent), mode="r").attrs.get("complete") is not True, new


@pytest.mark.parametrize("argv", [["compare", "acts.zarr", "acts.zarr", "--layer", "midblock", "-o", "/sys/imzarr-test/r.zarr"], ["stats", "acts.zarr", "--layer", "midblock", "-o", "/sys/imzarr-test.npz"]], ids=["compare", "stats"])
def test_unwritable_output_refused_before_the_work(work, argv):
    """A folder that takes no new files (/sys refuses even root) fails the command before it reads a feature."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys here")
    proc = run_imzarr(*argv, cwd=work)
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert "/sys takes no new files" in proc.stderr.splitlines()[-1], proc.stderr
    assert "samples ×" not in proc.stderr and "compared in" not in proc.stderr, proc.stderr



@pytest.fixture()
def read_only_folder(tmp_path):
    """A read-only mount holding an earlier reference file (skipped where this process may not mount)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (folder / "ref.npz").write_bytes(b"earlier statistics")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_an_existing_file_in_a_read_only_folder_is_refused_before_the_work(work, read_only_folder):
    """Re-making a file (--overwrite) where the folder takes no writes fails at once, as a new file there does,
    found without writing into the folder."""
    proc = run_imzarr("stats", "acts.zarr", "--layer", "midblock", "-o", str(read_only_folder / "ref.npz"), "--overwrite", cwd=work)
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert f"the folder {read_only_folder} takes no new files" in proc.stderr.splitlines()[-1], proc.stderr
    assert "samples ×" not in proc.stderr, proc.stderr

"""A store a command reads cannot change under it unnoticed: readers' leases (local) and generation ids (every
store, and all there is on object stores). Issue 23, case 1: an input rewritten with `convert npz --overwrite`
while `extract` reads it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from schemas.store_identity import GENERATION_ATTR, InputChangedError, StoreIdentity, StoreInUseError, check_unchanged, reader_lease
from schemas.store_lifecycle import StoreExistsError
from tests.support.commands import run_imzarr

# `imzarr extract` whose first shard task, before it reads, says so in a file and waits for the test's go file:
# the rewrite then lands while the extraction is certainly running. Only our own function is wrapped.
EXTRACT_PAUSED = r"""
import os, sys, time
signal_file, go, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
import extractor.extraction as extraction
original = extraction.extract_shard
def paused(task):
    open(signal_file, "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    return original(task)
extraction.extract_shard = paused
from schemas.cli.dispatch import main
sys.exit(main(argv))
"""


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory, sample_shards) -> Path:
    work = tmp_path_factory.mktemp("identity")
    shutil.copytree(sample_shards, work / "src")
    return work


def test_overwrite_of_a_store_being_extracted_is_refused_naming_the_reader(work):
    """Case 1 on a local disk: the rewrite is refused (exit 1, one line, the reader's pid and host); the
    extraction finishes from the unchanged store, complete and recording the input's generation."""
    convert = ["convert", "npz", "src/train", "-o", "img.zarr", "--shard-size", "16"]
    assert run_imzarr(*convert, cwd=work).returncode == 0
    before = _files(work / "img.zarr")
    generation = zarr.open_group(str(work / "img.zarr"), mode="r").attrs[GENERATION_ATTR]
    extract = ["extract", "img.zarr", "-o", "act.zarr", "--preset", "tiny-random", "--layers", "midblock", "--num-samples", "32",
               "--shard-size", "16", "--device", "cpu"]
    reading, go = work / "reading", work / "go"
    proc = subprocess.Popen([sys.executable, "-c", EXTRACT_PAUSED, str(reading), str(go), *extract], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not reading.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        rewrite = run_imzarr(*convert, "--overwrite", "--shuffle-seed", "7", cwd=work)
    finally:
        go.touch()
        out, err = proc.communicate(timeout=120)
    assert rewrite.returncode == 1 and len(rewrite.stderr.strip().splitlines()) == 1, rewrite.stderr
    assert f"pid {proc.pid} on {socket.gethostname()}" in rewrite.stderr and "reading this store" in rewrite.stderr
    assert proc.returncode == 0, err
    assert _files(work / "img.zarr") == before
    attrs = dict(zarr.open_group(str(work / "act.zarr"), mode="r").attrs)
    assert attrs["complete"] is True and attrs["source"]["generation"] == generation and attrs["settings"]["source_generation"] == generation


def test_a_rewriter_holding_the_store_keeps_readers_out(tmp_path):
    """While a writer empties a store to rebuild it, a reader's lease is refused, naming the writer."""
    from schemas.store_identity import rewrite_guard
    from schemas.store_lifecycle import acquire_writer_lock, release_writer_lock

    url = str(tmp_path / "s.zarr")
    acquire_writer_lock(url)
    try:
        with rewrite_guard(url):
            probe = "from schemas.store_identity import reader_lease\nwith reader_lease(__import__('sys').argv[1]): pass"
            refused = subprocess.run([sys.executable, "-c", probe, url], capture_output=True, text=True)
    finally:
        release_writer_lock(url)
    assert "StoreInUseError" in refused.stderr and "is being rewritten" in refused.stderr
    assert f"pid {__import__('os').getpid()} on {socket.gethostname()}" in refused.stderr
    with reader_lease(url), pytest.raises(StoreInUseError, match="reading this store"):
        with rewrite_guard(url):
            pass


def test_rewritten_object_store_input_fails_the_extraction_naming_it(sample_shards, tmp_path, monkeypatch):
    """Case 1 on an object store (memory://, no locks): the rewrite succeeds, and the identity check alone fails
    the extraction, naming the input; the output is never marked complete, and rerunning the same command is
    refused as made from another input (exit 2), never resumed."""
    import extractor.extraction as extraction
    from converter.api import convert_npz
    from extractor.api import extract

    image_url = "memory://identity-case1/img.zarr"
    convert_npz(str(sample_shards / "train"), image_url, shard_size=16, workers=1)
    opened = StoreIdentity.of(image_url, dict(zarr.open_group(image_url, mode="r").attrs))
    original, calls = extraction.extract_shard, []

    def rewritten_first(task):
        if not calls:  # the input is rebuilt (other settings, a new generation) while the run reads it
            convert_npz(str(sample_shards / "train"), image_url, shard_size=16, shuffle_seed=7, overwrite=True, workers=1)
        calls.append(task.shard)
        return original(task)

    monkeypatch.setattr(extraction, "extract_shard", rewritten_first)
    out = tmp_path / "act.zarr"
    options = dict(preset="tiny-random", layers=["midblock"], num_samples=32, shard_size=16, device="cpu", workers=1)
    with pytest.raises(InputChangedError) as info:
        extract(image_url, str(out), **options)
    message = str(info.value)
    assert message.startswith(f"{image_url}: the input store changed") and opened.generation in message and "\n" not in message
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False
    assert json.loads((out / "zarr.json").read_text())["attributes"]["settings"]["source_generation"] == opened.generation
    monkeypatch.setattr(extraction, "extract_shard", original)
    with pytest.raises(StoreExistsError, match="source_generation"):
        extract(image_url, str(out), **options)


def test_identity_check_sees_every_stage_of_a_rewrite(tmp_path):
    """Gone, under construction, incomplete, another generation: each fails the check; the same store passes."""
    url = str(tmp_path / "s.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3, attributes={"complete": True, GENERATION_ATTR: "a" * 32, "settings_fingerprint": "f"})
    opened = StoreIdentity.of(url, dict(group.attrs))
    check_unchanged(opened)
    for attrs, says in (({"complete": False, GENERATION_ATTR: "a" * 32, "settings_fingerprint": "f"}, "not complete"),
                        ({"complete": True, GENERATION_ATTR: "b" * 32, "settings_fingerprint": "f"}, "now generation " + "b" * 32),
                        ({"imzarr_under_construction": "x", "complete": False}, "not complete")):
        zarr.open_group(url, mode="w", zarr_format=3, attributes=attrs)
        with pytest.raises(InputChangedError, match=says):
            check_unchanged(opened)
    (tmp_path / "s.zarr" / "zarr.json").unlink()
    with pytest.raises(InputChangedError, match="it is gone"):
        check_unchanged(opened)
    np.testing.assert_equal(StoreIdentity.of(url, {}).describe(), "settings fingerprint None")

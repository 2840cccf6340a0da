"""`imzarr extract --dry-run`: the table of one batch, nothing written, and the real run's refusals and outcome."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from extractor import api
from extractor.cli import main as extractor_main
from schemas.store_lifecycle import StoreExistsError

OPTIONS = {"preset": "tiny-random", "layers": "encoder_bottleneck,midblock", "num_samples": 40, "batch_size": 16, "device": "cpu"}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes (and nothing else)."""
    return {
        os.path.relpath(os.path.join(folder, name), root): hashlib.sha256(Path(folder, name).read_bytes()).hexdigest()
        for folder, _, names in os.walk(root)
        for name in names
    }


def test_dry_run_writes_nothing_and_says_what_the_run_would_do(image_store, tmp_path):
    out = tmp_path / "acts.zarr"
    table = api.dry_run(image_store, str(out), **OPTIONS)
    lines = table.splitlines()
    # tiny-random at 64×64: the bottleneck and midblock are 64 channels at 16×16, float16.
    assert [line.split() for line in lines[:4]] == [
        ["layer", "module", "shape", "/", "sample", "bytes", "/", "sample", "store", "for", "40", "samples"],
        ["encoder_bottleneck", "model.enc.16x16_block0", "(64,", "16,", "16)", "32,768", "1.2", "MiB"],
        ["midblock", "model.dec.16x16_in0", "(64,", "16,", "16)", "32,768", "1.2", "MiB"],
        ["total", "65,536", "2.5", "MiB"],
    ]
    assert "output shards of 2048 samples: 1 task;" in table
    assert lines[-1] == f"dry run: nothing written; the run would write a new store ({out})"
    assert not out.exists()

    api.extract(image_store, str(out), **OPTIONS)
    before = tree_digest(out)
    assert api.dry_run(image_store, str(out), **OPTIONS).splitlines()[-1].endswith("the store there is complete: the run would find nothing to do" f" ({out})")
    assert tree_digest(out) == before


def test_dry_run_refuses_what_the_run_refuses(image_store, tmp_path, capsys):
    out = tmp_path / "acts.zarr"
    api.extract(image_store, str(out), **OPTIONS)
    before = tree_digest(out)
    with pytest.raises(StoreExistsError, match=r"made with other inputs or options .*--overwrite"):
        api.dry_run(image_store, str(out), **{**OPTIONS, "num_samples": 24})
    code = extractor_main(["extract", image_store, "-o", str(out), "--preset", "tiny-random", "--layers", "midblock", "--num-samples", "24", "--dry-run"])
    assert code == 2 and "made with other inputs or options" in capsys.readouterr().err
    replaced = api.dry_run(image_store, str(out), **{**OPTIONS, "num_samples": 24, "overwrite": True})
    assert replaced.splitlines()[-1] == f"dry run: nothing written; the run would delete the store there and write it anew (--overwrite) ({out})"
    assert tree_digest(out) == before

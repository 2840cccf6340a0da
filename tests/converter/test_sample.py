"""`imzarr sample DIR` writes under real shard names, so it must never replace a file that is not its own."""

from __future__ import annotations

import numpy as np
import pytest

from converter.sample import SampleExistsError, write_sample_shards
from tests.support.commands import run_imzarr

SIZES = dict(per_shard=12, train_shards=2, val_size=5)


def test_sample_is_idempotent_and_never_replaces_other_files(tmp_path):
    written = write_sample_shards(tmp_path / "s", **SIZES)
    assert [p.relative_to(tmp_path / "s").as_posix() for p in written] == ["train/train_data_batch_1.npz", "train/train_data_batch_2.npz", "val/val_data.npz"]
    stamps = {p: p.stat().st_mtime_ns for p in written}
    with np.load(written[0]) as shard:
        assert shard["data"].shape == (12, 3 * 64 * 64) and shard["data"].dtype == np.uint8 and set(shard["labels"].tolist()) <= set(range(1, 1001))
    assert write_sample_shards(tmp_path / "s", **SIZES) == written  # the same sample again: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in written} == stamps
    with pytest.raises(SampleExistsError, match=r"train_data_batch_1.npz: exists and is not this sample's shard"):
        write_sample_shards(tmp_path / "s", **{**SIZES, "per_shard": 13})  # a sample of other sizes is another file
    assert {p: p.stat().st_mtime_ns for p in written} == stamps


def test_sample_refuses_a_real_shard_before_writing_anything(tmp_path):
    mine = tmp_path / "imagenet64" / "train" / "train_data_batch_2.npz"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"a real shard")
    proc = run_imzarr("sample", str(tmp_path / "imagenet64"), "--per-shard", "12", "--train-shards", "2", "--val-size", "5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("train_data_batch_2.npz: exists and is not this sample's shard; write the sample into an empty folder")
    assert mine.read_bytes() == b"a real shard"
    assert sorted(p.name for p in (tmp_path / "imagenet64").rglob("*")) == ["train", "train_data_batch_2.npz"]  # nothing else written

"""NPZ converter: exact pixels, labels, order, shuffle, crash safety, idempotence and every bad input."""

import shutil
import signal
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import zarr

from converter.cli import main as convert_main
from converter.convert import ConvertOptions, convert
from converter.sources.base import SourceError
from converter.sources.npz import open_npz_source
from schemas.classes import class_table
from schemas.image_store import ImageStore, validate_image_store
from schemas.store_integrity import CHECKSUM_GROUP, DamagedStoreError
from tests.support.commands import checkout_env, run_imzarr
from tests.support.store_equality import stores_identical
from tests.support.synthetic import photo_like, read_shard_rows, write_adm_samples, write_npz_shard, write_pickle_batch

TABLE = class_table()


def shard_folder(tmp_path: Path) -> Path:
    """A folder for input shards, beside (never around) the output stores the tests write."""
    src = tmp_path / "src"
    src.mkdir()
    return src


def run_convert(*argv) -> int:
    return convert_main(["npz", *map(str, argv)])




@pytest.mark.parametrize("size", [64, 32, 16])
@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_pixels_and_labels_exact(tmp_path, size, compressed):
    rng = np.random.default_rng(size)
    src = shard_folder(tmp_path)
    paths = [
        write_npz_shard(src / f"train_data_batch_{i}.npz", photo_like(n, size, seed=i), rng.integers(1, 1001, n), compressed)
        for i, n in ((1, 150), (2, 170))
    ]
    out = tmp_path / "out.zarr"
    assert run_convert(src, "-o", out, "--shard-size", "128", "--inner-chunk", "16") == 0
    expected, labels = read_shard_rows(paths)
    store = validate_image_store(str(out))
    np.testing.assert_array_equal(store.image[:], expected)
    np.testing.assert_array_equal(store.coordinate("label"), labels)
    np.testing.assert_array_equal(store.coordinate("global_index"), np.arange(320))
    np.testing.assert_array_equal(store.coordinate("source_row"), np.r_[np.arange(150), np.arange(170)])
    assert list(store.coordinate("source_file")[[0, 149, 150]]) == ["train_data_batch_1.npz"] * 2 + ["train_data_batch_2.npz"]
    assert list(store.coordinate("synset")[:5]) == [TABLE.wnids[i] for i in labels[:5]]
    assert list(store.coordinate("class_name")[:5]) == [TABLE.names[i] for i in labels[:5]]
    attrs = store.attrs
    assert attrs["complete"] is True and attrs["resolution"] == size and attrs["source_label_order"] == "downsampled"
    assert [s["path"] for s in attrs["sources"]] == ["train_data_batch_1.npz", "train_data_batch_2.npz"]
    assert attrs["rejected"] == [] and attrs["shuffle_seed"] is None


def test_natural_shard_order(tmp_path):
    src = shard_folder(tmp_path)
    for i in (10, 2, 1, 9):
        write_npz_shard(src / f"train_data_batch_{i}.npz", np.full((3, 3, 16, 16), i, np.uint8), np.full(3, i))
    (src / "train_data_batch_9.npz").rename(src / "train_data_batch_9.NPZ")  # an upper-case .NPZ is a shard too
    out = tmp_path / "o.zarr"
    assert run_convert(src, "-o", out) == 0
    store = validate_image_store(str(out))
    assert list(store.coordinate("source_file")[::3]) == [f"train_data_batch_{i}.{'NPZ' if i == 9 else 'npz'}" for i in (1, 2, 9, 10)]
    np.testing.assert_array_equal(store.image[::3, 0, 0, 0], [1, 2, 9, 10])
    # Named one by one, as a shell's `train_data_batch_*` lists them (_1, _10, _2, _9): the same store.
    listed = [src / name for name in ("train_data_batch_1.npz", "train_data_batch_10.npz", "train_data_batch_2.npz", "train_data_batch_9.NPZ")]
    assert run_convert(*listed, "-o", tmp_path / "listed.zarr") == 0
    from tests.support.store_equality import stores_identical

    stores_identical(str(out), str(tmp_path / "listed.zarr"))


def test_same_named_shards_of_two_folders_are_told_apart(tmp_path):
    """source_file and sources name each file by its path below the folders' common parent where names repeat."""
    for folder, value in (("a", 1), ("b", 2)):
        (tmp_path / "in" / folder).mkdir(parents=True)
        write_npz_shard(tmp_path / "in" / folder / "train_data_batch_1.npz", np.full((3, 3, 16, 16), value, np.uint8), np.full(3, value))
    out = tmp_path / "o.zarr"
    assert run_convert(tmp_path / "in" / "a", tmp_path / "in" / "b", "-o", out) == 0
    store = validate_image_store(str(out))
    assert list(store.coordinate("source_file")) == ["a/train_data_batch_1.npz"] * 3 + ["b/train_data_batch_1.npz"] * 3
    assert [s["path"] for s in store.attrs["sources"]] == ["a/train_data_batch_1.npz", "b/train_data_batch_1.npz"]
    np.testing.assert_array_equal(store.image[:, 0, 0, 0], [1, 1, 1, 2, 2, 2])
    # Named one by one, as `in/*/*` or in any order and spelling: folder by folder, the same store.
    for listed in ([tmp_path / "in" / "b" / "train_data_batch_1.npz", tmp_path / "in" / "a" / "train_data_batch_1.npz"],
                   ["in/a/train_data_batch_1.npz", tmp_path / "in" / "b" / "train_data_batch_1.npz"]):
        again = tmp_path / f"again-{len(str(listed[0]))}.zarr"
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp_path)
            assert run_convert(*listed, "-o", again) == 0
        np.testing.assert_array_equal(validate_image_store(str(again)).image[:, 0, 0, 0], [1, 1, 1, 2, 2, 2])


def test_empty_shards_are_not_copies_of_each_other(tmp_path):
    """Two shards with no rows hold the same (nothing): converted beside a full one, not refused as a copy."""
    src = shard_folder(tmp_path)
    write_npz_shard(src / "train_data_batch_1.npz", np.full((3, 3, 16, 16), 7, np.uint8), np.full(3, 1))
    for i in (2, 3):
        write_npz_shard(src / f"train_data_batch_{i}.npz", np.zeros((0, 3, 16, 16), np.uint8), np.zeros(0, int), mean=False)
    assert run_convert(src, "-o", tmp_path / "o.zarr") == 0
    np.testing.assert_array_equal(validate_image_store(str(tmp_path / "o.zarr")).image[:, 0, 0, 0], [7, 7, 7])


def test_label_remap_all_classes(tmp_path):
    npz_labels = np.arange(1, 1001)
    write_npz_shard(tmp_path / "val_data.npz", photo_like(1000, 16), npz_labels, mean=False)
    out = tmp_path / "o.zarr"
    assert run_convert(tmp_path / "val_data.npz", "-o", out) == 0
    label = validate_image_store(str(out)).coordinate("label")
    table_index = {int(d): i for i, d in enumerate(TABLE.downsampled_labels)}
    np.testing.assert_array_equal(label, [table_index[v] for v in npz_labels])
    assert label[0] == 278 and label[448] == 0  # NPZ 1 → kit fox, NPZ 449 → tench
    assert not np.any(label == npz_labels - 1)  # "label − 1" is wrong for every class
    assert sorted(label.tolist()) == list(range(1000))


def test_adm_sample_files(tmp_path):
    images = photo_like(40, 32, seed=3)
    labels = np.arange(40) * 7
    write_adm_samples(tmp_path / "samples_40x32x32x3.npz", images, labels)
    out = tmp_path / "o.zarr"
    assert run_convert(tmp_path / "samples_40x32x32x3.npz", "-o", out) == 0
    store = validate_image_store(str(out))
    np.testing.assert_array_equal(store.image[:], images)
    np.testing.assert_array_equal(store.coordinate("label"), labels)
    assert store.attrs["source_label_order"] == "sorted" and store.attrs["source_format"] == "adm-npz"
    write_adm_samples(tmp_path / "nolabels.npz", images, None)
    assert run_convert(tmp_path / "nolabels.npz", "-o", tmp_path / "n.zarr") == 0
    nolab = validate_image_store(str(tmp_path / "n.zarr"))
    assert (nolab.coordinate("label") == -1).all() and list(nolab.coordinate("synset")[:1]) == [""]


def test_shuffle_seed(tmp_path):
    src = shard_folder(tmp_path)
    write_npz_shard(src / "train_data_batch_1.npz", photo_like(300, 16, 1), np.arange(300) % 1000 + 1)
    write_npz_shard(src / "train_data_batch_2.npz", photo_like(200, 16, 2), np.arange(200) % 1000 + 1, compressed=True)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert run_convert(src, "-o", tmp_path / f"{name}.zarr", "--shuffle-seed", seed, "--shard-size", "64") == 0
    stores_identical(str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"))
    a, c = validate_image_store(str(tmp_path / "a.zarr")), validate_image_store(str(tmp_path / "c.zarr"))
    gi = a.coordinate("global_index")
    assert sorted(gi.tolist()) == list(range(500)) and not np.array_equal(gi, np.arange(500))
    assert not np.array_equal(gi, c.coordinate("global_index"))
    expected, labels = read_shard_rows([src / "train_data_batch_1.npz", src / "train_data_batch_2.npz"])
    np.testing.assert_array_equal(a.image[:], expected[gi])
    np.testing.assert_array_equal(a.coordinate("label"), labels[gi])
    assert a.attrs["shuffle_seed"] == 7


def test_reads_identically_through_zarr_xarray_and_fast_reader(tmp_path):
    src = shard_folder(tmp_path)
    write_npz_shard(src / "val_data.npz", photo_like(500, 32, 5), np.arange(500) + 1, mean=False)
    out = str(tmp_path / "o.zarr")
    assert run_convert(src, "-o", out, "--shard-size", "128", "--inner-chunk", "8") == 0
    expected, labels = read_shard_rows([src / "val_data.npz"])
    direct = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(direct["image"][:], expected)
    ds = xr.open_zarr(out)
    assert ds.image.dims == ("sample", "channel", "y", "x") and isinstance(ds.image.data, dask.array.Array)
    assert ds.image.data.chunks[0][0] == 8  # xarray's dask chunk is the inner chunk
    # Numeric per-sample arrays are coordinates, in one chunk; text arrays are plain variables, one chunk per shard.
    assert set(ds.coords) == {"label", "global_index", "source_row"} and ds.label.data.numblocks == (1,)
    assert {"synset", "class_name", "source_file"} <= set(ds.data_vars) and ds.synset.data.chunks[0][0] == 128
    np.testing.assert_array_equal(ds.image.values, expected)
    np.testing.assert_array_equal(ds.label.values, labels)
    store = ImageStore(out, direct)
    idx = np.random.default_rng(0).integers(0, 500, 300)  # unsorted, with repeats
    np.testing.assert_array_equal(store.take(idx), expected[idx])
    np.testing.assert_array_equal(store.read(100, 300), expected[100:300])


def test_zero_images_and_fsspec_url(tmp_path):
    """All-black images (whole black shards) read back as written through every reader; memory:// works end to end."""
    images = photo_like(200, 16)
    images[:128] = 0
    write_npz_shard(tmp_path / "val_data.npz", images, np.ones(200, int), mean=False)
    source = open_npz_source([tmp_path / "val_data.npz"])
    result = convert(source, ConvertOptions("memory://imzarr-test/o.zarr", shard_size=64, inner_chunk=16))
    assert result.num_samples == 200
    store = validate_image_store("memory://imzarr-test/o.zarr")
    np.testing.assert_array_equal(store.image[:], images)
    np.testing.assert_array_equal(store.take(np.array([5, 150])), images[[5, 150]])
    local = convert(source, ConvertOptions(str(tmp_path / "z.zarr"), shard_size=64, inner_chunk=16))
    local_store = validate_image_store(local.url)
    np.testing.assert_array_equal(local_store.take(np.arange(200)[::-1]), images[::-1])
    shard_0 = tmp_path / "z.zarr" / "image" / "c" / "0" / "0" / "0" / "0"
    assert shard_0.exists()  # the converter stores black images like any other
    # zarr's default (write_empty_chunks=False) drops all-black shards and chunks. In a complete store that
    # records them as written, that is damage, named; without the record (older stores, other writers) the fast
    # reader fills them in, as zarr does.
    zarr.open_group(local.url, mode="r+", use_consolidated=False)["image"][:128] = images[:128]
    assert not shard_0.exists()
    with pytest.raises(DamagedStoreError, match=f"{shard_0}: missing"):
        validate_image_store(local.url)
    with pytest.raises(DamagedStoreError, match=f"{shard_0}: missing"):
        validate_image_store(local.url, require_complete=False).take(np.arange(200))
    shutil.rmtree(tmp_path / "z.zarr" / CHECKSUM_GROUP)
    np.testing.assert_array_equal(validate_image_store(local.url).take(np.arange(200)[::-1]), images[::-1])


def test_idempotent_rerun_and_changed_options(tmp_path, capsys):
    src = shard_folder(tmp_path)
    write_npz_shard(src / "val_data.npz", photo_like(100, 16), np.ones(100, int), mean=False)
    out = tmp_path / "o.zarr"
    assert run_convert(src, "-o", out) == 0
    before = (out / "image" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns
    capsys.readouterr()
    assert run_convert(src, "-o", out) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "image" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns == before
    assert run_convert(src, "-o", out, "--shuffle-seed", "1") == 2
    assert "shuffle_seed" in capsys.readouterr().err
    assert run_convert(src, "-o", out, "--shuffle-seed", "1", "--overwrite") == 0
    assert validate_image_store(str(out)).attrs["shuffle_seed"] == 1


def test_pickle_batches_need_opt_in(tmp_path, capsys):
    images = photo_like(30, 32)
    src = shard_folder(tmp_path)
    write_pickle_batch(src / "train_data_batch_1", images, np.arange(30) + 1)
    out = tmp_path / "o.zarr"
    assert run_convert(src, "-o", out) == 2
    err = capsys.readouterr().err
    assert "train_data_batch_1" in err and "--allow-pickle" in err and not out.exists()
    assert run_convert(src, "-o", out, "--allow-pickle") == 0
    store = validate_image_store(str(out))
    np.testing.assert_array_equal(store.image[:], images)
    np.testing.assert_array_equal(store.coordinate("label"), TABLE.from_downsampled(np.arange(30) + 1))


def _bad(tmp_path: Path, kind: str) -> tuple[list, str]:
    good = photo_like(10, 16)
    if kind == "no shards":
        (tmp_path / "empty").mkdir()
        return [tmp_path / "empty"], "no shards found"
    if kind == "truncated zip":
        p = write_npz_shard(tmp_path / "val_data.npz", good, np.ones(10, int))
        p.write_bytes(p.read_bytes()[:2000])
        return [p], "truncated or corrupt zip"
    if kind == "corrupt deflate":
        p = write_npz_shard(tmp_path / "val_data.npz", photo_like(200, 32), np.ones(200, int), compressed=True)
        raw = bytearray(p.read_bytes())
        with zipfile.ZipFile(p) as zf:
            info = zf.getinfo("data.npy")
        mid = info.header_offset + 100 + info.compress_size // 2
        raw[mid : mid + 64] = bytes(64)
        p.write_bytes(bytes(raw))
        return [p], "val_data.npz"
    if kind == "missing data":
        p = tmp_path / "val_data.npz"
        np.savez(p, labels=np.ones(3))
        return [p], "no 'data'"
    if kind == "missing labels":
        p = tmp_path / "val_data.npz"
        np.savez(p, data=good.reshape(10, -1))
        return [p], "no 'labels'"
    if kind == "length mismatch":
        p = tmp_path / "val_data.npz"
        np.savez(p, data=good.reshape(10, -1), labels=np.ones(9, int))
        return [p], "10 rows but labels has 9"
    if kind == "row length":
        p = tmp_path / "val_data.npz"
        np.savez(p, data=np.zeros((4, 100), np.uint8), labels=np.ones(4, int))
        return [p], "row length 100"
    if kind == "label range":
        p = write_npz_shard(tmp_path / "val_data.npz", good, np.r_[np.ones(9, int), 1001])
        return [p], "label 1001 outside 1..1000"
    if kind == "sorted label range":
        p = write_npz_shard(tmp_path / "val_data.npz", good, np.r_[np.ones(9, int), 1000])
        return [p, "--label-order", "sorted"], "label 1000 outside 0..999 (row 9; label order 'sorted'); if the file's labels are 1-based map_clsloc labels, pass --label-order downsampled"
    if kind == "mixed resolutions":
        src = shard_folder(tmp_path)
        write_npz_shard(src / "train_data_batch_1.npz", good, np.ones(10, int))
        write_npz_shard(src / "train_data_batch_2.npz", photo_like(10, 32), np.ones(10, int))
        res = good.shape[-1]
        return [src], f"mixed resolutions: {res}×{res} (1 file, e.g. {src / 'train_data_batch_1.npz'}); 32×32 (1 file, e.g. {src / 'train_data_batch_2.npz'}); convert each"
    if kind == "pickle":
        src = shard_folder(tmp_path)
        write_pickle_batch(src / "train_data_batch_1", good, np.ones(10, int))
        return [src], "--allow-pickle"
    if kind == "foreign output":
        write_npz_shard(tmp_path / "val_data.npz", good, np.ones(10, int))
        (tmp_path / "o.zarr").mkdir()
        (tmp_path / "o.zarr" / "notes.txt").write_text("mine")
        return [tmp_path / "val_data.npz"], "not an imzarr store"
    raise AssertionError(kind)


BAD_INPUTS = ["no shards", "truncated zip", "corrupt deflate", "missing data", "missing labels", "length mismatch",
              "row length", "label range", "sorted label range", "mixed resolutions", "pickle", "foreign output"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_one_clear_line(tmp_path, kind):
    args, message = _bad(tmp_path, kind)
    out = tmp_path / "o.zarr"
    proc = subprocess.run([sys.executable, "-m", "converter", "npz", *map(str, args), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imzarr convert: error: ") and message in lines[0], proc.stderr
    if out.exists() and (out / "zarr.json").exists():
        assert zarr.open_group(str(out), mode="r").attrs["complete"] is False


def test_killed_with_a_compressed_part_then_rerun_equals_uninterrupted(tmp_path):
    """SIGKILL after the third of ten shards is recorded done (a named step, tests/support/faults.py), with one
    source part inflated into scratch: the store says incomplete, and the rerun, reusing that scratch part, ends
    identical and tidies the scratch away. The fault matrix (tests/cli/test_fault_matrix.py) kills at every other
    step, with uncompressed sources only."""
    from tests.support.faults import KILL_AT_STEP

    rng = np.random.default_rng(0)
    src = shard_folder(tmp_path)
    for i in (1, 2):
        write_npz_shard(src / f"train_data_batch_{i}.npz", photo_like(300, 16, i), rng.integers(1, 1001, 300), compressed=(i == 2))
    args = ["convert", "npz", str(src), "--shard-size", "64", "--workers", "1", "--shuffle-seed", "3"]
    reference = tmp_path / "ref.zarr"
    assert run_imzarr(*args, "-o", reference).returncode == 0
    crashed = tmp_path / "crashed.zarr"
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP, "after_shard", "3", *args, "-o", str(crashed)], env=checkout_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((crashed / "_progress" / "done" / "c").iterdir())) == 3
    assert zarr.open_group(str(crashed), mode="r", use_consolidated=False).attrs["complete"] is False
    with pytest.raises(Exception, match="not complete"):
        validate_image_store(str(crashed))
    rerun = run_imzarr(*args, "-o", crashed)
    assert rerun.returncode == 0, rerun.stderr
    stores_identical(str(reference), str(crashed))
    assert not list(tmp_path.glob("*.scratch-*"))


def test_remote_row_reads_equal_local_pread(tmp_path, monkeypatch):
    """Scattered, adjacent and long runs of rows from a URL (memory://, remote like s3://) land where pread puts
    them, also when runs are split into several ranges."""
    import fsspec

    from converter.sources import source_files

    item = 48
    data = np.random.default_rng(0).integers(0, 256, 200 * item, dtype=np.uint8).tobytes()
    (tmp_path / "rows.raw").write_bytes(data)
    url = "memory://imzarr-test-rows/rows.raw"
    fsspec.filesystem("memory").pipe_file("/imzarr-test-rows/rows.raw", data)
    rows = np.array([0, 1, 2, 3, 4, 5, 6, 40, 41, 99, 150, 151, 152, 199])
    dest = np.random.default_rng(1).permutation(rows.size)
    monkeypatch.setattr(source_files, "RANGE_BYTES", 3 * item)  # runs of 7 and 3 rows become several ranges
    local, remote = np.zeros((rows.size, item), np.uint8), np.zeros((rows.size, item), np.uint8)
    source_files.read_items_into(str(tmp_path / "rows.raw"), rows * item, item, local, dest)
    source_files.read_items_into(url, rows * item, item, remote, dest)
    np.testing.assert_array_equal(remote, local)
    np.testing.assert_array_equal(local[dest], np.frombuffer(data, np.uint8).reshape(200, item)[rows])
    fsspec.filesystem("memory").rm("/imzarr-test-rows", recursive=True)


@pytest.mark.parametrize("shuffle", [None, 3])
def test_a_shard_replaced_during_the_conversion_leaves_the_store_unfinished(tmp_path, shuffle):
    """The shard is replaced after the source was opened (its labels and fingerprint read) and before its rows are:
    the images would come from the new file, the labels from the old one. The inputs are opened again before the
    store is marked complete, and the run fails naming the file instead."""
    from schemas.store_identity import InputChangedError

    src = tmp_path / "train"
    src.mkdir()
    for k in (1, 2):
        write_npz_shard(src / f"train_data_batch_{k}.npz", photo_like(20, 16, seed=k), np.arange(1, 21) + 10 * k)
    source = open_npz_source([src])
    write_npz_shard(tmp_path / "new.npz", photo_like(20, 16, seed=9), np.arange(1, 21) + 10)
    shutil.move(tmp_path / "new.npz", src / "train_data_batch_1.npz")
    out = str(tmp_path / "s.zarr")
    with pytest.raises(InputChangedError, match=r"train_data_batch_1\.npz: changed while the conversion read it; the store is left unfinished .* re-run with --overwrite"):
        convert(source, ConvertOptions(out, shard_size=64, inner_chunk=16, shuffle_seed=shuffle))
    assert zarr.open_group(out, mode="r").attrs["complete"] is False
    convert(open_npz_source([src]), ConvertOptions(out, shard_size=64, inner_chunk=16, shuffle_seed=shuffle, overwrite=True))
    images, _ = read_shard_rows(sorted(src.glob("*.npz")))
    store = validate_image_store(out)
    np.testing.assert_array_equal(store.take(np.argsort(store.coordinate("global_index"))), images)


def _flip_a_pixel_byte(path: Path, row: int) -> None:
    """Change one byte of row `row` of a stored `data` member in place (the zip's recorded CRC-32 stays)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("data.npy")
        assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(fh.read(4), "<u2")
        data_start = info.header_offset + 30 + int(name_len) + int(extra_len)
        fh.seek(data_start)
        header_len = len(fh.read(512).split(b"\n", 1)[0]) + 1
        at = data_start + header_len + row * 3 * 16 * 16 + 5
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("shuffle", [None, 2])
def test_a_flipped_byte_in_a_stored_member_fails_its_crc_and_leaves_the_store_unfinished(tmp_path, shuffle):
    """Stored members are read in place, row runs by many tasks: the CRC-32 the zip records is checked from their
    pieces (with --shuffle-seed, while the member is copied to scratch), so a flipped bit never becomes a pixel
    of a complete store."""
    src = tmp_path / "train"
    src.mkdir()
    for k in (1, 2):
        write_npz_shard(src / f"train_data_batch_{k}.npz", photo_like(100, 16, seed=k), np.arange(1, 101))
    out = str(tmp_path / "good.zarr")
    convert(open_npz_source([src]), ConvertOptions(out, shard_size=32, inner_chunk=16, shuffle_seed=shuffle))  # every piece checks
    assert validate_image_store(out).complete
    _flip_a_pixel_byte(src / "train_data_batch_2.npz", 57)
    bad = str(tmp_path / "bad.zarr")
    with pytest.raises(SourceError, match=r"train_data_batch_2\.npz: data\.npy fails its CRC-32 check \(corrupt data\)"):
        convert(open_npz_source([src]), ConvertOptions(bad, shard_size=32, inner_chunk=16, shuffle_seed=shuffle))
    assert zarr.open_group(bad, mode="r").attrs["complete"] is False


def test_the_crc_check_of_a_resumed_run_reads_what_the_killed_run_converted(tmp_path):
    """A row flipped in a shard an earlier run already converted (so no task of the resumed run reads it) still
    fails the member's check."""
    from converter.convert import check_read_members

    src = tmp_path / "train"
    src.mkdir()
    write_npz_shard(src / "train_data_batch_1.npz", photo_like(100, 16, seed=4), np.arange(1, 101))
    row_file = open_npz_source([src]).parts[0].row_file()
    every = np.arange(100)
    images = row_file.read(every)
    pieces = row_file.piece_checksums(0, every[40:], images, every[40:])  # rows 40.. read by this run's tasks
    check_read_members({0: row_file}, [{"images": 60, "row_crcs": [pieces]}])  # rows 0..39 are read again: all hold
    _flip_a_pixel_byte(src / "train_data_batch_1.npz", 7)
    with pytest.raises(SourceError, match="fails its CRC-32 check"):
        check_read_members({0: row_file}, [{"images": 60, "row_crcs": [pieces]}])


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_row_pieces_hold_for_rows_read_into_any_places(tmp_path, layout):
    """Rows read in any order into any places of a shard (a shuffled conversion: destinations such as 10, 9, 12
    for rows 4, 5, 6) give the member's CRC-32 exactly, for NPZ planes and ADM's interleaved pixels."""
    from converter.convert import check_read_members
    from converter.sources.row_checksums import crc32_combine, crc32_combine_here

    path = tmp_path / "x.npz"
    images = photo_like(60, 16, seed=8)
    write_adm_samples(path, images, None) if layout == "hwc" else write_npz_shard(path, images, np.arange(1, 61))
    row_file = open_npz_source([path]).parts[0].row_file()
    assert row_file.layout == layout and row_file.checksum is not None
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = np.sort(rng.choice(60, size=int(rng.integers(1, 60)), replace=False))
        dest = rng.permutation(60)[: rows.size]
        out = np.zeros((60, 3, 16, 16), np.uint8)
        row_file.read_into(rows, out, dest)
        np.testing.assert_array_equal(out[dest], images[rows])
        check_read_members({0: row_file}, [{"row_crcs": [row_file.piece_checksums(0, rows, out, dest)]}])  # the rest read again
    a, b = bytes(range(256)) * 3, bytes(range(7, 250))
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == crc32_combine_here(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)

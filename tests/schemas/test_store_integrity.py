"""Complete means every byte is there: crc32c records written with the data, `imzarr verify`, `imzarr info`'s
listing check, and readers that name a missing or truncated shard file instead of returning zeros."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from converter.convert import ConvertOptions, convert
from converter.sources.npz import open_npz_source
from extractor.activation_writer import create_activation_arrays
from schemas.shard_writer import ShardOutput
from schemas.activation_store import ACTIVATION_SCHEMA, validate_activation_store
from schemas.classes import class_table
from schemas.image_store import ImageStore, validate_image_store
from schemas.store_integrity import (
    CHECKSUM_GROUP,
    UNIT_RECORDS,
    DamagedStoreError,
    UnfinishedStoreError,
    read_checksum_record,
    record_checksums,
    record_unit_checksums,
    verify_store,
)
from schemas.store_lifecycle import finalize_store, mark_done, prepare_store
from tests.support.synthetic import photo_like, write_npz_shard
from tests.support.commands import run_imzarr

SHARD, INNER, N = 64, 16, 200  # 4 image shards of 16×16 images, the last one partial


def _crc32c_reference(data: bytes) -> int:
    """crc32c (Castagnoli, reflected polynomial 0x82F63B78, RFC 3720 B.4) byte by byte: independent of the
    C extension the writers use."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def test_reference_crc32c_matches_the_standard_check_value():
    assert _crc32c_reference(b"123456789") == 0xE3069283  # the catalogue's check value for CRC-32C


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> Path:
    """A converted image store (the converter's zarr-python shard writes), kept pristine; tests damage copies."""
    root = tmp_path_factory.mktemp("integrity")
    write_npz_shard(root / "val_data.npz", photo_like(N, 16), np.arange(N) % 3 + 1, mean=False)
    convert(open_npz_source([root / "val_data.npz"]), ConvertOptions(str(root / "images.zarr"), shard_size=SHARD, inner_chunk=INNER))
    return root / "images.zarr"


def _activation_store(url: Path, n: int = 40, shard: int = 16) -> Path:
    """An activation store written the way extract writes one: created and resumed through the lifecycle, each
    shard through ShardOutput (direct shard files, checksums as written), recorded, then finished."""
    labels = (np.arange(n) % 2).astype(np.int16)
    values = np.random.default_rng(0).normal(size=(n, 4, 2, 2)).astype(np.float16)
    positions = np.arange(n, dtype=np.int64)
    table = class_table()
    numeric = {"label": labels, "global_index": positions, "source_sample": positions}
    attrs = {
        "model": {"name": "synthetic", "trained": False}, "layers": {"feat": "synthetic.feat"}, "sigma": 1.0, "noise": None,
        "pooling": "none", "dtypes": {"storage": "float16", "compute": "fp32"}, "selection": {"count": n},
        "source": {"url": "synthetic"}, "versions": {}, "device": "cpu",
    }
    num_shards = -(-n // shard)
    state = prepare_store(
        str(url), ACTIVATION_SCHEMA, {"test": "integrity"}, num_shards,
        lambda g: create_activation_arrays(g, n, {"feat": (4, 2, 2)}, "float16", shard, None, coordinates=numeric), False, initial_attrs=attrs,
    )
    for k in state.pending:
        a, b = k * shard, min(n, (k + 1) * shard)
        output = ShardOutput(str(url), k, a, {"feat": values[a:b].copy()})
        output.ready(0, b - a)
        output.commit({"synset": table.synsets_of(labels[a:b]), "class_name": table.names_of(labels[a:b]), "source_file": np.full(b - a, "s", dtype=object)})
        record_unit_checksums(str(url), k, output.checksums)
        mark_done(str(url), k)
    record_checksums(str(url))
    finalize_store(str(url), {})
    return url


@pytest.fixture(scope="module")
def activation_store(tmp_path_factory) -> Path:
    return _activation_store(tmp_path_factory.mktemp("acts") / "acts.zarr")


def _copy(store: Path, tmp_path: Path) -> Path:
    target = tmp_path / store.name
    shutil.copytree(store, target)
    return target


def _data_files(store: Path) -> list[Path]:
    """Every chunk and shard file of the store's arrays (not metadata, not the checksum record)."""
    return sorted(p for p in store.rglob("*") if p.is_file() and p.name != "zarr.json" and CHECKSUM_GROUP not in p.parts)


@pytest.mark.parametrize("kind", ["image", "activation"])
def test_record_holds_each_files_crc32c_and_replaces_the_unit_records(kind, image_store, activation_store):
    store = image_store if kind == "image" else activation_store
    record = read_checksum_record(str(store))
    found = {}
    for path in _data_files(store):
        name, *key = path.relative_to(store).parts
        cell = tuple(int(c) for c in key[1:])  # default chunk keys: c/i/j/…
        found[(name, cell)] = int(record[name][cell])
        assert found[(name, cell)] == _crc32c_reference(path.read_bytes()), path
    recorded = {(name, cell) for name, values in record.items() for cell in zip(*np.nonzero(values != -1))}
    assert {(n, tuple(int(c) for c in cell)) for n, cell in recorded} == set(found)
    assert not (store / UNIT_RECORDS).exists() and not (store / "_progress").exists()
    assert verify_store(str(store)).damage == []


def _damage(store: Path, array: str) -> dict[str, Path]:
    """Flip one byte of shard 0, cut shard 1 short, delete shard 2 of `array`."""
    shard_dir = store / array / "c"
    files = {k: shard_dir / str(k) for k in range(3)}
    files = {k: next(p for p in sorted((shard_dir / str(k)).rglob("*")) if p.is_file()) for k in files}
    with open(files[0], "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.truncate(files[1], files[1].stat().st_size // 2)
    files[2].unlink()
    return {"flipped": files[0], "truncated": files[1], "missing": files[2]}


@pytest.mark.parametrize("kind", ["image", "activation"])
def test_verify_names_a_flipped_a_truncated_and_a_missing_shard(kind, image_store, activation_store, tmp_path):
    store = _copy(image_store if kind == "image" else activation_store, tmp_path)
    clean = run_imzarr("verify", str(store))
    assert clean.returncode == 0, clean.stderr
    assert "every crc32c as recorded" in clean.stdout
    damaged = _damage(store, "image" if kind == "image" else "feat")
    proc = run_imzarr("verify", str(store))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert sorted(lines) == sorted(
        [
            f"{damaged['flipped']}: checksum mismatch: crc32c {_crc32c_reference(damaged['flipped'].read_bytes()):08x}, "
            f"recorded {int(read_checksum_record(str(store))['image' if kind == 'image' else 'feat'].reshape(-1)[0]):08x}",
            f"{damaged['truncated']}: truncated: {damaged['truncated'].stat().st_size} bytes, expected {2 * damaged['truncated'].stat().st_size}",
            f"{damaged['missing']}: missing",
        ]
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"imzarr verify: error: {store}: 3 damaged data files ({errors[0].split('(', 1)[1]}"]
    assert "Traceback" not in proc.stderr


def test_info_names_missing_and_short_shards_and_calls_the_store_not_valid(image_store, tmp_path):
    store = _copy(image_store, tmp_path)
    ok = run_imzarr("info", str(store))
    assert ok.returncode == 0 and "data files   all present" in ok.stdout
    damaged = _damage(store, "image")
    proc = run_imzarr("info", str(store))
    assert proc.returncode == 1
    named = [line for line in proc.stdout.splitlines() if line.startswith("damaged")]
    assert sorted(named) == sorted([f"damaged      {damaged['missing']}: missing",
                                    f"damaged      {damaged['truncated']}: truncated: {damaged['truncated'].stat().st_size} bytes, "
                                    f"expected {2 * damaged['truncated'].stat().st_size}"])
    assert proc.stderr.strip().splitlines()[-1].startswith(f"imzarr info: error: {store}: not valid: 2 data files missing or short")


def test_readers_name_the_missing_or_truncated_shard_file(image_store, activation_store, tmp_path):
    store = _copy(image_store, tmp_path)
    damaged = _damage(store, "image")
    with pytest.raises(DamagedStoreError, match=rf"^{damaged['truncated']}: truncated: .*\(and 1 more damaged files"):
        validate_image_store(str(store))  # the first in listing order, and how many more
    reader = ImageStore(str(store), zarr.open_group(str(store), mode="r"))  # opened without the validator's listing
    # a flipped byte reads as the flipped value (only verify's checksums see it)
    flipped = reader.read(0, 4) != validate_image_store(str(image_store)).read(0, 4)
    assert np.flatnonzero(flipped.reshape(-1)).tolist() == [100]
    with pytest.raises(DamagedStoreError, match=f"^{damaged['truncated']}: shard index fails its crc32c"):
        reader.take(np.array([SHARD + 1]))
    with pytest.raises(DamagedStoreError, match=f"^{damaged['missing']}: missing; the store is marked complete"):
        reader.take(np.array([2 * SHARD + 3]))
    acts = _copy(activation_store, tmp_path)
    gone = next(p for p in sorted((acts / "feat" / "c" / "1").rglob("*")) if p.is_file())
    gone.unlink()
    with pytest.raises(DamagedStoreError, match=f"^{gone}: missing"):
        validate_activation_store(str(acts))


def test_commands_over_a_store_missing_a_shard_fail_in_one_line(image_store, activation_store, tmp_path):
    images = _copy(image_store, tmp_path)
    shard = images / "image" / "c" / "1" / "0" / "0" / "0"
    shard.unlink()
    for args in (["extract", str(images), "-o", str(tmp_path / "a.zarr"), "--preset", "tiny-random", "--layers", "midblock", "--device", "cpu"],
                 ["show", str(images), "-o", str(tmp_path / "grid.png")]):
        proc = run_imzarr(*args)
        assert proc.returncode == 1, (args[0], proc.stderr)
        assert proc.stderr.strip().splitlines() == [f"imzarr {args[0]}: error: {shard}: missing; the store is marked complete but lacks data"]
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "grid.png").exists()
    acts = _copy(activation_store, tmp_path)
    gone = acts / "feat" / "c" / "0" / "0" / "0" / "0"
    gone.unlink()
    proc = run_imzarr("compare", str(activation_store), str(acts), "--layer", "feat")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"imzarr compare: error: {gone}: missing; the store is marked complete but lacks data"]


def test_verify_over_an_fsspec_url(tmp_path):
    """memory:// (any fsspec filesystem): the same record is written through fsspec, and verify reads it back."""
    write_npz_shard(tmp_path / "val_data.npz", photo_like(100, 16), np.ones(100, int), mean=False)
    url = "memory://imzarr-integrity/v.zarr"
    convert(open_npz_source([tmp_path / "val_data.npz"]), ConvertOptions(url, shard_size=SHARD, inner_chunk=INNER))
    try:
        assert verify_store(url).damage == [] and verify_store(url).recorded
        fs = fsspec.filesystem("memory")
        root = "/imzarr-integrity/v.zarr"
        blob = bytearray(fs.cat_file(f"{root}/image/c/0/0/0/0"))
        blob[7] ^= 0x80
        fs.pipe_file(f"{root}/image/c/0/0/0/0", bytes(blob))
        fs.rm(f"{root}/image/c/1/0/0/0")
        found = {d.path: d.problem for d in verify_store(url).damage}
        assert set(found) == {f"{root}/image/c/0/0/0/0", f"{root}/image/c/1/0/0/0"}
        assert found[f"{root}/image/c/0/0/0/0"].startswith("checksum mismatch") and found[f"{root}/image/c/1/0/0/0"] == "missing"
    finally:
        fsspec.filesystem("memory").rm("/imzarr-integrity", recursive=True)


def test_a_store_without_a_record_gets_the_listing_checks(image_store, tmp_path):
    """Stores made before checksums: verify says what it could check; a missing shard cannot be told from one
    zarr left out (all fill), so only sizes count."""
    store = _copy(image_store, tmp_path)
    shutil.rmtree(store / CHECKSUM_GROUP)
    meta = json.loads((store / "zarr.json").read_text())
    meta["consolidated_metadata"]["metadata"] = {k: v for k, v in meta["consolidated_metadata"]["metadata"].items() if not k.startswith(CHECKSUM_GROUP)}
    (store / "zarr.json").write_text(json.dumps(meta))
    proc = run_imzarr("verify", str(store))
    assert proc.returncode == 0 and "no checksum record" in proc.stderr and f"{store}: ok (presence and sizes)" in proc.stdout
    assert "data files   sizes possible; no checksum record" in run_imzarr("info", str(store)).stdout
    shard = store / "image" / "c" / "1" / "0" / "0" / "0"
    os.truncate(shard, 10)  # shorter than any shard's index
    proc = run_imzarr("verify", str(store))
    assert proc.returncode == 1 and proc.stdout.splitlines() == [f"{shard}: truncated: 10 bytes, expected at least {4 * 16 + 4}"]


@pytest.mark.parametrize("order", ["in file order", "out of order"])
def test_shard_writer_crc32c_is_the_committed_files(order, tmp_path):
    """The direct writer checksums bytes as they arrive; batches out of file order fall back to reading back."""
    from schemas.shard_writer import ShardFileWriter, direct_layout

    url = str(tmp_path / "s.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    group.create_array("a", shape=(100, 3, 2), dtype="float16", chunks=(16, 3, 2), shards=(64, 3, 2), compressors=None, fill_value=0.0)
    values = np.random.default_rng(1).normal(size=(36, 3, 2)).astype(np.float16)  # the last shard: 36 of 64, padded
    writer = ShardFileWriter(tmp_path / "s.zarr" / "a", direct_layout(url, "a"), 1, np.dtype("float16"))
    batches = [(0, 20), (20, 36)] if order == "in file order" else [(20, 36), (0, 20)]
    for a, b in batches:
        writer.write(a, values[a:b])
    writer.commit()
    assert writer.crc32c == _crc32c_reference((tmp_path / "s.zarr" / "a" / "c" / "1" / "0" / "0").read_bytes())
    np.testing.assert_array_equal(zarr.open_array(url, path="a", mode="r")[64:], values)


@pytest.mark.parametrize("kind", ["image", "activation"])
def test_the_record_reads_as_zarr_python_reads_it(kind, image_store, activation_store, tmp_path):
    """The record is read from the spec's files (zarr.json, one raw chunk each); an array stored any other way
    (here: compressed) goes through zarr-python, and a chunk file never written reads as the fill value."""
    store = _copy(image_store if kind == "image" else activation_store, tmp_path)

    def by_zarr() -> dict[str, np.ndarray]:
        group = zarr.open_group(str(store), path=CHECKSUM_GROUP, mode="r")
        return {name: np.asarray(array[...]) for name, array in group.arrays()}

    def same(found: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> bool:
        return sorted(found) == sorted(expected) and all(found[k].dtype == expected[k].dtype and np.array_equal(found[k], expected[k]) for k in found)

    assert same(read_checksum_record(str(store)), by_zarr())
    names = sorted(by_zarr())
    compressed, unwritten = names[0], names[1]
    values = by_zarr()[compressed]
    group = zarr.open_group(str(store), path=CHECKSUM_GROUP, mode="r+")
    del group[compressed]
    group.create_array(compressed, shape=values.shape, dtype=values.dtype, chunks=values.shape, fill_value=-1, compressors=zarr.codecs.ZstdCodec())[...] = values
    for chunk in (store / CHECKSUM_GROUP / unwritten / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    expected = by_zarr()
    assert (expected[unwritten] == -1).all() and np.array_equal(expected[compressed], values)
    assert same(read_checksum_record(str(store)), expected)


def test_a_local_listing_equals_fsspec_find(image_store):
    from schemas.store_integrity import _listing, _local_listing

    fs = fsspec.filesystem("file")
    found = fs.find(str(image_store), detail=True)
    assert _local_listing(str(image_store)) == {path[len(str(image_store)) + 1 :]: int(info["size"]) for path, info in found.items()}
    assert _listing(fs, str(image_store)) == _local_listing(str(image_store))
    assert _local_listing(str(image_store / "no-such-folder")) == {}


def test_a_record_with_unreadable_metadata_is_named_in_one_line(image_store, tmp_path):
    store = _copy(image_store, tmp_path)
    (store / CHECKSUM_GROUP / "label" / "zarr.json").write_text("{ not json")
    with pytest.raises(DamagedStoreError, match=rf"^{store / CHECKSUM_GROUP / 'label' / 'zarr.json'}: the checksum record's metadata is not valid JSON"):
        read_checksum_record(str(store))
    result = run_imzarr("info", str(store))
    assert result.returncode != 0 and "not valid JSON" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["image", "activation"])
def test_verify_refuses_an_unfinished_store(kind, image_store, activation_store, tmp_path):
    """An interrupted run leaves `complete: false` and no checksum record: verify says so and fails, rather than
    passing it on presence and sizes alone."""
    store = _copy(image_store if kind == "image" else activation_store, tmp_path)
    zarr.open_group(str(store), mode="r+", use_consolidated=False).attrs["complete"] = False
    with pytest.raises(UnfinishedStoreError, match=r": unfinished \(its run was interrupted"):
        verify_store(str(store))  # the library's own entry point refuses it too
    proc = run_imzarr("verify", str(store))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"imzarr verify: error: {store}: unfinished (its run was interrupted, or is still going): re-run the command that made it to finish it, then verify"]

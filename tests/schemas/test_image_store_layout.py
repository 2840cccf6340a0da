"""The image store as xarray sees it by default: inner chunks of about 8 MiB as dask chunks, numeric coordinates
in one chunk each, text arrays as plain data variables, every array described; older stores still validate and
read; the array functions keep working for writers that learn coordinates shard by shard."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from converter.convert import ConvertOptions, ConvertOptionError, convert, validate_convert_options
from converter.sample import write_sample_shards
from converter.sources.npz import open_npz_source
from schemas.classes import class_table
from schemas.errors import StoreValidationError
from schemas.image_layout import (
    NUMERIC_COORDINATES,
    TEXT_COORDINATES,
    ImageLayoutError,
    create_image_arrays,
    inner_chunk_for,
    write_image_shard,
)
from schemas.image_store import COORDINATES, IMAGE_SCHEMA, ShardRangeReader, validate_image_store
from schemas.variable_attrs import REQUIRED_ARRAY_ATTRS, classes_lookup
from tests.support.synthetic import photo_like, write_npz_shard

TABLE = class_table()
PER_FILE = 700
SHARD = 1024  # two shards of 1,400 images: numeric coordinates span both, text arrays have one chunk per shard
SEED = 5


def source_rows(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, 3, 64, 64), sorted-order labels and file names of the sample's train shards, in source order."""
    images, labels, files = [], [], []
    for path in sorted(folder.glob("train_data_batch_*.npz")):
        with np.load(path) as data:
            images.append(data["data"].reshape(-1, 3, 64, 64))
            labels.append(TABLE.from_downsampled(data["labels"]))
            files += [path.name] * data["labels"].size
    return np.concatenate(images), np.concatenate(labels), files


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, Path]:
    """A shuffled store made by the real command line from the sample's shards (64×64, 2 files of 700)."""
    root = tmp_path_factory.mktemp("layout")
    write_sample_shards(root / "src", per_shard=PER_FILE, train_shards=2, val_size=10)
    out = root / "images.zarr"
    command = [sys.executable, "-m", "converter", "npz", str(root / "src" / "train"), "-o", str(out), "--shard-size", str(SHARD), "--shuffle-seed", str(SEED)]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(out), root / "src" / "train"


def open_quietly(url: str) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no string-dtype, chunk-splitting or consolidated-metadata warnings
        return xr.open_zarr(url)


def test_inner_chunk_rule(tmp_path):
    assert inner_chunk_for(64, 4096) == 512  # 6 MiB
    assert inner_chunk_for(32, 4096) == 2048 and inner_chunk_for(16, 4096) == 4096  # capped at the shard
    assert inner_chunk_for(256, 4096) == 32 and inner_chunk_for(1024, 4096) == 2 and inner_chunk_for(4096, 64) == 1
    assert inner_chunk_for(64, 100) == 100  # a shard smaller than the chunk is one chunk
    assert inner_chunk_for(64, 640) == 640  # 7.5 MiB: the whole shard fits
    assert inner_chunk_for(64, 1536) == 512 and inner_chunk_for(64, 1000) == 8  # shards hold whole inner chunks
    group = zarr.open_group(str(tmp_path / "generated.zarr"), mode="w", zarr_format=3)
    create_image_arrays(group, 2000, 64, 1000, None)  # what generate does with --shard-size 1000: a valid layout
    assert group["image"].chunks[0] == 8 and group["image"].shards[0] == 1000
    for resolution in (8, 64, 100, 256, 1024):
        inner = inner_chunk_for(resolution, 1 << 20)
        assert inner & (inner - 1) == 0 and (inner == 1 or inner * 3 * resolution**2 <= 8 << 20 < 2 * inner * 3 * resolution**2)


def test_default_open_gives_the_new_chunks_coordinates_and_variables(converted):
    url, _ = converted
    ds = open_quietly(url)
    n = ds.sizes["sample"]
    assert n == 2 * PER_FILE
    assert ds.image.data.chunks[0] == (512, 512, 376)  # the inner chunk, not the shard
    assert zarr.open_array(url, path="image", mode="r").shards[0] == SHARD
    for name in NUMERIC_COORDINATES:
        assert name in ds.coords and name not in ds.data_vars, name
        assert ds[name].data.chunks == ((n,),), name  # one chunk, one read
        assert zarr.open_array(url, path=name, mode="r").chunks == (n,), name
    for name in TEXT_COORDINATES:
        assert name in ds.data_vars and name not in ds.coords, name
        assert zarr.open_array(url, path=name, mode="r").chunks == (SHARD,), name
    assert set(ds.image.coords) == set(NUMERIC_COORDINATES)


def test_every_array_describes_itself_and_the_group_names_the_classes(converted):
    url, _ = converted
    ds = open_quietly(url)
    for name in ds.variables:
        for key in REQUIRED_ARRAY_ATTRS:
            assert ds[name].attrs.get(key), (name, key)
    assert ds.attrs["Conventions"].startswith("CF-")
    lookup = classes_lookup(ds.attrs)
    labels = ds.label.values
    assert sorted(lookup) == sorted(set(labels.tolist()))
    assert [lookup[int(x)] for x in labels[:20]] == [(str(s), str(c)) for s, c in zip(ds.synset.values[:20], ds.class_name.values[:20])]


def test_values_equal_the_source(converted):
    url, folder = converted
    images, labels, files = source_rows(folder)
    ds = open_quietly(url)
    order = ds.global_index.values
    assert sorted(order.tolist()) == list(range(images.shape[0])) and not np.array_equal(order, np.arange(order.size))
    np.testing.assert_array_equal(ds.image.values, images[order])
    np.testing.assert_array_equal(ds.label.values, labels[order])
    np.testing.assert_array_equal(ds.source_row.values, order % PER_FILE)
    assert [str(f) for f in ds.source_file.values] == [files[i] for i in order]
    assert [str(s) for s in ds.synset.values] == [TABLE.wnids[i] for i in labels[order]]
    assert [str(s) for s in ds.class_name.values] == [TABLE.names[i] for i in labels[order]]
    np.testing.assert_allclose(float(ds.image.mean()), images.astype(np.float64).mean(), rtol=1e-12)
    ds.label.load()
    per_class = ds.image.mean(("channel", "y", "x")).groupby("label").mean().compute()
    for label, value in zip(per_class.label.values, per_class.values):
        np.testing.assert_allclose(value, images[labels == label].astype(np.float64).mean(), rtol=1e-12)


def test_store_reader_and_validator_on_the_new_layout(converted):
    url, folder = converted
    images, labels, _ = source_rows(folder)
    store = validate_image_store(url)
    assert isinstance(store.fast_reader, ShardRangeReader)  # agnostic of the inner chunk size
    order = store.coordinate("global_index")
    idx = np.random.default_rng(0).integers(0, order.size, 300)
    np.testing.assert_array_equal(store.take(idx), images[order[idx]])
    np.testing.assert_array_equal(store.coordinate("label"), labels[order])
    assert store.coordinate("synset").dtype == object


def test_shard_tasks_may_not_write_coordinates_written_at_creation(converted):
    url, _ = converted
    with pytest.raises(ImageLayoutError, match="label is stored in chunks of 1400"):
        write_image_shard(url, 0, np.zeros((SHARD, 3, 64, 64), np.uint8), {"label": np.zeros(SHARD, np.int16)})


def test_auto_inner_chunk_follows_the_resolution(tmp_path):
    write_npz_shard(tmp_path / "val_data.npz", photo_like(300, 32), np.arange(300) % 1000 + 1, mean=False)
    out = str(tmp_path / "o.zarr")
    convert(open_npz_source([tmp_path / "val_data.npz"]), ConvertOptions(out, shard_size=8192))
    store = validate_image_store(out)
    assert store.image.chunks[0] == 2048 and store.attrs["settings"]["inner_chunk"] == 2048
    with pytest.raises(ConvertOptionError, match=r"--shard-size 1000: must be a multiple of --inner-chunk \(auto: 512 for 64×64"):
        validate_convert_options(ConvertOptions(out, shard_size=1000), resolution=64)


def test_a_store_of_the_earlier_layout_is_not_resumed(converted, tmp_path):
    """Its shard tasks wrote every coordinate; ours write only the text ones, so resuming it would leave holes."""
    url, folder = converted
    old = tmp_path / "old.zarr"
    args = [sys.executable, "-m", "converter", "npz", str(folder), "--shard-size", str(SHARD), "--shuffle-seed", str(SEED), "-o", str(old)]
    assert subprocess.run(args, capture_output=True).returncode == 0
    from schemas.store_lifecycle import settings_fingerprint

    group = zarr.open_group(str(old), mode="r+", use_consolidated=False)
    settings = {k: v for k, v in group.attrs["settings"].items() if k != "layout"}
    group.update_attributes({"settings": settings, "settings_fingerprint": settings_fingerprint(settings), "complete": False})
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 2 and "layout" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- stores of the earlier layout


def _old_layout_store(url: str, images: np.ndarray, labels: np.ndarray, shard: int, inner: int) -> dict[str, np.ndarray]:
    """A store as imzarr wrote it before per-array attributes: every coordinate listed and chunked per shard."""
    n = images.shape[0]
    group = zarr.open_group(url, mode="w", zarr_format=3)
    group.attrs.put(
        {
            "schema": IMAGE_SCHEMA, "complete": True, "source_format": "npz", "source_label_order": "downsampled", "resolution": images.shape[-1],
            "shuffle_seed": None, "sources": [], "rejected": [], "versions": {}, "num_samples": n,
        }
    )
    group.create_array(
        "image", shape=images.shape, dtype="uint8", chunks=(inner, *images.shape[1:]), shards=(shard, *images.shape[1:]), compressors=None,
        fill_value=0, dimension_names=("sample", "channel", "y", "x"), attributes={"coordinates": " ".join(COORDINATES)},
    )[:] = images
    values = {
        "label": labels.astype(np.int16), "synset": TABLE.synsets_of(labels), "class_name": TABLE.names_of(labels),
        "global_index": np.arange(n, dtype=np.int64), "source_file": np.full(n, "val_data.npz", dtype=object), "source_row": np.arange(n, dtype=np.int64),
    }
    for name, kind in COORDINATES.items():
        group.create_array(
            name, shape=(n,), dtype=str if kind == "U" else kind, chunks=(shard,), fill_value="" if kind == "U" else -1,
            compressors="auto" if kind == "U" else None, dimension_names=("sample",),
        )[:] = values[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(url)
    return values


def test_old_layout_validates_and_reads(tmp_path):
    images = photo_like(200, 16, seed=4)
    labels = np.arange(200) % 7
    url = str(tmp_path / "old.zarr")
    values = _old_layout_store(url, images, labels, shard=64, inner=16)
    store = validate_image_store(url)
    assert isinstance(store.fast_reader, ShardRangeReader)
    np.testing.assert_array_equal(store.take(np.arange(200)[::-1]), images[::-1])
    for name in COORDINATES:
        got = store.coordinate(name)
        assert list(got) == list(values[name]), name
    ds = open_quietly(url)
    assert set(ds.coords) == set(COORDINATES)  # the old listing: every per-sample array a coordinate
    np.testing.assert_array_equal(ds.image.values, images)
    np.testing.assert_array_equal(ds.label.values, labels)


def test_validator_refuses_other_listings_and_undescribed_arrays_under_conventions(tmp_path):
    url = str(tmp_path / "old.zarr")
    _old_layout_store(url, photo_like(64, 8), np.zeros(64, int), shard=64, inner=16)
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    group["image"].update_attributes({"coordinates": "label"})
    with pytest.raises(StoreValidationError, match=r"'coordinates' lists \['label'\]"):
        validate_image_store(url)
    group["image"].update_attributes({"coordinates": "label global_index source_row"})
    validate_image_store(url)  # the new listing, no Conventions: accepted without attributes
    group.update_attributes({"Conventions": "CF-1.11"})
    with pytest.raises(StoreValidationError, match=r"lacks attributes \['image.long_name'"):
        validate_image_store(url)


def test_writers_without_coordinates_at_creation_get_per_shard_coordinates(tmp_path):
    """The array functions as the generator calls them: coordinates written by the shard tasks."""
    url = str(tmp_path / "g.zarr")
    n, shard = 40, 16
    group = zarr.open_group(url, mode="w", zarr_format=3)
    create_image_arrays(group, n, 8, shard, min(64, shard))
    images = photo_like(n, 8, seed=2)
    labels = (np.arange(n) % 3).astype(np.int16)
    for start in range(0, n, shard):
        stop = min(n, start + shard)
        coords = {
            "label": labels[start:stop], "synset": TABLE.synsets_of(labels[start:stop]), "class_name": TABLE.names_of(labels[start:stop]),
            "global_index": np.arange(start, stop), "source_file": np.full(stop - start, "", dtype=object), "source_row": np.arange(start, stop),
        }
        write_image_shard(url, start, images[start:stop], coords)
    for name in COORDINATES:
        assert group[name].chunks == (shard,), name
    assert group["image"].attrs["coordinates"] == "label global_index source_row" and group["label"].attrs["long_name"]
    group.update_attributes(
        {"schema": IMAGE_SCHEMA, "complete": True, "source_format": "generated", "source_label_order": "sorted", "resolution": 8,
         "shuffle_seed": None, "sources": [], "rejected": [], "versions": {}}
    )
    store = validate_image_store(url)
    np.testing.assert_array_equal(store.read(0, n), images)
    np.testing.assert_array_equal(store.coordinate("label"), labels)
    with pytest.raises(ImageLayoutError, match="lack"):
        create_image_arrays(zarr.open_group(str(tmp_path / "h.zarr"), mode="w", zarr_format=3), n, 8, shard, None, coordinates={"label": labels})


def test_class_table_of_folder_labels_names_the_folders(tmp_path):
    """Labels numbered from folder names are not ImageNet classes: the `classes` table names the folders."""
    from PIL import Image

    for i, folder in enumerate(("cats", "dogs", "dogs")):
        (tmp_path / "tree" / folder).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "tree" / folder / f"{i}.JPEG", quality=90)
    out = tmp_path / "o.zarr"
    command = [sys.executable, "-m", "converter", "jpeg", str(tmp_path / "tree"), "--label-from-folders", "--size", "16", "-o", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    store = validate_image_store(str(out))
    assert store.attrs["classes"] == {"label": [0, 1], "synset": ["cats", "dogs"], "class_name": ["cats", "dogs"]}
    assert list(store.coordinate("synset")) == ["cats", "dogs", "dogs"]

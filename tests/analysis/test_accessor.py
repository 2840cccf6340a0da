"""`ds.imzarr` and the plain xarray idioms of issue 26, on image stores, activation stores and compare reports.

Every idiom of the issue's list is here: it works as typed, or the accessor call that replaces it (README,
"Analysis with the accessor") gives what the idiom meant, checked against NumPy on the stored values."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import converter
import extractor  # noqa: F401  (registers ds.imzarr)
from extractor.accessor import AccessorError, ProvenanceError
from extractor.selection import SelectionError, UnknownClassNameError
from schemas.classes import class_table
from tests.support.synthetic import write_activation_store, write_npz_shard

TENCH, KIT_FOX, GOLDFISH = 0, 278, 1
LABELS = np.array([TENCH, KIT_FOX, GOLDFISH, KIT_FOX, TENCH, KIT_FOX, GOLDFISH, TENCH, KIT_FOX, KIT_FOX] * 30, dtype=np.int16)


def _layer_values(a: int, b: int) -> np.ndarray:
    # Values near float16's largest (65504): a float16 sum overflows after two of them.
    rows = np.arange(a, b)[:, None]
    return (60000.0 + 37.0 * np.sin(rows * 0.7 + np.arange(6)[None, :])).astype(np.float16)


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("acts") / "acts.zarr")
    return write_activation_store(url, LABELS, _layer_values, (6,), layer="midblock", shard=128)


@pytest.fixture(scope="module")
def images_and_acts(tmp_path_factory):
    """An image store converted from an NPZ shard, and an activation store computed (synthetically) from every
    third image of it, with the provenance the extractor records."""
    root = tmp_path_factory.mktemp("prov")
    rng = np.random.default_rng(3)
    (root / "src").mkdir()
    npz_labels = np.array([449, 2, 449, 7] * 15)  # 1-based map_clsloc labels: 449 is tench
    write_npz_shard(root / "src" / "train_data_batch_1.npz", rng.integers(0, 256, (60, 64 * 64 * 3), dtype=np.uint8), npz_labels)
    images = str(root / "images.zarr")
    converter.convert_npz(root / "src", images)
    positions = np.arange(0, 60, 3)
    labels = zarr.open_array(images, path="label", mode="r")[:][positions]
    url = write_activation_store(str(root / "acts.zarr"), labels, lambda a, b: np.ones((b - a, 4)), (4,), layer="midblock", shard=64)
    group = zarr.open_group(url, mode="r+")
    group["source_sample"][:] = positions
    group["global_index"][:] = zarr.open_array(images, path="global_index", mode="r")[:][positions]  # as the extractor records them
    image_attrs = dict(zarr.open_group(images, mode="r").attrs)
    group.attrs["source"] = {"url": images, "schema": image_attrs["schema"], "fingerprint": image_attrs["settings_fingerprint"], "source_format": "npz"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(url)
    return images, url, positions


def test_registered_on_import_without_importing_xarray_or_torch():
    code = (
        "import sys, extractor\n"
        "assert 'xarray' not in sys.modules, 'import extractor imported xarray'\n"
        "import xarray as xr\n"
        "assert hasattr(xr.Dataset, 'imzarr') and 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = subprocess.run([sys.executable, "-c", "import xarray as xr, extractor; assert hasattr(xr.Dataset, 'imzarr')"], capture_output=True, text=True)
    assert after.returncode == 0, after.stderr
    # The accessor's module imported first of all (it is the one that imports xarray then): no circular import.
    first = subprocess.run([sys.executable, "-c", "from extractor.accessor import ImzarrAccessor; import xarray as xr; assert hasattr(xr.Dataset, 'imzarr')"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr


def test_sel_by_wnid_name_and_label(acts):
    ds = xr.open_zarr(acts)
    chosen = ds.imzarr.sel(classes=["tench", "n02119789", 1])
    expected = np.flatnonzero(np.isin(LABELS, [TENCH, KIT_FOX, GOLDFISH]))
    np.testing.assert_array_equal(chosen.source_sample.values, expected)
    fox = ds.imzarr.sel(classes="kit fox")
    assert set(fox.synset.values.tolist()) == {"n02119789"}
    np.testing.assert_array_equal(fox.midblock.values, ds.midblock.values[LABELS == KIT_FOX])
    assert fox.midblock.chunks is not None  # still lazy


def test_sel_refusals_name_the_class(acts):
    ds = xr.open_zarr(acts)
    with pytest.raises(SelectionError, match="n01530575"):
        ds.imzarr.sel(classes=["tench", "brambling"])  # brambling has no rows here
    with pytest.raises(UnknownClassNameError, match="kit fox"):
        ds.imzarr.sel(classes="kitfox")  # the shared parser's close matches
    # --classes' own rules: nothing named, an empty entry, a class named twice.
    for classes, message in (([], "names nothing"), (None, "none given"), ("tench,", "entry 2 is empty"),
                             (["tench", "tench"], "'tench' is given twice"), (["tench", 0], "'tench' and '0' both name n01440764")):
        with pytest.raises(SelectionError, match=message):
            ds.imzarr.sel(classes=classes)
    np.testing.assert_array_equal(ds.imzarr.sel(classes="tench, kit fox").source_sample.values, np.flatnonzero(np.isin(LABELS, [TENCH, KIT_FOX])))


def test_plain_sel_by_label_after_set_xindex(acts):
    # The issue's `ds.sel(synset=…)`: no index exists at open (it would decode every string). A label index is
    # cheap (int16): `set_xindex("label")` makes `sel(label=…)` work for one label; several go through the accessor.
    ds = xr.open_zarr(acts)
    with pytest.raises(KeyError):
        ds.sel(synset="n01440764")
    one = ds.set_xindex("label").sel(label=KIT_FOX)
    np.testing.assert_array_equal(one.midblock.values, ds.midblock.values[LABELS == KIT_FOX])
    np.testing.assert_array_equal(ds.imzarr.sel(classes="n01440764").midblock.values, ds.midblock.values[LABELS == TENCH])


@pytest.mark.parametrize("drop", [True, False])
def test_where_with_text_variables(acts, drop, tmp_path):
    ds = xr.open_zarr(acts)
    with pytest.raises(Exception):
        ds.where(ds.label == KIT_FOX, drop=drop).compute()  # the plain idiom: StringDType cannot hold NaN
    for cond in (ds.label == KIT_FOX, ds.synset == "n02119789"):
        got = ds.imzarr.where(cond, drop=drop)
        rows = LABELS == KIT_FOX
        if drop:
            np.testing.assert_array_equal(got.midblock.values, ds.midblock.values[rows])
            assert set(got.class_name.values.tolist()) == {"kit fox"}
        else:
            np.testing.assert_array_equal(np.isnan(got.midblock.values).all(axis=1), ~rows)
            np.testing.assert_array_equal(got.synset.values, ds.synset.values)  # a row's description, like label
        assert got.midblock.encoding["dtype"] == np.float16  # to_zarr writes what was stored
    out = str(tmp_path / "fox.zarr")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        (got.chunk({"sample": 64}) if drop else got).to_zarr(out, zarr_format=3)  # a selection: chunks as uneven as its rows
    assert zarr.open_array(out, path="midblock", mode="r").dtype == np.float16
    back = xr.open_zarr(out)
    np.testing.assert_array_equal(back.midblock.values, got.midblock.values)
    # Reopened as the store itself opens (float64, no CF fill value added): its reductions stay right. Values near
    # float16's largest overflow a float16 sum at once.
    assert back.midblock.dtype == np.float64 and "_FillValue" not in zarr.open_array(out, path="midblock", mode="r").attrs
    np.testing.assert_allclose(float(back.midblock.mean()), float(got.midblock.mean()), rtol=1e-12)


def test_class_reductions_against_float64_numpy(acts):
    ds = xr.open_zarr(acts)
    stored = zarr.open_array(acts, path="midblock", mode="r")[:].astype(np.float64)
    assert ds.midblock.dtype == np.float64  # CF scale_factor: reductions accumulate in float64
    labels = np.unique(LABELS)
    want_mean = np.stack([stored[LABELS == c].mean(axis=0) for c in labels])
    want_std = np.stack([stored[LABELS == c].std(axis=0, ddof=1) for c in labels])
    mean = ds.imzarr.class_mean("midblock")
    np.testing.assert_allclose(mean.values, want_mean, rtol=1e-12)
    assert mean.class_name.values.tolist() == [class_table().names[c] for c in labels]
    np.testing.assert_allclose(ds.imzarr.class_std("midblock", ddof=1).values, want_std, rtol=1e-9)
    count = ds.imzarr.class_count()
    assert count.values.tolist() == [int((LABELS == c).sum()) for c in labels] and count.synset.values[0] == "n01440764"
    # The xarray way, grouped by the in-memory labels the accessor hands over (flox reduces the dask chunks).
    grouped = ds.imzarr.groupby_class().mean()
    np.testing.assert_allclose(grouped.midblock.values, want_mean, rtol=1e-12)
    assert "synset" not in grouped.data_vars
    named = ds.imzarr.with_class_names(grouped)
    assert named.synset.values.tolist() == [class_table().wnids[c] for c in labels]
    # The README's idiom: label loaded, then plain groupby.
    ds.label.load()
    np.testing.assert_allclose(ds.midblock.groupby("label").mean().values, want_mean, rtol=1e-12)
    np.testing.assert_allclose(float(ds.midblock.mean()), stored.mean(), rtol=1e-12)


def test_float32_view_is_half_the_float64_size_and_accurate(acts):
    ds = xr.open_zarr(acts)
    stored = zarr.open_array(acts, path="midblock", mode="r")[:].astype(np.float64)
    small = ds.imzarr.as_float32()
    assert small.midblock.dtype == np.float32 and small.midblock.nbytes * 2 == ds.midblock.nbytes
    assert small.midblock.nbytes == 2 * stored.size * 2  # twice the float16 bytes on disk
    for got, want in ((small.midblock.mean(), stored.mean()), (small.midblock.std(), stored.std())):
        assert np.isfinite(float(got)) and np.isclose(float(got), want, rtol=1e-5)
    per_class = small.imzarr.class_mean("midblock").values
    want = np.stack([stored[LABELS == c].mean(axis=0) for c in np.unique(LABELS)])
    assert np.isfinite(per_class).all() and np.allclose(per_class, want, rtol=1e-6)


def test_image_store_selection_and_images_through_provenance(images_and_acts):
    images_url, acts_url, positions = images_and_acts
    images = xr.open_zarr(images_url)
    pixels = zarr.open_array(images_url, path="image", mode="r")[:]
    labels = zarr.open_array(images_url, path="label", mode="r")[:]
    tench = images.imzarr.sel(classes="tench")
    np.testing.assert_array_equal(tench.image.values, pixels[labels == TENCH])
    np.testing.assert_allclose(images.imzarr.class_mean("image").sel(label=TENCH).values, pixels[labels == TENCH].mean(axis=0))
    acts = xr.open_zarr(acts_url)
    assert images.imzarr.images() is images
    chosen = acts.imzarr.sel(classes="tench")
    matched = chosen.imzarr.images()
    assert matched.image.chunks is not None  # lazy
    want = positions[labels[positions] == TENCH]
    np.testing.assert_array_equal(matched.image.values, pixels[want])
    np.testing.assert_array_equal(matched.label.values, chosen.label.values)
    with pytest.raises(ProvenanceError, match="fingerprint"):
        acts.assign_attrs(source={**acts.attrs["source"], "fingerprint": "0" * 64}).imzarr.images()
    # A store written before provenance paths were absolute, opened from another folder; the path given instead.
    typed = acts.assign_attrs(source={**acts.attrs["source"], "url": "data/images.zarr"})
    with pytest.raises(ProvenanceError, match=r"^data/images\.zarr: the image store these activations were computed from is not there \(recorded relative to the folder the store was made from\); pass images\(store=PATH\)"):
        typed.imzarr.images()
    np.testing.assert_array_equal(typed.imzarr.sel(classes="tench").imzarr.images(store=images_url).image.values, pixels[want])
    with pytest.raises(ProvenanceError, match=r"nowhere\.zarr: no image store there"):
        typed.imzarr.images(store=images_url + "-nowhere.zarr")


@pytest.mark.parametrize("class_dim", ["label", "class"])
def test_compare_reports_old_and_new(class_dim):
    table = class_table()
    classes = np.array([0, 1, 278], dtype=np.int16)
    report = xr.Dataset(
        {"fd": (class_dim, [1.0, 2.0, 3.0])},
        coords={class_dim: classes, "synset": (class_dim, table.synsets_of(classes)), "class_name": (class_dim, table.names_of(classes))},
    )
    picked = report.imzarr.sel(classes=["kit fox", "n01440764"])
    assert picked.fd.values.tolist() == [1.0, 3.0]
    for method, call in [("groupby_class", lambda: report.imzarr.groupby_class()), ("class_count", lambda: report.imzarr.class_count()),
                         ("class_mean", lambda: report.imzarr.class_mean("fd")), ("class_std", lambda: report.imzarr.class_std("fd"))]:
        with pytest.raises(AccessorError, match=rf"^{method}\(\): a compare report already has one row per class \(its counts are n_real and n_fake\)"):
            call()
    with pytest.raises(AccessorError, match="not an imzarr store"):
        xr.Dataset({"x": ("time", [1])}).imzarr.labels()


def test_where_on_a_sharded_store_writes_back(tmp_path):
    """A store whose shards hold several inner chunks opens chunked by the inner chunks; `where` (without drop,
    every row kept) must not carry the shard layout into `to_zarr`, which would refuse the mismatch."""
    labels = np.repeat([KIT_FOX, TENCH], 256)
    url = write_activation_store(str(tmp_path / "maps.zarr"), labels, lambda a, b: np.full((b - a, 64, 16, 16), 0.5), (64, 16, 16), layer="midblock", shard=512)
    ds = xr.open_zarr(url)
    assert ds.midblock.encoding["shards"][0] > ds.midblock.chunks[0][0]  # the case: shards larger than dask chunks
    got = ds.imzarr.where(ds.label == KIT_FOX)
    out = str(tmp_path / "fox.zarr")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        got.to_zarr(out, zarr_format=3)
    back = xr.open_zarr(out).midblock.values
    assert zarr.open_array(out, path="midblock", mode="r").dtype == np.float16
    np.testing.assert_array_equal(np.isnan(back).all(axis=(1, 2, 3)), labels != KIT_FOX)
    assert (back[labels == KIT_FOX] == 0.5).all()


def test_concatenated_stores_name_every_class(tmp_path):
    """xr.concat keeps the first dataset's `classes` attribute: classes only the second has are named by their
    own rows, not left blank."""
    first = xr.open_zarr(write_activation_store(str(tmp_path / "a.zarr"), np.array([KIT_FOX] * 4), lambda a, b: np.ones((b - a, 3)), (3,), layer="midblock"))
    second = xr.open_zarr(write_activation_store(str(tmp_path / "b.zarr"), np.array([TENCH] * 2 + [KIT_FOX] * 2), lambda a, b: np.zeros((b - a, 3)), (3,), layer="midblock"))
    both = xr.concat([first, second], dim="sample")
    mean = both.imzarr.class_mean("midblock")
    assert mean.label.values.tolist() == [TENCH, KIT_FOX]
    assert mean.class_name.values.tolist() == ["tench", "kit fox"] and mean.synset.values.tolist() == ["n01440764", "n02119789"]
    np.testing.assert_array_equal(mean.values, [[0, 0, 0], [2 / 3, 2 / 3, 2 / 3]])


def test_labels_follow_an_in_place_change(acts):
    """xarray keeps one accessor per dataset object, and `ds.coords["label"] = …` changes the object in place."""
    ds = xr.open_zarr(acts)
    assert ds.imzarr.class_count().values.tolist() == [int((LABELS == c).sum()) for c in np.unique(LABELS)]
    ds.coords["label"] = ("sample", np.full(LABELS.size, KIT_FOX, dtype=np.int16))
    assert ds.imzarr.class_count().label.values.tolist() == [KIT_FOX]
    assert ds.imzarr.sel(classes="kit fox").sizes["sample"] == LABELS.size


def test_images_of_rows_from_another_image_store_are_refused(images_and_acts, tmp_path):
    """A concatenation keeps the first store's `source`: rows of a store computed from another image store would
    be read at their positions in the wrong one. Their recorded global_index tells them apart."""
    _, acts_url, positions = images_and_acts
    other = xr.open_zarr(write_activation_store(str(tmp_path / "other.zarr"), np.array([TENCH] * 3), lambda a, b: np.ones((b - a, 4)), (4,), layer="midblock"))
    other = other.assign_coords(global_index=("sample", np.array([5000, 5001, 5002])))
    both = xr.concat([xr.open_zarr(acts_url), other], dim="sample")
    with pytest.raises(ProvenanceError, match=r"3 of 23 rows are not this image store's \(global_index 5000 at row 20, the image store has 0 there\)"):
        both.imzarr.images()
    np.testing.assert_array_equal(xr.open_zarr(acts_url).imzarr.images().global_index.values, positions)
    # Unshuffled stores share global_index = position (real and generated stores alike): the labels tell them apart.
    generated = other.assign_coords(global_index=("sample", np.array([0, 1, 2])), label=("sample", np.array([278, 278, 278], dtype=np.int16)))
    with pytest.raises(ProvenanceError, match=r"3 of 23 rows are not this image store's \(label 278 at row 20"):
        xr.concat([xr.open_zarr(acts_url), generated], dim="sample").imzarr.images()


def test_class_reductions_refuse_text_and_empty_rows(acts):
    ds = xr.open_zarr(acts)
    with pytest.raises(AccessorError, match=r"class_mean\('synset'\): synset holds .* values, not numbers; numeric variables: \[.*'midblock'"):
        ds.imzarr.class_mean("synset")
    with pytest.raises(AccessorError, match=r"class_std\('midblock'\): the dataset has no rows"):
        ds.isel(sample=slice(0, 0)).imzarr.class_std("midblock")

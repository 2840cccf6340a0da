"""Analysis-ready activation stores: xarray reductions of float16 layers are finite and exact enough by default,
every array describes itself, the validator holds new stores to that and still opens old ones, and a reader
without the string extension (TensorStore) recovers classes from `label`."""

import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from schemas.activation_store import (
    FLOAT16_SCALE_FACTOR,
    activation_array_attrs,
    activation_variable_attrs,
    validate_activation_store,
)
from schemas.errors import StoreValidationError
from schemas.image_store import COORDINATES as IMAGE_COORDINATES
from schemas.variable_attrs import TEXT_VARIABLES, class_table_attrs, classes_lookup, image_store_array_attrs
from tests.support.synthetic import write_activation_store

LABELS = np.repeat([0, 3, 7], [70, 100, 130])  # 300 samples: several 64-sample chunks per class
REDUCTION_RTOL = 1e-3


def activations(shape, scale, seed):
    """ReLU-like values large enough that float16 partial sums overflow (a 64×16 chunk sums past 65504)."""
    values = np.random.default_rng(seed).normal(scale, scale, (LABELS.size, *shape))
    return np.maximum(values, 0.0)  # zeros are values too: CF decoding must not mask them


@pytest.fixture(scope="module")
def described_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    layouts = {"map16": ((16, 3, 3), "float16"), "pooled16": ((16,), "float16"), "map32": ((16, 3, 3), "float32")}
    stores = {}
    for name, (shape, dtype) in layouts.items():
        values = activations(shape, 300.0, seed=len(stores)).astype(dtype)
        url = write_activation_store(str(root / f"{name}.zarr"), LABELS, lambda a, b, v=values: v[a:b], shape, layer=name, dtype=dtype, shard=64, sigma=0.5)
        stores[name] = (url, values.astype(np.float64))
    return stores


def open_quietly(url: str) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CF-decoding, string-dtype or consolidated-metadata warnings
        return xr.open_zarr(url)


@pytest.mark.parametrize("name", ["map16", "pooled16", "map32"])
def test_default_reductions_are_finite_and_match_float64(described_stores, name):
    url, exact = described_stores[name]
    ds = open_quietly(url)
    var = ds[name]
    assert var.encoding["dtype"] == np.dtype("float32" if name == "map32" else "float16")
    checks = {
        "mean": (var.mean(), exact.mean()),
        "std": (var.std(), exact.std()),
        "sum": (var.sum(), exact.sum()),
        "sample mean": (var.mean("sample"), exact.mean(axis=0)),
    }
    for what, (lazy, expected) in checks.items():
        got = np.asarray(lazy.compute())
        assert np.isfinite(got).all(), what
        np.testing.assert_allclose(got, expected, rtol=REDUCTION_RTOL, err_msg=what)
    ds.label.load()
    per_class = var.groupby("label").mean().compute()
    assert per_class["label"].values.tolist() == [0, 3, 7]
    for i, label in enumerate([0, 3, 7]):
        np.testing.assert_allclose(per_class.values[i], exact[LABELS == label].mean(axis=0), rtol=REDUCTION_RTOL)


def test_float16_storage_stays_float16_on_disk(described_stores):
    url, _ = described_stores["map16"]
    array = zarr.open_array(url, path="map16", mode="r")
    assert array.dtype == np.float16 and array.attrs["scale_factor"] == FLOAT16_SCALE_FACTOR
    # CF packing with scale 1 changes no value: xarray's decoded values equal the stored float16 ones.
    np.testing.assert_array_equal(open_quietly(url)["map16"].values, array[:].astype(np.float64))


def test_old_float16_stores_still_open_and_say_how_to_reduce(tmp_path):
    values = activations((16, 3, 3), 300.0, seed=9).astype(np.float16)
    url = write_activation_store(str(tmp_path / "old.zarr"), LABELS, lambda a, b: values[a:b], (16, 3, 3), layer="old", shard=64, described=False)
    validate_activation_store(url)  # accepted: written before the attributes existed
    ds = open_quietly(url)
    assert ds["old"].dtype == np.float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's "overflow encountered in reduce"
        assert not np.isfinite(float(ds["old"].mean()))  # why the packing exists: Dask sums float16 chunks in float16
    assert np.isfinite(float(ds["old"].astype("float32").mean()))


def test_every_array_describes_itself(described_stores):
    url, _ = described_stores["map16"]
    ds = open_quietly(url)
    for name in ds.variables:
        assert ds[name].attrs.get("long_name") and ds[name].attrs.get("description"), name
    layer = ds["map16"].attrs
    assert layer["module_path"] == "synthetic.map16" and layer["pooling"] == "none" and layer["sigma"] == 0.5
    assert "σ = 0.5" in layer["description"] and "synthetic.map16" in layer["long_name"]
    # Numeric per-sample arrays are coordinates; text arrays open as plain variables (see schemas/variable_attrs.py).
    assert set(ds["map16"].coords) == {"label", "global_index", "source_sample"}
    assert set(TEXT_VARIABLES) <= set(ds.data_vars)
    assert ds.attrs["Conventions"].startswith("CF-")


def test_class_table_attribute_matches_the_text_arrays(described_stores):
    url, _ = described_stores["pooled16"]
    group = zarr.open_group(url, mode="r")
    lookup = classes_lookup(dict(group.attrs))
    labels, synsets, names = group["label"][:], group["synset"][:], group["class_name"][:]
    assert sorted(lookup) == [0, 3, 7]
    assert [lookup[int(x)][0] for x in labels] == [str(s) for s in synsets]
    assert [lookup[int(x)][1] for x in labels] == [str(s) for s in names]
    assert class_table_attrs(np.array([-1, 5, 5]))["classes"]["label"] == [5]  # unknown labels have no entry


def test_validator_holds_new_stores_to_their_attributes(described_stores):
    url, _ = described_stores["map16"]
    validate_activation_store(url)
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    attrs = dict(group["map16"].attrs)

    def consolidate():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(url)  # readers see the consolidated metadata, as of any finished store

    try:
        group["map16"].update_attributes({"scale_factor": None})
        consolidate()
        with pytest.raises(StoreValidationError, match="needs scale_factor"):
            validate_activation_store(url)
        del group["label"].attrs["long_name"]
        consolidate()
        with pytest.raises(StoreValidationError, match=r"lacks attributes \['label.long_name'\]"):
            validate_activation_store(url)
    finally:
        group["map16"].update_attributes(attrs)
        group["label"].update_attributes({"long_name": "ImageNet-1k class index"})
        consolidate()
    validate_activation_store(url)


def test_attribute_functions():
    float32 = activation_variable_attrs("midblock", "model.dec.8x8_in0", "mean", 80.0, "float32")
    assert "scale_factor" not in float32 and float32["pooling"] == "mean"  # float32 sums need no upcast
    every = activation_array_attrs({"a": "m.a", "b": "m.b"}, "none", 1.0, "float16", reconstructions=True)
    assert set(every) == {"a", "b", "reconstruction", "label", "synset", "class_name", "global_index", "source_file", "source_sample"}
    image = image_store_array_attrs(list(IMAGE_COORDINATES))
    assert set(image) == {"image", *IMAGE_COORDINATES} and image["image"]["coordinates"] == "label global_index source_row"
    with pytest.raises(StoreValidationError, match="pooling 'median'"):
        activation_variable_attrs("a", "m.a", "median", 1.0, "float16")


def test_tensorstore_recovers_classes_from_label(described_stores):
    """A second Zarr v3 implementation without the vlen-utf8 extension reads every numeric array, and the class
    table in the group attributes names each sample."""
    ts = pytest.importorskip("tensorstore")
    url, exact = described_stores["map16"]
    group = zarr.open_group(url, mode="r")

    def read(path):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/{path}"}}
        return ts.open(spec, read=True).result().read().result()

    np.testing.assert_array_equal(read("map16"), group["map16"][:])
    np.testing.assert_array_equal(read("global_index"), group["global_index"][:])
    labels = read("label")
    lookup = classes_lookup(dict(group.attrs))
    assert [lookup[int(x)][0] for x in labels] == [str(s) for s in group["synset"][:]]
    assert [lookup[int(x)][1] for x in labels] == [str(s) for s in group["class_name"][:]]

"""The Python API is the command line's twin: same defaults, same stores, same refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

import converter
import schemas
from converter.sources.base import ConvertOptionError
from schemas.output_paths import OutputOverlapsInputError


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    done = subprocess.run([sys.executable, "-m", "schemas", "sample", "src", "--per-shard", "80", "--train-shards", "1", "--val-size", "10"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root


def test_convert_npz_equals_the_command_line(sample):
    cli = subprocess.run([sys.executable, "-m", "schemas", "convert", "npz", "src/train", "-o", "cli.zarr"], cwd=sample, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    result = converter.convert_npz(sample / "src" / "train", str(sample / "api.zarr"))
    assert result.num_samples == 80 and not result.already_complete
    a, b = zarr.open_group(str(sample / "cli.zarr"), mode="r"), zarr.open_group(str(sample / "api.zarr"), mode="r")
    assert dict(a.attrs)["settings_fingerprint"] == dict(b.attrs)["settings_fingerprint"]
    for name, arr in a.arrays():
        np.testing.assert_array_equal(arr[:], b[name][:], err_msg=name)
    store = schemas.open_image_store(str(sample / "api.zarr"))
    assert len(store) == 80 and store.take([3, 1]).shape == (2, 3, 64, 64)
    assert converter.convert_npz(sample / "src" / "train", str(sample / "api.zarr")).already_complete
    # file:// URLs mean the local paths, as on the command line: the same store, already complete
    assert converter.convert_npz(f"file://{sample / 'src' / 'train'}", f"file://{sample / 'api.zarr'}").already_complete


def test_api_refuses_what_the_command_line_refuses(sample):
    with pytest.raises(ConvertOptionError, match="shard_sizes"):
        converter.convert_npz(sample / "src" / "train", str(sample / "x.zarr"), shard_sizes=64)
    with pytest.raises(OutputOverlapsInputError):
        converter.convert_npz(sample / "src" / "train", str(sample / "src" / "train" / "x.zarr"))
    with pytest.raises(OutputOverlapsInputError):
        converter.convert_npz(sample / "src" / "train", f"file://{sample / 'src' / 'train' / 'x.zarr'}")


def test_extract_takes_file_urls_as_paths(sample):
    import extractor

    images = str(sample / "ext_images.zarr")
    converter.convert_npz(sample / "src" / "train", images)
    kwargs = dict(layers=["encoder_bottleneck"], preset="tiny-random", pool="mean", num_samples=16, device="cpu")
    plain = extractor.extract(images, str(sample / "acts_plain.zarr"), **kwargs)
    url = extractor.extract(f"file://{images}", f"file://{sample / 'acts_url.zarr'}", **kwargs)
    assert plain.num_samples == url.num_samples == 16
    a, b = zarr.open_group(str(sample / "acts_plain.zarr"), mode="r"), zarr.open_group(str(sample / "acts_url.zarr"), mode="r")
    np.testing.assert_array_equal(a["encoder_bottleneck"][:], b["encoder_bottleneck"][:])


def test_extract_takes_one_class_by_wnid_or_index(sample):
    """A single class is one class, not the letters of its name (the command line's --classes n01440764)."""
    import extractor

    images = str(sample / "one_class_images.zarr")
    converter.convert_npz(sample / "src" / "train", images)
    store = schemas.open_image_store(images)
    labels, wnid = store.coordinate("label"), str(store.coordinate("synset")[0])
    kwargs = dict(layers=["encoder_bottleneck"], preset="tiny-random", pool="mean", device="cpu")
    by_index = extractor.extract(images, str(sample / "by_index.zarr"), classes=int(labels[0]), **kwargs)
    by_wnid = extractor.extract(images, str(sample / "by_wnid.zarr"), classes=wnid, **kwargs)
    assert by_index.num_samples == by_wnid.num_samples == int((labels == labels[0]).sum())


def test_features_equal_the_store_extract_writes(sample):
    """`features` on a batch in memory gives what `extract` stores for the same images: sample i gets global index
    i's noise, so the store's first rows (global indices 0, 1, … when converted in order) match (to rounding: the
    batches differ in size)."""
    import extractor

    images = str(sample / "features_images.zarr")
    converter.convert_npz(sample / "src" / "train", images)
    store = schemas.open_image_store(images)
    n = 24
    assert np.array_equal(store.coordinate("global_index")[:n], np.arange(n))
    layers = ["encoder_bottleneck", "model.enc.32x32_block0"]
    extractor.extract(images, str(sample / "features_acts.zarr"), layers=layers, preset="tiny-random", num_samples=n, dtype="float32", device="cpu")
    stored = zarr.open_group(str(sample / "features_acts.zarr"), mode="r")
    ds = extractor.features(store.read(0, n), store.coordinate("label")[:n], layers=layers, model="tiny-random", device="cpu", batch_size=10)
    for name in layers:
        np.testing.assert_allclose(ds[name].values, stored[name][:], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(ds["label"].values, stored["label"][:])
    assert [str(s) for s in ds["synset"].values] == [str(s) for s in stored["synset"][:]]


def test_features_refuse_images_of_another_size():
    import extractor
    from extractor.forward import ExtractionError

    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    with pytest.raises(ExtractionError, match="images are 32×32, the model takes 64×64"):
        extractor.features(images, layers=["encoder_bottleneck"], model="tiny-random", device="cpu")

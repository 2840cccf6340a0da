"""A store's own classes (`convert jpeg --label-from-folders`: sorted folder names numbered 0..K-1) keep their
names in every store made from it, and ImageNet-1k names never select or name them: label 0 there is `cats`,
not tench."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from PIL import Image

import converter
import extractor  # noqa: F401  (registers ds.imzarr)
from extractor import api
from extractor.analysis.contact_sheet import ContactSheetError, tile_origin, write_contact_sheet
from extractor.analysis.compare import CompareError
from extractor.selection import UnknownClassNameError
from extractor.store_attrs import FolderLabelsError
from schemas.api import store_info
from schemas.image_store import validate_image_store
from tests.support.stand_in import StandInNetwork, serving
from tests.support.synthetic import photo_like

FOLDERS = ("cats", "dogs", "owls")
PER_FOLDER = 6
# class_free: the folders' labels are not ImageNet classes, which a class-conditional network would take them for.
EXTRACT = dict(layers=["midblock"], preset="tiny-random", pool="mean", sigma=0.5, device="cpu", class_free=True)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    pictures = photo_like(len(FOLDERS) * PER_FOLDER, 72, seed=5)
    for k, folder in enumerate(FOLDERS):
        (root / "tree" / folder).mkdir(parents=True)
        for i in range(PER_FOLDER):
            Image.fromarray(pictures[k * PER_FOLDER + i].transpose(1, 2, 0)).save(root / "tree" / folder / f"{i}.jpg", quality=90)
    images = str(root / "pets.zarr")
    converter.convert_jpeg(root / "tree", images, label_from_folders=True)
    acts = str(root / "acts.zarr")
    api.extract(images, acts, **EXTRACT)
    return root, images, acts


def test_activation_store_records_the_image_stores_classes(own):
    _, images, acts = own
    expected = {"label": [0, 1, 2], "synset": list(FOLDERS), "class_name": list(FOLDERS)}
    assert zarr.open_group(images, mode="r").attrs["classes"] == expected
    assert zarr.open_group(acts, mode="r").attrs["classes"] == expected
    summary = store_info(images).summary.splitlines()
    assert "top classes  cats (0): 6, dogs (1): 6, owls (2): 6" in summary and "bottom       owls (2): 6, dogs (1): 6, cats (0): 6" in summary
    counts = xr.open_zarr(acts).imzarr.class_count()
    assert counts.class_name.values.tolist() == list(FOLDERS) and counts.values.tolist() == [PER_FOLDER] * 3


@pytest.mark.parametrize("which", ["images", "acts"])
def test_accessor_selects_own_classes_and_refuses_imagenet_names(own, which):
    ds = xr.open_zarr(own[1] if which == "images" else own[2])
    dogs = ds.imzarr.sel(classes=["dogs", "2"])
    assert dogs.label.values.tolist() == [1] * PER_FOLDER + [2] * PER_FOLDER
    assert ds.imzarr.sel(classes="Cats").label.values.tolist() == [0] * PER_FOLDER
    # ImageNet-1k's label 0 (tench) is not this store's label 0.
    with pytest.raises(UnknownClassNameError, match=r"^classes 'tench': not a class of this store, whose classes are its own \(not ImageNet-1k\): 0 cats, 1 dogs, 2 owls$"):
        ds.imzarr.sel(classes=["tench"])


def test_class_conditional_extract_refuses_folder_labels(own, tmp_path):
    """Folder 0 (cats) would run as ImageNet class 0 (tench): refused in one line, nothing written."""
    root, images, _ = own
    with_classes = {**EXTRACT, "class_free": False}
    with pytest.raises(FolderLabelsError, match=r"labels number its folders .*, not ImageNet classes.*pass --class-free"):
        api.extract(images, str(tmp_path / "conditioned.zarr"), **with_classes)
    assert not (tmp_path / "conditioned.zarr").exists()
    assert zarr.open_group(own[2], mode="r").attrs["class_conditioning"] == "none (zero labels)"
    # A network of these three classes (trained on the folders, say) takes the folders' labels as they are.
    network = StandInNetwork({"a": (4, 8, 8)}, {"b": (4, 8, 8)})
    network.label_dim = len(FOLDERS)
    with serving(network):
        api.extract(images, str(tmp_path / "own-network.zarr"), **{**with_classes, "layers": ["encoder_bottleneck"]})
    assert zarr.open_group(str(tmp_path / "own-network.zarr"), mode="r").attrs["class_conditioning"] == "one-hot of label"


def test_extract_selects_own_classes_as_the_accessor_does(own, tmp_path):
    """--classes on a store of numbered folders: folder names (any case) and labels, as ds.imzarr.sel takes them."""
    root, images, _ = own
    picked = api.extract(images, str(tmp_path / "picked.zarr"), classes=["Owls", "1"], **EXTRACT)
    assert picked.num_samples == 2 * PER_FOLDER
    assert xr.open_zarr(str(tmp_path / "picked.zarr")).label.values.tolist() == [1] * PER_FOLDER + [2] * PER_FOLDER
    with pytest.raises(UnknownClassNameError, match=r"^classes 'tench': not a class of this store, whose classes are its own"):
        api.extract(images, str(tmp_path / "tench.zarr"), classes="tench", **EXTRACT)
    assert not (tmp_path / "tench.zarr").exists()


def test_compare_and_stats_name_own_classes(own, tmp_path):
    root, images, acts = own
    other = str(tmp_path / "other.zarr")
    api.extract(images, other, seed=1, **EXTRACT)
    report = api.compare([acts, other], layer="midblock", metrics="fd").report
    assert report.label.values.tolist() == [0, 1, 2] and report.class_name.values.tolist() == list(FOLDERS)
    assert report.synset.values.tolist() == list(FOLDERS)
    api.stats(acts, layer="midblock", per_class=True, output=str(tmp_path / "stats.zarr"))
    stats = zarr.open_group(str(tmp_path / "stats.zarr"), mode="r")
    assert stats["class_name"][:].tolist() == list(FOLDERS) and stats["synset"][:].tolist() == list(FOLDERS)


def test_compare_refuses_stores_that_number_classes_differently(own, tmp_path):
    """Folder classes 0..2 against ImageNet-labelled activations: per class, label 0 would pair cats with tench."""
    from tests.support.synthetic import write_activation_store

    _, _, acts = own
    dim = zarr.open_group(acts, mode="r")["midblock"].shape[1]
    imagenet = write_activation_store(str(tmp_path / "imagenet.zarr"), np.repeat(np.arange(3), 6).astype(np.int16),
                                      lambda a, b: np.random.default_rng(a).normal(size=(b - a, dim)), (dim,), layer="midblock", shard=64)
    with pytest.raises(CompareError, match=r": label 0 is n01440764 \(tench\) there but cats \(cats\) in .*acts.zarr: the stores number classes differently"):
        api.compare([acts, imagenet], layer="midblock", metrics="fd")
    overall = api.compare([acts, imagenet], layer="midblock", metrics="fd", per_class=False).report
    assert np.isfinite(overall.attrs["fd"])


def test_compare_names_own_classes_of_a_store_made_before_they_were_recorded(own, tmp_path):
    """Activation stores made before 2026-12-07 recorded ImageNet names in `classes` for a store's own classes;
    compare takes their samples' names instead of refusing them against a newer store of the same images."""
    from schemas.variable_attrs import class_table_attrs
    from tests.support.store_edits import copy_with_group_attrs

    _, _, acts = own
    # What such a store holds: tench, goldfish, … for labels 0, 1, …
    old = copy_with_group_attrs(acts, tmp_path / "old.zarr", class_table_attrs(zarr.open_group(acts, mode="r")["label"][:]))
    assert zarr.open_group(old, mode="r").attrs["classes"]["class_name"][0] == "tench"
    report = api.compare([old, acts], layer="midblock", metrics="fd").report
    assert report.class_name.values.tolist() == list(FOLDERS)


def test_contact_sheet_names_own_classes_as_extract_does(own, tmp_path):
    """`imzarr show --classes 2,Cats` shows owls then cats (label 2 and a folder name in any case), as
    `extract --classes` picks them; tench (ImageNet's label 0) is refused."""
    _, images, _ = own
    store = validate_image_store(images)
    pixels, synsets = store.image[:], store.coordinate("synset")
    sheet = np.asarray(Image.open(write_contact_sheet(images, tmp_path / "own.png", classes=["2", "Cats"], per_class=2)).convert("RGB"))
    for row, folder in enumerate(["owls", "cats"]):
        for col, i in enumerate(np.flatnonzero(synsets == folder)[:2]):
            x, y = tile_origin(row, col, 64)
            np.testing.assert_array_equal(sheet[y : y + 64, x : x + 64], pixels[i].transpose(1, 2, 0), err_msg=f"{folder} #{col}")
    with pytest.raises(ContactSheetError, match="'tench': not a class of this store"):
        write_contact_sheet(images, tmp_path / "t.png", classes=["tench"])

"""JPEG tree discovery: layouts, canonical order, exact 1000-class labels and clear errors."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from converter.sources.jpeg_tree import JpegTree, JpegTreeError, scan_jpeg_tree
from schemas.classes import class_table
from schemas.errors import ImzarrError

TENCH, GOLDFISH, KIT_FOX, TOILET_TISSUE = "n01440764", "n01443537", "n02119789", "n15075141"


def touch(path: Path, data: bytes = b"x") -> Path:
    # Content is irrelevant to discovery: decoding happens later and decides by content.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


# --- class folders ---------------------------------------------------------------------------------------


def test_partial_wnid_tree_gets_1000_class_indices(tmp_path):
    for wnid, names in [
        (TOILET_TISSUE, ["b.JPEG", "a.JPEG"]),
        (TENCH, ["n01440764_2.JPEG", "n01440764_10.JPEG"]),
        (KIT_FOX, ["k.jpg"]),
    ]:
        for name in names:
            touch(tmp_path / wnid / name)
    tree = scan_jpeg_tree(tmp_path)
    assert isinstance(tree, JpegTree)
    assert tree.root == tmp_path
    assert tree.layout == "train-folders"
    assert tree.label_source == "wnid-folders"
    assert tree.folder_classes is None
    assert tree.files == (
        "n01440764/n01440764_10.JPEG",
        "n01440764/n01440764_2.JPEG",
        "n02119789/k.jpg",
        "n15075141/a.JPEG",
        "n15075141/b.JPEG",
    )
    assert tree.labels.dtype == np.int16
    assert tree.labels.tolist() == [0, 0, 278, 999, 999]
    assert len(tree) == 5
    table = class_table()
    assert [table.names[i] for i in tree.labels] == ["tench", "tench", "kit fox", "toilet tissue", "toilet tissue"]
    assert not tree.labels.flags.writeable


def test_nested_files_inside_class_folders_are_found(tmp_path):
    touch(tmp_path / GOLDFISH / "sub" / "deeper" / "x.JPEG")
    touch(tmp_path / GOLDFISH / "y.JPEG")
    tree = scan_jpeg_tree(tmp_path)
    assert tree.files == ("n01443537/sub/deeper/x.JPEG", "n01443537/y.JPEG")
    assert tree.labels.tolist() == [1, 1]


def test_kaggle_layout_descends_to_train(tmp_path):
    cls_loc = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    touch(cls_loc / "train" / GOLDFISH / "n01443537_1.JPEG")
    touch(cls_loc / "train" / TENCH / "n01440764_1.JPEG")
    touch(cls_loc / "val" / val_name(1))
    touch(tmp_path / "LOC_synset_mapping.txt")
    for root in (tmp_path, cls_loc):
        tree = scan_jpeg_tree(root)
        assert tree.root == cls_loc / "train"
        assert tree.files == ("n01440764/n01440764_1.JPEG", "n01443537/n01443537_1.JPEG")
        assert tree.labels.tolist() == [0, 1]
        assert tree.ignored == ()


def test_kaggle_layout_with_val_labels_descends_to_val(tmp_path):
    cls_loc = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    touch(cls_loc / "train" / GOLDFISH / "n01443537_1.JPEG")
    touch(cls_loc / "val" / val_name(2))
    touch(cls_loc / "val" / val_name(1))
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000002,{KIT_FOX} 1 2 3 4\n"
        f"ILSVRC2012_val_00000001,{GOLDFISH} 5 6 7 8 {TENCH} 1 1 2 2\n"
    )
    tree = scan_jpeg_tree(tmp_path, val_labels=csv)
    assert tree.root == cls_loc / "val"
    assert tree.layout == "val-flat"
    assert tree.files == (val_name(1), val_name(2))
    assert tree.labels.tolist() == [1, 278]


def test_non_wnid_folders_error_names_first(tmp_path):
    touch(tmp_path / "zebra" / "1.jpg")
    touch(tmp_path / "cat" / "1.jpg")
    touch(tmp_path / TENCH / "1.jpg")
    with pytest.raises(JpegTreeError) as info:
        scan_jpeg_tree(tmp_path)
    assert info.value.path == tmp_path / "cat"
    assert "not an ImageNet-1k WNID" in info.value.reason
    assert isinstance(info.value, ImzarrError)


def test_label_from_folders_numbers_sorted_folders(tmp_path):
    touch(tmp_path / "zebra" / "1.jpg")
    touch(tmp_path / "cat" / "2.PNG")
    touch(tmp_path / "cat" / "1.jpg")
    touch(tmp_path / TENCH / "1.jpg")
    tree = scan_jpeg_tree(tmp_path, label_from_folders=True)
    assert tree.label_source == "folder-names-sorted"
    assert tree.folder_classes == ("cat", TENCH, "zebra")
    assert tree.files == ("cat/1.jpg", "cat/2.PNG", f"{TENCH}/1.jpg", "zebra/1.jpg")
    assert tree.labels.tolist() == [0, 0, 1, 2]
    assert tree.labels.dtype == np.int16


def test_ignored_hidden_and_non_image_files(tmp_path):
    touch(tmp_path / TENCH / "a.JPEG")
    touch(tmp_path / TENCH / "b.jpeg")
    touch(tmp_path / TENCH / "c.Png")
    touch(tmp_path / TENCH / "notes.txt")
    touch(tmp_path / TENCH / ".DS_Store")
    touch(tmp_path / TENCH / ".hidden.JPEG")
    touch(tmp_path / ".cache" / "junk.JPEG")  # hidden folder: never entered, listed
    touch(tmp_path / TENCH / "sub" / ".thumbs" / "t.JPEG")  # the same below a class folder
    touch(tmp_path / "labels.csv")
    tree = scan_jpeg_tree(tmp_path)
    assert tree.files == (f"{TENCH}/a.JPEG", f"{TENCH}/b.jpeg", f"{TENCH}/c.Png")
    assert tree.ignored == (".cache/", "labels.csv", f"{TENCH}/.DS_Store", f"{TENCH}/.hidden.JPEG", f"{TENCH}/notes.txt", f"{TENCH}/sub/.thumbs/")


def test_class_archives_not_extracted_are_refused(tmp_path):
    """ILSVRC2012_img_train.tar holds one tar per class: a class still archived would be left out whole."""
    touch(tmp_path / TENCH / "a.JPEG")
    touch(tmp_path / f"{TENCH}.tar")  # extracted beside its folder: fine
    assert scan_jpeg_tree(tmp_path).ignored == (f"{TENCH}.tar",)
    touch(tmp_path / f"{KIT_FOX}.tar")
    touch(tmp_path / f"{GOLDFISH}.tar")
    with pytest.raises(JpegTreeError, match=rf"^{tmp_path / GOLDFISH}\.tar: a class archive not extracted and 1 more: its images would be missing from the store; extract each into its class folder \(mkdir {GOLDFISH} && tar -xf {GOLDFISH}\.tar -C {GOLDFISH}\)"):
        scan_jpeg_tree(tmp_path)
    only = tmp_path / "only"
    touch(only / f"{KIT_FOX}.tar")
    with pytest.raises(JpegTreeError, match="a class archive not extracted"):
        scan_jpeg_tree(only)
    touch(only / "ILSVRC2012_img_train.tar")  # not a class: ignored as before
    # Its folder made but nothing extracted into it (the refusal's own advice, when tar then fails): refused too.
    made = tmp_path / "made"
    touch(made / TENCH / "a.JPEG")
    (made / GOLDFISH).mkdir()
    touch(made / f"{GOLDFISH}.tar")
    with pytest.raises(JpegTreeError, match=rf"^{made / GOLDFISH}\.tar: a class archive not extracted:"):
        scan_jpeg_tree(made)
    upper = tmp_path / "upper"
    touch(upper / TENCH / "a.JPEG")
    touch(upper / f"{KIT_FOX.upper()}.TAR")
    with pytest.raises(JpegTreeError, match="a class archive not extracted"):
        scan_jpeg_tree(upper)
    # Not class-folder trees: a flat val folder, a tree of other classes numbered by folder.
    flat = tmp_path / "flat"
    touch(flat / val_name(1))
    touch(flat / f"{KIT_FOX}.tar")
    assert scan_jpeg_tree(flat, val_labels=write_ground_truth(tmp_path / "gt.txt", [1])).files == (val_name(1),)
    own = tmp_path / "own"
    touch(own / "cats" / "c.JPEG")
    touch(own / f"{KIT_FOX}.tar")
    assert scan_jpeg_tree(own, label_from_folders=True).files == ("cats/c.JPEG",)
    other = tmp_path / "other"
    touch(other / TENCH / "a.JPEG")
    touch(other / "ILSVRC2012_img_train.tar")
    assert scan_jpeg_tree(other).ignored == ("ILSVRC2012_img_train.tar",)


def test_every_image_extension_is_recognised(tmp_path):
    extensions = [".jpeg", ".JPG", ".png", ".BMP", ".webp", ".gif", ".tif", ".TIFF", ".ppm"]
    for i, ext in enumerate(extensions):
        touch(tmp_path / GOLDFISH / f"{i}{ext}")
    touch(tmp_path / GOLDFISH / "x.npy")
    tree = scan_jpeg_tree(tmp_path)
    assert len(tree.files) == len(extensions)
    assert tree.ignored == (f"{GOLDFISH}/x.npy",)


def test_canonical_order_is_sorted_relative_paths(tmp_path):
    rng = random.Random(0)
    wnids = list(class_table().wnids[:40])
    expected = []
    for wnid in rng.sample(wnids, len(wnids)):
        for j in rng.sample(range(30), 5):
            rel = f"{wnid}/{wnid}_{j}.JPEG"
            touch(tmp_path / rel)
            expected.append(rel)
    tree = scan_jpeg_tree(tmp_path)
    assert tree.files == tuple(sorted(expected))
    table = class_table()
    assert tree.labels.tolist() == [table.index_of_wnid(f.split("/")[0]) for f in tree.files]


def test_symlinked_class_folder_and_loop(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "goldfish-images"
    touch(elsewhere / "g.JPEG")
    root = tmp_path / "root"
    touch(root / TENCH / "t.JPEG")
    os.symlink(elsewhere, root / GOLDFISH)
    os.symlink(root / TENCH, root / TENCH / "loop")  # must not recurse forever
    tree = scan_jpeg_tree(root)
    assert tree.files == (f"{TENCH}/t.JPEG", f"{GOLDFISH}/g.JPEG")
    assert tree.labels.tolist() == [0, 1]
    assert tree.ignored == (f"{TENCH}/loop/",)  # listed, not walked again


def test_a_link_into_another_class_folder_is_refused(tmp_path):
    """Its images would be stored twice, the second time labelled with the class whose folder holds the link."""
    touch(tmp_path / TENCH / "sub" / "t.JPEG")
    touch(tmp_path / KIT_FOX / "f.JPEG")
    shared = tmp_path.parent / f"{tmp_path.name}-shared"
    touch(shared / "s.JPEG")
    os.symlink(shared, tmp_path / KIT_FOX / "more")  # a link out of the tree: followed, as before
    assert scan_jpeg_tree(tmp_path).files == (f"{TENCH}/sub/t.JPEG", f"{KIT_FOX}/f.JPEG", f"{KIT_FOX}/more/s.JPEG")
    os.symlink(tmp_path / TENCH / "sub", tmp_path / KIT_FOX / "linked")
    with pytest.raises(JpegTreeError, match=rf"^{tmp_path / KIT_FOX / 'linked'}: a link into the class folder {TENCH}: its images would be stored a second time; remove the link"):
        scan_jpeg_tree(tmp_path)
    os.remove(tmp_path / KIT_FOX / "linked")
    # A file link to another class's image, a folder link to this class's own subfolder, a link to a folder that
    # holds the class folders: each would store images twice.
    for link, target in ((tmp_path / KIT_FOX / "stolen.JPEG", tmp_path / TENCH / "sub" / "t.JPEG"),
                         (tmp_path / TENCH / "again", tmp_path / TENCH / "sub"),
                         (tmp_path / TENCH / "all", tmp_path.parent)):  # (a link to the root itself is a loop: skipped, listed)
        os.symlink(target, link)
        with pytest.raises(JpegTreeError, match=rf"^{link}: a link (into the class folder|to {tmp_path.parent}, which holds the class folder)"):
            scan_jpeg_tree(tmp_path)
        os.remove(link)
    # Two class names for one folder.
    os.symlink(tmp_path / TENCH, tmp_path / GOLDFISH)
    with pytest.raises(JpegTreeError, match=rf"^{tmp_path / GOLDFISH}: is the same folder as {TENCH} \(a link\)|^{tmp_path / TENCH}: is the same folder as {GOLDFISH}"):
        scan_jpeg_tree(tmp_path)


def test_unfollowable_links_are_listed_and_special_files_ignored(tmp_path):
    """A file link loop or a dangling link named like an image is kept (decoding rejects it, with the reason);
    a FIFO is ignored, never opened; none of them stops the scan, at the top level or below it."""
    val = tmp_path / "val"
    touch(val / val_name(1))
    os.symlink(val_name(2), val / val_name(2))  # a link to itself
    os.mkfifo(val / val_name(3))
    tree = scan_jpeg_tree(val, val_labels=write_ground_truth(tmp_path / "gt.txt", [1, 2, 3]))
    assert tree.files == (val_name(1), val_name(2)) and tree.ignored == (val_name(3),)
    root = tmp_path / "root"
    touch(root / TENCH / "a.JPEG")
    os.symlink("b.JPEG", root / TENCH / "b.JPEG")
    os.symlink("missing.JPEG", root / TENCH / "c.JPEG")
    os.mkfifo(root / TENCH / "d.JPEG")
    tree = scan_jpeg_tree(root)
    assert tree.files == (f"{TENCH}/a.JPEG", f"{TENCH}/b.JPEG", f"{TENCH}/c.JPEG")
    assert tree.ignored == (f"{TENCH}/d.JPEG",)


# --- flat val --------------------------------------------------------------------------------------------


def write_ground_truth(path: Path, ids: list[int]) -> Path:
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def test_flat_val_with_devkit_ground_truth(tmp_path):
    val = tmp_path / "val"
    for n in (3, 1, 2, 4):
        touch(val / val_name(n))
    touch(val / "readme.txt")
    gt = write_ground_truth(tmp_path / "ILSVRC2012_validation_ground_truth.txt", [449, 1, 889, 450, 7])
    tree = scan_jpeg_tree(val, val_labels=gt)
    assert tree.layout == "val-flat"
    assert tree.label_source == "devkit-ground-truth"
    assert tree.files == tuple(val_name(n) for n in (1, 2, 3, 4))
    # ILSVRC2012_ID 449 = tench (0), 1 = kit fox (278), 889 = toilet tissue (999), 450 = goldfish (1).
    assert tree.labels.tolist() == [0, 278, 999, 1]
    assert tree.labels.dtype == np.int16
    assert tree.ignored == ("readme.txt",)
    assert tree.folder_classes is None


def test_devkit_labels_follow_image_number_not_position(tmp_path):
    # Only images 2 and 5 exist: they take lines 2 and 5.
    touch(tmp_path / "val" / val_name(5))
    touch(tmp_path / "val" / val_name(2))
    gt = write_ground_truth(tmp_path / "gt.txt", [449, 1, 449, 449, 450])
    tree = scan_jpeg_tree(tmp_path / "val", val_labels=gt)
    assert tree.labels.tolist() == [278, 1]


def test_devkit_too_few_lines(tmp_path):
    touch(tmp_path / "val" / val_name(1))
    touch(tmp_path / "val" / val_name(3))
    gt = write_ground_truth(tmp_path / "gt.txt", [449, 1])
    with pytest.raises(JpegTreeError) as info:
        scan_jpeg_tree(tmp_path / "val", val_labels=gt)
    assert info.value.path == gt
    assert "has 2 lines" in info.value.reason and val_name(3) in info.value.reason


def test_devkit_bad_lines(tmp_path):
    touch(tmp_path / "val" / val_name(1))
    with pytest.raises(JpegTreeError, match="outside the ILSVRC2012_ID range"):
        scan_jpeg_tree(tmp_path / "val", val_labels=write_ground_truth(tmp_path / "a.txt", [1001]))
    (tmp_path / "b.txt").write_text("449\nfish\n")
    with pytest.raises(JpegTreeError, match="line 2 is 'fish'"):
        scan_jpeg_tree(tmp_path / "val", val_labels=tmp_path / "b.txt")


def test_devkit_needs_val_file_names(tmp_path):
    touch(tmp_path / "val" / "photo.JPEG")
    gt = write_ground_truth(tmp_path / "gt.txt", [449])
    with pytest.raises(JpegTreeError, match="'photo.JPEG'"):
        scan_jpeg_tree(tmp_path / "val", val_labels=gt)


def test_flat_val_with_shuffled_kaggle_csv(tmp_path):
    table = class_table()
    rng = random.Random(1)
    truth = {n: rng.randrange(1000) for n in range(1, 31)}
    for n in truth:
        touch(tmp_path / "val" / val_name(n))
    rows = [f"ILSVRC2012_val_{n:08d},{table.wnids[c]} 10 20 30 40" for n, c in truth.items()]
    rows.append(f"ILSVRC2012_val_{99:08d},{TENCH} 1 2 3 4")  # a row with no image is fine
    rng.shuffle(rows)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    tree = scan_jpeg_tree(tmp_path / "val", val_labels=csv)
    assert tree.label_source == "kaggle-loc-val-solution"
    assert tree.files == tuple(val_name(n) for n in range(1, 31))
    assert tree.labels.tolist() == [truth[n] for n in range(1, 31)]


def test_kaggle_csv_missing_image_is_named(tmp_path):
    touch(tmp_path / "val" / val_name(1))
    touch(tmp_path / "val" / val_name(2))
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,{TENCH} 1 2 3 4\n")
    with pytest.raises(JpegTreeError) as info:
        scan_jpeg_tree(tmp_path / "val", val_labels=csv)
    assert info.value.path == csv
    assert val_name(2) in info.value.reason


def test_kaggle_csv_bad_wnid(tmp_path):
    touch(tmp_path / "val" / val_name(1))
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n99999999 1 2 3 4\n")
    with pytest.raises(JpegTreeError, match="row 2"):
        scan_jpeg_tree(tmp_path / "val", val_labels=csv)


def test_flat_val_without_labels_is_an_error(tmp_path):
    touch(tmp_path / val_name(1))
    with pytest.raises(JpegTreeError, match="val_labels") as info:
        scan_jpeg_tree(tmp_path)
    assert info.value.path == tmp_path


def test_val_reorganised_into_wnid_folders(tmp_path):
    touch(tmp_path / KIT_FOX / val_name(7))
    touch(tmp_path / TENCH / val_name(3))
    tree = scan_jpeg_tree(tmp_path)
    assert tree.layout == "train-folders"
    assert tree.labels.tolist() == [0, 278]
    with pytest.raises(JpegTreeError, match="class folders"):
        scan_jpeg_tree(tmp_path, val_labels=write_ground_truth(tmp_path.parent / "gt.txt", [1] * 7))


# --- empty and odd roots ---------------------------------------------------------------------------------


def test_empty_root_and_no_images(tmp_path):
    with pytest.raises(JpegTreeError, match="no image files") as info:
        scan_jpeg_tree(tmp_path)
    assert info.value.path == tmp_path
    touch(tmp_path / "notes.txt")
    (tmp_path / TENCH).mkdir()
    with pytest.raises(JpegTreeError, match="no image files"):
        scan_jpeg_tree(tmp_path)


def test_each_reader_names_the_other_when_given_its_format(tmp_path):
    from converter.sources.npz import find_shards
    from converter.sources.base import SourceError

    npz, tree = tmp_path / "npz", tmp_path / "tree"
    touch(npz / "train_data_batch_1.npz")
    touch(tree / TENCH / "a.JPEG")
    with pytest.raises(JpegTreeError, match=r"no image files found; it holds \.npz shards: use `imzarr convert npz`$"):
        scan_jpeg_tree(npz)
    with pytest.raises(SourceError, match=r"no shards found .*; it holds image files: use `imzarr convert jpeg`$"):
        find_shards([tree])
    touch(tmp_path / "empty" / "notes.txt")
    with pytest.raises(SourceError, match=r"extension-less batches\)$"):
        find_shards([tmp_path / "empty"])


def test_missing_root_and_mixed_layout(tmp_path):
    with pytest.raises(JpegTreeError, match="does not exist"):
        scan_jpeg_tree(tmp_path / "nope")
    touch(tmp_path / TENCH / "a.JPEG")
    touch(tmp_path / val_name(1))
    with pytest.raises(JpegTreeError, match="mixed layout"):
        scan_jpeg_tree(tmp_path)

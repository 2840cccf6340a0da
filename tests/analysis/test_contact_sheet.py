"""Contact sheets: size, tile placement and exact upscaled pixels, class choice and order, reconstructions of an
activation store, and clear errors."""

import numpy as np
import pytest
from PIL import Image

from converter.convert import ConvertOptions, convert
from converter.sources.npz import open_npz_source
from extractor.analysis.contact_sheet import ContactSheetError, sheet_size, tile_origin, write_contact_sheet
from schemas.classes import class_table
from schemas.image_store import validate_image_store
from tests.support.synthetic import write_activation_store
from tests.support.synthetic import photo_like, write_npz_shard


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """16-px images of three classes (downsampled labels 5, 9, 700), unshuffled."""
    root = tmp_path_factory.mktemp("small")
    labels = np.array([700, 5, 9, 5, 700, 9, 5, 5, 9, 700, 5, 9])
    write_npz_shard(root / "val_data.npz", photo_like(labels.size, 16, seed=4), labels, mean=False)
    url = str(root / "small.zarr")
    convert(open_npz_source([root / "val_data.npz"]), ConvertOptions(url, shard_size=64, inner_chunk=16))
    return url


def upscaled(chw, scale):
    return np.repeat(np.repeat(chw.transpose(1, 2, 0), scale, axis=0), scale, axis=1)


def tile_pixels(sheet, row, col, tile):
    x, y = tile_origin(row, col, tile)
    return sheet[y : y + tile, x : x + tile]


def test_default_sheet_rows_are_the_first_classes_in_label_order(image_store, tmp_path):
    store = validate_image_store(image_store)
    synsets = store.coordinate("synset")
    out = write_contact_sheet(image_store, tmp_path / "s.png", per_class=3, max_classes=4)
    with Image.open(out) as img:
        assert img.format == "PNG"
        sheet = np.asarray(img.convert("RGB"))
    assert (sheet.shape[1], sheet.shape[0]) == sheet_size(4, 3, 64)  # 64-px images are not scaled
    first_classes = sorted(set(synsets.tolist()))[:4]
    images = store.image[:]
    for row, wnid in enumerate(first_classes):
        for col, i in enumerate(np.flatnonzero(synsets == wnid)[:3]):
            np.testing.assert_array_equal(tile_pixels(sheet, row, col, 64), upscaled(images[i], 1), err_msg=f"{wnid} #{col}")


def test_small_images_are_upscaled_nearest_and_given_classes_keep_their_order(small_store, tmp_path):
    store = validate_image_store(small_store)
    labels = store.coordinate("label")
    images = store.image[:]
    table = class_table()
    wnids = [table.wnids[int(label)] for label in sorted(set(labels.tolist()))]
    chosen = [wnids[2], wnids[0]]
    out = write_contact_sheet(small_store, tmp_path / "u.png", classes=chosen, per_class=5)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert (sheet.shape[1], sheet.shape[0]) == sheet_size(2, 5, 64)  # 16 px × 4
    synsets = store.coordinate("synset")
    first = np.flatnonzero(synsets == chosen[0])[0]
    np.testing.assert_array_equal(tile_pixels(sheet, 0, 0, 64), upscaled(images[first], 4))
    second_row = np.flatnonzero(synsets == chosen[1])
    np.testing.assert_array_equal(tile_pixels(sheet, 1, len(second_row) - 1, 64), upscaled(images[second_row[-1]], 4))
    # A class with fewer samples than per_class leaves background tiles, not other images.
    short = np.flatnonzero(synsets == chosen[0]).size
    assert short < 5
    assert (tile_pixels(sheet, 0, short, 64) == tile_pixels(sheet, 0, 4, 64)).all()
    assert len(np.unique(tile_pixels(sheet, 0, short, 64).reshape(-1, 3), axis=0)) == 1
    # The row label area carries text: lighter pixels than the background.
    label_area = sheet[:64, : tile_origin(0, 0, 64)[0]]
    assert label_area.max() > 200


def test_reconstructions_of_an_activation_store(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([3, 1, 3, 1, 1, 3])
    recon = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    feats = rng.normal(size=(6, 4))
    url = write_activation_store(str(tmp_path / "a.zarr"), labels, lambda a, b: feats[a:b], (4,), shard=64, reconstructions=recon)
    out = write_contact_sheet(url, tmp_path / "r.png", per_class=2, variable="reconstruction")
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert (sheet.shape[1], sheet.shape[0]) == sheet_size(2, 2, 64)
    # Rows in label order: label 1 first (its first two samples: 1, 3), then label 3 (samples 0, 2).
    np.testing.assert_array_equal(tile_pixels(sheet, 0, 0, 64), upscaled(recon[1], 2))
    np.testing.assert_array_equal(tile_pixels(sheet, 0, 1, 64), upscaled(recon[3], 2))
    np.testing.assert_array_equal(tile_pixels(sheet, 1, 1, 64), upscaled(recon[2], 2))
    plain = write_activation_store(str(tmp_path / "p.zarr"), labels, lambda a, b: feats[a:b], (4,), shard=64)
    with pytest.raises(ContactSheetError, match="without --reconstructions"):
        write_contact_sheet(plain, tmp_path / "x.png")


def test_errors(small_store, tmp_path):
    with pytest.raises(ContactSheetError, match="'n99999999' is not an ImageNet-1k WNID"):
        write_contact_sheet(small_store, tmp_path / "e.png", classes=["n99999999"])
    with pytest.raises(ContactSheetError, match=r"classes n01440764 \(tench\) have no samples in this store \(3 classes there, e\.g\. n"):
        write_contact_sheet(small_store, tmp_path / "e.png", classes=["n01440764"])
    with pytest.raises(ContactSheetError, match="only in activation stores"):
        write_contact_sheet(small_store, tmp_path / "e.png", variable="reconstruction")
    with pytest.raises(ContactSheetError, match=r"^--per-class 0: must be a whole number ≥ 1$"):
        write_contact_sheet(small_store, tmp_path / "e.png", per_class=0)


def test_classes_by_name_or_index_header_and_counts(small_store, tmp_path):
    """Rows named by class name or label index as by WNID; the header and "k of N" are drawn as text."""
    store = validate_image_store(small_store)
    synsets = store.coordinate("synset")
    table = class_table()
    wnids = sorted(set(synsets.tolist()))
    first, second = table.index_of_wnid(wnids[0]), table.index_of_wnid(wnids[1])
    by_wnid = np.asarray(Image.open(write_contact_sheet(small_store, tmp_path / "w.png", classes=[wnids[0], wnids[1]], per_class=2)).convert("RGB"))
    by_name = np.asarray(Image.open(write_contact_sheet(small_store, tmp_path / "n.png", classes=[table.names[first].upper(), str(second)], per_class=2)).convert("RGB"))
    np.testing.assert_array_equal(by_name, by_wnid)
    header = by_wnid[: tile_origin(0, 0, 64)[1]]
    assert header.max() > 200  # the store name is written above the rows
    with pytest.raises(ContactSheetError, match="close matches"):
        write_contact_sheet(small_store, tmp_path / "e.png", classes=["tenchh"])


def test_row_counts_say_k_of_n(small_store, tmp_path, monkeypatch):
    from extractor.analysis import contact_sheet

    drawn = []
    monkeypatch.setattr(contact_sheet, "_draw_label", lambda draw, row, tile, name, wnid, count, total: drawn.append((wnid, count, total)))
    write_contact_sheet(small_store, tmp_path / "k.png", per_class=3)
    synsets = validate_image_store(small_store).coordinate("synset")
    assert drawn == [(w, min(3, int((synsets == w).sum())), int((synsets == w).sum())) for w in sorted(set(synsets.tolist()))]


def test_an_existing_file_is_replaced_only_when_it_is_a_png(small_store, tmp_path):
    """`imzarr show -o` re-makes an earlier sheet; a file of another kind at that path (a shard, notes) is refused,
    untouched."""
    from extractor.api import show
    from schemas.output_paths import ExistingFileError

    victim = tmp_path / "val_data.npz"
    np.savez(victim, data=np.zeros((2, 12), np.uint8), labels=np.ones(2))
    before = victim.read_bytes()
    with pytest.raises(ExistingFileError, match=r"val_data\.npz: exists and is not a PNG image; writing the figure there would destroy it"):
        show(small_store, str(victim))
    assert victim.read_bytes() == before
    (tmp_path / "sheet.png").write_bytes(b"not really a png")
    with pytest.raises(ExistingFileError, match="is not a PNG image"):
        show(small_store, str(tmp_path / "sheet.png"))
    first = show(small_store, str(tmp_path / "grid.png"), per_class=2)
    again = show(small_store, str(tmp_path / "grid.png"), per_class=3)  # an earlier PNG is re-made
    assert first == again and Image.open(again).size == sheet_size(3, 3, 64)

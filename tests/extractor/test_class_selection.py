"""--classes: WNIDs, class names (case-insensitive, exact or unique prefix) and label indices all name a class;
ambiguous and unknown names fail with the candidates."""

import numpy as np
import pytest

from extractor.selection import SelectionError, SelectionSpec, UnknownClassNameError, describe_selection, per_class_shortfall, resolve_class, resolve_classes, select_samples
from schemas.classes import class_table


@pytest.mark.parametrize("given", ["n01440764", "tench", "TENCH", " Tench ", "0", "tenc"])
def test_one_class_many_spellings(given):
    assert resolve_class(given) == "n01440764"


def test_names_with_spaces_and_prefixes():
    assert resolve_class("great white shark") == "n01484850"
    assert resolve_class("Great White") == "n01484850"
    assert resolve_classes(["tench", "1"]) == ("n01440764", "n01443537")  # order kept
    assert resolve_classes("Tench, 1") == ("n01440764", "n01443537")  # one comma-separated text


def test_ambiguous_and_unknown_names_list_candidates():
    with pytest.raises(UnknownClassNameError, match=r"2 classes have that name.*n02012849.*n03126707"):
        resolve_class("crane")  # the bird and the machine
    with pytest.raises(UnknownClassNameError, match=r"begins 2 class names.*goldfish.*goldfinch"):
        resolve_class("goldf")
    with pytest.raises(UnknownClassNameError, match=r"close matches: n01440764 \(tench, 0\)"):
        resolve_class("tnch")
    with pytest.raises(UnknownClassNameError, match="outside 0..999"):
        resolve_class("1000")
    assert issubclass(UnknownClassNameError, SelectionError)


def test_selection_by_name_equals_selection_by_wnid():
    table = class_table()
    labels = np.array([0, 1, 2, 1, 0, 5])
    synsets = table.synsets_of(labels)
    by_wnid = SelectionSpec(classes=("n01440764", table.wnids[5]))
    by_name = SelectionSpec(classes=("Tench", "5"))
    chosen = select_samples(by_wnid, labels, synsets)
    np.testing.assert_array_equal(select_samples(by_name, labels, synsets), chosen)
    assert chosen.tolist() == [0, 4, 5]
    # Recorded as WNIDs: both spellings are the same selection (and the same settings fingerprint).
    assert describe_selection(by_name, chosen) == describe_selection(by_wnid, chosen)
    # Classes missing from the samples the indices pick are said to be missing there, not in the store.
    with pytest.raises(SelectionError, match=r"^classes n01440764 \(tench\) have no samples in the 2 samples the indices select \(1 class there, e\.g\. n01443537\)$"):
        select_samples(SelectionSpec(positions=(1, 3), classes=("tench",)), labels, synsets)


def test_folder_named_classes_of_a_store_are_taken_as_given():
    labels = np.array([-1, -1, 0])
    synsets = np.array(["n99999999", "n99999999", "n01440764"], dtype=object)
    spec = SelectionSpec(classes=("n99999999",))
    assert select_samples(spec, labels, synsets).tolist() == [0, 1]
    assert describe_selection(spec, np.array([0, 1]))["classes"] == ["n99999999"]
    with pytest.raises(SelectionError, match="have no samples"):
        select_samples(SelectionSpec(classes=("goldfish",)), labels, synsets)


def test_per_class_shortfall_names_the_short_classes():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 9)
    synsets = np.array(["a"] * labels.size, dtype=object)
    spec = SelectionSpec(per_class=4, seed=0)
    assert np.bincount(labels[select_samples(spec, labels, synsets)]).tolist() == [4, 2, 4]
    assert per_class_shortfall(spec, labels, synsets) == "--per-class 4: 1 of 3 classes have fewer samples, all of theirs taken (label: count 1: 2)"
    assert per_class_shortfall(SelectionSpec(per_class=2), labels, synsets) is None
    assert per_class_shortfall(SelectionSpec(), labels, synsets) is None
    # --num-samples cuts the draw afterwards: classes it cut short are not short of samples.
    assert per_class_shortfall(SelectionSpec(per_class=2, num_samples=3), labels, synsets) is None


def test_index_lists_are_read_as_given(tmp_path):
    """An index file's values as written (uint64 2**64-1 is not -1), one list (not a table flattened), an empty file
    said in one line without numpy's warning."""
    import warnings

    from extractor.selection import SelectionError, _read_indices

    np.save(tmp_path / "huge.npy", np.array([3, 2**64 - 1], dtype=np.uint64))
    np.save(tmp_path / "table.npy", np.array([[1, 2], [3, 4]]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SelectionError, match=r"huge.npy: index 18446744073709551615 outside 0..9$"):
        _read_indices(str(tmp_path / "huge.npy"), 10)
    with pytest.raises(SelectionError, match=r"table.npy: sample positions must be a 1-d list, got an array of shape \(2, 2\)"):
        _read_indices(str(tmp_path / "table.npy"), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SelectionError, match="empty.txt: lists no sample positions"):
            _read_indices(str(tmp_path / "empty.txt"), 10)

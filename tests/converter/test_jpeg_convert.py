"""JPEG trees end to end: recipes applied per file, odd files, rejects, labels, strictness, crash safety."""

import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from converter.api import RejectedFilesError, convert_jpeg
from converter.cli import main as convert_main
from converter.sources.jpeg_recipes import RECIPES, load_and_resize
from schemas.api import store_info
from schemas.classes import class_table
from schemas.image_store import validate_image_store
from tests.support.commands import checkout_env, run_imzarr
from tests.support.store_equality import stores_identical
from tests.support.synthetic import TREE_WNIDS, write_mixed_jpeg_tree

TABLE = class_table()
WNIDS = TREE_WNIDS


def _photo(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * yy + seed), np.cos(5 * xx), yy * xx], -1) * 100 + 120
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def odd_tree(tmp_path):
    root = write_mixed_jpeg_tree(tmp_path / "train", ((375, 500), (300, 200), (120, 160), (90, 70), (20, 30)), _photo)
    Image.fromarray(_photo(40, 1000, 6)).save(root / WNIDS[2] / "f_wide.JPEG", quality=90)
    Image.fromarray(_photo(1000, 40, 7)).save(root / WNIDS[2] / "g_tall.JPEG", quality=90)
    good = (root / WNIDS[0] / "a_plain.JPEG").read_bytes()
    (root / WNIDS[0] / "h_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / WNIDS[1] / "i_empty.JPEG").write_bytes(b"")
    (root / WNIDS[1] / "labels.txt").write_text("not an image")
    return root


def test_tree_every_recipe_exact_with_rejects(odd_tree, tmp_path, capsys):
    good = ["a_plain", "b_cmyk", "c_gray", "d_png", "e_small", "f_wide", "g_tall"]
    for recipe in RECIPES:
        out = tmp_path / f"{recipe}.zarr"
        assert convert_main(["jpeg", str(odd_tree), "-o", str(out), "--recipe", recipe, "--size", "32"]) == 0
        summary = capsys.readouterr().out
        assert "7 converted, 2 rejected, 1 non-image files and hidden folders ignored" in summary
        store = validate_image_store(str(out))
        files = list(store.coordinate("source_file"))
        assert [f.split("/")[1].split(".")[0] for f in files] == good
        expected = np.stack([load_and_resize(odd_tree / f, recipe, 32) for f in files])
        np.testing.assert_array_equal(store.image[:], expected)
        np.testing.assert_array_equal(store.coordinate("label"), [0, 0, 278, 278, 980, 980, 980])
        assert list(store.coordinate("global_index")) == [0, 1, 3, 4, 6, 7, 8]  # sorted paths, rejects leave gaps
        attrs = store.attrs
        assert sorted(map(tuple, attrs["rejected"])) == [
            (f"{WNIDS[0]}/h_truncated.JPEG", "truncated image"),
            (f"{WNIDS[1]}/i_empty.JPEG", "empty file"),
        ]
        assert attrs["recipe"] == recipe and attrs["pillow_version"] == Image.__version__
        assert attrs["image_files_found"] == len(files) + len(attrs["rejected"])
        assert attrs["ignored_files"] == [f"{WNIDS[1]}/labels.txt"]
        described = store_info(str(out)).summary.splitlines()
        assert "tree         9 image files" in described
        assert f"rejected     2: {WNIDS[0]}/h_truncated.JPEG (truncated image), {WNIDS[1]}/i_empty.JPEG (empty file)" in described


def test_strict_fails_on_rejects_every_time(odd_tree, tmp_path, capsys):
    args = ["jpeg", str(odd_tree), "-o", str(tmp_path / "s.zarr"), "--strict"]
    assert convert_main(args) == 1
    captured = capsys.readouterr()
    first = captured.err.splitlines()
    assert first[-1] == (f"imzarr convert: error: {tmp_path / 's.zarr'}: 2 files rejected (strict; they are listed in the store's `rejected`, see imzarr info): "
                         "run without strict to accept the store as it is, or replace the files and re-run with --overwrite")
    assert [line for line in first if line.startswith("rejected: ")] == first[-3:-1] and "7 converted, 2 rejected" in captured.out
    assert convert_main(args) == 1  # the store is complete, its rejects recorded: a rerun fails alike
    again = capsys.readouterr()
    assert again.err.splitlines()[-1] == first[-1] and "already complete" in again.out
    assert convert_main(args[:-1]) == 0


def test_strict_is_the_library_rule(odd_tree, tmp_path):
    """The Python API fails a strict run as the command does, with what the run did attached."""
    out = str(tmp_path / "s.zarr")
    with pytest.raises(RejectedFilesError) as failed:
        convert_jpeg(odd_tree, out, strict=True)
    assert failed.value.exit_code == 1 and failed.value.result.num_samples == 7 and len(failed.value.result.rejected) == 2
    assert str(failed.value) == (f"{out}: 2 files rejected (strict; they are listed in the store's `rejected`, see imzarr info): "
                                 "run without strict to accept the store as it is, or replace the files and re-run with --overwrite")
    with pytest.raises(RejectedFilesError):
        convert_jpeg(odd_tree, out, strict=True)
    assert convert_jpeg(odd_tree, out).already_complete


def test_truncated_files_are_rejected_when_pillow_is_told_to_load_them(odd_tree, tmp_path, monkeypatch):
    """Training code often sets Pillow's LOAD_TRUNCATED_IMAGES process-wide; Pillow would then fill the missing
    half with grey and the converter store it. The run rejects the file anyway and leaves the setting as it was."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    result = convert_jpeg(odd_tree, str(tmp_path / "t.zarr"))
    assert result.num_samples == 7 and (f"{WNIDS[0]}/h_truncated.JPEG", "truncated image") in result.rejected
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_truncated_files_are_rejected_in_worker_processes_that_load_them(odd_tree, tmp_path):
    """A script that sets the flag at its top level sets it in the worker processes it spawns, too."""
    script = tmp_path / "convert_with_flag.py"
    script.write_text(
        "from PIL import ImageFile\n"
        "ImageFile.LOAD_TRUNCATED_IMAGES = True\n"
        "if __name__ == '__main__':\n"
        "    import sys, converter\n"
        "    r = converter.convert_jpeg(sys.argv[1], sys.argv[2], processes=True, workers=2)\n"
        "    print(r.num_samples, sorted(path for path, _ in r.rejected))\n"
    )
    done = subprocess.run([sys.executable, str(script), str(odd_tree), str(tmp_path / "p.zarr")], env=checkout_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "7" and "h_truncated.JPEG" in done.stdout


def test_every_file_rejected_names_them(tmp_path):
    root = tmp_path / "bad"
    (root / WNIDS[0]).mkdir(parents=True)
    (root / WNIDS[0] / "garbage.JPEG").write_bytes(b"not a picture at all")
    (root / WNIDS[0] / "zero.JPEG").write_bytes(b"")
    out = tmp_path / "bad.zarr"
    assert convert_main(["jpeg", str(root), "-o", str(out)]) == 2
    with pytest.raises(Exception, match=rf"no usable images \(2 rejected: {WNIDS[0]}/garbage\.JPEG: not an image \(cannot identify image file\); {WNIDS[0]}/zero\.JPEG: empty file\)"):
        convert_jpeg(root, str(out))
    assert not out.exists()


def test_flat_val_with_devkit_labels(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    ids = [449, 1, 980]
    for i in range(3):
        Image.fromarray(_photo(64, 80, i)).save(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG", quality=90)
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{i}\n" for i in ids))
    out = tmp_path / "v.zarr"
    assert convert_main(["jpeg", str(val), "--val-labels", str(gt), "-o", str(out)]) == 0
    store = validate_image_store(str(out))
    np.testing.assert_array_equal(store.coordinate("label"), TABLE.from_downsampled(np.array(ids)))
    assert store.coordinate("label")[0] == 0 and store.coordinate("label")[1] == 278
    assert store.attrs["label_source"] == "devkit-ground-truth"


def test_label_from_folders(tmp_path):
    for name in ("dogs", "cats"):
        (tmp_path / "t" / name).mkdir(parents=True)
        Image.fromarray(_photo(50, 50, 1)).save(tmp_path / "t" / name / "x.jpg")
    assert convert_main(["jpeg", str(tmp_path / "t"), "-o", str(tmp_path / "bad.zarr")]) == 2
    out = tmp_path / "f.zarr"
    assert convert_main(["jpeg", str(tmp_path / "t"), "--label-from-folders", "-o", str(out)]) == 0
    store = validate_image_store(str(out))
    assert list(store.coordinate("label")) == [0, 1] and list(store.coordinate("synset")) == ["cats", "dogs"]
    assert store.attrs["folder_classes"] == ["cats", "dogs"] and store.attrs["source_label_order"] == "folder-names-sorted"


def test_killed_while_reading_the_tree_then_rerun_equals_uninterrupted(tmp_path):
    """SIGKILL once the first of three 128-file blocks is decoded into scratch (stage 1; tests/support/faults.py
    names the step, so the kill lands there on every run): no store exists yet, and the rerun, reusing that block,
    ends identical to an uninterrupted run. The fault matrix (tests/cli/test_fault_matrix.py) covers the kills
    after the store exists."""
    from tests.support.faults import KILL_AT_STEP

    root = tmp_path / "tree"
    for w in WNIDS:
        (root / w).mkdir(parents=True)
    for i in range(300):
        Image.fromarray(_photo(48, 64, i)).save(root / WNIDS[i % 3] / f"{i:04d}.JPEG", quality=85)
    for i in (0, 181, 299):  # one unreadable file in each block: the record lists them in input order however the blocks resume
        (root / WNIDS[i % 3] / f"{i:04d}.JPEG").write_bytes(b"not a picture")
    args = ["convert", "jpeg", str(root), "--shard-size", "64", "--workers", "2", "--shuffle-seed", "1"]
    assert run_imzarr(*args, "-o", tmp_path / "ref.zarr").returncode == 0
    crashed = tmp_path / "crashed.zarr"
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP, "after_part", "1", *args, "-o", str(crashed)], env=checkout_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (crashed / "zarr.json").exists()  # still in stage 1: no store that could look complete
    assert len(list(tmp_path.glob("crashed.zarr.scratch-*/part-*.json"))) >= 1
    rerun = run_imzarr(*args, "-o", crashed)
    assert rerun.returncode == 0, rerun.stderr
    stores_identical(str(tmp_path / "ref.zarr"), str(crashed))
    assert [path for path, _ in validate_image_store(str(crashed)).attrs["rejected"]] == [f"{WNIDS[i % 3]}/{i:04d}.JPEG" for i in (0, 181, 299)]
    assert not list(tmp_path.glob("*.scratch-*"))


def test_processes_equal_threads(odd_tree, tmp_path):
    assert convert_main(["jpeg", str(odd_tree), "-o", str(tmp_path / "t.zarr"), "--workers", "2"]) == 0
    assert convert_main(["jpeg", str(odd_tree), "-o", str(tmp_path / "p.zarr"), "--workers", "2", "--processes"]) == 0
    threads, procs = (validate_image_store(str(tmp_path / f"{n}.zarr")) for n in "tp")
    np.testing.assert_array_equal(threads.image[:], procs.image[:])
    assert threads.attrs["rejected"] == procs.attrs["rejected"]


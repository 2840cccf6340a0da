"""Sources and checkpoints read from s3:// (moto's S3 server on 127.0.0.1) give exactly what the same files on
local disk give: NPZ shards (stored and deflated), a JPEG tree with odd files, an EDM network pickle."""

from __future__ import annotations

import hashlib
import pickle
import tempfile
from pathlib import Path

import fsspec.config
import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from schemas.classes import class_table
from schemas.cli.dispatch import main as imzarr
from tests.support.store_equality import stores_identical
from tests.support.synthetic import TREE_WNIDS, photo_like, read_shard_rows, write_mixed_jpeg_tree, write_npz_shard
from tests.support.edm_pickles import edm_style

pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from tests.support.s3_server import CREDENTIALS  # noqa: E402

WNIDS = TREE_WNIDS
# Attributes that record how the inputs were fingerprinted: mtime on disk, ETag in object storage.
FINGERPRINTED = ("sources", "settings", "settings_fingerprint")


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    return photo_like(1, max(h, w), seed)[0].transpose(1, 2, 0)[:h, :w].copy()


def _write_inputs(root: Path) -> None:
    npz = root / "npz"
    npz.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, compressed in ((1, False), (2, True), (10, False)):  # _2 before _10: natural order
        write_npz_shard(npz / f"train_data_batch_{i}.npz", photo_like(40, 32, seed=i), rng.integers(1, 1001, 40), compressed=compressed)
    (npz / ".hidden.npz").write_bytes(b"not read")
    adm = root / "adm"
    adm.mkdir()
    samples = photo_like(24, 16, seed=7).transpose(0, 2, 3, 1)
    np.savez(adm / "samples_stored.npz", arr_0=samples, arr_1=np.arange(24) * 40)
    np.savez_compressed(adm / "samples_deflated.npz", arr_0=samples[::-1], arr_1=np.arange(24) * 40)

    tree = write_mixed_jpeg_tree(root / "train", ((75, 100), (60, 40), (48, 64), (45, 35), (20, 30)), _photo)
    good = (tree / WNIDS[0] / "a_plain.JPEG").read_bytes()
    (tree / WNIDS[2] / "f_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (tree / WNIDS[1] / "labels.txt").write_text("not an image")
    (tree / WNIDS[2] / ".hidden.JPEG").write_bytes(good)
    (tree / WNIDS[0] / ".thumbs").mkdir()  # a hidden folder: skipped whole and listed, on disk and in S3 alike
    (tree / WNIDS[0] / ".thumbs" / "a.JPEG").write_bytes(good)
    val = root / "val"
    val.mkdir()
    for i in range(3):
        Image.fromarray(_photo(40 + 8 * i, 50, 20 + i)).save(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG", quality=90)
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("449\n1\n980\n")  # devkit (map_clsloc) numbers
    (root / "bad").mkdir()
    (root / "bad" / "garbage.npz").write_bytes(b"this is not a zip file at all")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, s3) -> Path:
    """The same files on local disk and under s3://BUCKET/in/."""
    root = tmp_path_factory.mktemp("inputs")
    _write_inputs(root)
    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{s3.bucket}/in/{path.relative_to(root).as_posix()}")
    return root


@pytest.fixture
def cli(s3, monkeypatch, capsys):
    """`imzarr …` in this process with the moto endpoint as --storage-options; returns (exit code, stdout, stderr)."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})  # what --storage-options adds is undone after the test

    def run(*args: str) -> tuple[int, str, str]:
        code = imzarr([*map(str, args), "--storage-options", s3.storage_options_json])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _bucket_state(s3) -> dict[str, str]:
    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    return {name: info["ETag"] for name, info in fs.find(f"{s3.bucket}/in", detail=True).items()}


def _assert_same_store(a: str | Path, b: str | Path) -> dict:
    """Every array byte-identical; every attribute equal except the inputs' fingerprints (mtime vs ETag)."""
    stores_identical(a, b, ignore_attrs=FINGERPRINTED)
    attrs_a, attrs_b = dict(zarr.open_group(str(a), mode="r").attrs), dict(zarr.open_group(str(b), mode="r").attrs)
    strip = lambda files: [{k: v for k, v in f.items() if k != "fingerprint"} for f in files]  # noqa: E731
    assert strip(attrs_a["sources"]) == strip(attrs_b["sources"])
    return attrs_b


def test_npz_shards_from_s3_equal_local(inputs, s3, cli, tmp_path):
    before = _bucket_state(s3)
    common = ["--shard-size", "32", "--inner-chunk", "16", "--shuffle-seed", "3"]  # shuffled: rows read out of order
    assert cli("convert", "npz", inputs / "npz", "-o", tmp_path / "local.zarr", *common)[0] == 0
    code, out, err = cli("convert", "npz", s3.url("in/npz/"), "-o", tmp_path / "remote.zarr", *common)
    assert code == 0, err
    assert "120 converted" in out
    attrs = _assert_same_store(tmp_path / "local.zarr", tmp_path / "remote.zarr")
    assert [f["path"] for f in attrs["sources"]] == ["train_data_batch_1.npz", "train_data_batch_2.npz", "train_data_batch_10.npz"]
    assert all(f["fingerprint"].startswith("sha256-size-mtime-member-crcs:") for f in attrs["sources"])

    # What the shards hold, in the shuffled order the store records.
    store = zarr.open_group(str(tmp_path / "remote.zarr"), mode="r")
    shards = [inputs / "npz" / f"train_data_batch_{i}.npz" for i in (1, 2, 10)]
    images, labels = read_shard_rows(shards)
    order = store["global_index"][:]
    np.testing.assert_array_equal(store["image"][:], images[order])
    np.testing.assert_array_equal(store["label"][:], labels[order])

    # One file by its URL; a rerun from s3 finds the store complete (same fingerprints: nothing changed).
    code, _, err = cli("convert", "npz", s3.url("in/npz/train_data_batch_2.npz"), "-o", tmp_path / "one.zarr")
    assert code == 0, err
    assert zarr.open_group(str(tmp_path / "one.zarr"), mode="r")["image"].shape[0] == 40
    code, out, _ = cli("convert", "npz", s3.url("in/npz/"), "-o", tmp_path / "remote.zarr", *common)
    assert code == 0 and "already complete" in out
    assert _bucket_state(s3) == before  # inputs are never written


@pytest.mark.parametrize("shuffle", [[], ["--shuffle-seed", "5"]], ids=["in-order", "shuffled"])
def test_adm_samples_from_s3_hold_their_pixels(inputs, s3, cli, tmp_path, shuffle):
    # In order, stored rows are read as byte ranges; shuffled, each file is first copied to scratch in one pass.
    common = ["--shard-size", "16", *shuffle]
    code, _, err = cli("convert", "npz", s3.url("in/adm"), "-o", tmp_path / "remote.zarr", *common)
    assert code == 0, err
    assert cli("convert", "npz", inputs / "adm", "-o", tmp_path / "local.zarr", *common)[0] == 0
    _assert_same_store(tmp_path / "local.zarr", tmp_path / "remote.zarr")
    store = zarr.open_group(str(tmp_path / "remote.zarr"), mode="r")
    samples = photo_like(24, 16, seed=7)
    expected = np.concatenate([samples[::-1], samples])  # samples_deflated sorts before samples_stored
    np.testing.assert_array_equal(store["image"][:], expected[store["global_index"][:]])
    assert not list(tmp_path.glob("*.scratch-*"))


@pytest.mark.slow
def test_npz_from_s3_to_s3_on_a_cluster_equals_local(inputs, s3, cli, tmp_path, monkeypatch):
    from distributed import LocalCluster

    common = ["--shard-size", "64", "--inner-chunk", "16"]
    assert cli("convert", "npz", inputs / "npz", "-o", tmp_path / "local.zarr", *common)[0] == 0
    # Worker processes inherit the credentials from this process's environment; the endpoint reaches them
    # through the fsspec defaults the task runner hands every worker.
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        code, _, err = cli(
            "convert", "npz", s3.url("in/npz"), "-o", s3.url("out/cluster.zarr"), *common,
            "--scheduler", cluster.scheduler_address, "--scratch-dir", tmp_path / "scratch",
        )  # fmt: skip
    assert code == 0, err
    _assert_same_store(tmp_path / "local.zarr", s3.url("out/cluster.zarr"))


def test_jpeg_tree_from_s3_equals_local(inputs, s3, cli, tmp_path):
    common = ["--size", "16", "--shard-size", "16"]
    code, local_out, err = cli("convert", "jpeg", inputs / "train", "-o", tmp_path / "local.zarr", *common)
    assert code == 0, err
    code, remote_out, err = cli("convert", "jpeg", s3.url("in/train/"), "-o", tmp_path / "remote.zarr", *common)
    assert code == 0, err
    assert "5 converted, 1 rejected, 3 non-image files and hidden folders ignored" in remote_out
    attrs = _assert_same_store(tmp_path / "local.zarr", tmp_path / "remote.zarr")
    assert attrs["rejected"] == [[f"{WNIDS[2]}/f_truncated.JPEG", "truncated image"]]
    assert attrs["ignored_files"] == [f"{WNIDS[0]}/.thumbs/", f"{WNIDS[1]}/labels.txt", f"{WNIDS[2]}/.hidden.JPEG"]
    assert attrs["sources"][0]["fingerprint"].startswith("sha256-paths-etags:")
    store = zarr.open_group(str(tmp_path / "remote.zarr"), mode="r")
    assert list(store["source_file"][:]) == [
        f"{WNIDS[0]}/a_plain.JPEG", f"{WNIDS[0]}/b_cmyk.JPEG", f"{WNIDS[1]}/c_gray.JPEG", f"{WNIDS[1]}/d_png.JPEG", f"{WNIDS[2]}/e_small.JPEG",
    ]  # fmt: skip
    assert list(store["synset"][:]) == [WNIDS[0], WNIDS[0], WNIDS[1], WNIDS[1], WNIDS[2]]
    np.testing.assert_array_equal(store["label"][:], [0, 0, 278, 278, 980])
    np.testing.assert_array_equal(store["global_index"][:], [0, 1, 2, 3, 4])


def test_flat_val_folder_and_its_labels_file_from_s3_equal_local(inputs, s3, cli, tmp_path):
    local = ["convert", "jpeg", inputs / "val", "--val-labels", inputs / "ILSVRC2012_validation_ground_truth.txt"]
    code, _, err = cli(*local, "-o", tmp_path / "local.zarr", "--size", "16")
    assert code == 0, err
    remote = ["convert", "jpeg", s3.url("in/val/"), "--val-labels", s3.url("in/ILSVRC2012_validation_ground_truth.txt")]
    code, _, err = cli(*remote, "-o", tmp_path / "remote.zarr", "--size", "16")
    assert code == 0, err
    _assert_same_store(tmp_path / "local.zarr", tmp_path / "remote.zarr")
    store = zarr.open_group(str(tmp_path / "remote.zarr"), mode="r")
    np.testing.assert_array_equal(store["label"][:], class_table().from_downsampled(np.array([449, 1, 980])))
    assert list(store["label"][:2]) == [0, 278]  # devkit 449 is tench, 1 kit fox


def test_checkpoint_from_s3_gives_the_local_activations(inputs, s3, cli, tmp_path, edm_reference, edm_modules):
    from extractor.models import ModelSpec, load_model
    from extractor.models.edm import EDMPrecond

    reconstruct, easy_dict = edm_modules
    config = dict(edm_reference["config"])
    net = EDMPrecond(**config)
    net.load_state_dict(edm_reference["state_dict"])
    marker = tmp_path / "MARKER"
    local = tmp_path / "edm-net.pkl"
    with local.open("wb") as fh:
        pickle.dump({"ema": edm_style(net, reconstruct, marker, init_kwargs=easy_dict(config))}, fh)
    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    fs.put_file(str(local), f"{s3.bucket}/ckpt/edm-net.pkl")
    folder = tmp_path / "dmd2"
    folder.mkdir()
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    fs.put_file(str(folder / "pytorch_model.bin"), f"{s3.bucket}/ckpt/dmd2/pytorch_model.bin")

    copies_before = set(Path(tempfile.gettempdir()).glob("imzarr-checkpoint-*"))
    assert cli("convert", "npz", inputs / "npz", "-o", tmp_path / "images.zarr")[0] == 0
    extract = ["--layers", "midblock", "--pool", "mean", "--sigma", "0.5", "--device", "cpu", "--num-samples", "8"]
    assert cli("extract", tmp_path / "images.zarr", "-o", tmp_path / "local.zarr", "--checkpoint", local, *extract)[0] == 0
    code, _, err = cli("extract", tmp_path / "images.zarr", "-o", tmp_path / "remote.zarr", "--checkpoint", s3.url("ckpt/edm-net.pkl"), *extract)
    assert code == 0, err
    assert not marker.exists()  # the safe unpickler ran nothing from the pickle
    a, b = zarr.open_group(str(tmp_path / "local.zarr"), mode="r"), zarr.open_group(str(tmp_path / "remote.zarr"), mode="r")
    for name, array in a.arrays():
        np.testing.assert_array_equal(array[:], b[name][:], err_msg=name)
    assert b.attrs["model"]["sha256"] == a.attrs["model"]["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    assert b.attrs["model"]["checkpoint"] == s3.url("ckpt/edm-net.pkl")

    # A DMD2 checkpoint folder at a URL: its generator file, the same weights and sha256 as on disk.
    from_s3 = load_model(ModelSpec(checkpoint=s3.url("ckpt/dmd2/")))
    on_disk = load_model(ModelSpec(checkpoint=str(folder)))
    assert from_s3.sha256 == on_disk.sha256
    for key, value in on_disk.module.state_dict().items():
        assert torch.equal(value, from_s3.module.state_dict()[key]), key
    assert set(Path(tempfile.gettempdir()).glob("imzarr-checkpoint-*")) == copies_before  # the copies are gone

    # The public readers take URLs as they take paths; telling a pickle from a torch file fetches 4 bytes.
    from extractor.models.checkpoints import is_edm_network_pickle, read_checkpoint

    assert is_edm_network_pickle(s3.url("ckpt/edm-net.pkl")) and not is_edm_network_pickle(s3.url("ckpt/dmd2/"))
    (remote_state, remote_kwargs), (local_state, local_kwargs) = read_checkpoint(s3.url("ckpt/edm-net.pkl")), read_checkpoint(local)
    assert remote_kwargs == local_kwargs and remote_state.keys() == local_state.keys()
    assert all(torch.equal(remote_state[k], local_state[k]) for k in local_state)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["convert", "npz", "{s3}/in/no-such-folder/"], "{s3}/in/no-such-folder/: no such file or folder"),
        (["convert", "npz", "s3://imzarr-no-such-bucket/shards"], "s3://imzarr-no-such-bucket/shards: no such file or folder"),
        (["convert", "npz", "{s3}/in/bad/garbage.npz"], "{s3}/in/bad/garbage.npz: not an .npz (zip) file or a pickled batch (unknown content)"),
        (["convert", "jpeg", "{s3}/in/no-such-tree"], "{s3}/in/no-such-tree: does not exist"),
        (["convert", "jpeg", "{s3}/in/npz/train_data_batch_1.npz"], "{s3}/in/npz/train_data_batch_1.npz: not a directory"),
        (["extract", "{out}/images.zarr", "--checkpoint", "{s3}/ckpt/none.pkl", "--layers", "midblock"], "{s3}/ckpt/none.pkl: no such checkpoint file or folder"),
    ],
)
def test_missing_or_bad_urls_are_one_line_errors(inputs, s3, cli, tmp_path, args, expected):
    base = f"s3://{s3.bucket}"
    if args[0] == "extract":
        assert cli("convert", "npz", inputs / "npz", "-o", tmp_path / "images.zarr")[0] == 0
    args = [a.format(s3=base, out=tmp_path) for a in args]
    code, _, err = cli(*args, "-o", tmp_path / "out.zarr")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(expected.format(s3=base)), err
    assert "Traceback" not in err


def test_output_inside_an_s3_input_is_refused(inputs, s3, cli):
    code, _, err = cli("convert", "npz", s3.url("in/npz"), "-o", s3.url("in/npz/out.zarr"))
    assert code == 2 and "lies inside the input" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("convert", "jpeg", s3.url("in/train"), "-o", s3.url("in/train"))
    assert code == 2 and "is the input" in err


def test_a_rewritten_s3_object_is_changed_input(s3, cli, tmp_path):
    """An object rewritten in place (same key and size, new ETag) is a different input: the rerun refuses in one
    line, --overwrite rebuilds the store from the new bytes."""
    fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
    local, out = tmp_path / "src", tmp_path / "o.zarr"
    local.mkdir()
    images = {seed: photo_like(20, 16, seed=seed) for seed in (0, 1)}
    write_npz_shard(local / "val_data.npz", images[0], np.arange(20) + 1, mean=False)
    fs.put_file(str(local / "val_data.npz"), f"{s3.bucket}/rewritten/val_data.npz")
    assert cli("convert", "npz", s3.url("rewritten/"), "-o", out)[0] == 0
    write_npz_shard(local / "val_data.npz", images[1], np.arange(20) + 1, mean=False)
    fs.put_file(str(local / "val_data.npz"), f"{s3.bucket}/rewritten/val_data.npz")
    code, _, err = cli("convert", "npz", s3.url("rewritten/"), "-o", out)
    assert code == 2 and "changed: sources" in err.strip().splitlines()[-1]
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["image"][:], images[0])  # untouched
    assert cli("convert", "npz", s3.url("rewritten/"), "-o", out, "--overwrite")[0] == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["image"][:], images[1])

"""The Python API is the command line's twin: same defaults, same stores, same refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

import converter
import schemas
from schemas.cli.dispatch import main as imzarr_main
from schemas.errors import ImzarrError
from schemas.keywords import UnknownKeywordError
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
    with pytest.raises(UnknownKeywordError, match="shard_sizes'; did you mean shard_size"):
        converter.convert_npz(sample / "src" / "train", str(sample / "x.zarr"), shard_sizes=64)
    with pytest.raises(OutputOverlapsInputError):
        converter.convert_npz(sample / "src" / "train", str(sample / "src" / "train" / "x.zarr"))
    with pytest.raises(OutputOverlapsInputError):
        converter.convert_npz(sample / "src" / "train", f"file://{sample / 'src' / 'train' / 'x.zarr'}")


def test_an_unknown_keyword_is_one_line_with_the_python_spelling(sample):
    """The command line's --no-noise is noise=False in Python; a typo gets its close match and the full list,
    never a TypeError from a function the caller did not call."""
    import extractor
    import extractor.api

    store = str(sample / "src" / "train")
    with pytest.raises(UnknownKeywordError, match=r"^extract\(\) takes no keyword 'no_noise'; did you mean noise=False\? \(its keywords: batch_size, .*\bseed\b"):
        extractor.extract(store, str(sample / "a.zarr"), layers="midblock", preset="tiny-random", no_noise=True)
    with pytest.raises(UnknownKeywordError, match=r"^generate\(\) takes no keyword 'batchsize'; did you mean batch_size"):
        extractor.generate(str(sample / "g.zarr"), preset="tiny-random", batchsize=8)
    with pytest.raises(TypeError, match=r"^features\(\) takes no keyword 'seed'; did you mean noise_seed\?"):
        extractor.features(np.zeros((1, 3, 64, 64), np.uint8), layers=["midblock"], model="tiny-random", seed=3)
    from extractor.api import LayersNeededError, ModelChoiceError

    with pytest.raises(ModelChoiceError, match=r"^name the network: preset=NAME \(--preset\) or checkpoint=PATH \(--checkpoint\)$"):
        extractor.extract(store, str(sample / "a.zarr"), layers="midblock")
    with pytest.raises(ModelChoiceError, match=r"^preset='tiny-random' and checkpoint='x\.pkl' both name a network: give one of them$"):
        extractor.extract(store, str(sample / "a.zarr"), layers="midblock", preset="tiny-random", checkpoint="x.pkl")
    from extractor.analysis import compare_stores, compare_to_reference, statistics
    from extractor.image_dataset import ImageStoreDataset
    import converter

    with pytest.raises(LayersNeededError, match=r"^extract\(\) needs layers=\[…\]"):
        extractor.extract(store, str(sample / "a.zarr"), preset="tiny-random")

    for call, message in [
        (lambda: compare_stores("r.zarr", "g.zarr", "pool3", prdc_subst=0), r"^compare_stores\(\) takes no keyword 'prdc_subst'; did you mean prdc_subset"),
        (lambda: compare_to_reference("g.zarr", "ref.npz", "pool3", metrcs="fd"), r"^compare_to_reference\(\) takes no keyword 'metrcs'; did you mean metrics"),
        (lambda: statistics("r.zarr", layr="pool3"), r"^statistics\(\) takes no keyword 'layr'; did you mean layer"),
        (lambda: extractor.api.compare(["r.zarr", "g.zarr"], layer="pool3", reprot="site"), r"^compare\(\) takes no keyword 'reprot'; did you mean report"),
        (lambda: extractor.api.stats("r.zarr", layer="pool3", ouput="x.npz"), r"^stats\(\) takes no keyword 'ouput'; did you mean output"),
        # A required keyword misspelt: named as a typo, not as Python's "missing argument" of an inner function.
        (lambda: extractor.extract(store, str(sample / "a.zarr"), layer=["midblock"], preset="tiny-random"), r"^extract\(\) takes no keyword 'layer'; did you mean layers"),
        (lambda: extractor.features(np.zeros((1, 3, 64, 64), np.uint8), layer=["midblock"], model="tiny-random"), r"^features\(\) takes no keyword 'layer'; did you mean layers"),
        (lambda: ImageStoreDataset(store, per_clas=3), r"^ImageStoreDataset\(\) takes no keyword 'per_clas'; did you mean per_class"),
        (lambda: converter.convert_npz(store, str(sample / "c.zarr"), shufle_seed=1), r"^convert_npz\(\) takes no keyword 'shufle_seed'; did you mean shuffle_seed\?"),
    ]:
        with pytest.raises(UnknownKeywordError, match=message):
            call()
    assert not (sample / "a.zarr").exists() and not (sample / "g.zarr").exists()


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


def test_analysis_takes_file_urls_as_paths(sample):
    """compare, stats, report and show own the file:// rule too (the command line passes URLs through as given)."""
    import extractor

    images = str(sample / "url_images.zarr")
    converter.convert_npz(sample / "src" / "train", images)
    kwargs = dict(layers=["midblock"], preset="tiny-random", pool="mean", sigma=0.5, device="cpu")
    extractor.extract(images, str(sample / "url_real.zarr"), num_samples=40, **kwargs)
    extractor.extract(images, str(sample / "url_fake.zarr"), num_samples=60, **kwargs)
    url = f"file://{sample}"
    from extractor import api

    run = api.compare([f"{url}/url_real.zarr", f"{url}/url_fake.zarr"], layer="midblock", output=f"{url}/url_cmp.zarr",
                            plot=f"{url}/url_cmp.png", report=f"{url}/url_site")
    assert run.options.output == str(sample / "url_cmp.zarr") and (sample / "url_cmp.zarr" / "zarr.json").is_file()
    assert (sample / "url_cmp.png").is_file() and (sample / "url_site" / "index.html").is_file()
    api.report_site(f"{url}/url_cmp.zarr", f"{url}/url_site2")
    assert (sample / "url_site2" / "index.html").is_file()
    api.stats(f"{url}/url_real.zarr", layer="midblock", output=f"{url}/url_ref.npz")
    assert np.load(sample / "url_ref.npz")["mu"].shape == (64,)
    assert api.show(f"file://{images}", f"{url}/url_grid.png") == str(sample / "url_grid.png")
    assert not any(p.name.startswith("file:") for p in sample.rglob("*"))


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
    # Any rows, in any order: each image's own global index gives it its stored row's noise.
    rows = np.array([17, 3, 9])
    picked = extractor.features(store.take(rows), store.coordinate("label")[rows], layers=layers, model="tiny-random", device="cpu",
                                global_index=store.coordinate("global_index")[rows])
    for name in layers:
        np.testing.assert_allclose(picked[name].values, stored[name][:][rows], rtol=1e-5, atol=1e-6, err_msg=name)
    assert picked["global_index"].values.tolist() == [17, 3, 9]
    with pytest.raises(extractor.api.FeatureInputError, match="global_index must hold one non-negative integer per image"):
        extractor.features(store.take(rows), layers=layers, model="tiny-random", device="cpu", global_index=[1, 2])


def test_features_refuse_images_of_another_size():
    import extractor
    from extractor.forward import ExtractionError

    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    with pytest.raises(ExtractionError, match="images are 32×32, the model takes 64×64"):
        extractor.features(images, layers=["encoder_bottleneck"], model="tiny-random", device="cpu")


# Each refusal of a command, as its command line and as the Python call the command maps it to. Every one is
# refused before any work (no store is read or written), so the whole table runs in seconds.
REFUSALS = [
    ("convert npz into its input", ["convert", "npz", "src/train", "-o", "src/train/x.zarr"],
     lambda: converter.convert_npz("src/train", "src/train/x.zarr")),
    ("convert npz scratch is a file", ["convert", "npz", "src/train", "-o", "x.zarr", "--scratch-dir", "src/val/val_data.npz"],
     lambda: converter.convert_npz("src/train", "x.zarr", scratch_dir="src/val/val_data.npz")),
    ("convert jpeg into its root", ["convert", "jpeg", "src", "-o", "src/x.zarr"],
     lambda: converter.convert_jpeg("src", "src/x.zarr")),
    ("convert jpeg unknown recipe", ["convert", "jpeg", "src", "-o", "x.zarr", "--recipe", "bicubic"],
     lambda: converter.convert_jpeg("src", "x.zarr", recipe="bicubic")),
    ("extract unknown layer", ["extract", "in.zarr", "-o", "out.zarr", "--layers", "midblok", "--preset", "tiny-random"],
     lambda: _api().extract("in.zarr", "out.zarr", layers="midblok", preset="tiny-random")),
    ("extract into its input", ["extract", "in.zarr", "-o", "in.zarr/acts.zarr", "--layers", "midblock", "--preset", "tiny-random"],
     lambda: _api().extract("in.zarr", "in.zarr/acts.zarr", layers="midblock", preset="tiny-random")),
    ("extract unknown device", ["extract", "in.zarr", "-o", "out.zarr", "--layers", "midblock", "--preset", "tiny-random", "--device", "tpu"],
     lambda: _api().extract("in.zarr", "out.zarr", layers="midblock", preset="tiny-random", device="tpu")),
    ("extract bad resources", ["extract", "in.zarr", "-o", "out.zarr", "--layers", "midblock", "--preset", "tiny-random", "--resources", "GPU"],
     lambda: _api().extract("in.zarr", "out.zarr", layers="midblock", preset="tiny-random", resources="GPU")),
    ("generate layers without their store", ["generate", "-o", "gen.zarr", "--preset", "tiny-random", "--per-class", "1", "--layers", "midblock"],
     lambda: _api().generate("gen.zarr", preset="tiny-random", per_class=1, layers="midblock")),
    ("generate activations inside the images", ["generate", "-o", "gen.zarr", "--preset", "tiny-random", "--per-class", "1", "--layers", "midblock", "--activations-out", "gen.zarr/a.zarr"],
     lambda: _api().generate("gen.zarr", preset="tiny-random", per_class=1, layers="midblock", activations_out="gen.zarr/a.zarr")),
    ("generate activations onto the images", ["generate", "-o", "gen.zarr", "--preset", "tiny-random", "--per-class", "1", "--layers", "midblock", "--activations-out", "gen.zarr"],
     lambda: _api().generate("gen.zarr", preset="tiny-random", per_class=1, layers="midblock", activations_out="gen.zarr")),
    ("generate unknown class", ["generate", "-o", "gen.zarr", "--preset", "tiny-random", "--per-class", "1", "--classes", "n99999999"],
     lambda: _api().generate("gen.zarr", preset="tiny-random", per_class=1, classes="n99999999")),
    ("compare one store", ["compare", "a.zarr", "--layer", "midblock"],
     lambda: _api().compare(["a.zarr"], layer="midblock")),
    ("compare unknown metric", ["compare", "a.zarr", "b.zarr", "--layer", "midblock", "--metrics", "fid"],
     lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", metrics="fid")),
    ("compare report inside an input", ["compare", "a.zarr", "b.zarr", "--layer", "midblock", "-o", "a.zarr/r.zarr"],
     lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", output="a.zarr/r.zarr")),
    ("compare thumbnails without a site", ["compare", "a.zarr", "b.zarr", "--layer", "midblock", "--per-class-thumbnails", "4"],
     lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", per_class_thumbnails=4)),
    ("compare site onto a file", ["compare", "a.zarr", "b.zarr", "--layer", "midblock", "--report", "src/val/val_data.npz"],
     lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", report="src/val/val_data.npz")),
    ("stats with nothing to do", ["stats", "a.zarr"],
     lambda: _api().stats("a.zarr")),
    ("stats output without a layer", ["stats", "a.zarr", "-o", "ref.npz"],
     lambda: _api().stats("a.zarr", output="ref.npz")),
    ("stats reference not an npz", ["stats", "a.zarr", "--layer", "midblock", "-o", "ref.txt"],
     lambda: _api().stats("a.zarr", layer="midblock", output="ref.txt")),
    ("report of no compare store", ["report", "missing.zarr", "-o", "site"],
     lambda: _api().report_site("missing.zarr", "site")),
    ("show onto a folder", ["show", "a.zarr", "-o", "src"],
     lambda: _api().show("a.zarr", "src")),
    ("show into its input", ["show", "src", "-o", "src/grid.png"],
     lambda: _api().show("src", "src/grid.png")),
    ("show as a jpeg", ["show", "a.zarr", "-o", "grid.jpg"],
     lambda: _api().show("a.zarr", "grid.jpg")),
    ("compare plot as a jpeg", ["compare", "a.zarr", "b.zarr", "--layer", "midblock", "--plot", "c.jpg"],
     lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", plot="c.jpg")),
    ("compare KID seed beyond 32 bits", ["compare", "a.zarr", "b.zarr", "--layer", "midblock", "--kid-seed", str(2**32)],
     lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", kid_seed=2**32)),
    ("compare KID subsets of one", ["compare", "a.zarr", "b.zarr", "--layer", "midblock", "--kid-subset-size", "1"],
     lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", kid_subset_size=1)),
]  # fmt: skip


def _api():
    from extractor import api

    return api


@pytest.mark.parametrize("argv, call", [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_each_refusal_of_the_command_line_is_the_python_apis(sample, monkeypatch, capsys, argv, call) -> None:
    """The same error class and message from `imzarr …` (in process; --debug hands over the exception itself) and
    from the Python call, and the command's one line and exit code say it."""
    monkeypatch.chdir(sample)
    before = sorted(sample.rglob("*"))
    with pytest.raises(ImzarrError) as from_cli:
        imzarr_main([*argv, "--debug"])
    with pytest.raises(ImzarrError) as from_api:
        call()
    assert (type(from_api.value), str(from_api.value)) == (type(from_cli.value), str(from_cli.value))
    capsys.readouterr()
    assert imzarr_main(argv) == from_cli.value.exit_code
    assert str(from_cli.value).splitlines()[0] in capsys.readouterr().err
    assert sorted(sample.rglob("*")) == before  # refused before anything was written


def test_extract_takes_positions_as_a_sequence_or_a_file(sample):
    """`indices=` in Python: a list or array of store positions selects what the same positions in a file do."""
    import extractor
    from extractor.selection import SelectionError

    images = str(sample / "pos_images.zarr")
    converter.convert_npz(sample / "src" / "train", images)
    (sample / "pos.txt").write_text("17\n3\n9\n")
    kwargs = dict(layers=["midblock"], preset="tiny-random", pool="mean", device="cpu")
    extractor.extract(images, str(sample / "pos_list.zarr"), indices=[17, 3, 9], **kwargs)
    extractor.extract(images, str(sample / "pos_file.zarr"), indices=str(sample / "pos.txt"), **kwargs)
    by_list, by_file = (zarr.open_group(str(sample / f"pos_{k}.zarr"), mode="r") for k in ("list", "file"))
    assert by_list["source_sample"][:].tolist() == by_file["source_sample"][:].tolist() == [3, 9, 17]
    np.testing.assert_array_equal(by_list["midblock"][:], by_file["midblock"][:])
    assert by_list.attrs["selection"]["sha256"] == by_file.attrs["selection"]["sha256"]
    assert by_list.attrs["selection"]["indices"].startswith("given in Python")
    with pytest.raises(SelectionError, match=r"^indices: sample positions must be whole numbers, got dtype float64$"):
        extractor.extract(images, str(sample / "pos_bad.zarr"), indices=[1.5], **kwargs)  # as from a file
    with pytest.raises(SelectionError, match=r"^indices: expected a file of store positions or a 1-d sequence of them, got shape \(1, 2\)$"):
        extractor.extract(images, str(sample / "pos_bad.zarr"), indices=[[1, 2]], **kwargs)
    assert not (sample / "pos_bad.zarr").exists()
    whole = extractor.extract(images, str(sample / "pos_float.zarr"), indices=np.array([3.0, 9.0, 17.0]), **kwargs)
    assert whole.num_samples == 3


def test_paths_of_a_cluster_run_mean_the_same_on_its_workers(tmp_path, monkeypatch):
    """With --scheduler, tasks run on workers started in folders of their own: extract and generate hand them
    absolute paths (relative ones would name other files there); a local run keeps the paths as given."""
    from extractor.api import extract_options, generate_options

    monkeypatch.chdir(tmp_path)
    cluster = {"scheduler": "tcp://127.0.0.1:1"}
    options = extract_options("in.zarr", "out.zarr", layers="midblock", checkpoint="ckpt.pkl", **cluster)
    assert (options.store, options.output, options.forward.model.checkpoint) == (str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), str(tmp_path / "ckpt.pkl"))
    made = generate_options("gen.zarr", preset="tiny-random", num_samples=4, layers="midblock", activations_out="acts.zarr", **cluster)
    assert (made.output, made.activations_out) == (str(tmp_path / "gen.zarr"), str(tmp_path / "acts.zarr"))
    assert extract_options("in.zarr", "out.zarr", layers="midblock", preset="tiny-random").store == "in.zarr"
    assert extract_options("s3://b/in.zarr", "out.zarr", layers="midblock", preset="tiny-random", **cluster).store == "s3://b/in.zarr"


# Values the command line's argument types turn away before the library sees them (choices, whole numbers): the
# library refuses them itself, so that a notebook gets the same rule in one line, before anything is written.
PYTHON_ONLY_REFUSALS = [
    ("label order misspelt", lambda: converter.convert_npz("src/train", "x.zarr", label_order="downsampld"),
     "ConvertOptionError", "--label-order 'downsampld': choose downsampled or sorted; did you mean downsampled?"),
    ("shard size zero", lambda: converter.convert_npz("src/train", "x.zarr", shard_size=0),
     "ConvertOptionError", "--shard-size 0: must be a whole number ≥ 1"),
    ("shard size none", lambda: converter.convert_npz("src/train", "x.zarr", shard_size=None),
     "ConvertOptionError", "--shard-size None: must be a whole number ≥ 1"),
    ("no sample images", lambda: converter.api.write_sample_shards("sample2", per_shard=0),
     "SampleOptionError", "--per-shard 0: must be a whole number ≥ 1"),
    ("image size a float", lambda: converter.convert_jpeg("src", "x.zarr", size=32.0),
     "ConvertOptionError", "--size 32.0: must be a whole number ≥ 1 (pixels)"),
    ("no workers", lambda: _api().extract("in.zarr", "out.zarr", layers="midblock", preset="tiny-random", workers=0),
     "SchedulerError", "--workers 0: must be a whole number ≥ 1"),
    ("a fractional count", lambda: _api().extract("in.zarr", "out.zarr", layers="midblock", preset="tiny-random", num_samples=2.5),
     "SelectionError", "--num-samples 2.5: must be a whole number ≥ 1"),
    ("a bool for a count", lambda: _api().dry_run("in.zarr", "out.zarr", layers="midblock", preset="tiny-random", per_class=True),
     "SelectionError", "--per-class True: must be a whole number ≥ 1"),
    ("a negative seed", lambda: _api().generate("gen.zarr", preset="tiny-random", per_class=1, seed=-1),
     "ExtractionError", "--seed -1: must be a whole number from 0 to 2**64 - 1"),
    ("a negative PRDC seed", lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", prdc_seed=-1),
     "CompareError", "--seed -1: must be a whole number from 0 to 2**64 - 1"),
    ("compare scratch inside an input", lambda: _api().compare(["a.zarr", "b.zarr"], layer="midblock", scratch_dir="a.zarr/tmp"),
     "OutputOverlapsInputError", "a.zarr/tmp: the scratch folder lies inside the input a.zarr"),
    ("no thumbnails", lambda: _api().report_site("missing.zarr", "site", per_class_thumbnails=0),
     "ReportSiteError", "--per-class-thumbnails 0: must be a whole number ≥ 1"),
    ("a contact sheet of no rows", lambda: _api().show("a.zarr", "grid.png", max_classes=0),
     "ContactSheetError", "--max-classes 0: must be a whole number ≥ 1"),
    ("a batch of none", lambda: _api().features(np.zeros((1, 3, 64, 64), np.uint8), layers=["midblock"], model="tiny-random", batch_size=0),
     "FeatureInputError", "batch_size 0: must be a whole number ≥ 1"),
    ("show keyword misspelt", lambda: _api().show("a.zarr", "grid.png", per_clas=2),
     "UnknownKeywordError", "show() takes no keyword 'per_clas'; did you mean per_class"),
    ("report keyword of compare's other name", lambda: _api().report_site("missing.zarr", "site", per_class=3),
     "UnknownKeywordError", "report_site() takes no keyword 'per_class'; did you mean per_class_thumbnails?"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, message", [case[1:] for case in PYTHON_ONLY_REFUSALS], ids=[case[0] for case in PYTHON_ONLY_REFUSALS])
def test_the_library_refuses_what_only_argument_types_refused(sample, monkeypatch, call, error, message) -> None:
    monkeypatch.chdir(sample)
    before = sorted(sample.rglob("*"))
    with pytest.raises(ImzarrError) as refused:
        call()
    assert type(refused.value).__name__ == error and str(refused.value).startswith(message)
    assert sorted(sample.rglob("*")) == before


def test_numpy_integers_are_the_same_settings_as_ints(sample, tmp_path):
    """A notebook passes np.int64 as readily as int: the runs take them, record plain ints, and a run with ints
    finds the store complete (the same settings), on the command line too."""
    from extractor import api

    converted = converter.convert_npz(sample / "src" / "train", str(tmp_path / "img.zarr"), shard_size=np.int64(64), shuffle_seed=np.int32(3), workers=np.int8(1))
    assert converted.num_samples == 80 and not converted.already_complete
    assert converter.convert_npz(sample / "src" / "train", str(tmp_path / "img.zarr"), shard_size=64, shuffle_seed=3, workers=1).already_complete
    acts = str(tmp_path / "acts.zarr")
    made = api.extract(str(tmp_path / "img.zarr"), acts, layers="midblock", preset="tiny-random", device="cpu",
                       per_class=np.int64(2), seed=np.uint16(5), batch_size=np.int64(8), shard_size=np.int64(16))  # fmt: skip
    assert not made.already_complete and made.num_samples > 0
    settings = dict(zarr.open_group(acts, mode="r").attrs)["settings"]
    assert type(settings["noise_seed"]) is int and type(dict(zarr.open_group(acts, mode="r").attrs)["selection"]["per_class"]) is int
    argv = ["extract", str(tmp_path / "img.zarr"), "-o", acts, "--layers", "midblock", "--preset", "tiny-random", "--device", "cpu",
            "--per-class", "2", "--seed", "5", "--shard-size", "16"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "schemas", *argv], capture_output=True, text=True)
    assert done.returncode == 0 and "already complete" in done.stdout + done.stderr, done.stderr


def test_the_command_line_refuses_a_report_site_in_memory(sample, monkeypatch, capsys):
    """memory:// ends with the command's process: the report site, like every other output, is refused there."""
    monkeypatch.chdir(sample)
    assert imzarr_main(["report", "missing.zarr", "-o", "memory://site"]) == 2
    assert "memory:// lives only as long as this process" in capsys.readouterr().err

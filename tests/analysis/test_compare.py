"""compare_stores: overall and per-class metrics equal reference computations on the stored values, pooling and
flattening of unpooled layers, the Zarr report, the terminal table, the PNG, and clear errors."""

import importlib.util
import json
import io
import os
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr
from PIL import Image

from extractor.analysis import compare as compare_module
from extractor.analysis.compare import CompareError, LayerMismatchError, NonFiniteFeaturesError, compare_stores, format_report_table
from extractor.analysis.plots import PlotError
from schemas.api import store_info, verify_store_files
from schemas.classes import class_table
from tests.support.reference_metrics import reference_fd_of_samples, reference_prdc
from tests.support.synthetic import write_activation_store

DIM = 8
MODES = 4
PER_MODE = 20
FULL, HALF, QUARTER, TINY, REAL_ONLY = 1, 7, 42, 300, 99  # labels: how many of the real modes the fakes cover


def mode_centres(label):
    rng = np.random.default_rng(label)
    return rng.normal(0, 1, (MODES, DIM)) * 0.3 + np.eye(MODES, DIM) * 12 + label * 0.5


def sample_class(rng, label, modes, per_mode):
    centres = mode_centres(label)[list(modes)]
    return np.concatenate([c + rng.normal(0, 1, (per_mode, DIM)) for c in centres])


def make_features(seed=0):
    """Real: every class has 4 separated modes. Fake: FULL covers all 4, HALF 2, QUARTER 1; TINY has 3 per side."""
    rng = np.random.default_rng(seed)
    real_parts, fake_parts, real_labels, fake_labels = [], [], [], []
    for label, fake_modes in ((FULL, range(4)), (HALF, range(2)), (QUARTER, range(1))):
        real_parts.append(sample_class(rng, label, range(4), PER_MODE))
        real_labels += [label] * (MODES * PER_MODE)
        per_mode = MODES * PER_MODE // len(fake_modes) - 3  # similar class sizes on both sides, not equal
        fake_parts.append(sample_class(rng, label, fake_modes, per_mode))
        fake_labels += [label] * (per_mode * len(fake_modes))
    real_parts += [sample_class(rng, TINY, [0], 3), sample_class(rng, REAL_ONLY, [0], 10)]
    real_labels += [TINY] * 3 + [REAL_ONLY] * 10
    fake_parts.append(sample_class(rng, TINY, [0], 3))
    fake_labels += [TINY] * 3
    real, fake = np.concatenate(real_parts), np.concatenate(fake_parts)
    real_labels, fake_labels = np.array(real_labels), np.array(fake_labels)
    # Shuffle so classes are interleaved across blocks, as in a real store.
    pr, pf = rng.permutation(len(real)), rng.permutation(len(fake))
    return real[pr], real_labels[pr], fake[pf], fake_labels[pf]


def store(path, features, labels, dtype="float16", pooling=None, layer="feat"):
    url = str(path)
    write_activation_store(url, labels, lambda a, b: features[a:b], features.shape[1:], layer=layer, dtype=dtype, shard=64, pooling=pooling)
    return url


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    real, real_labels, fake, fake_labels = make_features()
    real_url = store(root / "real.zarr", real, real_labels, dtype="float16")
    fake_url = store(root / "fake.zarr", fake, fake_labels, dtype="float32")
    # The metrics see what was stored: float16 rounding included.
    return real_url, fake_url, real.astype(np.float16).astype(np.float64), real_labels, fake, fake_labels, root


def test_overall_fd_of_few_samples_is_exact(tmp_path):
    """Fewer samples than dimensions: the overall FD comes from the exact n×n form, not the rank-deficient
    covariances (whose square root amplified the float32 products' rounding into a negative FD)."""
    rng = np.random.default_rng(11)
    labels = np.repeat([1, 2], 30)
    x = rng.integers(64, 128, size=(60, 256)) / 64  # multiples of 1/64 below 4: float16 holds them and x + 0.25
    a, b = store(tmp_path / "a.zarr", x, labels), store(tmp_path / "b.zarr", x, labels)
    assert abs(compare_stores(a, b, "feat", metrics="fd", per_class=False).attrs["fd"]) < 1e-9
    c = store(tmp_path / "c.zarr", x + 0.25, labels)  # the same covariance, the mean moved by 0.25 in 256 dims
    assert compare_stores(a, c, "feat", metrics="fd", per_class=False).attrs["fd"] == pytest.approx(256 * 0.25**2, rel=1e-9)


def test_report_records_absolute_store_paths(stores, monkeypatch):
    real_url, fake_url, *_, root = stores
    monkeypatch.chdir(root)
    a = compare_stores("real.zarr", "fake.zarr", "feat", metrics="fd", per_class=False).attrs
    assert a["real_store"] == os.path.abspath(real_url) and a["fake_store"] == os.path.abspath(fake_url)


def test_info_and_verify_describe_and_check_a_report(stores, tmp_path):
    real_url, fake_url, *_ = stores
    out = str(tmp_path / "report.zarr")
    compare_stores(real_url, fake_url, "feat", metrics="fd", output=out)
    info = store_info(out)
    assert info.damage == [] and "data files   all present" in info.text
    lines = info.summary.splitlines()
    assert lines[1] == "schema       imzarr.compare/1" and "array        fd  float64  4  (label)" in lines
    assert any(line.split() == ["real_store", os.path.abspath(real_url)] for line in lines)
    clean = verify_store_files(out)
    assert clean.result.recorded and clean.note is None and clean.damage_lines == [] and clean.result.files > 0
    fd_chunk = tmp_path / "report.zarr" / "fd" / "c" / "0"
    data = bytearray(fd_chunk.read_bytes())
    data[-1] ^= 0xFF
    fd_chunk.write_bytes(bytes(data))
    assert [line.split(": ", 1)[1].split(":")[0] for line in verify_store_files(out).damage_lines] == ["checksum mismatch"]


def test_runs_on_threads_beside_a_client_and_consolidates_its_checksums(stores, tmp_path):
    """README: locally every writer runs a threaded scheduler. A dask.distributed Client made the default in the
    notebook would otherwise get the work, on workers without this process's credentials or memory stores."""
    from distributed import Client, get_task_stream

    real_url, fake_url, *_ = stores
    out = str(tmp_path / "report.zarr")
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client, get_task_stream(client) as tasks:
        compare_stores(real_url, fake_url, "feat", metrics="fd", output=out)
        again = compare_stores(real_url, fake_url, "feat", metrics="fd", output=out)  # found complete: read with dask
    assert tasks.data == [] and "fd" in again.attrs
    group = zarr.open_group(out, mode="r")  # consolidated metadata, as xr.open_zarr reads it
    assert "_checksums" in group and group["_checksums"]["fd"].shape == (1,)


def test_a_rerun_with_the_same_inputs_and_settings_does_nothing(stores, tmp_path):
    real_url, fake_url = (shutil.copytree(url, tmp_path / "in" / os.path.basename(url)) for url in stores[:2])
    for url in (real_url, fake_url):
        zarr.open_group(str(url), mode="r+").attrs["generation"] = os.path.basename(url).ljust(32, "0")  # as writers give
    real_url, fake_url = str(real_url), str(fake_url)
    out, png = str(tmp_path / "out" / "report.zarr"), str(tmp_path / "out" / "report.png")
    os.mkdir(tmp_path / "out")
    first = compare_stores(real_url, fake_url, "feat", metrics="fd,kid", output=out, plot=png)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    log = io.StringIO()
    again = compare_stores(real_url, fake_url, "feat", metrics="fd,kid", output=out, plot=png, log=log)
    assert log.getvalue() == f"[compare] {out}: already complete (same inputs and settings); nothing to do\n"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == files
    assert again.attrs["fd"] == first.attrs["fd"] and again.attrs["settings_fingerprint"] == first.attrs["settings_fingerprint"]
    xr.testing.assert_identical(again.drop_attrs(), first.drop_attrs())
    # Another option, a missing plot, or an input rewritten (a new generation id): the comparison runs again.
    for changes in ({"k": 3}, {"plot": str(tmp_path / "out" / "other.png")}):
        log = io.StringIO()
        compare_stores(real_url, fake_url, "feat", **({"metrics": "fd,kid", "output": out, "plot": png} | changes), log=log)
        assert "already complete" not in log.getvalue()
    group = zarr.open_group(fake_url, mode="r+")
    generation = group.attrs["generation"]
    group.attrs["generation"] = "0" * 32
    try:
        log = io.StringIO()
        compare_stores(real_url, fake_url, "feat", metrics="fd,kid", output=out, plot=png, log=log)
        assert "already complete" not in log.getvalue()
    finally:
        group.attrs["generation"] = generation


def test_overall_and_per_class_equal_references(stores):
    real_url, fake_url, real, real_labels, fake, fake_labels, root = stores
    log = io.StringIO()
    ds = compare_stores(real_url, fake_url, "feat", k=5, block_size=50, log=log)  # blocks do not divide the sizes
    a = ds.attrs
    assert f"[compare] 1 class only in the real store, so in no per-class row: {REAL_ONLY} {class_table().names[REAL_ONLY]}\n" in log.getvalue()
    assert a["n_real"] == len(real) and a["n_fake"] == len(fake) and a["k"] == 5 and a["layer"] == "feat" and a["pool"] == "mean"
    assert a["real_store"] == real_url and a["fake_store"] == fake_url
    assert a["fd"] == pytest.approx(reference_fd_of_samples(real, fake), rel=1e-6)
    overall = reference_prdc(real, fake, 5)
    for name, value in overall.items():
        # float32 blocked distances: at most one sample on a ball's edge may flip
        assert a[name] == pytest.approx(value, abs=1.01 / min(len(real), len(fake))), name
    assert a["classes_only_in_real"] == 1 and a["classes_only_in_fake"] == 0

    assert ds["label"].values.tolist() == [FULL, HALF, QUARTER, TINY]
    names = class_table().names
    assert ds["class_name"].values.tolist() == [names[c] for c in (FULL, HALF, QUARTER, TINY)]
    for label in (FULL, HALF, QUARTER):
        row = ds.sel(label=label)
        r, f = real[real_labels == label], fake[fake_labels == label]
        assert int(row.n_real) == len(r) and int(row.n_fake) == len(f)
        assert float(row.fd) == pytest.approx(reference_fd_of_samples(r, f), rel=1e-6)
        for name, value in reference_prdc(r, f, 5).items():
            assert float(row[name]) == pytest.approx(value, abs=1e-12), (label, name)
        assert str(row.note.values) == ""
    cov = ds["coverage"].sel(label=[FULL, HALF, QUARTER]).values
    assert cov[0] > cov[1] > cov[2]  # all modes > half of them > a quarter
    assert cov[0] > 0.9 and 0.35 < cov[1] < 0.65 and cov[2] < 0.4
    tiny = ds.sel(label=TINY)
    assert np.isnan(float(tiny.coverage)) and np.isnan(float(tiny.precision)) and "k+1=6" in str(tiny.note.values)
    assert np.isfinite(float(tiny.fd))  # 3 samples per side are enough for a (rank-2) Fréchet distance


def test_report_zarr_table_and_png(stores):
    real_url, fake_url, *_, root = stores
    out, png = str(root / "report.zarr"), root / "report.png"
    ds = compare_stores(real_url, fake_url, "feat", output=out, plot=str(png))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no consolidated-metadata or string-dtype warnings
        back = xr.open_zarr(out)
    assert back.attrs["fd"] == ds.attrs["fd"] and back.attrs["schema"] == "imzarr.compare/1"
    np.testing.assert_array_equal(back["coverage"].values, ds["coverage"].values)
    assert list(back["synset"].values) == list(ds["synset"].values)  # vlen strings (StringDType) read back

    table = format_report_table(ds, worst=2)
    lines = table.splitlines()
    assert any(line.startswith("overall  FD") for line in lines)
    header = next(i for i, line in enumerate(lines) if "n_real" in line)
    worst = lines[header + 1 : header + 3]
    wnids = class_table().wnids
    assert wnids[QUARTER] in worst[0] and wnids[HALF] in worst[1]  # the worst-covered class first
    assert "1 class has too few samples" in table

    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1800, 900)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
    # Coverage bars in orange, and the untrained model's warning in red below the panels.
    assert ((pixels[..., 0] > 240) & (pixels[..., 1] > 140) & (pixels[..., 1] < 175) & (pixels[..., 2] < 90)).sum() > 50
    bottom = pixels[-40:]
    assert ((bottom[..., 0] > 190) & (bottom[..., 1] < 70) & (bottom[..., 2] < 70)).sum() > 100


def test_table_ranks_by_fd_where_no_class_has_a_coverage_and_names_a_missing_sigma(stores):
    """Classes too small for k-NN metrics (coverage NaN everywhere) still list, worst FD first; a feature
    network's report (no σ recorded) says so instead of '?'."""
    real_url, fake_url, *_ = stores
    ds = compare_stores(real_url, fake_url, "feat").load()
    ds["coverage"][:] = np.nan
    del ds.attrs["sigma"]
    lines = format_report_table(ds, worst=2).splitlines()
    assert "σ = none (clean images))" in lines[0]
    header = next(i for i, line in enumerate(lines) if "n_real" in line)
    assert lines[header - 1].endswith("2 worst fd first") and len(lines) > header + 2
    worst = np.argsort(ds["fd"].values)[::-1][:2]
    for line, i in zip(lines[header + 1 : header + 3], worst):
        assert str(ds["synset"].values[i]) in line


def test_report_states_its_provenance(stores, tmp_path):
    """Model (preset/checkpoint, short sha256, trained), σ, layer and module, both stores: in the report and table."""
    real_url, fake_url, *_ = stores
    ds = compare_stores(real_url, fake_url, "feat", per_class=False)
    a = ds.attrs
    assert a["real_store"] == real_url and a["fake_store"] == fake_url and a["layer"] == "feat"
    assert a["module_path"] == "synthetic.feat" and a["sigma"] == 80.0 and a["trained"] is False
    assert "UNTRAINED" in a["model"] and a["real_trained"] is False
    table = format_report_table(ds)
    assert "UNTRAINED" in table and "synthetic.feat" in table and "σ = 80.0" in table

    rng = np.random.default_rng(3)
    labels = np.repeat([1, 2], 10)
    trained = {"name": "ckpt", "preset": None, "checkpoint": "/ckpt/dmd2/pytorch_model.bin", "sha256": "f" * 64, "trained": True}
    a_url = store(tmp_path / "a.zarr", rng.normal(size=(20, 4)), labels)
    b_url = write_activation_store(str(tmp_path / "b.zarr"), labels, lambda a, b: rng.normal(size=(b - a, 4)), (4,), layer="feat", shard=64, sigma=0.5, model=trained)
    mixed = compare_stores(a_url, b_url, "feat", per_class=False).attrs
    assert mixed["trained"] is False and mixed["fake_trained"] is True
    assert mixed["fake_model"] == "checkpoint …/dmd2/pytorch_model.bin, sha256 ffffffffffff, trained"
    assert mixed["fake_model_sha256"] == "f" * 64  # the whole hash, that a file can be checked against
    assert "imzarr" in json.loads(mixed["versions"]) and "fake_noise_seed" not in mixed  # these stores record no noise
    assert mixed["model"].startswith("real: synthetic") and "generated: checkpoint" in mixed["model"]
    assert mixed["sigma"] == "real 80.0, generated 0.5"
    # One layer name on two networks may be two modules: both are named, not the real side's alone.
    group = zarr.open_group(b_url, mode="r+")
    group.attrs["layers"] = {"feat": "model.dec.8x8_in0"}
    group["feat"].update_attributes({"module_path": "model.dec.8x8_in0"})
    group.attrs["noise"] = {"seed": 7, "recipe": "splitmix64-box-muller/2"}
    zarr.consolidate_metadata(b_url)
    other = compare_stores(a_url, b_url, "feat", per_class=False).attrs
    assert other["module_path"] == "real: synthetic.feat; generated: model.dec.8x8_in0" and other["fake_noise_seed"] == 7
    assert "real: synthetic.feat; generated: model.dec.8x8_in0" in format_report_table(compare_stores(a_url, b_url, "feat", per_class=False))


def test_report_variables_describe_themselves(stores):
    real_url, fake_url, *_ = stores
    ds = compare_stores(real_url, fake_url, "feat")
    for name in ds.variables:
        assert ds[name].attrs.get("long_name") and ds[name].attrs.get("description"), name


def test_large_classes_take_the_blocked_path(stores, monkeypatch):
    real_url, fake_url, *_ = stores
    in_memory = compare_stores(real_url, fake_url, "feat", block_size=32)
    monkeypatch.setattr(compare_module, "IN_MEMORY_CLASS_ROWS", 30)
    blocked = compare_stores(real_url, fake_url, "feat", block_size=32)
    for name in ("fd", "precision", "recall", "density", "coverage"):
        np.testing.assert_allclose(blocked[name].values, in_memory[name].values, rtol=1e-6, atol=0.02, err_msg=name)


def test_unpooled_layers_mean_max_and_flatten(tmp_path):
    rng = np.random.default_rng(1)
    labels_r, labels_f = np.repeat([3, 5], 40), np.repeat([3, 5], 35)
    maps_r = rng.normal(size=(80, 4, 3, 3)) + labels_r[:, None, None, None]
    maps_f = rng.normal(size=(70, 4, 3, 3)) * 1.3 + labels_f[:, None, None, None]
    ur = store(tmp_path / "r.zarr", maps_r, labels_r, dtype="float32")
    uf = store(tmp_path / "f.zarr", maps_f, labels_f, dtype="float32")
    for pool, reduce in (("mean", lambda m: m.mean(axis=(2, 3))), ("max", lambda m: m.max(axis=(2, 3))), ("none", lambda m: m.reshape(len(m), -1))):
        ds = compare_stores(ur, uf, "feat", pool=pool, block_size=16)
        r, f = reduce(maps_r.astype(np.float32)).astype(np.float64), reduce(maps_f.astype(np.float32)).astype(np.float64)
        assert ds.attrs["pool"] == pool
        assert ds.attrs["fd"] == pytest.approx(reference_fd_of_samples(r, f), rel=1e-5), pool
        assert ds.attrs["coverage"] == pytest.approx(reference_prdc(r, f, 5)["coverage"], abs=1.01 / 70), pool
    # A store pooled at extraction compares with an unpooled one reduced the same way, and not with another way.
    pooled = store(tmp_path / "p.zarr", maps_f.astype(np.float32).mean(axis=(2, 3)), labels_f, dtype="float32", pooling="mean")
    mixed = compare_stores(ur, pooled, "feat", pool="mean")
    assert mixed.attrs["fd"] == pytest.approx(compare_stores(ur, uf, "feat", pool="mean").attrs["fd"], rel=1e-6)
    with pytest.raises(LayerMismatchError, match="pooled 'mean' at extraction"):
        compare_stores(ur, pooled, "feat", pool="max")
    # Two pooled stores: a --pool other than theirs is refused, not ignored; none given, or theirs, compares.
    for other_pool in ("max", "none"):
        with pytest.raises(LayerMismatchError, match=f"p.zarr: layer feat was pooled 'mean' at extraction, so --pool {other_pool} "):
            compare_stores(pooled, pooled, "feat", pool=other_pool)
    assert compare_stores(pooled, pooled, "feat").attrs["fd"] == compare_stores(pooled, pooled, "feat", pool="mean").attrs["fd"]
    # A layer that is one vector per sample by itself (pool3, logits: its own `pooling` is "none") takes any --pool.
    zarr.open_array(pooled, path="feat", mode="r+").update_attributes({"pooling": "none"})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(pooled)
    assert compare_stores(pooled, pooled, "feat", pool="max").attrs["fd"] == compare_stores(pooled, pooled, "feat").attrs["fd"]


def test_errors_name_store_and_reason(tmp_path, stores):
    real_url, fake_url, *_ = stores
    labels = np.repeat([1, 2], 10)
    other = store(tmp_path / "other.zarr", np.zeros((20, 5)), labels, layer="midblock")
    with pytest.raises(LayerMismatchError, match=r"no layer 'feat'; this generated store has \['midblock'\]"):
        compare_stores(real_url, other, "feat")
    wider = store(tmp_path / "wider.zarr", np.zeros((20, DIM + 1)), labels)
    with pytest.raises(LayerMismatchError, match="features differ"):
        compare_stores(real_url, wider, "feat")
    huge = store(tmp_path / "huge.zarr", np.zeros((8, 520, 3, 3), dtype=np.float16), np.arange(8))
    with pytest.raises(LayerMismatchError, match="4680 values per sample.*--pool mean"):
        compare_stores(huge, huge, "feat", pool="none")
    bad = np.random.default_rng(0).normal(size=(20, DIM))
    bad[13, 2] = np.inf  # what float16 storage makes of values beyond ±65504
    overflow = store(tmp_path / "inf.zarr", bad, labels)
    with pytest.raises(NonFiniteFeaturesError, match="first at sample 13"):
        compare_stores(real_url, overflow, "feat")
    with pytest.raises(CompareError, match="pool must be one of"):
        compare_stores(real_url, fake_url, "feat", pool="median")
    with pytest.raises(PlotError, match="projection must be one of"):
        compare_stores(real_url, fake_url, "feat", plot=str(tmp_path / "x.png"), projection="tsne")
    if importlib.util.find_spec("umap") is None:
        with pytest.raises(PlotError, match="umap-learn"):
            compare_stores(real_url, fake_url, "feat", plot=str(tmp_path / "x.png"), projection="umap")


def test_without_per_class(stores, tmp_path):
    real_url, fake_url, *_ = stores
    out = str(tmp_path / "overall.zarr")
    ds = compare_stores(real_url, fake_url, "feat", per_class=False, output=out)
    assert ds.sizes["label"] == 0 and ds.attrs["per_class"] is False
    assert xr.open_zarr(out).attrs["coverage"] == ds.attrs["coverage"]
    assert format_report_table(ds).splitlines()[-1].startswith("overall")
    checked = verify_store_files(out)  # empty per-class arrays: an empty checksum record each, on every zarr
    assert checked.result.recorded and checked.damage_lines == [] and store_info(out).damage == []


def test_kid_on_few_samples_says_its_subsets_repeat(tmp_path):
    """Fewer samples than the 1,000 of a KID subset: the subsets shrink to the smaller side, and where that takes
    both sides whole the 100 subsets are one (± 0 is no spread): the log says so."""
    rng = np.random.default_rng(1)
    stores = [write_activation_store(str(tmp_path / f"{n}.zarr"), np.zeros(n, np.int64), lambda a, b: rng.random((b - a, 8)), (8,), layer="pool3") for n in (30, 30, 45)]
    log = io.StringIO()
    same = compare_stores(stores[0], stores[1], "pool3", metrics="kid", log=log)
    assert same.attrs["kid_std"] == 0 and same.attrs["kid_subset_size"] == 30
    assert "KID: subsets of 30 take every sample of both sides (30 real, 30 generated), so the 100 subsets are one and ± 0 is no spread" in log.getvalue()
    log = io.StringIO()
    compare_stores(stores[2], stores[0], "pool3", metrics="kid", log=log)
    assert "KID: subsets of 30, not 1000: a side has only 30 samples (recorded as kid_subset_size)" in log.getvalue()


def test_plot_never_replaces_a_file_that_is_not_a_png(stores, tmp_path):
    from extractor.analysis.compare import compare_options
    from schemas.output_paths import ExistingFileError

    real_url, fake_url = stores[0], stores[1]
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExistingFileError, match=r"notes\.txt: exists and is not a PNG image"):
        compare_options([real_url, fake_url], layer="feat", plot=str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "keep me"

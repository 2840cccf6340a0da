"""Reference statistics, KID and Inception Score against the implementations papers use.

How `fixtures/metrics_ref.npz` was made (the generator holds reference code, so it is not part of the repository):

- Features: `real` (300 × 64) and `fake` (250 × 64) float16, |N(0,1)·M·s + c| plus a per-class offset, with
  shuffled labels of classes 1, 7, 42 (real 100/120/80, fake 90/60/100); `logits` (100 × 1008) float16 normal
  values with a shared per-class offset. All drawn from numpy default_rng(24).
- Stores of those features (tests/support/synthetic.write_activation_store, layer `pool3`) went through this project's
  `statistics(store, layer="pool3", output=ref_real.npz / ref_fake.npz)`.
- In a separate venv (Python 3.11, torch 2.14.1, numpy 2.4.6, scipy 1.17.1) with pytorch-fid 0.3.0 and
  torch-fidelity 0.4.0: `pytorch_fid_fd_store` = pytorch-fid's `calculate_frechet_distance` of the
  `compute_statistics_of_path("ref_real.npz", …)` (pytorch-fid reading our file) against np.mean / np.cov of the
  fake features (what its `calculate_activation_statistics` does with activations); `pytorch_fid_fd_files` the same
  with both of our files. `kid_*`: torch-fidelity's `kid_features_to_metric(real, fake)` on float64 tensors of the features
  (kid_subsets 10, kid_subset_size 100, rng_seed 2020, poly kernel degree 3, coef0 1, gamma 1/D), overall and per
  class with subset size min(100, class counts). `isc_*`: torch-fidelity's `isc_features_to_metric` on the float64
  logits (10 splits, shuffle, rng_seed 2020).

EDM's formula (fid.py: m = ||μ−μ_ref||², s = sqrtm(Σ·Σ_ref), FID = m + Tr(Σ + Σ_ref − 2 s.real)) is computed here
with SciPy from the files our `stats` writes.
"""

from __future__ import annotations

import io
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import xarray as xr

from extractor.analysis import GaussianAccumulator, inception_score, kid, read_reference, statistics, store_inception_score
from extractor.analysis.compare import (
    CompareError,
    LayerMismatchError,
    compare_options,
    compare_stores,
    compare_to_reference,
    format_report_table,
    open_report,
    write_report,
)
from extractor.analysis.kernel_inception_distance import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS
from extractor.analysis.reference_statistics import InsufficientSpaceError, OutputExistsError, ReferenceFileError, per_class_bytes
from extractor.cli import main as extractor_main
from schemas.api import verify_store_files
from tests.support.synthetic import write_activation_store

from tests.support.locations import FIXTURES  # noqa: E402

FIXTURE = FIXTURES / "metrics_ref.npz"
RTOL = 1e-6


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def stores(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("refmetrics")
    real = write_activation_store(str(root / "real.zarr"), ref["real_labels"], lambda a, b: ref["real"][a:b], (64,), layer="pool3", shard=128)
    fake = write_activation_store(str(root / "fake.zarr"), ref["fake_labels"], lambda a, b: ref["fake"][a:b], (64,), layer="pool3", shard=128)
    logits = write_activation_store(str(root / "logits.zarr"), np.zeros(100, np.int64), lambda a, b: ref["logits"][a:b], (1008,), layer="logits", shard=64)
    return real, fake, logits, root


def edm_fid(mu, sigma, mu_ref, sigma_ref):
    m = np.square(mu - mu_ref).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))  # EDM passes disp=False, deprecated in SciPy 1.17 (same value)
    return float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))


def test_reference_file_is_what_fid_tools_read(ref, stores):
    real, fake, _, root = stores
    out = str(root / "ref.npz")
    result = statistics(real, layer="pool3", output=out)
    with np.load(out) as f:  # no allow_pickle: as pytorch-fid and EDM open it
        assert set(f.files) == {"mu", "sigma", "imzarr"}
        mu, sigma = f["mu"], f["sigma"]
        meta = json.loads(str(f["imzarr"]))
    assert mu.dtype == np.float64 and mu.shape == (64,) and sigma.dtype == np.float64 and sigma.shape == (64, 64)
    x = ref["real"].astype(np.float64)
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=0, atol=1e-6 * np.abs(sigma).max())
    assert meta == {"store": real, "layer": "pool3", "module_path": "synthetic.pool3", "pool": "mean", "count": 300, "dim": 64,
                    "model": "synthetic, sha256 ?, UNTRAINED (random weights)", "sigma": 80.0}
    assert result.statistics.count == 300


def test_fd_against_reference_equals_pytorch_fid_and_edm(ref, stores):
    real, fake, _, root = stores
    real_npz, fake_npz = str(root / "r.npz"), str(root / "f.npz")
    statistics(real, layer="pool3", output=real_npz)
    statistics(fake, layer="pool3", output=fake_npz)
    report = compare_to_reference(fake, real_npz, "pool3", output=str(root / "vs_ref.zarr"))
    fd = report.attrs["fd"]
    assert fd == pytest.approx(float(ref["pytorch_fid_fd_store"]), rel=RTOL)
    assert fd == pytest.approx(float(ref["pytorch_fid_fd_files"]), rel=RTOL)
    r, f = read_reference(real_npz), read_reference(fake_npz)
    assert fd == pytest.approx(edm_fid(f.mu, f.sigma, r.mu, r.sigma), rel=RTOL)
    back = open_report(str(root / "vs_ref.zarr"))
    assert back.attrs["reference_sha256"] == hashlib.sha256(Path(real_npz).read_bytes()).hexdigest()
    assert back.attrs["reference"] == real_npz and back.attrs["reference_dim"] == 64 and back.attrs["fd"] == fd  # full float64
    both = compare_stores(real, fake, "pool3", metrics="fd", per_class=False)
    assert both.attrs["fd"] == pytest.approx(fd, rel=1e-9)
    assert "reference" in format_report_table(report)


def test_kid_equals_torch_fidelity_overall_and_per_class(ref, stores):
    real, fake, *_ = stores
    got = kid(ref["real"], ref["fake"], subsets=10, subset_size=100, seed=2020)
    assert got.mean == pytest.approx(float(ref["kid_mean"]), rel=RTOL) and got.std == pytest.approx(float(ref["kid_std"]), rel=RTOL)
    report = compare_stores(real, fake, "pool3", metrics="kid", kid_subsets=10, kid_subset_size=100)
    a = report.attrs
    assert a["kid"] == pytest.approx(float(ref["kid_mean"]), rel=RTOL) and a["kid_std"] == pytest.approx(float(ref["kid_std"]), rel=RTOL)
    assert (a["kid_subsets"], a["kid_subset_size"], a["kid_seed"]) == (10, 100, 2020)
    assert report["label"].values.tolist() == ref["kid_labels"].tolist()
    np.testing.assert_allclose(report["kid"].values, ref["kid_class_mean"], rtol=RTOL)
    np.testing.assert_allclose(report["kid_std"].values, ref["kid_class_std"], rtol=RTOL)
    assert report["kid_subset_size"].values.tolist() == ref["kid_class_size"].tolist()
    assert "fd" not in report and "coverage" not in report and "precision" not in a
    assert (KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED) == (100, 1000, 2020)  # torch-fidelity's defaults


def test_inception_score_equals_torch_fidelity(ref, stores):
    *_, logits, _ = stores
    for got in (inception_score(ref["logits"]), store_inception_score(logits, block_size=7)):
        assert got.mean == pytest.approx(float(ref["isc_mean"]), rel=RTOL) and got.std == pytest.approx(float(ref["isc_std"]), rel=RTOL)
        assert (got.splits, got.seed, got.samples) == (10, 2020, 100)


def test_streamed_covariance_equals_numpy_float64():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(5003, 48)) @ rng.normal(size=(48, 48)) * 0.3 + np.linspace(0, 200, 48)).astype(np.float16)
    x = x[np.argsort(x[:, 0])]  # sorted rows: chunk means drift, which the pairwise merge must absorb
    acc = GaussianAccumulator(48, product_dtype=np.float32, chunk_bytes=48 * 4 * 700)
    for a in range(0, 5003, 999):
        acc.update(x[a : a + 999])
    exact = np.cov(x.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(acc.mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.cov, exact, rtol=0, atol=1e-6 * np.abs(exact).max())


def test_compare_metrics_choice_prdc_subset_and_label_dimension(stores, tmp_path):
    real, fake, *_ = stores
    ds = compare_stores(real, fake, "pool3", metrics=["prdc", "fd"], prdc_subset=200, prdc_seed=3)
    a = ds.attrs
    assert a["metrics"] == "fd,prdc" and (a["prdc_subset_real"], a["prdc_subset_fake"], a["prdc_seed"]) == (200, 200, 3)
    assert "kid" not in a and "kid" not in ds and set(ds.dims) == {"label"}
    assert list(ds.coords) == ["label", "synset", "class_name"]
    every = compare_stores(real, fake, "pool3", metrics="prdc", prdc_subset=0, per_class=False)
    assert (every.attrs["prdc_subset_real"], every.attrs["prdc_subset_fake"]) == (300, 250)
    again = compare_stores(real, fake, "pool3", metrics=["prdc", "fd"], prdc_subset=200, prdc_seed=3)
    assert again.attrs["coverage"] == a["coverage"]  # seeded
    with pytest.raises(CompareError, match="unknown"):
        compare_stores(real, fake, "pool3", metrics="fid")
    with pytest.raises(CompareError, match="need the real samples"):
        compare_to_reference(fake, "unused.npz", "pool3", metrics="fd,kid")
    with pytest.raises(CompareError, match="give two stores"):
        compare_options([fake], layer="pool3")
    with pytest.raises(CompareError, match="with --reference give one store"):
        compare_options([real, fake], layer="pool3", reference="ref.npz")
    with pytest.raises(CompareError, match="saved statistics .* have no samples to draw"):
        compare_options([fake], layer="pool3", reference="ref.npz", plot=str(tmp_path / "x.png"))


def test_reports_written_with_class_open_on_label(stores, tmp_path):
    real, fake, *_ = stores
    ds = compare_stores(real, fake, "pool3", metrics="fd", kid_subset_size=50)
    old = ds.rename({"label": "class"})
    path = str(tmp_path / "old.zarr")
    write_report(old, path)
    back = open_report(path)
    assert set(back.dims) == {"label"} and back["label"].values.tolist() == [1, 7, 42]
    np.testing.assert_array_equal(back["fd"].values, ds["fd"].values)
    assert back.sel(label=7)["synset"].item() == ds.sel(label=7)["synset"].item()


def test_mismatches_and_bad_files_are_one_line(stores, tmp_path, capsys):
    real, fake, logits, root = stores
    ref_npz = str(tmp_path / "ref.npz")
    statistics(real, layer="pool3", output=ref_npz)
    # D mismatch
    np.savez(tmp_path / "d32.npz", mu=np.zeros(32), sigma=np.eye(32))
    with pytest.raises(LayerMismatchError, match=r"D=32 features, but layer pool3 .* gives D=64"):
        compare_to_reference(fake, str(tmp_path / "d32.npz"), "pool3")
    # layer mismatch: imzarr's metadata names another layer
    other = write_activation_store(str(tmp_path / "other.zarr"), np.zeros(20, np.int64), lambda a, b: np.ones((b - a, 64)), (64,), layer="midblock")
    with pytest.raises(LayerMismatchError, match="statistics of layer pool3"):
        compare_to_reference(other, ref_npz, "midblock")
    np.savez(tmp_path / "bad.npz", m=np.zeros(3))
    with pytest.raises(ReferenceFileError, match="need `mu` and `sigma`"):
        read_reference(str(tmp_path / "bad.npz"))
    code = extractor_main(["compare", fake, "--reference", str(tmp_path / "d32.npz"), "--layer", "pool3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "D=32" in err[0]
    # outputs: never the input, never an existing file without --overwrite
    with pytest.raises(OutputExistsError, match="--overwrite"):
        statistics(real, layer="pool3", output=ref_npz)
    statistics(real, layer="pool3", output=ref_npz, overwrite=True)
    # --overwrite replaces only a reference file imzarr wrote: never an NPZ shard, a sample batch or another tool's file
    for name, members in {"shard.npz": {"data": np.zeros((2, 12), np.uint8), "labels": np.ones(2)}, "samples.npz": {"arr_0": np.zeros((2, 2, 2, 3), np.uint8)},
                          "fid.npz": {"mu": np.zeros(64), "sigma": np.eye(64)}}.items():
        np.savez(tmp_path / name, **members)
        before = (tmp_path / name).read_bytes()
        with pytest.raises(OutputExistsError, match=rf"{name}: exists and is not a reference file imzarr wrote \(holds \[.*\]\); --overwrite replaces only those"):
            statistics(real, layer="pool3", output=str(tmp_path / name), overwrite=True)
        assert (tmp_path / name).read_bytes() == before
    # a pooling mismatch says the way out that works: --pool for an unpooled store, extracting again for a pooled one
    np.savez(tmp_path / "max.npz", mu=np.zeros(64), sigma=np.eye(64), imzarr=np.array(json.dumps({"pool": "max"})))
    with pytest.raises(LayerMismatchError, match=r"'max'-reduced features, but .* gives pooled 'mean' at extraction; extract the layer again with --pool max"):
        compare_to_reference(fake, str(tmp_path / "max.npz"), "pool3")
    spatial = write_activation_store(str(tmp_path / "spatial.zarr"), np.zeros(20, np.int64), lambda a, b: np.ones((b - a, 64, 2, 2)), (64, 2, 2), layer="pool3")
    with pytest.raises(LayerMismatchError, match=r"'max'-reduced features, but .* gives spatial mean here; pass --pool max$"):
        compare_to_reference(spatial, str(tmp_path / "max.npz"), "pool3")
    # files that are no statistics say what they are
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ReferenceFileError, match=r"need `mu` and `sigma`; `arr_0` looks like images: convert them \(imzarr convert npz\)"):
        read_reference(str(tmp_path / "samples.npz"))
    np.savez(tmp_path / "objects.npz", mu=np.array([None, 1], dtype=object), sigma=np.eye(2))
    with pytest.raises(ReferenceFileError, match="holds pickled object arrays, which are not read"):
        read_reference(str(tmp_path / "objects.npz"))
    # a matrix that is no covariance
    for name, sigma, why in [("neg.npz", -np.eye(64), "64 negative variances"), ("asym.npz", np.eye(64) + np.triu(np.ones((64, 64)), 1), "not symmetric")]:
        np.savez(tmp_path / name, mu=np.zeros(64), sigma=sigma)
        with pytest.raises(ReferenceFileError, match=f"`sigma` is not a covariance: .*{why}"):
            read_reference(str(tmp_path / name))
    assert extractor_main(["stats", real, "--layer", "pool3", "-o", real + "/x.npz"]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    # a per-class store is a Zarr folder: never named .npz, never taken as a reference
    assert extractor_main(["stats", real, "--layer", "pool3", "--per-class", "-o", str(tmp_path / "pc.npz")]) == 2
    assert "per-class statistics are a Zarr store (a folder), not an .npz file" in capsys.readouterr().err
    assert not (tmp_path / "pc.npz").exists()
    statistics(real, layer="pool3", output=str(tmp_path / "pc.zarr"), per_class=True)
    assert extractor_main(["compare", fake, "--reference", str(tmp_path / "pc.zarr"), "--layer", "pool3"]) == 2
    assert "is a folder (a per-class statistics store?)" in capsys.readouterr().err


def test_cli_stats_and_compare_reference(stores, tmp_path, capsys):
    real, fake, logits, _ = stores
    out = str(tmp_path / "cli.npz")
    assert extractor_main(["stats", real, "--layer", "pool3", "-o", out]) == 0
    assert extractor_main(["compare", fake, "--reference", out, "--layer", "pool3", "-o", str(tmp_path / "r.zarr")]) == 0
    printed = capsys.readouterr().out
    assert "reference" in printed and "FD" in printed
    # a site shows samples: refused before any output with --reference, and for a report made against statistics
    argv = ["compare", fake, "--reference", out, "--layer", "pool3", "-o", str(tmp_path / "r2.zarr"), "--report", str(tmp_path / "site")]
    assert extractor_main(argv) == 2
    assert capsys.readouterr().err.strip() == "imzarr compare: error: --report shows real and generated samples side by side; saved statistics (--reference) have no samples to show"
    assert not (tmp_path / "r2.zarr").exists() and not (tmp_path / "site").exists()
    assert extractor_main(["report", str(tmp_path / "r.zarr"), "-o", str(tmp_path / "site")]) == 2
    assert f"r.zarr: compares a store with saved statistics ({out}), which have no samples to show" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()
    assert extractor_main(["stats", logits, "--inception-score"]) == 0
    assert "Inception Score" in capsys.readouterr().out


def test_per_class_statistics_store(ref, stores, tmp_path):
    real, *_ = stores
    out = str(tmp_path / "per_class.zarr")
    statistics(real, layer="pool3", output=out, per_class=True)
    ds = xr.open_zarr(out)
    assert ds.attrs["schema"] == "imzarr.statistics/1" and ds["label"].values.tolist() == [1, 7, 42]
    assert "_checksums" not in ds.variables and verify_store_files(out).result.recorded and verify_store_files(out).damage_lines == []
    assert ds["sigma"].dims == ("label", "feature", "feature_2") and ds["mu"].dtype == np.float64
    x, labels = ref["real"].astype(np.float64), ref["real_labels"]
    for c in (1, 7, 42):
        row = ds.sel(label=c)
        np.testing.assert_allclose(row["mu"].values, x[labels == c].mean(axis=0), rtol=1e-12)
        exact = np.cov(x[labels == c], rowvar=False)
        np.testing.assert_allclose(row["sigma"].values, exact, rtol=0, atol=1e-6 * np.abs(exact).max())
        assert int(row["count"]) == (labels == c).sum()
    assert per_class_bytes(1000, 2048) == 1000 * (2048 * 2048 + 2048) * 8


def test_per_class_refused_with_its_size_when_it_does_not_fit(stores, tmp_path, monkeypatch):
    real, *_ = stores
    import shutil as shutil_module

    from extractor.analysis import reference_statistics as statistics_module

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(statistics_module.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(InsufficientSpaceError, match=r"3 classes × 64² float64 take 0\.00 GB"):
        statistics(real, layer="pool3", output=str(tmp_path / "pc.zarr"), per_class=True)
    assert not (tmp_path / "pc.zarr").exists()


def test_compare_records_the_inception_score_of_the_generated_store(ref, stores, tmp_path):
    *_, logits, _ = stores
    ref_npz = str(tmp_path / "logits.npz")
    statistics(logits, layer="logits", output=ref_npz)
    report = compare_to_reference(logits, ref_npz, "logits", metrics="fd,is", output=str(tmp_path / "is.zarr"))
    a = open_report(str(tmp_path / "is.zarr")).attrs
    assert a["inception_score"] == pytest.approx(float(ref["isc_mean"]), rel=RTOL) and a["inception_score_std"] == pytest.approx(float(ref["isc_std"]), rel=RTOL)
    assert (a["inception_score_splits"], a["inception_score_seed"], a["inception_score_layer"]) == (10, 2020, "logits")
    assert abs(report.attrs["fd"]) < 1e-6 * np.trace(read_reference(ref_npz).sigma)  # a store against its own statistics
    assert "IS " in format_report_table(report)


def test_reference_of_another_sigma_or_model_is_said_and_recorded(ref, tmp_path):
    """imzarr's statistics record the model and σ of their features; a generated store of another σ or network is
    compared (as two stores are), and the log and the report say both."""
    import io

    real = write_activation_store(str(tmp_path / "r.zarr"), ref["real_labels"], lambda a, b: ref["real"][a:b], (64,), layer="pool3", sigma=0.5)
    fake = write_activation_store(str(tmp_path / "f.zarr"), ref["fake_labels"], lambda a, b: ref["fake"][a:b], (64,), layer="pool3", sigma=80.0,
                                  model={"name": "other", "preset": "other", "trained": True})
    out = str(tmp_path / "ref.npz")
    statistics(real, layer="pool3", output=out)
    assert read_reference(out).metadata["sigma"] == 0.5
    log = io.StringIO()
    report = compare_to_reference(fake, out, "pool3", log=log)
    assert "[compare] sigma differs: reference 0.5, generated 80.0 (the FD measures that difference too)" in log.getvalue()
    assert report.attrs["sigma"] == "reference 0.5, generated 80.0" and report.attrs["model"].startswith("reference synthetic")
    assert report.attrs["reference"] == out
    same = compare_to_reference(real, out, "pool3", log=(quiet := io.StringIO()))
    assert same.attrs["sigma"] == 0.5 and "differs" not in quiet.getvalue()


def test_inception_score_without_logits_is_refused_before_the_other_metrics(stores, tmp_path):
    """A store without the logits layer: refused before the FD's pass over the features (metadata only)."""
    real, *_ = stores
    log = io.StringIO()
    with pytest.raises(LayerMismatchError, match=r"no layer 'logits'"):
        compare_stores(real, real, "pool3", metrics="fd,is", log=log)
    assert "samples" not in log.getvalue() and "FD" not in log.getvalue(), log.getvalue()

"""Extractor: values equal a direct forward, independent of batching and scheduling; resumable; clear errors."""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import dask.array
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import LocalCluster

from extractor.cli import main as extractor_main
from extractor.extraction import ExtractOptions, extract
from extractor.forward import (
    DEFAULT_NOISE_SEED,
    DEFAULT_SIGMA,
    ForwardSettings,
    PreparedForward,
    RunOptions,
    ieee_float32_convolutions,
    resolve_forward,
)
from extractor.integrity import IntegrityError
from extractor.models import EDMPrecond, LayerCapture, LoadedModel, ModelSpec, autocast_context, build_preset, cached_model
from extractor.shard_forward import nonfinite_rows
from extractor.store_attrs import LabelRangeError, NoiseRecipeError
from extractor.noise import LEGACY_NOISE_RECIPE, NOISE_RECIPE, per_sample_noise
from extractor.selection import SelectionSpec
from schemas.activation_store import activation_inner_chunk, validate_activation_store
from schemas.image_store import validate_image_store
from schemas.task_runner import SchedulerError, SchedulerSpec, UnsatisfiableResourcesError
from tests.support.tolerances import BF16_LAYER_TOLERANCE, BF16_OUTPUT_TOLERANCE
from tests.support.stand_in import StandInNetwork, serving

PRESET = ModelSpec(preset="tiny-random")
LAYERS = ("encoder_bottleneck", "model.enc.32x32_block0")


def direct_forward(store_url, positions, layers, sigma=80.0, seed=0, pool="none"):
    """The reference: the network called directly with hooks written here, on the same inputs."""
    model = build_preset("tiny-random").eval()
    store = validate_image_store(store_url)
    images = store.image[:][positions]
    gidx = store.coordinate("global_index")[positions]
    labels = store.coordinate("label")[positions]
    x = torch.from_numpy(images).float() / 127.5 - 1
    if seed is not None:
        x = x + sigma * per_sample_noise(seed, gidx, (3, 64, 64), "cpu")
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), 1000).float()
    paths = {"encoder_bottleneck": "model.enc.16x16_block0", "midblock": "model.dec.16x16_in0"}
    got = {}
    handles = [
        model.get_submodule(paths.get(name, name)).register_forward_hook(lambda m, i, o, name=name: got.__setitem__(name, o))
        for name in layers
    ]
    with torch.no_grad():
        out = model(x, torch.full((len(positions),), sigma), one_hot)
    for h in handles:
        h.remove()
    if pool == "mean":
        got = {k: v.mean(dim=(2, 3)) for k, v in got.items()}
    elif pool == "max":
        got = {k: v.amax(dim=(2, 3)) for k, v in got.items()}
    recon = ((out + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return {k: v.numpy() for k, v in got.items()}, recon


def run(image_store, out, batch_size=64, **kw):
    selection = kw.pop("selection", SelectionSpec())
    scheduler = kw.pop("scheduler", SchedulerSpec())
    shard = kw.pop("shard_size", 32)
    fwd = ForwardSettings(model=kw.pop("model", PRESET), layers=kw.pop("layers", LAYERS), **kw)
    return extract(ExtractOptions(image_store, str(out), fwd, selection, RunOptions(batch_size, "cpu", scheduler, shard_size=shard)))


def test_provenance_records_absolute_paths_whatever_the_working_folder(image_store, tmp_path, monkeypatch):
    """Relative paths on the command line: the store records where its images are from any folder (a notebook
    elsewhere finds them), not the path as typed."""
    monkeypatch.chdir(os.path.dirname(image_store))
    run(os.path.basename(image_store), os.path.relpath(tmp_path / "rel.zarr"), layers=("midblock",), selection=SelectionSpec(num_samples=8))
    source = zarr.open_group(str(tmp_path / "rel.zarr"), mode="r").attrs["source"]
    assert source["url"] == os.path.abspath(image_store) and os.path.isabs(source["url"])


def test_full_layers_and_reconstructions_equal_direct_forward(image_store, tmp_path):
    run(image_store, tmp_path / "a.zarr", storage_dtype="float32", reconstructions=True, layers=LAYERS + ("midblock",))
    group = validate_activation_store(str(tmp_path / "a.zarr"))
    expected, recon = direct_forward(image_store, np.arange(120), LAYERS + ("midblock",))
    for name in LAYERS + ("midblock",):
        np.testing.assert_allclose(group[name][:], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.abs(group["reconstruction"][:].astype(int) - recon).max() <= 1  # truncation of values within 1e-5
    attrs = dict(group.attrs)
    assert attrs["model"]["trained"] is False and attrs["layers"]["encoder_bottleneck"] == "model.enc.16x16_block0"
    assert attrs["sigma"] == 80.0 and attrs["noise"]["seed"] == 0 and attrs["pooling"] == "none"
    images = validate_image_store(image_store)
    np.testing.assert_array_equal(group["global_index"][:], images.coordinate("global_index"))
    np.testing.assert_array_equal(group["label"][:], images.coordinate("label"))


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooled_equal_direct_forward(image_store, tmp_path, pool):
    run(image_store, tmp_path / "p.zarr", pool=pool, storage_dtype="float32", selection=SelectionSpec(num_samples=40))
    group = validate_activation_store(str(tmp_path / "p.zarr"))
    expected, _ = direct_forward(image_store, np.arange(40), LAYERS, pool=pool)
    for name in LAYERS:
        assert group[name].shape == (40, expected[name].shape[1])
        np.testing.assert_allclose(group[name][:], expected[name], rtol=1e-4, atol=1e-5)


def test_batch_size_changes_values_only_by_float_rounding(image_store, tmp_path):
    """What the README promises: the same settings reproduce a store bit for bit; another batch size changes
    values only by the rounding of the network's float sums."""
    for b in (1, 7, 64):
        run(image_store, tmp_path / f"b{b}.zarr", batch_size=b, selection=SelectionSpec(num_samples=50))
    run(image_store, tmp_path / "again64.zarr", batch_size=64, selection=SelectionSpec(num_samples=50))
    ref = zarr.open_group(str(tmp_path / "b64.zarr"), mode="r")
    again = zarr.open_group(str(tmp_path / "again64.zarr"), mode="r")
    for name in LAYERS:
        np.testing.assert_array_equal(again[name][:], ref[name][:])
    for b in (1, 7):
        other = zarr.open_group(str(tmp_path / f"b{b}.zarr"), mode="r")
        for name in LAYERS:
            np.testing.assert_allclose(other[name][:].astype(np.float32), ref[name][:].astype(np.float32), rtol=2e-3, atol=2e-3)
        assert other.attrs["batch_sizes"] == [b]  # what the values depend on through rounding, recorded


def test_selection_per_class_and_classes(image_store, tmp_path):
    assert run(image_store, tmp_path / "k.zarr", selection=SelectionSpec(per_class=3, seed=1), layers=("encoder_bottleneck",), pool="mean").notes == ()
    ds = xr.open_zarr(str(tmp_path / "k.zarr"))
    labels, counts = np.unique(ds.label.values, return_counts=True)
    assert len(labels) == 10 and (counts == 3).all()
    src = ds.source_sample.values
    assert (np.diff(src) > 0).all()
    store_labels = validate_image_store(image_store).coordinate("label")
    np.testing.assert_array_equal(ds.label.values, store_labels[src])
    run(image_store, tmp_path / "c.zarr", selection=SelectionSpec(classes=("n01440764",)), layers=("encoder_bottleneck",), pool="mean")
    assert set(xr.open_zarr(str(tmp_path / "c.zarr")).synset.values.tolist()) == {"n01440764"}


def test_opens_in_xarray_and_groupby_is_lazy(image_store, tmp_path):
    run(image_store, tmp_path / "x.zarr")
    ds = xr.open_zarr(str(tmp_path / "x.zarr"))
    var = ds["encoder_bottleneck"]
    assert var.dims == ("sample", "encoder_bottleneck_channel", "encoder_bottleneck_y", "encoder_bottleneck_x")
    # xarray refuses to group by a dask-backed coordinate without knowing its values; loading the small label
    # coordinate (in place) is enough, and the activations stay lazy.
    ds.label.load()
    means = ds.groupby("label").mean()
    assert isinstance(means["encoder_bottleneck"].data, dask.array.Array)  # still lazy
    lab = ds.label.values[0]
    np.testing.assert_allclose(
        means["encoder_bottleneck"].sel(label=lab).values,
        var.values[ds.label.values == lab].astype(np.float32).mean(0),
        rtol=1e-2, atol=1e-2,
    )


def test_distributed_cluster_equals_local(image_store, tmp_path):
    run(image_store, tmp_path / "local.zarr", selection=SelectionSpec(num_samples=64))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        run(image_store, tmp_path / "dist.zarr", selection=SelectionSpec(num_samples=64), scheduler=SchedulerSpec(address=cluster.scheduler_address))
        # A feature network's tasks rebuild its resolved settings in the workers (noise=False there is no option).
        feature = dict(layers=("pool3",), model=ModelSpec(preset="fid-inception"), pool="mean")
        for where, spec in (("feat_local", SchedulerSpec()), ("feat_dist", SchedulerSpec(address=cluster.scheduler_address))):
            run(image_store, tmp_path / f"{where}.zarr", batch_size=4, selection=SelectionSpec(num_samples=4), scheduler=spec, **feature)
        # Resources no worker offers would hold every task forever: refused at once, before any output exists.
        wanting = SchedulerSpec(address=cluster.scheduler_address, resources=(("GPU", 1.0),))
        with pytest.raises(UnsatisfiableResourcesError, match=r"no worker offers --resources GPU=1 \(its 2 workers offer: none\); start workers with `dask worker tcp://"):
            run(image_store, tmp_path / "gpu.zarr", selection=SelectionSpec(num_samples=8), scheduler=wanting)
        assert not (tmp_path / "gpu.zarr").exists()
    feat_local, feat_dist = (zarr.open_group(str(tmp_path / f"feat_{n}.zarr"), mode="r") for n in ("local", "dist"))
    np.testing.assert_allclose(feat_dist["pool3"][:].astype(np.float32), feat_local["pool3"][:].astype(np.float32), rtol=1e-3, atol=1e-3)
    local, dist = (zarr.open_group(str(tmp_path / f"{n}.zarr"), mode="r") for n in ("local", "dist"))
    for name in LAYERS:
        np.testing.assert_allclose(dist[name][:].astype(np.float32), local[name][:].astype(np.float32), rtol=2e-3, atol=2e-3)
    assert dict(local.attrs)["selection"] == dict(dist.attrs)["selection"]


def test_changed_settings_refused_then_overwrite(image_store, tmp_path, capsys):
    out = str(tmp_path / "o.zarr")
    base = [image_store, "-o", out, "--preset", "tiny-random", "--layers", "encoder_bottleneck", "--num-samples", "16", "--device", "cpu"]
    assert extractor_main(["extract", *base]) == 0
    assert "UNTRAINED" in capsys.readouterr().out
    assert extractor_main(["extract", *base]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert extractor_main(["extract", *base, "--sigma", "2.5"]) == 2
    assert "sigma" in capsys.readouterr().err
    assert extractor_main(["extract", *base, "--sigma", "2.5", "--overwrite"]) == 0
    assert zarr.open_group(out, mode="r").attrs["sigma"] == 2.5


def _unfinished_store(image_store, tmp_path):
    url = str(tmp_path / "unfinished.zarr")
    shutil.copytree(image_store, url)
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    group.attrs["complete"] = False
    with pytest.warns(UserWarning, match="Consolidated metadata"):
        zarr.consolidate_metadata(url)
    return url


def _bad_checkpoint(tmp_path):
    state = build_preset("tiny-random").state_dict()
    state.pop("model.enc.64x64_conv.bias")
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("missing store", lambda s, t: [str(t / "nope.zarr"), "--layers", "midblock", "--preset", "tiny-random"], "nope.zarr: does not exist"),
        ("incomplete store", lambda s, t: [_unfinished_store(s, t), "--layers", "midblock", "--preset", "tiny-random"], "not complete"),
        ("unknown layer", lambda s, t: [s, "--layers", "model.enc.bogus", "--preset", "tiny-random"], "valid layers: model.enc.64x64_conv"),
        ("sigma zero", lambda s, t: [s, "--layers", "midblock", "--preset", "tiny-random", "--sigma", "0"], "0.002"),
        ("bad checkpoint", lambda s, t: [s, "--layers", "midblock", "--checkpoint", _bad_checkpoint(t)], "model.enc.64x64_conv.bias"),
    ],
)
def test_bad_input_one_clear_line(image_store, tmp_path, case, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "extractor", "extract", *args(image_store, tmp_path), "-o", str(tmp_path / "o.zarr"), "--device", "cpu"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imzarr extract: error:") and message in lines[0], proc.stderr


from tests.support.locations import EDM_REFERENCE as FIXTURE  # noqa: E402
# bf16 autocast (the CUDA default): every fixture layer within 3 % of its largest |value|, D(x) within 1 %
# (measured on CPU autocast: 1.7 % and 0.5 %).


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_edm_reference_fixture_through_the_forward_path(compute_dtype):
    ref = torch.load(FIXTURE, weights_only=True)
    model = EDMPrecond(**ref["config"]).eval()
    model.load_state_dict(ref["state_dict"])
    layers = tuple(ref["module_order"])
    loaded = LoadedModel(model, "edm reference fixture", ref["config"], False, "", model.img_resolution, model.label_dim)
    if compute_dtype == "fp32":
        fwd = ForwardSettings(PRESET, layers, compute_dtype="fp32")
        with PreparedForward(fwd, "cpu", model.img_resolution, network=loaded) as forward:
            acts, out = forward.run(ref["x"], ref["class_labels"], need_output=True, sigma=ref["sigma"])
    else:
        # PreparedForward refuses bf16 on the CPU; its capture under the CPU's bf16 autocast is the only place this
        # tolerance can be checked without a GPU.
        with torch.inference_mode(), autocast_context("cpu", "bf16"), LayerCapture(model, layers) as capture:
            acts, out = capture.run(ref["x"], ref["sigma"], ref["class_labels"], need_output=True)
    for path in layers:
        want = ref["activations"][path]
        if compute_dtype == "fp32":
            torch.testing.assert_close(acts[path], want, rtol=1e-4, atol=1e-5, msg=path)
        else:
            assert (acts[path].float() - want).abs().max() <= BF16_LAYER_TOLERANCE * want.abs().max(), path
    if compute_dtype == "fp32":
        torch.testing.assert_close(out, ref["out"], rtol=1e-4, atol=1e-5)
    else:
        assert (out - ref["out"]).abs().max() <= BF16_OUTPUT_TOLERANCE * ref["out"].abs().max()


def test_store_made_with_the_old_noise_recipe_is_refused(image_store, tmp_path):
    out = tmp_path / "old.zarr"
    run(image_store, out, selection=SelectionSpec(num_samples=16), layers=("encoder_bottleneck",), pool="mean")
    group = zarr.open_group(str(out), mode="r+", use_consolidated=False)
    assert group.attrs["noise"]["recipe"] == NOISE_RECIPE
    group.attrs["noise"] = {"seed": 0, "per_sample": LEGACY_NOISE_RECIPE}  # what stores made before it record
    for attempt in range(2):  # complete, then unfinished: neither is confirmed nor resumed
        with pytest.raises(NoiseRecipeError, match="numpy default_rng") as err:
            run(image_store, out, selection=SelectionSpec(num_samples=16), layers=("encoder_bottleneck",), pool="mean")
        assert str(out) in str(err.value) and "\n" not in str(err.value)
        group.attrs["complete"] = False
    extract(ExtractOptions(image_store, str(out), ForwardSettings(PRESET, ("encoder_bottleneck",), pool="mean"),
                           SelectionSpec(num_samples=16), RunOptions(8, "cpu", shard_size=32, overwrite=True)))
    assert validate_activation_store(str(out)).attrs["noise"]["recipe"] == NOISE_RECIPE


def test_fp32_forwards_turn_tf32_convolutions_off_while_they_run():
    """Counted: overlapping forwards (two workers) keep it off until the last one ends; then torch's own setting."""
    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32
    with ieee_float32_convolutions("cuda:0"):
        with ieee_float32_convolutions("cuda:0"):
            assert cudnn.allow_tf32 is False
        assert cudnn.allow_tf32 is False
    assert cudnn.allow_tf32 == before
    with ieee_float32_convolutions("cpu"):
        assert cudnn.allow_tf32 == before


def test_nonfinite_rows_exact_for_storage_dtypes():
    half = torch.zeros(5, 3, 4, 4, dtype=torch.float16)
    half[0] = 65504  # finite maxima: their float32 row sum stays finite
    half[1, 2, 3, 3] = float("inf")
    half[2, 0, 0, 0] = float("nan")
    half[3, 0, 0, 0], half[3, 0, 0, 1] = float("inf"), float("-inf")
    assert nonfinite_rows(half).tolist() == [False, True, True, True, False]
    single = torch.full((3, 100), 3e38, dtype=torch.float32)
    single[1, 5] = float("nan")
    assert nonfinite_rows(single).tolist() == [False, True, False]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        values = torch.full((6, 2, 3), -torch.finfo(dtype).max, dtype=dtype)  # finite extremes, sign bit set
        values[1, 1, 2] = float("-inf")
        values[2, 0, 1] = -float("nan")  # a NaN with its sign bit set
        values[3, 1, 0] = float("inf")
        values[4] = -0.0
        values[5, 0, 0] = torch.finfo(dtype).tiny / 2  # subnormal
        want = [False, True, True, True, False, False]
        assert nonfinite_rows(values).tolist() == want, dtype
        scratch = torch.full((values.numel() * values.element_size() + 7,), 0xFF, dtype=torch.uint8)
        assert nonfinite_rows(values, scratch).tolist() == want, dtype


def test_nonfinite_activations_leave_the_store_incomplete(image_store, tmp_path):
    out = str(tmp_path / "nan.zarr")
    network = StandInNetwork({"a": (4, 8, 8)}, {"b": (4, 8, 8)}, value=70000.0)  # finite in float32, Inf in float16
    with serving(network), pytest.raises(IntegrityError, match=r"NaN/Inf.*encoder_bottleneck: samples \[0, 1, 2"):
        run(image_store, out, selection=SelectionSpec(num_samples=16), layers=("encoder_bottleneck",))
    with pytest.raises(Exception, match="not complete"):
        validate_activation_store(out)
    assert not list(Path(out).rglob("*.partial"))


def test_labels_beyond_the_network_classes_are_refused_before_any_output(image_store, tmp_path):
    """A 10-class network given the sample's kit fox (278): refused in one line before the store exists (it was an
    IndexError mid-run); classes within its range, or no classes at all, run."""
    network = StandInNetwork({"a": (4, 8, 8)}, {"b": (4, 8, 8)})
    network.label_dim = 10
    with serving(network):
        with pytest.raises(LabelRangeError, match=r"label \d+ is beyond the 10 classes this network is conditioned on \(labels 0..9\)"):
            run(image_store, tmp_path / "all.zarr", layers=("encoder_bottleneck",))
        assert not (tmp_path / "all.zarr").exists()
        tench = run(image_store, tmp_path / "tench.zarr", layers=("encoder_bottleneck",), selection=SelectionSpec(classes=("tench",)))
        free = run(image_store, tmp_path / "free.zarr", layers=("encoder_bottleneck",), class_free=True, selection=SelectionSpec(num_samples=8))
    assert tench.num_samples > 0 and free.num_samples == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_equals_cpu(image_store, tmp_path):
    """Pinned buffers, copy stream, device checks and casts: the same values as on CPU (fp32, no autocast)."""
    for device in ("cpu", "cuda"):
        fwd = ForwardSettings(PRESET, LAYERS, storage_dtype="float32", compute_dtype="fp32", reconstructions=True)
        extract(ExtractOptions(image_store, str(tmp_path / f"{device}.zarr"), fwd, SelectionSpec(num_samples=80),
                               RunOptions(batch_size=16, device=device, shard_size=32)))
    cpu, cuda = (zarr.open_group(str(tmp_path / f"{d}.zarr"), mode="r") for d in ("cpu", "cuda"))
    for name in LAYERS:
        np.testing.assert_allclose(cuda[name][:], cpu[name][:], rtol=1e-3, atol=1e-4, err_msg=name)
    assert np.abs(cuda["reconstruction"][:].astype(int) - cpu["reconstruction"][:]).max() <= 1


def test_cli_store_is_analysis_ready(image_store, tmp_path):
    """A store made by `imzarr extract` (float16 by default) reduces in xarray to finite float64-exact values, and
    has the layout: numeric coordinates one chunk each, text arrays one chunk per shard, one inner chunk size."""
    out = str(tmp_path / "ready.zarr")
    args = ["extract", image_store, "-o", out, "--preset", "tiny-random", "--layers", "midblock,encoder_bottleneck", "--device", "cpu", "--shard-size", "32"]
    assert extractor_main(args) == 0
    group = validate_activation_store(out)
    exact, labels = group["midblock"][:].astype(np.float64), group["label"][:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CF-decoding, string-dtype or consolidated-metadata warnings
        ds = xr.open_zarr(out)
    mean = float(ds.midblock.mean())
    assert np.isfinite(mean) and mean == pytest.approx(exact.mean(), rel=1e-3)
    ds.label.load()
    per_class = ds.midblock.groupby("label").mean().compute()
    assert np.isfinite(per_class.values).all()
    for i, label in enumerate(per_class["label"].values):
        np.testing.assert_allclose(per_class.values[i], exact[labels == label].mean(axis=0), rtol=1e-3, atol=1e-12)
    assert set(ds.midblock.coords) == {"label", "global_index", "source_sample"} and ds.attrs["Conventions"].startswith("CF-")
    assert sorted(group.attrs["classes"]["label"]) == sorted(set(labels.tolist()))
    n = group["midblock"].shape[0]
    for name in ("label", "global_index", "source_sample"):
        assert group[name].chunks == (n,), name
    for name in ("synset", "class_name", "source_file"):
        assert group[name].chunks == (32,), name
    assert group["midblock"].chunks[0] == group["encoder_bottleneck"].chunks[0] == activation_inner_chunk(64 * 16 * 16 * 2, 32)
    assert group["midblock"].attrs["scale_factor"] == 1.0 and group.attrs["settings"]["layout"] == 2


def test_inner_chunk_fits_8_mib_within_the_shard():
    assert activation_inner_chunk(64 * 16 * 16 * 2, 4096) == 256  # 32 KiB per sample
    assert activation_inner_chunk(128, 4096) == 4096  # pooled: the whole shard
    assert activation_inner_chunk(64 * 16 * 16 * 2, 100) == 100  # a shard that fits is one chunk
    assert activation_inner_chunk(1 << 20, 1000) == 8  # a power of two that divides the shard
    assert activation_inner_chunk(64 << 20, 4096) == 1


def test_forward_defaults_resolve_per_network_kind():
    tiny = cached_model(PRESET, "cpu")
    default = resolve_forward(ForwardSettings(PRESET, LAYERS), tiny, "cpu")
    assert (default.sigma, default.noise_seed, default.compute_dtype) == (DEFAULT_SIGMA, DEFAULT_NOISE_SEED, "fp32")
    clean = resolve_forward(ForwardSettings(PRESET, LAYERS, sigma=0.5, noise_seed=7, noise=False), tiny, "cpu")
    assert (clean.sigma, clean.noise_seed, clean.noised) == (0.5, None, False)
    feature = cached_model(ModelSpec(preset="fid-inception"), "cpu")
    resolved = resolve_forward(ForwardSettings(ModelSpec(preset="fid-inception"), ("pool3",)), feature, "cpu")
    assert (resolved.sigma, resolved.noise_seed, resolved.noised) == (None, None, False)


def test_clean_input_recorded_on_every_layer(image_store, tmp_path):
    out = tmp_path / "clean.zarr"
    run(image_store, out, selection=SelectionSpec(num_samples=16), layers=("encoder_bottleneck",), pool="mean", noise=False)
    group = validate_activation_store(str(out))
    expected, _ = direct_forward(image_store, np.arange(16), ("encoder_bottleneck",), seed=None, pool="mean")
    np.testing.assert_allclose(group["encoder_bottleneck"][:].astype(np.float32), expected["encoder_bottleneck"], rtol=2e-3, atol=2e-3)
    attrs = dict(group.attrs)
    assert attrs["noise"] is None and attrs["sigma"] == 80.0 and "noise_recipe" not in attrs["settings"]
    assert "the clean image scaled to [-1, 1]" in group["encoder_bottleneck"].attrs["description"]


def test_no_noise_on_the_command_line_feeds_the_clean_image(image_store, tmp_path):
    """`--no-noise` reaches extract as ForwardSettings(noise=False): the store records no noise."""
    out = str(tmp_path / "clean-cli.zarr")
    args = ["extract", image_store, "-o", out, "--preset", "tiny-random", "--layers", "encoder_bottleneck", "--pool", "mean",
            "--num-samples", "8", "--no-noise", "--device", "cpu"]
    assert extractor_main(args) == 0
    attrs = dict(validate_activation_store(out).attrs)
    assert attrs["noise"] is None and attrs["settings"]["noise_seed"] is None


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_hooks_are_registered_once_per_run(image_store, tmp_path, monkeypatch):
    """Six batches in three tasks on two worker threads: one LayerCapture, one hook per module; none left after."""

    module = cached_model(PRESET, "cpu").module
    before = _hook_count(module)
    built, seen = [], []
    original_init, original_run = LayerCapture.__init__, LayerCapture.run

    def counting_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)

    def counting_run(self, *args, **kwargs):
        seen.append(_hook_count(module))
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(LayerCapture, "__init__", counting_init)
    monkeypatch.setattr(LayerCapture, "run", counting_run)
    run(image_store, tmp_path / "once.zarr", batch_size=8, shard_size=16, selection=SelectionSpec(num_samples=48), layers=LAYERS + ("midblock",))
    assert len(built) == 1
    assert len(seen) == 1 + 6  # the layer probe, then 48 samples in batches of 8
    assert set(seen) == {before + 3}  # encoder_bottleneck, model.enc.32x32_block0, midblock: three modules
    assert _hook_count(module) == before


def test_prepared_forward_hooks_stay_idle_outside_its_batches():
    """Hooks on the shared module change nothing for other forwards of it while the run holds them."""
    settings = ForwardSettings(PRESET, ("midblock",), storage_dtype="float32", compute_dtype="fp32")
    module = cached_model(PRESET, "cpu").module
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        bare = module(x, torch.full((2,), 80.0), None)
    with PreparedForward(settings, "cpu", 64) as forward:
        first, _ = forward.run(x, None, need_output=False)
        with torch.inference_mode():
            torch.testing.assert_close(module(x, torch.full((2,), 80.0), None), bare, rtol=0, atol=0)
        again, _ = forward.run(x, None, need_output=False)
    torch.testing.assert_close(first["midblock"], again["midblock"], rtol=0, atol=0)


@pytest.mark.parametrize("compute_dtype", ["bf16", "fp16"])
def test_half_precision_on_the_cpu_is_refused_by_the_library_as_on_the_command_line(image_store, tmp_path, compute_dtype):
    from extractor.api import features, generate
    from extractor.forward import ComputeDeviceError
    from tests.support.commands import run_imzarr

    message = f"--compute-dtype {compute_dtype}: needs a CUDA device (this run is on the CPU); use fp32"
    settings = ForwardSettings(PRESET, ("midblock",), compute_dtype=compute_dtype)
    images = np.zeros((2, 3, 64, 64), dtype=np.uint8)
    calls = [
        lambda: extract(ExtractOptions(image_store, str(tmp_path / "o.zarr"), settings, run=RunOptions(device="cpu"))),
        lambda: features(images, layers=["midblock"], model="tiny-random", device="cpu", compute_dtype=compute_dtype),
        lambda: generate(str(tmp_path / "g.zarr"), preset="tiny-random", num_samples=2, device="cpu", compute_dtype=compute_dtype),
        lambda: PreparedForward(settings, "cpu", 64),
    ]
    for call in calls:
        with pytest.raises(ComputeDeviceError) as err:
            call()
        assert str(err.value) == message
    proc = run_imzarr("extract", image_store, "-o", tmp_path / "cli.zarr", "--preset", "tiny-random", "--layers", "midblock",
                      "--device", "cpu", "--compute-dtype", compute_dtype)
    assert proc.returncode == 2 and proc.stderr.strip() == f"imzarr extract: error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_resources_without_a_cluster_are_refused():
    with pytest.raises(SchedulerError, match=r"^--resources GPU=1: worker resources exist only on a dask.distributed cluster; give --scheduler"):
        SchedulerSpec(resources=(("GPU", 1.0),))


def test_unconditional_checkpoint_records_no_class_conditioning(image_store, tmp_path):
    """A network without labels (label_dim 0) is recorded as unconditional, whatever --class-free says."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=64, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    torch.save(net.state_dict(), tmp_path / "unconditional.pt")
    spec = ModelSpec(checkpoint=str(tmp_path / "unconditional.pt"))
    for class_free in (False, True):
        out = tmp_path / f"u{class_free}.zarr"
        fwd = ForwardSettings(model=spec, layers=("midblock",), pool="mean", class_free=class_free)
        extract(ExtractOptions(image_store, str(out), fwd, SelectionSpec(num_samples=4), RunOptions(4, "cpu", SchedulerSpec(), shard_size=32)))
        assert zarr.open_group(str(out), mode="r").attrs["class_conditioning"] == "none (an unconditional network)"


def test_compile_on_the_cpu_is_refused(image_store, tmp_path, capsys):
    """--compile compiles for CUDA only: on the CPU it is refused, not silently dropped."""
    from extractor.api import generate
    from extractor.forward import ComputeDeviceError

    message = "--compile: compiles the U-Net's blocks for CUDA, and this run is on the CPU (where it would change nothing); leave it out"
    settings = ForwardSettings(PRESET, ("midblock",))
    with pytest.raises(ComputeDeviceError, match=f"^{re.escape(message)}$"):
        extract(ExtractOptions(image_store, str(tmp_path / "o.zarr"), settings, run=RunOptions(device="cpu", compile=True)))
    with pytest.raises(ComputeDeviceError, match=f"^{re.escape(message)}$"):
        generate(str(tmp_path / "g.zarr"), preset="tiny-random", num_samples=2, device="cpu", compile=True)
    assert extractor_main(["extract", image_store, "-o", str(tmp_path / "cli.zarr"), "--preset", "tiny-random", "--layers", "midblock", "--device", "cpu", "--compile"]) == 2
    assert capsys.readouterr().err.strip() == f"imzarr extract: error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_per_class_shortfall_is_a_note_of_the_command(image_store, tmp_path, capsys):
    labels = validate_image_store(image_store).coordinate("label")
    present, counts = np.unique(labels, return_counts=True)
    k = int(counts.max()) + 1  # more than any class has: every class is short
    argv = ["extract", image_store, "-o", str(tmp_path / "k.zarr"), "--preset", "tiny-random", "--layers", "midblock", "--pool", "mean", "--per-class", str(k), "--device", "cpu"]
    assert extractor_main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("NOTE: --per-class")]
    shown = ", ".join(f"{c}: {n}" for c, n in list(zip(present.tolist(), counts.tolist()))[:8])
    assert notes == [f"NOTE: --per-class {k}: {present.size} of {present.size} classes have fewer samples, all of theirs taken (label: count {shown}{' …' if present.size > 8 else ''})"]


def test_samples_without_labels_are_said_and_recorded(tmp_path, capsys):
    """Generated samples saved without their classes (an ADM samples file without arr_1) have label -1: the
    class-conditional network gets zeros for them. The command says so, and the store records it."""
    from converter import convert_npz
    from tests.support.synthetic import photo_like, write_adm_samples

    write_adm_samples(tmp_path / "samples_12x64x64x3.npz", photo_like(12, 64, seed=3), None)
    convert_npz(str(tmp_path / "samples_12x64x64x3.npz"), str(tmp_path / "s.zarr"))
    argv = ["extract", str(tmp_path / "s.zarr"), "--preset", "tiny-random", "--layers", "midblock", "--pool", "mean", "--device", "cpu"]
    assert extractor_main([*argv, "-o", str(tmp_path / "a.zarr")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("NOTE: ")]
    assert "NOTE: 12 of 12 samples have no label (-1): the class-conditional network gets zeros for their class" in "\n".join(notes)
    assert zarr.open_group(str(tmp_path / "a.zarr"), mode="r").attrs["class_conditioning"] == "one-hot of label; zeros for the 12 samples without a label (-1)"
    assert extractor_main([*argv, "-o", str(tmp_path / "free.zarr"), "--class-free"]) == 0  # said to: no note
    assert not [line for line in capsys.readouterr().out.splitlines() if "no label" in line]
    assert zarr.open_group(str(tmp_path / "free.zarr"), mode="r").attrs["class_conditioning"] == "none (zero labels)"


def test_the_default_shard_size_given_by_its_number_is_the_same_settings(image_store, tmp_path):
    """`--shard-size N` where N is what the default picks: the store made without it is complete, not "changed",
    and the other way round."""
    from extractor import api
    from extractor.activation_writer import default_shard_size
    from schemas.store_lifecycle import StoreExistsError

    out = str(tmp_path / "acts.zarr")
    options = {"preset": "tiny-random", "layers": "midblock", "num_samples": 8, "device": "cpu"}
    assert not api.extract(image_store, out, **options).already_complete
    shapes = {name: shape for name, _, shape in api.layer_table(preset="tiny-random").rows if name == "midblock"}
    assert api.extract(image_store, out, shard_size=default_shard_size(shapes, "float16"), **options).already_complete
    with pytest.raises(StoreExistsError, match=r"changed: shard_size"):
        api.extract(image_store, out, shard_size=default_shard_size(shapes, "float16") // 2, **options)
    other = str(tmp_path / "explicit.zarr")
    assert not api.extract(image_store, other, shard_size=default_shard_size(shapes, "float16"), **options).already_complete
    assert api.extract(image_store, other, **options).already_complete


def test_the_same_positions_named_otherwise_are_the_same_selection(image_store, tmp_path, monkeypatch):
    """The positions decide the values: an indices file named by another path, the same positions in Python, or
    classes in another order find the store complete; other positions are refused. A store made when the whole
    description was recorded still confirms with that description."""
    from extractor import api
    from schemas.store_lifecycle import StoreExistsError

    options = {"preset": "tiny-random", "layers": "midblock", "device": "cpu", "pool": "mean"}
    np.savetxt(tmp_path / "idx.txt", [3, 1, 40], fmt="%d")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "idx.zarr")
    assert not api.extract(image_store, out, indices="idx.txt", **options).already_complete
    assert api.extract(image_store, out, indices=str(tmp_path / "idx.txt"), **options).already_complete
    assert api.extract(image_store, out, indices=[40, 3, 1], **options).already_complete
    assert dict(zarr.open_group(out, mode="r").attrs)["selection"]["indices_file"] == "idx.txt"  # provenance keeps the name
    with pytest.raises(StoreExistsError, match=r"changed: selection"):
        api.extract(image_store, out, indices=[3, 1, 41], **options)
    labels = validate_image_store(image_store).coordinate("label")
    first, second = (int(v) for v in np.unique(labels)[:2])
    by_class = str(tmp_path / "classes.zarr")
    assert not api.extract(image_store, by_class, classes=[first, second], **options).already_complete
    assert api.extract(image_store, by_class, classes=[second, first], **options).already_complete

    # A store of the earlier rule: its settings hold the whole description, its fingerprint made from them.
    legacy = str(tmp_path / "legacy.zarr")
    api.extract(image_store, legacy, indices="idx.txt", **options)
    group = zarr.open_group(legacy, mode="r+", use_consolidated=False)
    settings = dict(group.attrs)["settings"]
    settings["selection"] = dict(group.attrs)["selection"]
    from schemas.store_lifecycle import settings_fingerprint

    group.attrs.update({"settings": settings, "settings_fingerprint": settings_fingerprint(settings)})
    assert api.extract(image_store, legacy, indices="idx.txt", **options).already_complete

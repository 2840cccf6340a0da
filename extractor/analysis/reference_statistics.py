"""Gaussian statistics of a layer (`imzarr stats`): reference files as FID tools write them, and per class.

A reference file is an uncompressed `.npz` with `mu` (float64, D) and `sigma` (float64, D×D, the unbiased
covariance, as `np.cov(features, rowvar=False)` gives), what pytorch-fid's `--save-stats` and EDM's `fid.py ref`
write and read back with `np.load(path)["mu"]`/`["sigma"]`. Files made here add one more member, `imzarr`: a
JSON text (a 0-d unicode array, readable without pickle) naming the store, layer, pooling and sample count, so
`compare --reference` can refuse statistics of another layer; tools that read only `mu` and `sigma` ignore it.

Statistics are accumulated while the layer is read block by block (GaussianAccumulator: chunk scatter products
in float32, merged in float64), so memory is a few blocks plus the D×D sums whatever the store's size.
Per-class statistics go to a Zarr store (`imzarr.statistics/1`) on dimension `label`, one class at a time from
a float32 spill of the features; they are refused, with the size they would take, when the spill and the
per-class covariances (classes × D² × 8 bytes) would not fit in the free space of the output's disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import zarr

from extractor.analysis.inception_scoring import IS_LAYER, IS_SEED, IS_SPLITS, InceptionScore, InceptionScoreAccumulator, InceptionScoreSettings, inception_score_attrs
from extractor.analysis.layer_features import AnalysisInputError, LayerFeatures, class_rows, feature_blocks, open_layer, stream_layer
from extractor.analysis.metrics import GaussianAccumulator
from extractor.analysis.provenance import describe_model
from schemas.errors import ImzarrError, PathError
from schemas.keywords import keyword_names, refuse_unknown_keywords
from schemas.option_values import SEED_32, whole_numbers
from schemas.output_paths import absolute_url, check_output_location, check_scratch_location, local_file_url_to_path, local_path, refuse_process_bound_output, write_output_file
from schemas.store_integrity import record_checksums
from schemas.store_lifecycle import claim_report_output
from schemas.variable_attrs import classes_lookup, label_names

STATISTICS_SCHEMA = "imzarr.statistics/1"
REFERENCE_METADATA_KEY = "imzarr"
# Chunk scatter products in float32, summed in float64: twice float64's speed, within ~1e-6 of np.cov (tested).
STREAM_PRODUCT_DTYPE = np.float32
BLOCK_SIZE = 8192


class ReferenceFileError(PathError):
    """A reference-statistics file that cannot be read or does not hold `mu` (D,) and `sigma` (D, D)."""


class OutputExistsError(ImzarrError):
    """A file output exists already and --overwrite was not given."""


class InsufficientSpaceError(AnalysisInputError):
    """Per-class statistics would not fit on the output's disk: the message gives the size they would take."""


@dataclass
class LayerStatistics:
    """Mean and unbiased covariance of one store's layer features, with where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    metadata: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


@dataclass
class ReferenceStatistics:
    """A reference file read back: its `mu`, `sigma`, sha256 and imzarr metadata (empty for other tools' files)."""

    path: str
    mu: np.ndarray
    sigma: np.ndarray
    sha256: str
    metadata: dict

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


# ---------------------------------------------------------------- whole-layer statistics


def layer_metadata(side: LayerFeatures) -> dict:
    """What statistics describe: the store, layer, pooling, counts, and the model and σ that made the features (so a
    comparison against them can say when the generated side's differ)."""
    return {"store": absolute_url(side.url), "layer": side.var, "module_path": side.module_path, "pool": side.reduction, "count": side.n, "dim": side.dim,
            "model": describe_model(side.attrs.get("model") or {}), "sigma": side.attrs.get("sigma")}


def statistics_accumulator(dim: int) -> GaussianAccumulator:
    return GaussianAccumulator(dim, product_dtype=STREAM_PRODUCT_DTYPE)


def layer_statistics(store: str, layer: str, pool: str | None = None, block_size: int = BLOCK_SIZE, log: TextIO | None = None) -> LayerStatistics:
    """`mu` and `sigma` of a store's layer (unpooled layers reduced with `pool`), streamed in bounded memory."""
    side = open_layer("store", store, layer, pool)
    acc = statistics_accumulator(side.dim)
    stream_layer(side, block_size, [lambda a, b, x: acc.update(x)], log=log)
    return finish_statistics(acc, side)


def finish_statistics(acc: GaussianAccumulator, side: LayerFeatures) -> LayerStatistics:
    if acc.count < 2:
        raise AnalysisInputError(f"{side.url}: layer {side.var} has {acc.count} samples; a covariance needs at least 2")
    return LayerStatistics(acc.mean, acc.cov, acc.count, layer_metadata(side))


def statistics_from_features(features: np.ndarray) -> LayerStatistics:
    """`mu` and `sigma` of in-memory features (n, D), by the same accumulation as a store's."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise AnalysisInputError(f"features must be 2-D with at least 2 rows, got shape {x.shape}")
    acc = statistics_accumulator(x.shape[1])
    acc.update(x)
    return LayerStatistics(acc.mean, acc.cov, acc.count, {"count": acc.count, "dim": x.shape[1]})


# ---------------------------------------------------------------- reference files


def reference_bytes(stats: LayerStatistics) -> bytes:
    """The `.npz` bytes: `mu`, `sigma` (float64) and the `imzarr` metadata text."""
    buffer = io.BytesIO()
    meta = np.array(json.dumps(stats.metadata, sort_keys=True))
    np.savez(buffer, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64), **{REFERENCE_METADATA_KEY: meta})
    return buffer.getvalue()


def check_file_output(path: str, inputs: list[str], overwrite: bool) -> None:
    """A reference file output: never an input or inside one, never a folder; an existing file only with
    overwrite, and only when it is a reference file imzarr wrote (an NPZ shard or a sample batch never)."""
    refuse_process_bound_output(path)
    check_output_location(path, inputs)
    local = local_path(path)
    if local is not None and os.path.isdir(local):
        raise PathError(path, "is a folder; give a file name such as ref.npz")
    if local is None or not os.path.exists(local):
        return
    if not overwrite:
        raise OutputExistsError(f"{path}: exists; pass --overwrite to replace it")
    members = _npz_members(local)
    if members is None or REFERENCE_METADATA_KEY not in members or not members <= {"mu", "sigma", REFERENCE_METADATA_KEY}:
        held = "not an .npz" if members is None else f"holds {sorted(members)}"
        raise OutputExistsError(
            f"{path}: exists and is not a reference file imzarr wrote ({held}); --overwrite replaces only those: "
            "give another file name"
        )


def _npz_members(path: str) -> set[str] | None:
    """Array names in an .npz file (without reading them), or None for any other file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name.removesuffix(".npy") for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return None


def write_reference(stats: LayerStatistics, path: str) -> str:
    """Write `stats` as a reference file (whole or not at all)."""
    return write_output_file(path, reference_bytes(stats))


def read_reference(path: str) -> ReferenceStatistics:
    """A reference file from imzarr, pytorch-fid (`--save-stats`) or EDM (`fid.py ref`); checked for shape and finiteness."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as fh:
            raw = fh.read()
    except IsADirectoryError:
        raise ReferenceFileError(path, "is a folder (a per-class statistics store?); a reference is the .npz that `imzarr stats -o ref.npz` writes without --per-class") from None
    except (OSError, ValueError) as exc:
        raise ReferenceFileError(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            keys = set(npz.files)
            if not {"mu", "sigma"} <= keys:
                images = keys & {"arr_0", "data"}
                way = (f"; `{sorted(images)[0]}` looks like images: convert them (imzarr convert npz), extract the layer, then "
                       "compare the two stores or make statistics with imzarr stats") if images else ""
                raise ReferenceFileError(path, f"holds {sorted(keys)}; reference statistics need `mu` and `sigma`{way}")
            mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
            meta = json.loads(str(npz[REFERENCE_METADATA_KEY])) if REFERENCE_METADATA_KEY in keys else {}
    except ReferenceFileError:
        raise
    except Exception as exc:  # numpy raises several types for a file that is not an npz
        if "allow_pickle" in str(exc):
            raise ReferenceFileError(path, "holds pickled object arrays, which are not read (unpickling can run code); save `mu` and `sigma` as plain float arrays") from None
        raise ReferenceFileError(path, f"is not a NumPy .npz file ({type(exc).__name__})") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ReferenceFileError(path, f"`mu` has shape {mu.shape} and `sigma` {sigma.shape}; expected (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceFileError(path, "`mu` or `sigma` holds inf or NaN")
    # A covariance is symmetric with variances ≥ 0; another matrix gives an FD that means nothing (even < 0).
    if (np.diag(sigma) < 0).any():
        raise ReferenceFileError(path, f"`sigma` is not a covariance: {int((np.diag(sigma) < 0).sum())} negative variances on its diagonal")
    if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-6 * np.abs(sigma).max(initial=0.0):
        raise ReferenceFileError(path, "`sigma` is not a covariance: it is not symmetric")
    return ReferenceStatistics(path, mu, sigma, hashlib.sha256(raw).hexdigest(), meta)


# ---------------------------------------------------------------- per class


def per_class_bytes(num_classes: int, dim: int) -> int:
    """Bytes of the per-class store's arrays: a D×D float64 covariance and a D mean per class."""
    return int(num_classes) * (int(dim) * int(dim) + int(dim)) * 8


def check_per_class_space(output: str, num_classes: int, dim: int, n: int, scratch_dir: str | None) -> None:
    """Refuse per-class statistics whose covariances plus the float32 feature spill exceed the output disk's free space."""
    needed_out, needed_spill = per_class_bytes(num_classes, dim), n * dim * 4
    local = local_path(output)
    if local is None:
        return  # an object store: no free-space figure to check against
    folder = os.path.dirname(os.path.abspath(local)) or "."
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    spill_folder = scratch_dir or tempfile.gettempdir()
    same_disk = os.stat(folder).st_dev == os.stat(spill_folder).st_dev
    free_out = shutil.disk_usage(folder).free
    needed_here = needed_out + (needed_spill if same_disk else 0)
    if needed_here > free_out:
        raise InsufficientSpaceError(
            f"{output}: per-class statistics of {num_classes} classes × {dim}² float64 take {needed_out / 1e9:,.2f} GB "
            f"(+ {needed_spill / 1e9:,.2f} GB of float32 features in the scratch folder); {free_out / 1e9:,.2f} GB are free there"
        )
    if not same_disk and needed_spill > shutil.disk_usage(spill_folder).free:
        raise InsufficientSpaceError(f"{spill_folder}: the float32 feature spill takes {needed_spill / 1e9:,.2f} GB; {shutil.disk_usage(spill_folder).free / 1e9:,.2f} GB are free")


_PER_CLASS_ATTRS = {
    "mu": ("mean of the class's features", "mean over the class's samples (float64)"),
    "sigma": ("covariance of the class's features", "unbiased covariance (n−1) of the class's samples, float64; NaN below 2 samples"),
    "count": ("samples of the class", "samples of this class in the store"),
    "label": ("ImageNet-1k class index", "0-based index in sorted-WNID order"),
    "synset": ("WordNet ID of the class", "WNID such as n01440764"),
    "class_name": ("class name", "ImageNet-1k class name from the packaged class table"),
}


def write_per_class_statistics(
    store: str, layer: str, output: str, pool: str | None = None, block_size: int = BLOCK_SIZE,
    scratch_dir: str | None = None, log: TextIO | None = None, extra_attrs: dict | None = None,
) -> str:  # fmt: skip
    """Per-class `mu`, `sigma`, `count` of a store's layer into a Zarr store on dimension `label` (see the module doc)."""
    side = open_layer("store", store, layer, pool)
    groups = class_rows(side.labels)
    check_per_class_space(output, len(groups), side.dim, side.n, scratch_dir)
    overall = statistics_accumulator(side.dim)
    labels = np.array(sorted(groups), dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="imzarr-stats-", dir=scratch_dir) as scratch:
        rows = stream_layer(side, block_size, [lambda a, b, x: overall.update(x)], Path(scratch), log)
        group = zarr.open_group(output, mode="w", zarr_format=3)
        d, c = side.dim, labels.size
        mu = group.create_array("mu", shape=(c, d), chunks=(max(1, min(c, 4096)), d), dtype="float64", fill_value=np.nan, dimension_names=("label", "feature"))
        sigma = group.create_array("sigma", shape=(c, d, d), chunks=(1, d, d), dtype="float64", fill_value=np.nan, dimension_names=("label", "feature", "feature_2"))
        counts = np.array([groups[int(k)].size for k in labels], dtype=np.int64)
        means = np.full((c, d), np.nan)
        for i, k in enumerate(labels.tolist()):
            acc = statistics_accumulator(d)
            idx = groups[k]
            for a in range(0, idx.size, block_size):
                acc.update(rows.take(idx[a : a + block_size]))
            means[i] = acc.mean
            if acc.count >= 2:
                sigma[i] = acc.cov
        mu[:] = means
        for name, values in (("count", counts), ("label", labels.astype(np.int16))):
            arr = group.create_array(name, shape=(c,), dtype=values.dtype, chunks=(max(c, 1),), dimension_names=("label",))
            arr[:] = values
        for name, values in zip(("synset", "class_name"), label_names(labels, classes_lookup(side.attrs))):
            arr = group.create_array(name, shape=(c,), dtype=str, chunks=(max(c, 1),), dimension_names=("label",))
            arr[:] = np.asarray(values, dtype=object)
        for name, (long_name, description) in _PER_CLASS_ATTRS.items():
            group[name].update_attributes({"long_name": long_name, "description": description})
        group["mu"].update_attributes({"coordinates": "synset class_name count"})
        meta = layer_metadata(side)
        group.attrs.update({"schema": STATISTICS_SCHEMA, **meta, "classes": int(c), **(extra_attrs or {})})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(output)
    record_checksums(output)  # so that `imzarr verify` can check a copied statistics store byte for byte
    return output


# ---------------------------------------------------------------- Inception Score of a store


def logits_layer(store: str, settings: InceptionScoreSettings = InceptionScoreSettings()) -> LayerFeatures:
    """The store's layer the Inception Score reads, checked to be logits (n, classes): metadata only, so a comparison
    asks first, before its other metrics' work."""
    side = open_layer("store", store, settings.layer)
    if side.reduce is not None:
        raise AnalysisInputError(f"{store}: layer {side.var} has per-sample shape {tuple(side.array.shape[1:])}; the Inception Score needs logits (n, classes)")
    return side


def store_inception_score(store: str, settings: InceptionScoreSettings = InceptionScoreSettings(), block_size: int = BLOCK_SIZE) -> InceptionScore:
    """Inception Score of a store's logits layer (fid-inception's `logits`), read once in blocks."""
    side = logits_layer(store, settings)
    acc = InceptionScoreAccumulator(side.n, side.dim, settings.splits, settings.seed)
    for a, _, logits in feature_blocks(side, block_size):
        acc.update(a, logits)
    return acc.result()


# ---------------------------------------------------------------- the command's options and run


@dataclass(frozen=True)
class StatisticsOptions:
    store: str
    layer: str | None
    output: str | None
    per_class: bool = False
    pool: str | None = None  # None: "mean" for unpooled layers; layers pooled at extraction keep theirs
    inception_score: bool = False
    is_settings: InceptionScoreSettings = InceptionScoreSettings()
    overwrite: bool = False
    block_size: int = BLOCK_SIZE
    scratch_dir: str | None = None


@dataclass
class StatisticsResult:
    output: str | None
    statistics: LayerStatistics | None
    inception_score: InceptionScore | None
    seconds: float


def statistics_options(
    store: str, *, layer: str | None = None, output: str | None = None, per_class: bool = False, pool: str | None = None,
    inception_score: bool = False, is_layer: str = IS_LAYER, is_splits: int = IS_SPLITS, is_seed: int = IS_SEED,
    overwrite: bool = False, block_size: int = BLOCK_SIZE, scratch_dir: str | None = None,
) -> StatisticsOptions:  # fmt: skip
    """`imzarr stats`'s options, checked: an output for statistics, a layer for an output, one output kind per mode."""
    store, output, scratch_dir = local_file_url_to_path([store, output, scratch_dir])
    counts = whole_numbers({"--is-splits": (is_splits, 1), "is_seed": (is_seed, *SEED_32), "block_size": (block_size, 1)}, AnalysisInputError)
    is_splits, is_seed, block_size = counts.values()
    if output is None and not inception_score:
        raise AnalysisInputError(
            f"{store}: nothing to do: give -o (reference .npz, or a Zarr store with --per-class) and/or --inception-score "
            "(from Python, layer_statistics(store, layer) gives mu and sigma in memory)"
        )
    if output is not None and layer is None:
        raise AnalysisInputError(f"{store}: statistics need --layer (the layer whose features they describe)")
    if per_class and output is None:
        raise AnalysisInputError(f"{store}: --per-class writes a Zarr store; give it with -o")
    if output is not None:
        if per_class:
            if output.rstrip("/").endswith(".npz"):
                raise PathError(output, "per-class statistics are a Zarr store (a folder), not an .npz file; name it e.g. ref-per-class.zarr")
            claim_report_output(output, STATISTICS_SCHEMA, overwrite, [store])
            refuse_process_bound_output(output)
            check_output_location(output, [store])
        else:
            if not output.endswith(".npz"):
                raise PathError(output, "reference statistics are an .npz file (pytorch-fid and EDM read them by that name); use --per-class for a Zarr store")
            check_file_output(output, [store], overwrite)
    if scratch_dir is not None:
        check_scratch_location(scratch_dir, output, [store])
    is_settings = InceptionScoreSettings(is_layer, is_splits, is_seed)
    return StatisticsOptions(store, layer, output, per_class, pool, inception_score, is_settings, overwrite, block_size, scratch_dir)


def run_statistics(options: StatisticsOptions, log: TextIO | None = None) -> StatisticsResult:
    """Write the reference file or per-class store, and/or compute the store's Inception Score."""
    started = time.monotonic()
    score = None
    if options.inception_score:
        score = store_inception_score(options.store, options.is_settings, options.block_size)
    stats = None
    extra = {} if score is None else inception_score_attrs(score)
    if options.output is not None and options.per_class:
        write_per_class_statistics(options.store, options.layer, options.output, options.pool, options.block_size, options.scratch_dir, log, extra)
    elif options.output is not None:
        stats = layer_statistics(options.store, options.layer, options.pool, options.block_size, log)
        write_reference(stats, options.output)
    return StatisticsResult(options.output, stats, score, time.monotonic() - started)


def statistics(store: str, **options) -> StatisticsResult:
    """`imzarr stats` from Python: keywords as `statistics_options` takes them."""
    refuse_unknown_keywords(options, keyword_names(statistics_options), "statistics")
    return run_statistics(statistics_options(store, **options))

"""`imzarr compare`: how a generated activation store differs from a reference ("real") one, overall and per class,
or from saved reference statistics (`--reference ref.npz`).

One streaming pass per store reads the layer in blocks, reduces each sample to a feature vector (spatial mean
or max, or the flattened map), feeds the streaming Gaussian statistics and spills the float32 features to a raw
file in a scratch folder. Everything after that reads the spill files: KID's subsets, precision/recall/density/
coverage on a seeded subset of each side (Naeem et al.'s 10,000 by default; every pair with `prdc_subset=0`),
and each class's rows (a few hundred at most in ImageNet-sized stores) for the per-class metrics, which use all
of a class's samples. Memory therefore stays at a few blocks whatever the store sizes; disk use is the two
feature sets in float32.

The report is an xarray Dataset: overall numbers are attributes (full float64: JSON numbers round-trip), per-class
numbers are variables on dimension `label` with `synset` and `class_name` coordinates, as in the stores.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TextIO

import dask
import fsspec
import numpy as np
import torch
import xarray as xr
import zarr

from extractor.analysis.inception_scoring import IS_LAYER, IS_SEED, IS_SPLITS, InceptionScoreSettings, inception_score_attrs
from extractor.analysis.kernel_inception_distance import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, class_subset_size, kid_from_takers
from extractor.analysis.layer_features import (
    MAX_FLAT_DIM,
    AnalysisInputError,
    LayerFeatures,
    LayerMismatchError,
    NonFiniteFeaturesError,
    RowFile,
    check_compatible,
    class_rows,
    describe,
    open_layer,
    stream_layer,
)
from extractor.analysis.metrics import (
    GaussianAccumulator,
    frechet_distance,
    frechet_distance_from_samples,
    prdc,
    prdc_blocked,
)
from extractor.analysis.provenance import describe_model, describe_sigma, short_sha
from extractor.store_attrs import versions
from extractor.analysis.reference_statistics import ReferenceStatistics, logits_layer, read_reference, statistics_accumulator, store_inception_score
from schemas.compare_report import COMPARE_SCHEMA as REPORT_SCHEMA
from schemas.compare_report import REPORT_DIM, on_label_dimension
from schemas.keywords import keyword_names, refuse_unknown_keywords
from schemas.option_values import SEED_32, SEED_64, whole_numbers
from schemas.store_identity import StoreIdentity, check_unchanged, reader_lease
from schemas.output_paths import (
    absolute_url,
    check_output_location,
    check_png_output,
    check_scratch_location,
    local_file_url_to_path,
    local_path,
    refuse_process_bound_output,
)
from schemas.store_integrity import read_checksum_record, record_checksums
from schemas.store_lifecycle import claim_report_output, settings_fingerprint
from schemas.variable_attrs import classes_lookup, label_names
from schemas.vocabulary import POOL_MODES

__all__ = [
    "MAX_FLAT_DIM", "CompareError", "CompareOptions", "LayerMismatchError", "NonFiniteFeaturesError",
    "compare", "compare_options", "compare_stores", "compare_to_reference", "format_report_table", "open_report", "write_report",
]  # fmt: skip

METRIC_GROUPS = ("fd", "kid", "prdc", "is")
DEFAULT_METRICS = ("fd", "kid", "prdc")
PRDC_NAMES = ("precision", "recall", "density", "coverage")
PRDC_SUBSET = 10_000  # per side, as Naeem et al. 2020 evaluate
PRDC_SEED = 0
IN_MEMORY_CLASS_ROWS = 2048  # larger classes go through the blocked k-NN (2048² float64 distances = 32 MB)
PLOT_SAMPLE_ROWS = 5000  # per side
# Blocked k-NN over whole stores runs in float32 on features centred on the real mean: about twice as fast as
# float64 here, and centring keeps the relative error of squared distances near 1e-6, far below sampling noise.
BLOCKED_DTYPE = torch.float32
PER_CLASS_FD_NOTE = (
    "per-class FD uses each class's sample covariance, rank-deficient when a class has fewer samples than "
    "feature dimensions; compare it only across classes of similar size"
)
PER_CLASS_KID_NOTE = "per-class KID uses subsets of min(kid_subset_size, the class's real count, its generated count) per side (variable kid_subset_size)"
# The report describes itself (long_name, description) like the stores it compares.
REPORT_VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    "fd": {"long_name": "Fréchet distance", "description": "||μr−μg||² + Tr(Σr + Σg − 2(ΣrΣg)^½) of Gaussians fitted to the class's real and generated features"},
    "kid": {"long_name": "kernel inception distance", "description": "mean over seeded subsets of the unbiased MMD² with k(x,y) = (x·y/D + 1)³ (Bińkowski et al. 2018)"},
    "kid_std": {"long_name": "KID standard deviation", "description": "standard deviation (ddof 0) of the per-subset MMD² values"},
    "kid_subset_size": {"long_name": "KID subset size", "description": "samples per side in each KID subset: the default, limited by the class's counts"},
    "precision": {"long_name": "k-NN precision", "description": "fraction of generated samples inside some real sample's k-NN ball (Kynkäänniemi et al. 2019)"},
    "recall": {"long_name": "k-NN recall", "description": "fraction of real samples inside some generated sample's k-NN ball (Kynkäänniemi et al. 2019)"},
    "density": {"long_name": "density", "description": "mean count of real k-NN balls holding a generated sample, divided by k (Naeem et al. 2020)"},
    "coverage": {"long_name": "coverage", "description": "fraction of real samples whose k-NN ball holds a generated sample (Naeem et al. 2020)"},
    "n_real": {"long_name": "real samples of the class", "description": "samples of this class in the real store"},
    "n_fake": {"long_name": "generated samples of the class", "description": "samples of this class in the generated store"},
    "note": {"long_name": "note", "description": "why a metric is NaN for this class (too few samples), else empty"},
    "label": {"long_name": "ImageNet-1k class index", "description": "0-based index in sorted-WNID order"},
    "synset": {"long_name": "WordNet ID of the class", "description": "WNID such as n01440764"},
    "class_name": {"long_name": "class name", "description": "ImageNet-1k class name from the packaged class table"},
}


class CompareError(AnalysisInputError):
    """Two activation stores (or a store and reference statistics) cannot be compared: the message says why."""


@dataclass(frozen=True)
class CompareOptions:
    """One comparison; `compare_options` builds and checks it (the command line builds its run there too)."""

    generated: str
    layer: str
    real: str | None = None  # the real store, or None with `reference`
    reference: str | None = None  # saved statistics (.npz with mu, sigma) instead of a real store
    metrics: tuple[str, ...] = DEFAULT_METRICS
    per_class: bool = True
    pool: str | None = None  # None: "mean" for unpooled layers; layers pooled at extraction keep theirs
    k: int = 5
    prdc_subset: int = PRDC_SUBSET  # per side; 0: every sample
    prdc_seed: int = PRDC_SEED
    kid_subsets: int = KID_SUBSETS
    kid_subset_size: int = KID_SUBSET_SIZE
    kid_seed: int = KID_SEED
    is_settings: InceptionScoreSettings = InceptionScoreSettings()
    output: str | None = None
    plot: str | None = None
    projection: str = "pca"
    block_size: int = 8192
    scratch_dir: str | None = None

    @property
    def inputs(self) -> list[str]:
        return [p for p in (self.real, self.generated, self.reference) if p is not None]


def parse_metrics(metrics: str | Sequence[str] | None, reference: bool) -> tuple[str, ...]:
    """`fd,kid,prdc,is` (a comma list or a sequence) → the metric groups, checked; None: the defaults."""
    if metrics is None:
        return ("fd",) if reference else DEFAULT_METRICS
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRIC_GROUPS]
    if unknown or not names:
        raise CompareError(f"metrics: unknown {unknown or names!r}; choose from {','.join(METRIC_GROUPS)} (prdc = precision, recall, density, coverage)")
    if reference and set(names) - {"fd", "is"}:
        raise CompareError(f"metrics {','.join(sorted(set(names) - {'fd', 'is'}))} need the real samples; saved statistics (--reference) give FD only (and IS of the store)")
    return tuple(m for m in METRIC_GROUPS if m in names)


def compare_options(
    stores: str | Sequence[str],
    *,
    layer: str,
    reference: str | None = None,
    metrics: str | Sequence[str] | None = None,
    per_class: bool = True,
    pool: str | None = None,
    k: int = 5,
    prdc_subset: int = PRDC_SUBSET,
    prdc_seed: int = PRDC_SEED,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_seed: int = KID_SEED,
    is_layer: str = IS_LAYER,
    is_splits: int = IS_SPLITS,
    is_seed: int = IS_SEED,
    output: str | None = None,
    plot: str | None = None,
    projection: str = "pca",
    block_size: int = 8192,
    scratch_dir: str | None = None,
    overwrite: bool = False,
) -> CompareOptions:
    """`imzarr compare`'s options as keywords, checked before anything is read: REAL GENERATED, or GENERATED with
    `reference`; `output` is claimed (an earlier report there may be replaced; another imzarr store only with
    `overwrite`)."""
    stores = local_file_url_to_path([stores] if isinstance(stores, str) else list(stores))
    reference, output, plot, scratch_dir = local_file_url_to_path([reference, output, plot, scratch_dir])
    if reference is not None and len(stores) != 1:
        raise CompareError(f"with --reference give one store (the generated one), got {len(stores)}: {stores}")
    if reference is None and len(stores) != 2:
        raise CompareError(f"give two stores (real, then generated) or one store and --reference, got {len(stores)}: {stores}")
    if pool is not None and pool not in POOL_MODES:
        raise CompareError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    counts = whole_numbers({
        "-k": (k, 1), "block_size": (block_size, 1), "--prdc-subset": (prdc_subset, 0), "--seed": (prdc_seed, *SEED_64),
        "--kid-subsets": (kid_subsets, 1), "--kid-subset-size": (kid_subset_size, 2), "--kid-seed": (kid_seed, *SEED_32),
        "--is-splits": (is_splits, 1), "is_seed": (is_seed, *SEED_32),
    }, CompareError)  # fmt: skip
    k, block_size, prdc_subset, prdc_seed, kid_subsets, kid_subset_size, kid_seed, is_splits, is_seed = counts.values()
    chosen = parse_metrics(metrics, reference is not None)
    if plot is not None:
        from extractor.analysis.plots import check_plotting

        if reference is not None:
            raise CompareError("--plot draws both feature sets; saved statistics (--reference) have no samples to draw")
        check_plotting(projection)
    real, generated = (None, stores[0]) if reference is not None else (stores[0], stores[1])
    options = CompareOptions(
        generated=generated, layer=layer, real=real, reference=reference, metrics=chosen, per_class=per_class and reference is None,
        pool=pool, k=k, prdc_subset=prdc_subset, prdc_seed=prdc_seed, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
        kid_seed=kid_seed, is_settings=InceptionScoreSettings(is_layer, is_splits, is_seed), output=output, plot=plot, projection=projection,
        block_size=block_size, scratch_dir=scratch_dir,
    )  # fmt: skip
    if scratch_dir is not None:
        check_scratch_location(scratch_dir, output, options.inputs)
    if output is not None:
        claim_report_output(output, REPORT_SCHEMA, overwrite, options.inputs)
    if plot is not None:
        refuse_process_bound_output(plot)
        check_output_location(plot, options.inputs + ([output] if output else []))
        check_png_output(plot, "the plot", "compare.png")
    return options


def compare_stores(a_url: str, b_url: str, layer: str, log: TextIO | None = None, **options) -> xr.Dataset:
    """Compare store `b_url` (generated) against store `a_url` (real) on one layer; return the report Dataset.

    Keywords as `compare_options` takes them. Overall (attributes): Fréchet distance of Gaussians fitted to each
    store, KID over seeded subsets, precision/recall/density/coverage on a seeded subset of each side. Per class
    (classes present in both stores, all their samples): the same metrics plus sample counts, as variables on
    dim `label`; NaN with a note where a side has too few samples. Unpooled layers are reduced spatially with
    `pool` ("mean"/"max"; None: "mean"), or flattened with "none" (at most 4096 values); layers pooled at extraction
    keep their pooling (another `pool` is refused). `output` writes the report as Zarr v3, `plot` a PNG (projection "pca" or "umap").
    """
    refuse_unknown_keywords(options, set(keyword_names(compare_options)) - {"reference"}, "compare_stores")
    return compare(compare_options([a_url, b_url], layer=layer, **options), log=log)


def compare_to_reference(store: str, reference: str, layer: str, log: TextIO | None = None, **options) -> xr.Dataset:
    """FD (and with metrics "fd,is" the Inception Score) of a store's layer against saved `mu`/`sigma` statistics."""
    refuse_unknown_keywords(options, set(keyword_names(compare_options)) - {"reference"}, "compare_to_reference")
    return compare(compare_options([store], layer=layer, reference=reference, **options), log=log)


def compare(options: CompareOptions, log: TextIO | None = None) -> xr.Dataset:
    """Run a comparison built by `compare_options`; return (and with `output`, write) the report.

    The input stores are leased while they are read, and checked afterwards to be the stores that were opened
    (schemas/store_identity.py): one rewritten meanwhile fails the comparison instead of mixing two stores."""
    started = time.monotonic()
    stores = [url for url in (options.real, options.generated) if url is not None]
    # The threaded scheduler, as every writer runs locally, even where a dask.distributed Client is the default:
    # its workers are other processes, without this one's credentials or memory:// stores.
    with reader_lease(*stores), dask.config.set(scheduler="threads"):
        opened = [StoreIdentity.of(url, dict(zarr.open_group(url, mode="r").attrs)) for url in stores]
        settings = report_settings(options, opened)
        fingerprint = None if settings is None else settings_fingerprint(settings)
        finished = _finished_report(options, fingerprint)
        if finished is not None:
            _log(log, f"{options.output}: already complete (same inputs and settings); nothing to do")
            return finished
        if "is" in options.metrics:
            logits_layer(options.generated, options.is_settings)  # a store without logits is refused before the other work
        if options.reference is not None:
            report = _against_reference(options, log)
        else:
            report = _between_stores(options, log)
        if "is" in options.metrics:
            score = store_inception_score(options.generated, options.is_settings, options.block_size)
            report.attrs.update(inception_score_attrs(score) | {"inception_score_layer": options.is_settings.layer})
            _log(log, f"Inception Score {score.mean:.4f} ± {score.std:.4f} ({score.splits} splits)")
        for identity in opened:
            check_unchanged(identity)  # the features read are still the stores'
    # Which generation of each store the report was made from: `imzarr report` refuses a store rewritten since.
    roles = ("real", "fake") if options.real is not None else ("fake",)
    report.attrs |= {f"{role}_store_generation": identity.generation for role, identity in zip(roles, opened) if identity.generation}
    report.attrs["seconds"] = round(time.monotonic() - started, 3)
    if fingerprint is not None:
        report.attrs["settings_fingerprint"] = fingerprint
    if options.output is not None:
        with dask.config.set(scheduler="threads"):
            write_report(report, options.output)
    _log(log, f"done in {time.monotonic() - started:.1f} s")
    return report


# How PRDC counts ball membership (extractor/analysis/metrics.py): strictly inside, as the authors' code does.
PRDC_BALL = "d < radius"

# Options that say where things go, not what the report holds (block_size stays: the sums' rounding follows it).
NOT_REPORT_SETTINGS = frozenset({"real", "generated", "reference", "output", "plot", "projection", "scratch_dir"})


def report_settings(options: CompareOptions, opened: list[StoreIdentity]) -> dict | None:
    """What a report is made from: its inputs (stores by generation id, a local reference file by size and time)
    and every option its values depend on (and the plot asked for with it); None where an input cannot be told
    apart from a rewrite of it (a store made before generation ids, a remote reference file)."""
    inputs: dict[str, str] = {}
    for identity in opened:
        if identity.generation is None:
            return None
        inputs[str(absolute_url(identity.url))] = identity.generation
    if options.reference is not None:
        local = local_path(options.reference)
        if local is None:
            return None
        stat = os.stat(local)
        inputs[local] = f"{stat.st_size} bytes, modified {stat.st_mtime_ns} ns"
    chosen = {f.name: getattr(options, f.name) for f in fields(options) if f.name not in NOT_REPORT_SETTINGS}
    chosen["pool"] = options.pool or "mean"  # what None means: a report made with the default or with --pool mean is one report
    if options.plot is not None:
        chosen |= {"plot": absolute_url(options.plot), "projection": options.projection}
    if "prdc" in options.metrics:
        # Reports made when a distance equal to the radius counted as inside are remade, not kept as complete.
        chosen["prdc_ball"] = PRDC_BALL
    return {"inputs": inputs, **chosen}


def _finished_report(options: CompareOptions, fingerprint: str | None) -> xr.Dataset | None:
    """The report already at `output`, when it was made from the same inputs and settings and finished (its
    checksum record is written last), with its plot there too; else None (the comparison runs)."""
    if options.output is None or fingerprint is None:
        return None
    if options.plot is not None:
        fs, path = fsspec.core.url_to_fs(options.plot)
        if not fs.exists(path):
            return None
    try:
        attrs = dict(zarr.open_group(options.output, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if attrs.get("schema") != REPORT_SCHEMA or attrs.get("settings_fingerprint") != fingerprint or read_checksum_record(options.output) is None:
        return None
    return open_report(options.output)


# ---------------------------------------------------------------- against saved statistics


def _against_reference(options: CompareOptions, log: TextIO | None) -> xr.Dataset:
    fake = open_layer("generated", options.generated, options.layer, options.pool)
    ref = read_reference(options.reference)
    _check_reference(ref, fake)
    attrs = _base_attrs(options, fake) | {
        "reference": absolute_url(ref.path),  # as the stores' paths are recorded
        "reference_sha256": ref.sha256,
        "reference_dim": ref.dim,
        "reference_metadata": json.dumps(ref.metadata, sort_keys=True),
        "real_store": None,
        "n_real": ref.metadata.get("count"),
        **_side_provenance("fake", fake),
    }
    if "fd" in options.metrics:
        acc = statistics_accumulator(fake.dim)
        stream_layer(fake, options.block_size, [lambda a, b, x: acc.update(x)], log=log)
        if acc.count < 2:
            raise CompareError(f"{fake.url}: {acc.count} samples; FD needs at least 2")
        attrs["fd"] = frechet_distance(ref.mu, ref.sigma, acc.mean, acc.cov)
        _log(log, f"FD against {ref.path}: {attrs['fd']:.4f}")
    attrs["model"], attrs["trained"], attrs["module_path"], attrs["sigma"] = attrs["fake_model"], attrs["fake_trained"], attrs["fake_module_path"], attrs["fake_sigma"]
    # imzarr's statistics record the model and σ of their features; features of another network or noise level
    # differ for that reason alone, as between two stores (said, and recorded as both).
    for key in ("model", "sigma"):
        if key in ref.metadata and ref.metadata[key] != attrs[key]:
            _log(log, f"{key} differs: reference {ref.metadata[key]}, generated {attrs[key]} (the FD measures that difference too)")
            attrs[key] = f"reference {ref.metadata[key]}, generated {attrs[key]}"
    return _dataset(np.zeros(0, np.int64), {}, attrs)


def _check_reference(ref: ReferenceStatistics, fake: LayerFeatures) -> None:
    """A D mismatch, or imzarr metadata naming another layer or pooling, is refused in one line."""
    if ref.dim != fake.dim:
        raise LayerMismatchError(f"{ref.path}: statistics of D={ref.dim} features, but layer {fake.var} of {fake.url} gives D={fake.dim} ({describe(fake)})")
    meta = ref.metadata
    if meta.get("layer") is not None and meta.get("layer") != fake.var and meta.get("module_path") != fake.module_path:
        raise LayerMismatchError(f"{ref.path}: statistics of layer {meta['layer']} ({meta.get('module_path')}), not of {fake.var} ({fake.module_path}) of {fake.url}")
    if meta.get("pool") is not None and meta["pool"] != fake.reduction:
        # A store pooled at extraction holds no other reduction: only extracting again (with that --pool, or
        # unpooled) can give it; an unpooled store is reduced here as --pool says.
        way_out = f"pass --pool {meta['pool']}" if fake.reduce is not None else f"extract the layer again with --pool {meta['pool']} (or --pool none)"
        raise LayerMismatchError(f"{ref.path}: statistics of {meta['pool']!r}-reduced features, but {fake.url} gives {describe(fake)}; {way_out}")


# ---------------------------------------------------------------- between two stores


def _between_stores(options: CompareOptions, log: TextIO | None) -> xr.Dataset:
    real = open_layer("real", options.real, options.layer, options.pool)
    fake = open_layer("generated", options.generated, options.layer, options.pool)
    check_compatible(real, fake, options.layer)
    classes = _shared_classes(real, fake) if options.per_class else None
    metrics = options.metrics
    if "prdc" in metrics:
        for side in (real, fake):
            if side.n < options.k + 1:
                raise CompareError(f"{side.url}: {side.n} samples; k-NN metrics with k={options.k} need at least {options.k + 1}")
    attrs = _base_attrs(options, real) | {"n_real": real.n, "n_fake": fake.n, "real_store": absolute_url(real.url), **_provenance(real, fake)}
    with tempfile.TemporaryDirectory(prefix="imzarr-compare-", dir=options.scratch_dir) as scratch:
        stats = [statistics_accumulator(side.dim) for side in (real, fake)]
        real_rows = stream_layer(real, options.block_size, [lambda a, b, x: stats[0].update(x)], Path(scratch), log)
        fake_rows = stream_layer(fake, options.block_size, [lambda a, b, x: stats[1].update(x)], Path(scratch), log)
        if "fd" in metrics:
            if max(real.n, fake.n) <= real.dim:
                # Fewer samples than dimensions: rank-deficient covariances, whose square root amplifies the float32
                # products' rounding (an FD of -4e-5 for a store against its copy, measured). The exact n×n form
                # costs nothing at this size.
                attrs["fd"] = frechet_distance_from_samples(real_rows.take(np.arange(real.n)), fake_rows.take(np.arange(fake.n)))
            else:
                attrs["fd"] = frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)
            _log(log, f"overall FD {attrs['fd']:.4f}")
        if "kid" in metrics:
            size = class_subset_size(real.n, fake.n, options.kid_subset_size)
            if size < 2:
                raise CompareError(f"KID needs at least 2 samples per side, got {real.n} real and {fake.n} generated")
            result = kid_from_takers(real_rows.take, real.n, fake_rows.take, fake.n, options.kid_subsets, size, options.kid_seed)
            attrs |= {"kid": result.mean, "kid_std": result.std, "kid_subsets": result.subsets, "kid_subset_size": result.subset_size, "kid_seed": result.seed}
            _log(log, f"overall KID {result.mean:.6f} ± {result.std:.6f} ({result.subsets} subsets of {result.subset_size})")
            if size >= max(real.n, fake.n):  # without replacement, every subset is then both sides whole
                _log(log, f"KID: subsets of {size} take every sample of both sides ({real.n} real, {fake.n} generated), so the {result.subsets} subsets are one and ± 0 is no spread; more samples give one")
            elif size < options.kid_subset_size:
                _log(log, f"KID: subsets of {size}, not {options.kid_subset_size}: a side has only {min(real.n, fake.n)} samples (recorded as kid_subset_size)")
        if "prdc" in metrics:
            attrs |= _overall_prdc(options, real_rows, fake_rows, stats[0].mean, log)
        labels, values = np.zeros(0, np.int64), {}
        if options.per_class:
            labels, values = _per_class(options, real, fake, real_rows, fake_rows, log)
        report = _dataset(labels, values, attrs, classes)
        if options.plot is not None:
            from extractor.analysis.plots import plot_comparison

            real_x, real_y = _plot_sample(real_rows, real.labels)
            fake_x, fake_y = _plot_sample(fake_rows, fake.labels)
            plot_comparison(real_x, fake_x, report, options.plot, projection=options.projection, real_labels=real_y, fake_labels=fake_y)
    known_r, known_f = set(np.unique(real.labels[real.labels >= 0]).tolist()), set(np.unique(fake.labels[fake.labels >= 0]).tolist())
    report.attrs |= {"classes_only_in_real": len(known_r - known_f), "classes_only_in_fake": len(known_f - known_r)}
    for side, features, only in (("real", real, known_r - known_f), ("generated", fake, known_f - known_r)):
        unlabelled = int((features.labels < 0).sum())
        if unlabelled:
            _log(log, f"{unlabelled:,} of {features.n:,} samples of the {side} store have no label (-1): they count overall, in no class")
        if only:
            shown = sorted(only)[:8]
            names = label_names(np.array(shown), classes_lookup(features.attrs))[1]
            listed = ", ".join(f"{label} {name}" for label, name in zip(shown, names))
            _log(log, f"{_classes(len(only))} only in the {side} store, so in no per-class row: {listed}{' …' if len(only) > 8 else ''}")
    return report


def _overall_prdc(options: CompareOptions, real_rows: RowFile, fake_rows: RowFile, shift: np.ndarray, log: TextIO | None) -> dict:
    """Precision/recall/density/coverage on a seeded subset of each side (every sample with prdc_subset 0)."""
    rng = np.random.default_rng(options.prdc_seed)
    picks = []
    for rows in (real_rows, fake_rows):
        size = rows.n if options.prdc_subset == 0 else min(rows.n, options.prdc_subset)
        picks.append(np.arange(rows.n) if size == rows.n else np.sort(rng.choice(rows.n, size, replace=False)))
    idx_r, idx_f = picks
    _log(log, f"k-NN over {idx_r.size} × {idx_f.size} samples")
    result = prdc_blocked(
        real_rows.reader(idx_r), idx_r.size, fake_rows.reader(idx_f), idx_f.size, k=options.k, block_size=options.block_size, dtype=BLOCKED_DTYPE, shift=shift
    )
    return result.as_dict() | {"prdc_subset_real": int(idx_r.size), "prdc_subset_fake": int(idx_f.size), "prdc_seed": options.prdc_seed, "k": options.k}


def _plot_sample(rows: RowFile, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Up to PLOT_SAMPLE_ROWS feature rows drawn at random (seeded), with their labels."""
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(rows.n, size=min(rows.n, PLOT_SAMPLE_ROWS), replace=False))
    return rows.take(idx), labels[idx]


# ---------------------------------------------------------------- per class


def _per_class(
    options: CompareOptions, real: LayerFeatures, fake: LayerFeatures, real_rows: RowFile, fake_rows: RowFile, log: TextIO | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    started = time.monotonic()
    groups_r, groups_f = class_rows(real.labels), class_rows(fake.labels)
    labels = np.array(sorted(set(groups_r) & set(groups_f)), dtype=np.int64)
    names = _per_class_names(options.metrics)
    values: dict[str, np.ndarray] = {m: np.full(labels.size, np.nan) for m in names}
    if "kid" in options.metrics:
        values["kid_subset_size"] = np.zeros(labels.size, dtype=np.int64)
    values["n_real"] = np.zeros(labels.size, dtype=np.int64)
    values["n_fake"] = np.zeros(labels.size, dtype=np.int64)
    values["note"] = np.full(labels.size, "", dtype=object)
    for i, c in enumerate(labels.tolist()):
        idx_r, idx_f = groups_r[c], groups_f[c]
        values["n_real"][i], values["n_fake"][i] = idx_r.size, idx_f.size
        found, note = _class_metrics(options, real_rows, idx_r, fake_rows, idx_f)
        for name, value in found.items():
            values[name][i] = value
        values["note"][i] = note
    _log(log, f"{_classes(labels.size)} compared in {time.monotonic() - started:.1f} s")
    return labels, values


def _per_class_names(metrics: tuple[str, ...]) -> list[str]:
    names = []
    if "fd" in metrics:
        names.append("fd")
    if "kid" in metrics:
        names += ["kid", "kid_std"]
    if "prdc" in metrics:
        names += list(PRDC_NAMES)
    return names


def _class_metrics(options: CompareOptions, real_rows: RowFile, idx_r: np.ndarray, fake_rows: RowFile, idx_f: np.ndarray) -> tuple[dict, str]:
    n_r, n_f, k, block_size = idx_r.size, idx_f.size, options.k, options.block_size
    notes, found = [], {}
    small = max(n_r, n_f) <= IN_MEMORY_CLASS_ROWS
    if small:
        real_x, fake_x = real_rows.take(idx_r), fake_rows.take(idx_f)
    if "fd" in options.metrics:
        if min(n_r, n_f) < 2:
            notes.append("FD needs at least 2 samples per side")
        else:
            found["fd"] = frechet_distance_from_samples(real_x, fake_x) if small else _blocked_fd(real_rows, idx_r, fake_rows, idx_f, block_size)
    if "kid" in options.metrics:
        size = class_subset_size(n_r, n_f, options.kid_subset_size)
        if size < 2:
            notes.append("KID needs at least 2 samples per side")
        else:
            take_r, take_f = (lambda i: real_x[i], lambda i: fake_x[i]) if small else (lambda i: real_rows.take(idx_r[i]), lambda i: fake_rows.take(idx_f[i]))
            result = kid_from_takers(take_r, n_r, take_f, n_f, options.kid_subsets, size, options.kid_seed)
            found |= {"kid": result.mean, "kid_std": result.std, "kid_subset_size": size}
    if "prdc" in options.metrics:
        if min(n_r, n_f) < k + 1:
            notes.append(f"k-NN metrics need at least k+1={k + 1} samples per side")
        elif small:
            found |= prdc(real_x, fake_x, k=k).as_dict()
        else:
            shift = real_rows.take(idx_r[: min(n_r, block_size)]).mean(axis=0)
            found |= prdc_blocked(
                real_rows.reader(idx_r), n_r, fake_rows.reader(idx_f), n_f, k=k, block_size=block_size, dtype=BLOCKED_DTYPE, shift=shift
            ).as_dict()
    return found, "; ".join(notes)


def _blocked_fd(real_rows: RowFile, idx_r: np.ndarray, fake_rows: RowFile, idx_f: np.ndarray, block_size: int) -> float:
    stats = []
    for rows, idx in ((real_rows, idx_r), (fake_rows, idx_f)):
        acc = GaussianAccumulator(rows.dim)
        for a in range(0, idx.size, block_size):
            acc.update(rows.take(idx[a : a + block_size]))
        stats.append(acc)
    return frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)


# ---------------------------------------------------------------- the report


def _base_attrs(options: CompareOptions, side: LayerFeatures) -> dict:
    attrs = {
        "schema": REPORT_SCHEMA,
        "layer": options.layer,
        "variable": side.var,
        "pool": side.reduction,
        "metrics": ",".join(options.metrics),
        "fake_store": absolute_url(options.generated),
        "n_fake": None,
        "per_class": bool(options.per_class),
        "blocked_knn_dtype": str(BLOCKED_DTYPE).removeprefix("torch."),
        "versions": json.dumps(versions(), sort_keys=True),
    }
    if "fd" in options.metrics and options.per_class:
        attrs["per_class_fd_note"] = PER_CLASS_FD_NOTE
    if "kid" in options.metrics and options.per_class:
        attrs["per_class_kid_note"] = PER_CLASS_KID_NOTE
    if options.reference is not None:
        attrs["n_fake"] = side.n
    return attrs


def _dataset(labels: np.ndarray, values: dict[str, np.ndarray], attrs: dict, classes: dict[int, tuple[str, str]] | None = None) -> xr.Dataset:
    """The report: per-class `values` along `label`, named by the stores' recorded `classes` (else ImageNet-1k)."""
    synsets, names = label_names(labels, classes or {})
    data_vars = {name: (REPORT_DIM, array, dict(REPORT_VARIABLE_ATTRS[name])) for name, array in values.items()}
    coords = {
        "label": (REPORT_DIM, labels.astype(np.int16), dict(REPORT_VARIABLE_ATTRS["label"])),
        "synset": (REPORT_DIM, synsets, dict(REPORT_VARIABLE_ATTRS["synset"])),
        "class_name": (REPORT_DIM, names, dict(REPORT_VARIABLE_ATTRS["class_name"])),
    }
    return xr.Dataset(data_vars, coords=coords, attrs={k: v for k, v in attrs.items() if v is not None})


def _shared_classes(real: LayerFeatures, fake: LayerFeatures) -> dict[int, tuple[str, str]]:
    """{label: (WNID, name)} both stores record; a label the two name differently is refused (per-class metrics
    would pair different classes: a store of numbered folders against an ImageNet generator's samples)."""
    recorded = [classes_lookup(side.attrs) for side in (real, fake)]
    for label in sorted(recorded[0].keys() & recorded[1].keys()):
        if recorded[0][label][0] != recorded[1][label][0]:
            # Activation stores made before 2026-12-07 recorded ImageNet names for an image store's own classes;
            # their samples' coordinates (copied from the image store) name them right.
            recorded[0][label], recorded[1][label] = _sample_class(real, label), _sample_class(fake, label)
        if recorded[0][label][0] != recorded[1][label][0]:
            (a, a_name), (b, b_name) = recorded[0][label], recorded[1][label]
            raise CompareError(
                f"{fake.url}: label {label} is {b} ({b_name}) there but {a} ({a_name}) in {real.url}: the stores number classes differently, "
                "so per-class metrics would pair different classes (--no-per-class compares them overall)"
            )
    return recorded[1] | recorded[0]


def _sample_class(side: LayerFeatures, label: int) -> tuple[str, str]:
    """(WNID, class name) of `label` as the store's first sample of it records them."""
    row = int(np.flatnonzero(side.labels == label)[0])
    group = zarr.open_group(side.url, mode="r")
    return str(group["synset"][row]), str(group["class_name"][row])


def _side_provenance(prefix: str, side: LayerFeatures) -> dict:
    model = side.attrs.get("model") or {}
    return {
        f"{prefix}_model": describe_model(model),
        f"{prefix}_model_sha256": model.get("sha256") or "?",  # whole: a short one names a file, it does not check one
        f"{prefix}_trained": model.get("trained") is True,
        f"{prefix}_sigma": side.attrs.get("sigma"),
        f"{prefix}_module_path": side.module_path,
        # The noise the features were extracted with (None: no noise, a feature network): a seed names the draw.
        f"{prefix}_noise_seed": (side.attrs.get("noise") or {}).get("seed"),
    }


def _provenance(real: LayerFeatures, fake: LayerFeatures) -> dict:
    """Where both feature sets came from: model (preset or checkpoint, short sha256, trained), σ, module, stores.

    Flat keys per side (`real_…`, `fake_…`), plus `model` (one line, or both when they differ) and `trained`
    (true only when both models were trained), so the figure and any reader can state them without the stores.
    """
    out = _side_provenance("real", real) | _side_provenance("fake", fake)
    same_model = out["real_model"] == out["fake_model"]
    out["model"] = out["real_model"] if same_model else f"real: {out['real_model']}; generated: {out['fake_model']}"
    out["trained"] = out["real_trained"] and out["fake_trained"]
    same_module = out["real_module_path"] == out["fake_module_path"]
    out["module_path"] = out["real_module_path"] if same_module else f"real: {out['real_module_path']}; generated: {out['fake_module_path']}"
    out["sigma"] = out["real_sigma"] if out["real_sigma"] == out["fake_sigma"] else f"real {out['real_sigma']}, generated {out['fake_sigma']}"
    return out


def write_report(report: xr.Dataset, output: str) -> None:
    """Write the report as a consolidated Zarr v3 group that `xr.open_zarr(output)` opens without warnings, with
    the crc32c of every data file recorded (`_checksums`, a group xarray does not see)."""
    out = report.copy()
    for name in list(out.variables):
        if out[name].dtype.kind == "U":
            out[name] = out[name].astype(object)  # fixed-width UTF-32 is an unstable zarr v3 extension
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet; xarray opens v3 stores without warnings only with it.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        out.to_zarr(output, mode="w", zarr_format=3, consolidated=False)
        record_checksums(output)  # so that `imzarr verify` can check a copied report byte for byte
        zarr.consolidate_metadata(output)  # after the record, which it then lists as the stores' metadata do


def open_report(path: str) -> xr.Dataset:
    """A compare report, in memory (a few arrays of one row per class), on dimension `label`; reports written
    before it was named so (dimension `class`) are renamed on open."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds = xr.open_zarr(path).load()
    renamed = on_label_dimension(ds)
    if renamed is not ds and "label" in renamed.variables:
        renamed["label"].attrs = dict(REPORT_VARIABLE_ATTRS["label"])
    return renamed


def _num(a: dict, key: str, fmt: str) -> str:
    value = a.get(key)
    return "n/a" if value is None else format(value, fmt)


def format_report_table(ds: xr.Dataset, worst: int = 15) -> str:
    """A short terminal table: the overall line, then the worst-covered (or highest-FD) classes first."""
    a = ds.attrs
    metrics = str(a.get("metrics", "fd,prdc")).split(",")
    k = f", k={a['k']}" if "k" in a else ""
    lines = [f"layer {a['layer']} ({a.get('module_path', '?')}; features: {a['pool']}{k}, σ = {describe_sigma(a.get('sigma'))})", f"  model      {a.get('model', 'not recorded')}"]
    if a.get("reference"):
        lines.append(f"  reference  {a['reference']}  (sha256 {short_sha(a.get('reference_sha256'))}, D = {a.get('reference_dim')})")
    else:
        lines.append(f"  real       {a['real_store']}  ({a['n_real']:,} samples)")
    lines.append(f"  generated  {a['fake_store']}  ({a['n_fake']:,} samples)")
    overall = []
    if "fd" in metrics:
        overall.append(f"FD {_num(a, 'fd', '.4g')}")
    if "kid" in metrics:
        overall.append(f"KID {_num(a, 'kid', '.4g')} ± {_num(a, 'kid_std', '.2g')} ({a.get('kid_subsets')}×{a.get('kid_subset_size')})")
    if "prdc" in metrics:
        overall.append(" ".join(f"{m} {_num(a, m, '.3f')}" for m in PRDC_NAMES) + f" (on {a.get('prdc_subset_real')}×{a.get('prdc_subset_fake')})")
    if "is" in metrics:
        overall.append(f"IS {_num(a, 'inception_score', '.4g')} ± {_num(a, 'inception_score_std', '.2g')}")
    lines.append("overall  " + "  ".join(overall))
    n_classes = ds.sizes.get(REPORT_DIM, 0)
    if not n_classes:
        return "\n".join(lines)
    # Ranked by coverage, else FD, else KID: the first of them defined for some class (coverage needs k+1 samples
    # of a class per side, FD two).
    ranks = [m for m in ("coverage", "fd", "kid") if m in ds]
    key = next((m for m in ranks if not np.isnan(ds[m].values).all()), ranks[0] if ranks else None)
    values = ds[key].values if key else np.zeros(n_classes)
    defined = np.flatnonzero(~np.isnan(values))
    ranked = np.argsort(values[defined], kind="stable")
    order = defined[ranked if key == "coverage" else ranked[::-1]][:worst]
    lines.append(f"per class: {_classes(n_classes)} in both stores; {len(order)} worst {key or ''} first")
    columns = [("fd", "FD", 9, ".4g"), ("kid", "KID", 9, ".3g"), ("precision", "prec", 5, ".3f"), ("recall", "recall", 6, ".3f"), ("density", "dens", 5, ".3f"), ("coverage", "cov", 5, ".3f")]
    shown = [c for c in columns if c[0] in ds]
    lines.append(f"  {'label':>5}  {'synset':<9}  {'class':<24} {'n_real':>6} {'n_fake':>6} " + " ".join(f"{title:>{w}}" for _, title, w, _ in shown))
    for i in order.tolist():
        name = str(ds["class_name"].values[i]).split(",")[0][:24]
        cells = " ".join(f"{ds[v].values[i]:>{w}{f}}" for v, _, w, f in shown)
        lines.append(f"  {int(ds['label'].values[i]):>5}  {ds['synset'].values[i]!s:<9}  {name:<24} {int(ds['n_real'].values[i]):>6} {int(ds['n_fake'].values[i]):>6} {cells}")
    undefined = n_classes - defined.size
    if undefined:
        lines.append(f"  {_classes(undefined)} {'has' if undefined == 1 else 'have'} too few samples for {key} (NaN; see the `note` variable)")
    if a.get("classes_only_in_real") or a.get("classes_only_in_fake"):
        lines.append(f"  classes only in the real store: {a['classes_only_in_real']}, only in the generated store: {a['classes_only_in_fake']}")
    return "\n".join(lines)


def _log(log: TextIO | None, message: str) -> None:
    if log is not None:
        print(f"[compare] {message}", file=log, flush=True)


def _classes(n: int) -> str:
    """`1 class`, `3 classes`."""
    return f"{n} class" if n == 1 else f"{n} classes"

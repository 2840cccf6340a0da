"""`imzarr compare`: how a generated activation store differs from a reference ("real") one, overall and per class.

One streaming pass per store reads the layer in blocks, reduces each sample to a feature vector (spatial mean
or max, or the flattened map), feeds the streaming Gaussian statistics and spills the float32 features to a raw
file in a scratch folder. Everything after that reads the spill files: the blocked k-NN metrics over all
samples, and each class's rows (a few hundred at most in ImageNet-sized stores) for the per-class metrics.
Memory therefore stays at a few blocks whatever the store sizes; disk use is the two feature sets in float32.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import xarray as xr
import zarr

from extractor.analysis.provenance import describe_model, short_sha
from extractor.analysis.metrics import (
    PRDC,
    GaussianAccumulator,
    frechet_distance,
    frechet_distance_from_samples,
    prdc,
    prdc_blocked,
)
from schemas.activation_store import validate_activation_store
from schemas.classes import class_table
from schemas.errors import ImzarrError
from schemas.store_identity import StoreIdentity, check_unchanged, reader_lease

REPORT_SCHEMA = "imzarr.compare/1"
POOLS = ("mean", "max", "none")
MAX_FLAT_DIM = 4096  # flattened maps beyond this make k-NN in that space meaningless and the covariance huge
READ_BUDGET_BYTES = 128 << 20  # stored bytes of one read block (unpooled maps are ~100 KB per sample)
IN_MEMORY_CLASS_ROWS = 2048  # larger classes go through the blocked k-NN (2048² float64 distances = 32 MB)
PLOT_SAMPLE_ROWS = 5000  # per side
# Blocked k-NN over whole stores runs in float32 on features centred on the real mean: about twice as fast as
# float64 here, and centring keeps the relative error of squared distances near 1e-6, far below sampling noise.
BLOCKED_DTYPE = torch.float32
PER_CLASS_FD_NOTE = (
    "per-class FD uses each class's sample covariance, rank-deficient when a class has fewer samples than "
    "feature dimensions; compare it only across classes of similar size"
)
METRICS = ("fd", "precision", "recall", "density", "coverage")
# The report describes itself (long_name, description) like the stores it compares.
REPORT_VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    "fd": {"long_name": "Fréchet distance", "description": "||μr−μg||² + Tr(Σr + Σg − 2(ΣrΣg)^½) of Gaussians fitted to the class's real and generated features"},
    "precision": {"long_name": "k-NN precision", "description": "fraction of generated samples inside some real sample's k-NN ball (Kynkäänniemi et al. 2019)"},
    "recall": {"long_name": "k-NN recall", "description": "fraction of real samples inside some generated sample's k-NN ball (Kynkäänniemi et al. 2019)"},
    "density": {"long_name": "density", "description": "mean count of real k-NN balls holding a generated sample, divided by k (Naeem et al. 2020)"},
    "coverage": {"long_name": "coverage", "description": "fraction of real samples whose k-NN ball holds a generated sample (Naeem et al. 2020)"},
    "n_real": {"long_name": "real samples of the class", "description": "samples of this class in the real store"},
    "n_fake": {"long_name": "generated samples of the class", "description": "samples of this class in the generated store"},
    "note": {"long_name": "note", "description": "why a metric is NaN for this class (too few samples), else empty"},
    "class": {"long_name": "ImageNet-1k class index", "description": "0-based index in sorted-WNID order"},
    "synset": {"long_name": "WordNet ID of the class", "description": "WNID such as n01440764"},
    "class_name": {"long_name": "class name", "description": "ImageNet-1k class name from the packaged class table"},
}


class CompareError(ImzarrError):
    """Two activation stores (or a layer of them) cannot be compared: the message names the store and why."""


class LayerMismatchError(CompareError):
    """The layer is missing from a store, or its features differ in shape or reduction between the stores."""


class NonFiniteFeaturesError(CompareError):
    """A store holds inf or NaN activations (float16 overflow, or a diverged network)."""


@dataclass
class _Side:
    """One store's layer and how its samples become feature vectors."""

    role: str  # "real" or "generated", for messages
    url: str
    var: str
    array: zarr.Array
    reduce: str | None  # spatial reduction compare applies (None: the store is pooled already)
    reduction: str  # what each feature is, whoever did it: "mean", "max" or "none" (flattened)
    dim: int
    labels: np.ndarray
    attrs: dict  # the store's group attributes: model, σ, layers (provenance)

    @property
    def n(self) -> int:
        return int(self.array.shape[0])


class _RowFile:
    """Float32 features spilled to a raw file: block reads for the k-NN passes, row gathers for classes."""

    def __init__(self, path: Path, n: int, dim: int):
        self.path, self.n, self.dim = path, n, dim
        self.row_bytes = dim * 4

    def read(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.dim
        return np.fromfile(self.path, dtype=np.float32, count=count, offset=start * self.row_bytes).reshape(-1, self.dim)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at sorted indices; one pread per run of adjacent rows."""
        out = np.empty((indices.size, self.dim), dtype=np.float32)
        if indices.size == 0:
            return out
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        starts, stops = np.concatenate([[0], breaks]), np.concatenate([breaks, [indices.size]])
        with open(self.path, "rb") as f:
            fd = f.fileno()
            for a, b in zip(starts.tolist(), stops.tolist()):
                raw = os.pread(fd, (b - a) * self.row_bytes, int(indices[a]) * self.row_bytes)
                out[a:b] = np.frombuffer(raw, dtype=np.float32).reshape(b - a, self.dim)
        return out

    def reader(self, indices: np.ndarray):
        """A (start, stop) reader over the given rows, for the blocked metrics."""
        return lambda a, b: self.take(indices[a:b])


def compare_stores(
    a_url: str,
    b_url: str,
    layer: str,
    per_class: bool = True,
    pool: str = "mean",
    k: int = 5,
    output: str | None = None,
    plot: str | None = None,
    block_size: int = 8192,
    projection: str = "pca",
    scratch_dir: str | None = None,
    log: TextIO | None = None,
) -> xr.Dataset:
    """Compare store `b_url` (generated) against store `a_url` (real) on one layer; return the report Dataset.

    Overall: Fréchet distance of Gaussians fitted to each store, and k-NN precision/recall/density/coverage
    (attrs). Per class (classes present in both stores): the same metrics plus sample counts (variables on dim
    `class`); NaN with a note where a side has too few samples. Unpooled layers are reduced spatially with `pool`
    ("mean"/"max"), or flattened with "none" (at most 4096 values); layers pooled at extraction keep their pooling.
    `output` writes the report as Zarr v3,
    `plot` a PNG (projection "pca" or "umap"); `scratch_dir` holds the spilled float32 features.
    """
    started = time.monotonic()
    if pool not in POOLS:
        raise CompareError(f"pool must be one of {POOLS}, got {pool!r}")
    if k < 1 or block_size < 1:
        raise CompareError(f"k and block_size must be positive, got k={k}, block_size={block_size}")
    if plot is not None:
        from extractor.analysis.plots import check_plotting

        check_plotting(projection)
    with reader_lease(a_url, b_url):  # neither store may be rewritten while it is read (schemas/store_identity.py)
        real = _open_side("real", a_url, layer, pool)
        fake = _open_side("generated", b_url, layer, pool)
        _check_compatible(real, fake, layer)
        for side in (real, fake):
            if side.n < k + 1:
                raise CompareError(f"{side.url}: {side.n} samples; k-NN metrics with k={k} need at least {k + 1}")

        with tempfile.TemporaryDirectory(prefix="imzarr-compare-", dir=scratch_dir) as scratch:
            real_rows, real_stats = _stream_features(real, Path(scratch), block_size, log)
            fake_rows, fake_stats = _stream_features(fake, Path(scratch), block_size, log)
            for side in (real, fake):
                check_unchanged(StoreIdentity.of(side.url, side.attrs))  # the features read are still the stores'
            fd = frechet_distance(real_stats.mean, real_stats.cov, fake_stats.mean, fake_stats.cov)
            _log(log, f"overall FD {fd:.4f}; k-NN over {real.n} × {fake.n} samples")
            overall = prdc_blocked(
                real_rows.read, real.n, fake_rows.read, fake.n, k=k, block_size=block_size, dtype=BLOCKED_DTYPE, shift=real_stats.mean
            )
            classes, per_class_values = _per_class(real, fake, real_rows, fake_rows, k, block_size, log) if per_class else (np.zeros(0, np.int16), None)
            report = _report(real, fake, layer, k, fd, overall, classes, per_class_values, per_class)
            report.attrs["seconds"] = round(time.monotonic() - started, 3)
            if plot is not None:
                from extractor.analysis.plots import plot_comparison

                real_x, real_y = _plot_sample(real_rows, real.labels)
                fake_x, fake_y = _plot_sample(fake_rows, fake.labels)
                plot_comparison(real_x, fake_x, report, plot, projection=projection, real_labels=real_y, fake_labels=fake_y)
        if output is not None:
            write_report(report, output)
        _log(log, f"done in {time.monotonic() - started:.1f} s")
        return report


# ---------------------------------------------------------------- opening and checking


def _open_side(role: str, url: str, layer: str, pool: str) -> _Side:
    group = validate_activation_store(url)
    attrs = dict(group.attrs)
    layers: dict[str, str] = attrs["layers"]
    # Accept the module path a layer was captured from as well as its variable name.
    var = layer if layer in layers else next((v for v, path in layers.items() if path == layer), None)
    if var is None:
        raise LayerMismatchError(f"{url}: no layer {layer!r}; this {role} store has {sorted(layers)}")
    array = group[var]
    if array.ndim == 2:
        return _Side(role, url, var, array, None, str(attrs["pooling"]), int(array.shape[1]), group["label"][:], attrs)
    dim = int(np.prod(array.shape[1:])) if pool == "none" else int(array.shape[1])
    if dim > MAX_FLAT_DIM:
        raise LayerMismatchError(
            f"{url}: layer {var} flattened is {dim} values per sample (shape {tuple(array.shape[1:])}), over {MAX_FLAT_DIM}; "
            f"use --pool mean (or max) to compare its channel means"
        )
    return _Side(role, url, var, array, pool, pool, dim, group["label"][:], attrs)


def _check_compatible(real: _Side, fake: _Side, layer: str) -> None:
    same_shape = real.array.shape[1:] == fake.array.shape[1:] if real.array.ndim == fake.array.ndim else True
    if real.dim != fake.dim or real.reduction != fake.reduction or not same_shape:
        raise LayerMismatchError(
            f"layer {layer}: features differ: {real.url} has per-sample shape {tuple(real.array.shape[1:])} → "
            f"{real.dim} features ({_describe(real)}), {fake.url} has {tuple(fake.array.shape[1:])} → {fake.dim} "
            f"({_describe(fake)})"
        )


def _describe(side: _Side) -> str:
    if side.reduce is None:
        return f"pooled '{side.reduction}' at extraction"
    return "flattened" if side.reduction == "none" else f"spatial {side.reduction} here"


# ---------------------------------------------------------------- the streaming pass


def _stream_features(side: _Side, scratch: Path, block_size: int, log: TextIO | None) -> tuple[_RowFile, GaussianAccumulator]:
    """Read the layer once in blocks: reduce, check, accumulate statistics, spill float32 rows to disk."""
    started = time.monotonic()
    rows = _rows_per_read(side.array, block_size)
    stats = GaussianAccumulator(side.dim)
    path = scratch / f"{side.role}.f32"
    with open(path, "wb") as f:
        for a in range(0, side.n, rows):
            b = min(side.n, a + rows)
            feats = _reduce(side.array[a:b], side.reduce)
            finite = np.isfinite(feats).all(axis=1)
            if not finite.all():
                bad = a + int(np.flatnonzero(~finite)[0])
                raise NonFiniteFeaturesError(
                    f"{side.url}: layer {side.var} has inf/NaN activations (first at sample {bad}, "
                    f"{int((~finite).sum())} samples in rows {a}..{b - 1}); float16 storage overflows beyond ±65504"
                )
            stats.update(feats)
            feats.tofile(f)
    _log(log, f"{side.role} {side.url}: {side.n} samples × {side.dim} features read in {time.monotonic() - started:.1f} s")
    return _RowFile(path, side.n, side.dim), stats


def _rows_per_read(array: zarr.Array, block_size: int) -> int:
    """Rows per read: at most block_size and READ_BUDGET_BYTES, a whole number of inner chunks when possible."""
    row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    rows = max(1, min(block_size, READ_BUDGET_BYTES // max(row_bytes, 1)))
    chunk = int(array.chunks[0])
    return rows if rows < chunk else rows - rows % chunk


def _reduce(block: np.ndarray, reduce: str | None) -> np.ndarray:
    """(n, C[, H, W]) stored values → (n, dim) float32 features."""
    if reduce is None:
        return block.astype(np.float32, copy=False)
    if reduce == "mean":
        return block.mean(axis=(2, 3), dtype=np.float32)  # accumulates float16 in float32 without a full copy
    if reduce == "max":
        return block.max(axis=(2, 3)).astype(np.float32)
    return block.reshape(block.shape[0], -1).astype(np.float32)


def _plot_sample(rows: _RowFile, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Up to PLOT_SAMPLE_ROWS feature rows drawn at random (seeded), with their labels."""
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(rows.n, size=min(rows.n, PLOT_SAMPLE_ROWS), replace=False))
    return rows.take(idx), labels[idx]


# ---------------------------------------------------------------- per class


def _per_class(
    real: _Side, fake: _Side, real_rows: _RowFile, fake_rows: _RowFile, k: int, block_size: int, log: TextIO | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    started = time.monotonic()
    groups_r, groups_f = _class_rows(real.labels), _class_rows(fake.labels)
    classes = np.array(sorted(set(groups_r) & set(groups_f)), dtype=np.int16)
    values: dict[str, np.ndarray] = {m: np.full(classes.size, np.nan) for m in METRICS}
    values["n_real"] = np.zeros(classes.size, dtype=np.int64)
    values["n_fake"] = np.zeros(classes.size, dtype=np.int64)
    values["note"] = np.full(classes.size, "", dtype=object)
    for i, c in enumerate(classes.tolist()):
        idx_r, idx_f = groups_r[c], groups_f[c]
        values["n_real"][i], values["n_fake"][i] = idx_r.size, idx_f.size
        fd, metrics, note = _class_metrics(real_rows, idx_r, fake_rows, idx_f, k, block_size)
        values["fd"][i] = fd
        for name, value in metrics.items():
            values[name][i] = value
        values["note"][i] = note
    _log(log, f"{classes.size} classes compared in {time.monotonic() - started:.1f} s")
    return classes, values


def _class_rows(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Sorted sample positions of every known label (-1, unknown, is left out)."""
    order = np.argsort(labels, kind="stable")  # stable: positions stay ascending within a class
    sorted_labels = labels[order]
    uniq, starts = np.unique(sorted_labels, return_index=True)
    stops = np.append(starts[1:], labels.size)
    return {int(c): order[a:b] for c, a, b in zip(uniq, starts, stops) if c >= 0}


def _class_metrics(
    real_rows: _RowFile, idx_r: np.ndarray, fake_rows: _RowFile, idx_f: np.ndarray, k: int, block_size: int
) -> tuple[float, dict[str, float], str]:
    n_r, n_f = idx_r.size, idx_f.size
    notes = []
    small = max(n_r, n_f) <= IN_MEMORY_CLASS_ROWS
    if small:
        real_x, fake_x = real_rows.take(idx_r), fake_rows.take(idx_f)
    fd = math.nan
    if min(n_r, n_f) < 2:
        notes.append("FD needs at least 2 samples per side")
    elif small:
        fd = frechet_distance_from_samples(real_x, fake_x)
    else:
        fd = _blocked_fd(real_rows, idx_r, fake_rows, idx_f, block_size)
    metrics: dict[str, float] = {}
    if min(n_r, n_f) < k + 1:
        notes.append(f"k-NN metrics need at least k+1={k + 1} samples per side")
    elif small:
        metrics = prdc(real_x, fake_x, k=k).as_dict()
    else:
        shift = real_rows.take(idx_r[: min(n_r, block_size)]).mean(axis=0)
        metrics = prdc_blocked(
            real_rows.reader(idx_r), n_r, fake_rows.reader(idx_f), n_f, k=k, block_size=block_size, dtype=BLOCKED_DTYPE, shift=shift
        ).as_dict()
    return fd, metrics, "; ".join(notes)


def _blocked_fd(real_rows: _RowFile, idx_r: np.ndarray, fake_rows: _RowFile, idx_f: np.ndarray, block_size: int) -> float:
    stats = []
    for rows, idx in ((real_rows, idx_r), (fake_rows, idx_f)):
        acc = GaussianAccumulator(rows.dim)
        for a in range(0, idx.size, block_size):
            acc.update(rows.take(idx[a : a + block_size]))
        stats.append(acc)
    return frechet_distance(stats[0].mean, stats[0].cov, stats[1].mean, stats[1].cov)


# ---------------------------------------------------------------- the report


def _report(
    real: _Side, fake: _Side, layer: str, k: int, fd: float, overall: PRDC, classes: np.ndarray, values: dict | None, per_class: bool
) -> xr.Dataset:
    table = class_table()
    labels = classes.astype(np.int64)
    if values is None:
        values = {m: np.zeros(0) for m in METRICS} | {"n_real": np.zeros(0, np.int64), "n_fake": np.zeros(0, np.int64), "note": np.zeros(0, object)}
    known_r, known_f = set(np.unique(real.labels[real.labels >= 0]).tolist()), set(np.unique(fake.labels[fake.labels >= 0]).tolist())
    attrs = {
        "schema": REPORT_SCHEMA,
        "layer": layer,
        "variable": real.var,
        "pool": real.reduction,
        "k": int(k),
        "fd": float(fd),
        **{name: float(value) for name, value in overall.as_dict().items()},
        "n_real": real.n,
        "n_fake": fake.n,
        "real_store": real.url,
        "fake_store": fake.url,
        "per_class": bool(per_class),
        "classes_only_in_real": len(known_r - known_f),
        "classes_only_in_fake": len(known_f - known_r),
        "per_class_fd_note": PER_CLASS_FD_NOTE,
        "blocked_knn_dtype": str(BLOCKED_DTYPE).removeprefix("torch."),
        **_provenance(real, fake),
    }
    data_vars = {name: ("class", values[name], dict(REPORT_VARIABLE_ATTRS[name])) for name in (*METRICS, "n_real", "n_fake", "note")}
    coords = {
        "class": ("class", classes.astype(np.int16), dict(REPORT_VARIABLE_ATTRS["class"])),
        "synset": ("class", table.synsets_of(labels).astype(object), dict(REPORT_VARIABLE_ATTRS["synset"])),
        "class_name": ("class", table.names_of(labels).astype(object), dict(REPORT_VARIABLE_ATTRS["class_name"])),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _provenance(real: _Side, fake: _Side) -> dict:
    """Where both feature sets came from: model (preset or checkpoint, short sha256, trained), σ, module, stores.

    Flat keys per side (`real_…`, `fake_…`), plus `model` (one line, or both when they differ) and `trained`
    (true only when both models were trained), so the figure and any reader can state them without the stores.
    """
    out: dict = {}
    for prefix, side in (("real", real), ("fake", fake)):
        model = side.attrs.get("model") or {}
        out |= {
            f"{prefix}_model": describe_model(model),
            f"{prefix}_model_sha256": short_sha(model.get("sha256")),
            f"{prefix}_trained": model.get("trained") is True,
            f"{prefix}_sigma": side.attrs.get("sigma"),
            f"{prefix}_module_path": side.attrs["layers"][side.var],
        }
    same_model = out["real_model"] == out["fake_model"]
    out["model"] = out["real_model"] if same_model else f"real: {out['real_model']}; generated: {out['fake_model']}"
    out["trained"] = out["real_trained"] and out["fake_trained"]
    out["module_path"] = out["real_module_path"]
    out["sigma"] = out["real_sigma"] if out["real_sigma"] == out["fake_sigma"] else f"real {out['real_sigma']}, generated {out['fake_sigma']}"
    return out


def write_report(report: xr.Dataset, output: str) -> None:
    """Write the report as a consolidated Zarr v3 group that `xr.open_zarr(output)` opens without warnings."""
    out = report.copy()
    for name in list(out.variables):
        if out[name].dtype.kind == "U":
            out[name] = out[name].astype(object)  # fixed-width UTF-32 is an unstable zarr v3 extension
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet; xarray opens v3 stores without warnings only with it.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        out.to_zarr(output, mode="w", zarr_format=3, consolidated=True)


def format_report_table(ds: xr.Dataset, worst: int = 15) -> str:
    """A short terminal table: the overall line, then the worst-covered classes first."""
    a = ds.attrs
    lines = [
        f"layer {a['layer']} ({a.get('module_path', '?')}; features: {a['pool']}, k={a['k']}, σ = {a.get('sigma', '?')})",
        f"  model      {a.get('model', 'not recorded')}",
        f"  real       {a['real_store']}  ({a['n_real']:,} samples)",
        f"  generated  {a['fake_store']}  ({a['n_fake']:,} samples)",
        f"overall  FD {a['fd']:.4g}  precision {a['precision']:.3f}  recall {a['recall']:.3f}  "
        f"density {a['density']:.3f}  coverage {a['coverage']:.3f}",
    ]
    n_classes = ds.sizes.get("class", 0)
    if not n_classes:
        return "\n".join(lines)
    coverage = ds["coverage"].values
    defined = np.flatnonzero(~np.isnan(coverage))
    order = defined[np.argsort(coverage[defined], kind="stable")][:worst]
    lines.append(f"per class: {n_classes} classes in both stores; {len(order)} worst coverage first")
    header = f"  {'label':>5}  {'synset':<9}  {'class':<24} {'n_real':>6} {'n_fake':>6} {'FD':>9} {'prec':>5} {'recall':>6} {'dens':>5} {'cov':>5}"
    lines.append(header)
    for i in order.tolist():
        name = str(ds["class_name"].values[i]).split(",")[0][:24]
        lines.append(
            f"  {int(ds['class'].values[i]):>5}  {ds['synset'].values[i]!s:<9}  {name:<24} {int(ds['n_real'].values[i]):>6} "
            f"{int(ds['n_fake'].values[i]):>6} {ds['fd'].values[i]:>9.4g} {ds['precision'].values[i]:>5.3f} "
            f"{ds['recall'].values[i]:>6.3f} {ds['density'].values[i]:>5.3f} {coverage[i]:>5.3f}"
        )
    undefined = n_classes - defined.size
    if undefined:
        lines.append(f"  {undefined} classes have too few samples for k-NN metrics (NaN; see the `note` variable)")
    if a.get("classes_only_in_real") or a.get("classes_only_in_fake"):
        lines.append(f"  classes only in the real store: {a['classes_only_in_real']}, only in the generated store: {a['classes_only_in_fake']}")
    return "\n".join(lines)


def _log(log: TextIO | None, message: str) -> None:
    if log is not None:
        print(f"[compare] {message}", file=log, flush=True)

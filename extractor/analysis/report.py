"""`imzarr report`: a compare report as a static web site that opens from disk or any static server.

`DIR/index.html` holds the provenance header, the untrained banner and the overall numbers as plain HTML;
`data/run.js` the per-class table and the whole-run projection; `classes/cNNNN.js` one class's detail (loaded
on demand, so a 1,000-class page opens fast) with its thumbnail grids `classes/cNNNN-{real,fake,near}.jpg`.
Data travels as script files, never fetched: browsers refuse `fetch` of `file://` URLs, but load scripts.
The page's own JavaScript and CSS ship in `report_assets/`; nothing is requested from any other host.

The images are found through the provenance the stores record: the compare report names its two activation
stores, each activation store its image store (`source.url`) and, per sample, the image's position there
(`source_sample`). Features are reduced as compare reduces them (the report's `variable` and `pool`) and spilled
to a float32 file in a scratch folder, so memory stays at a read block and one class's rows.

The report's per-class dimension may be called `class` or `label`; every per-class variable becomes a table
column and every floating-point overall attribute an overall number, so metrics compare adds appear unchanged.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
import mimetypes
import os
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

import dask
import fsspec
import numpy as np
import xarray as xr
from PIL import Image

from extractor.analysis.plots import UNTRAINED_BANNER
from extractor.analysis.provenance import describe_model, describe_sigma, short_sha
from schemas.compare_report import COMPARE_SCHEMA, on_label_dimension
from schemas.activation_store import validate_activation_store
from schemas.errors import ImzarrError
from schemas.image_store import validate_image_store
from schemas.option_values import whole_numbers
from schemas.output_paths import absolute_url, check_output_location, is_relative_path, local_path, write_output_file
from schemas.remote_storage import open_store_group
from schemas.store_identity import GENERATION_ATTR

SITE_SCHEMA = "imzarr.report-site/1"
MARKER = "imzarr-report.json"  # names the folder as a report site this command may replace
SITE_ENTRIES = ("index.html", "assets", "data", "classes")  # everything a site holds besides its marker
ASSETS = ("report.js", "report.css")
THUMBS_PER_SIDE = 16
TILE = 64  # thumbnail side in pixels: ImageNet-64 at its own size; smaller images are upscaled, larger reduced
GRID_COLUMNS = 4
JPEG_QUALITY = 80
MAX_PROJECTION_POINTS = 400  # per side and class: enough to see the shape, small enough to load instantly
CLASSES_PER_BATCH = 64  # classes whose images are read together (one sorted take per image store)
READ_ROWS = 8192
# Attributes that are settings or counts, not overall metrics (every other float attribute is a metric).
NON_METRIC_ATTRS = frozenset({"seconds", "sigma", "k"})
TEXT_FIRST = ("synset", "class_name")
COUNT_COLUMNS = ("n_real", "n_fake")
# compare's metrics in the order it lists them; metrics it adds later follow, in alphabetical order.
METRIC_ORDER = ("fd", "precision", "recall", "density", "coverage")
TITLES = {"synset": "WNID", "class_name": "name", "fd": "FD"}


class ReportSiteError(ImzarrError):
    """The site cannot be made: a missing or unreadable input (named), or an output that is not ours to write."""


@dataclass(frozen=True)
class SiteResult:
    """A written site: where it is, the page to open, and how big it is."""

    url: str
    index: str
    classes: int
    files: int
    bytes: int
    seconds: float


# ---------------------------------------------------------------- claiming the output


def claim_site_output(output: str | None, inputs: list[str] | tuple[str, ...] = (), per_class: int | None = None) -> None:
    """Refuse an output folder that overlaps an input or holds anything but an earlier report site, and a
    thumbnail count without a site to size (`output` None)."""
    if output is None:
        if per_class is not None:
            raise ReportSiteError("--per-class-thumbnails needs --report (the site it sizes)")
        return
    whole_numbers({"--per-class-thumbnails": (per_class, 1)}, ReportSiteError)
    check_output_location(output, [i for i in inputs if i])
    fs, path = fsspec.core.url_to_fs(output)
    if not fs.exists(path):
        return
    if fs.isfile(path):
        raise ReportSiteError(f"{output}: is a file; give a folder for the report site")
    names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
    if not names:
        return
    if MARKER in names:
        try:
            marker = json.loads(fs.cat_file(f"{path.rstrip('/')}/{MARKER}"))
        except (ValueError, OSError):
            marker = {}
        if marker.get("schema") == SITE_SCHEMA:
            return
    raise ReportSiteError(f"{output}: exists and is not an imzarr report site; choose another output folder")


# ---------------------------------------------------------------- inputs


@dataclass
class _Side:
    """One activation store of the comparison: its features per sample and where each sample's image is."""

    role: str
    url: str
    attrs: dict
    labels: np.ndarray
    image_positions: np.ndarray  # source_sample: the image's position in the image store
    images_url: str
    features: np.ndarray  # (n, dim) float32, memory-mapped from the scratch folder


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def open_compare(compare: str | xr.Dataset) -> tuple[xr.Dataset, str | None]:
    """The compare report as a Dataset (and its URL), its per-class dimension named `label`."""
    url = None
    if not isinstance(compare, xr.Dataset):
        url = str(compare)
        if not _exists(url):
            raise ReportSiteError(f"{url}: compare report not found")
        try:
            compare = xr.open_zarr(url, consolidated=None, zarr_format=3).load()
        except Exception as exc:  # zarr raises several types for "not a group"
            raise ReportSiteError(f"{url}: not a compare report ({type(exc).__name__}: {exc})") from None
    schema = compare.attrs.get("schema")
    if schema != COMPARE_SCHEMA:
        raise ReportSiteError(f"{url or 'dataset'}: not a compare report (schema {schema!r}, expected {COMPARE_SCHEMA})")
    return on_label_dimension(compare), url


def _relative_note(url: str) -> str:
    """Stores and reports written before provenance was recorded as absolute paths hold paths as typed."""
    if not is_relative_path(url):
        return ""
    return f"; a path relative to the folder it was made from, not found from {os.getcwd()}: run from that folder"


def _open_side(role: str, url: str, compare_url: str, variable: str, pool: str, scratch: Path, generation: str | None) -> _Side:
    """One side's features, labels and image positions, from the activation store the compare report names: the
    same generation of it (where the report records one) and the image store it was computed from."""
    if not _exists(url):
        raise ReportSiteError(f"{url}: {role} activation store not found (named by the compare report {compare_url}{_relative_note(url)})")
    group = validate_activation_store(url)
    attrs = dict(group.attrs)
    if generation is not None and attrs.get(GENERATION_ATTR) != generation:
        raise ReportSiteError(f"{url}: rewritten (another generation) since {compare_url} was made from it: re-run compare, then report")
    source = attrs.get("source") or {}
    images_url = source.get("url")
    if not images_url:
        raise ReportSiteError(f"{url}: records no image store (attribute source.url); its images cannot be shown")
    if not _exists(images_url):
        raise ReportSiteError(f"{images_url}: {role} image store not found (the source of activation store {url}{_relative_note(images_url)})")
    recorded = source.get("fingerprint")
    if recorded is not None and open_store_group(images_url).attrs.get("settings_fingerprint") != recorded:
        raise ReportSiteError(f"{images_url}: not the image store activation store {url} was computed from (its settings fingerprint differs from the recorded one); re-run extract, compare, then report")
    if variable not in group:
        raise ReportSiteError(f"{url}: no layer variable {variable!r} (the one the compare report {compare_url} used)")
    array = group[variable]
    n = int(array.shape[0])
    dim = int(array.shape[1]) if array.ndim == 2 or pool != "none" else int(np.prod(array.shape[1:]))
    features = np.lib.format.open_memmap(scratch / f"{role}.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, READ_ROWS):
        b = min(n, a + READ_ROWS)
        features[a:b] = reduce_features(array[a:b], pool)
    return _Side(role, url, attrs, np.asarray(group["label"][:]), np.asarray(group["source_sample"][:]), images_url, features)


def reduce_features(block: np.ndarray, pool: str) -> np.ndarray:
    """(n, C[, H, W]) stored activations → (n, dim) float32 features, reduced as compare reduces them."""
    if block.ndim == 2:
        return block.astype(np.float32, copy=False)
    if pool == "mean":
        return block.mean(axis=(2, 3), dtype=np.float32)
    if pool == "max":
        return block.max(axis=(2, 3)).astype(np.float32)
    return block.reshape(block.shape[0], -1).astype(np.float32)


# ---------------------------------------------------------------- numbers


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The rows of x on their top two principal axes (eigenvectors of the scatter matrix), and axis labels
    with each axis's share of the variance."""
    centred = x.astype(np.float64) - x.mean(axis=0)
    eig, vec = np.linalg.eigh(centred.T @ centred)
    eig, vec = np.clip(eig[::-1], 0.0, None), vec[:, ::-1]
    emb = centred @ vec[:, :2]
    if emb.shape[1] < 2:
        emb = np.column_stack([emb, np.zeros(len(emb))])
    total = max(float(eig.sum()), 1e-300)
    return emb, [f"PC{i + 1} ({eig[i] / total:.1%} of variance)" if i < eig.size else f"PC{i + 1}" for i in range(2)]


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a_i − b_j||² for every pair, in float64 (clipped at 0 against rounding)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def nearest_real(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each fake row: the index of its nearest real row and the Euclidean distance to it."""
    d = squared_distances(fake, real)
    idx = d.argmin(axis=1)
    return idx, np.sqrt(d[np.arange(len(fake)), idx])


def typical_real_distance(real: np.ndarray) -> float | None:
    """Median distance from a real sample to its nearest other real sample of the class: the scale a generated
    sample's neighbour distance is read against (far below it suggests a copy). None below two samples."""
    if len(real) < 2:
        return None
    d = squared_distances(real, real)
    np.fill_diagonal(d, np.inf)
    return float(np.median(np.sqrt(d.min(axis=1))))


def _json_number(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _rounded(points: np.ndarray) -> list[list[float]]:
    return np.round(points, 4).tolist()


# ---------------------------------------------------------------- the table and overall numbers


def table_columns(ds: xr.Dataset) -> list[dict[str, Any]]:
    """Every per-class variable (and the class's label, WNID, name) as a column: key, title, description, kind."""
    per_class = [name for name in ds.variables if ds[name].dims == ("label",)]
    order = [n for n in ("label", *TEXT_FIRST, *COUNT_COLUMNS, *METRIC_ORDER) if n in per_class]
    order += sorted(n for n in per_class if n not in order and ds[n].dtype.kind in "fiub")
    order += sorted(n for n in per_class if n not in order)
    columns = []
    for name in order:
        attrs = ds[name].attrs
        kind = "number" if ds[name].dtype.kind in "fiub" else "text"
        columns.append({"key": name, "title": TITLES.get(name, name), "long_name": attrs.get("long_name", name), "description": attrs.get("description", ""), "kind": kind})
    return columns


def overall_metrics(ds: xr.Dataset) -> list[dict[str, Any]]:
    """Every floating-point overall attribute that is not a setting (compare's metrics and any it adds later)."""
    names = [k for k, v in ds.attrs.items() if isinstance(v, float) and k not in NON_METRIC_ATTRS and not k.startswith(("real_", "fake_"))]
    names.sort(key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER else len(METRIC_ORDER), k))
    out = []
    for name in names:
        attrs = ds[name].attrs if name in ds.variables else {}
        out.append({"key": name, "value": _json_number(ds.attrs[name]), "long_name": attrs.get("long_name", name), "description": attrs.get("description", "")})
    return out


def _trained(ds: xr.Dataset, sides: list[_Side]) -> bool:
    """True only when every network behind the features was trained (the report's own `trained`, else the stores')."""
    if "trained" in ds.attrs:
        return ds.attrs["trained"] is True
    return all((side.attrs.get("model") or {}).get("trained") is True for side in sides)


# ---------------------------------------------------------------- thumbnails


def _tile(image_chw: np.ndarray) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0)), "RGB")
    side = img.width
    if side == TILE:
        return img
    if side < TILE:
        scale = max(1, TILE // side)
        img = img.resize((side * scale, side * scale), Image.Resampling.NEAREST)
        return img if img.width == TILE else img.resize((TILE, TILE), Image.Resampling.BILINEAR)
    return img.resize((TILE, TILE), Image.Resampling.LANCZOS)


def grid_jpeg(images: np.ndarray) -> bytes:
    """uint8 (n, 3, S, S) images as one JPEG grid of GRID_COLUMNS columns of TILE-pixel tiles."""
    n = len(images)
    rows = max(1, math.ceil(n / GRID_COLUMNS))
    sheet = Image.new("RGB", (min(n, GRID_COLUMNS) * TILE or TILE, rows * TILE), (0, 0, 0))
    for i in range(n):
        sheet.paste(_tile(images[i]), ((i % GRID_COLUMNS) * TILE, (i // GRID_COLUMNS) * TILE))
    out = io.BytesIO()
    sheet.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


# ---------------------------------------------------------------- writing


class _SiteWriter:
    """Files of the site, written through fsspec (local files appear whole or not at all)."""

    def __init__(self, output: str):
        self.output = output.rstrip("/")
        self.local = local_path(self.output)
        self.fs, self.root = fsspec.core.url_to_fs(self.output)
        self._s3 = "s3" in ([self.fs.protocol] if isinstance(self.fs.protocol, str) else list(self.fs.protocol))
        self.sizes: dict[str, int] = {}
        self._pending: dict[str, bytes] = {}

    def url(self, name: str) -> str:
        return f"{self.output}/{name}"

    def write(self, name: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.sizes[name] = len(raw)
        if self.local is not None:
            write_output_file(str(Path(self.local) / name), raw)
            return
        self._pending[f"{self.root.rstrip('/')}/{name}"] = raw
        if len(self._pending) >= 256:
            self.flush()

    @property
    def files(self) -> int:
        return len(self.sizes)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def flush(self) -> None:
        """Object stores: many small files in concurrent requests, one batch per content type. S3 serves an
        object with the type it was stored with, and a static bucket must serve index.html as text/html."""
        by_type: dict[str | None, dict[str, bytes]] = {}
        for path, raw in self._pending.items():
            by_type.setdefault(mimetypes.guess_type(path)[0], {})[path] = raw
        for content_type, batch in by_type.items():
            extra = {"ContentType": content_type} if content_type and self._s3 else {}
            self.fs.pipe(batch, **extra)
        self._pending = {}

    def remove_previous(self) -> None:
        """An earlier site here (claimed by its marker): remove what a site holds, nothing else."""
        for entry in (*SITE_ENTRIES, MARKER):
            path = f"{self.root.rstrip('/')}/{entry}"
            if self.fs.exists(path):
                self.fs.rm(path, recursive=self.fs.isdir(path))


def _marker(complete: bool, inputs: dict[str, Any]) -> str:
    return json.dumps({"schema": SITE_SCHEMA, "complete": complete, "entries": list(SITE_ENTRIES), "inputs": inputs}, indent=1)


def imzarr_version() -> str:
    try:
        return version("imzarr")
    except PackageNotFoundError:
        return "unknown"


def write_report_site(
    compare: str | xr.Dataset,
    output: str,
    per_class: int | None = None,
    scratch_dir: str | None = None,
    log: TextIO | None = None,
) -> SiteResult:
    """Write the report site for a compare report (its URL, or the Dataset compare returned) into folder `output`.

    `per_class`: real and generated thumbnails shown per class, each generated one with its nearest real sample
    (default THUMBS_PER_SIDE). Returns where the site is and its size.
    """
    # The threaded scheduler, as every writer runs locally, even where a dask.distributed Client is the default:
    # its workers are other processes, without this one's credentials or memory:// stores.
    with dask.config.set(scheduler="threads"):
        return _write_site(compare, output, per_class, scratch_dir, log)


def _write_site(compare: str | xr.Dataset, output: str, per_class: int | None, scratch_dir: str | None, log: TextIO | None) -> SiteResult:
    started = time.monotonic()
    per_class = whole_numbers({"--per-class-thumbnails": (THUMBS_PER_SIDE if per_class is None else per_class, 1)}, ReportSiteError)["--per-class-thumbnails"]
    ds, compare_url = open_compare(compare)
    a = ds.attrs
    source = compare_url or "the compare result"
    stores = [a.get("real_store"), a.get("fake_store")]
    if a.get("reference"):
        raise ReportSiteError(
            f"{source}: compares a store with saved statistics ({a['reference']}), which have no samples to show; "
            "the report site needs a comparison of two activation stores (real, generated)"
        )
    for role, url in zip(("real", "generated"), stores):
        if not url:
            raise ReportSiteError(f"{source}: records no {role} activation store; cannot find its images")
    claim_site_output(output, [compare_url, *stores])
    variable, pool = str(a.get("variable") or a.get("layer")), str(a.get("pool", "mean"))
    with tempfile.TemporaryDirectory(prefix="imzarr-report-", dir=scratch_dir) as scratch:
        real = _open_side("real", stores[0], source, variable, pool, Path(scratch), a.get("real_store_generation"))
        fake = _open_side("generated", stores[1], source, variable, pool, Path(scratch), a.get("fake_store_generation"))
        for side in (real, fake):
            claim_site_output(output, [side.images_url])
        _log(log, f"features read: {len(real.labels)} real, {len(fake.labels)} generated")
        writer = _SiteWriter(output)
        recorded_compare = absolute_url(compare_url) if compare_url else None  # as the stores record their paths
        inputs = {"compare": recorded_compare, "real": real.url, "generated": fake.url, "real_images": real.images_url, "generated_images": fake.images_url}
        writer.remove_previous()
        writer.write(MARKER, _marker(False, inputs))
        run = _write_classes(ds, real, fake, writer, per_class, log)
        run |= _run_data(ds, real, fake)
        writer.write("data/run.js", "window.IMZARR_RUN = " + json.dumps(run, allow_nan=False, separators=(",", ":")) + ";\n")
        for asset in ASSETS:
            writer.write(f"assets/{asset}", files("extractor.analysis").joinpath("report_assets", asset).read_bytes())
        writer.write("index.html", _index_html(ds, real, fake, recorded_compare, run))
        writer.flush()
        writer.write(MARKER, _marker(True, inputs))
        writer.flush()
    seconds = time.monotonic() - started  # the SiteResult says it (the command line prints it once)
    return SiteResult(writer.output, writer.url("index.html"), int(ds.sizes.get("label", 0)), writer.files, writer.bytes, seconds)


def _class_rows(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    uniq, starts = np.unique(labels[order], return_index=True)
    stops = np.append(starts[1:], labels.size)
    return {int(c): order[s:e] for c, s, e in zip(uniq, starts, stops)}


def _write_classes(ds: xr.Dataset, real: _Side, fake: _Side, writer: _SiteWriter, per_class: int, log: TextIO | None) -> dict[str, Any]:
    """Each class's detail file and grids; returns the class means' projection for the whole-run picture."""
    labels = [int(c) for c in ds["label"].values] if "label" in ds.coords else []
    rows_r, rows_f = _class_rows(real.labels), _class_rows(fake.labels)
    real_images, fake_images = validate_image_store(real.images_url), validate_image_store(fake.images_url)
    names = ds["class_name"].values if "class_name" in ds.variables else [""] * len(labels)
    synsets = ds["synset"].values if "synset" in ds.variables else [""] * len(labels)
    means_r, means_f = [], []
    rng = np.random.default_rng(0)
    for start in range(0, len(labels), CLASSES_PER_BATCH):
        batch = []
        for i in range(start, min(len(labels), start + CLASSES_PER_BATCH)):
            c = labels[i]
            idx_r, idx_f = rows_r.get(c, np.zeros(0, np.int64)), rows_f.get(c, np.zeros(0, np.int64))
            x_r, x_f = real.features[idx_r], fake.features[idx_f]
            means_r.append(x_r.mean(axis=0) if len(x_r) else None)
            means_f.append(x_f.mean(axis=0) if len(x_f) else None)
            shown_r, shown_f = idx_r[:per_class], idx_f[:per_class]
            if len(x_r) and len(shown_f):
                near, dist = nearest_real(x_r, fake.features[shown_f])
            else:
                near, dist = np.zeros(0, np.int64), np.zeros(0)
            typical = typical_real_distance(x_r)
            detail = {
                "label": c, "synset": str(synsets[i]), "name": str(names[i]), "n_real": int(len(idx_r)), "n_fake": int(len(idx_f)),
                "tile": TILE, "columns": GRID_COLUMNS, "typical_real_distance": typical,
                "real": {"sample": real.image_positions[shown_r].tolist()},
                "fake": {"sample": fake.image_positions[shown_f].tolist()},
                "near": {
                    "sample": real.image_positions[idx_r[near]].tolist() if near.size else [],
                    "distance": [float(d) for d in dist],
                    "ratio": [float(d) / typical if typical else None for d in dist],
                },
                "projection": _class_projection(x_r, x_f, rng),
            }
            batch.append(detail)
        _write_batch(batch, real_images, fake_images, writer)
        _log(log, f"classes {start + len(batch)}/{len(labels)} written")
    return {"means": _means_projection(labels, means_r, means_f)}


def _class_projection(x_r: np.ndarray, x_f: np.ndarray, rng: np.random.Generator) -> dict[str, Any] | None:
    if len(x_r) + len(x_f) < 3:
        return None
    pick_r = np.sort(rng.choice(len(x_r), MAX_PROJECTION_POINTS, replace=False)) if len(x_r) > MAX_PROJECTION_POINTS else slice(None)
    pick_f = np.sort(rng.choice(len(x_f), MAX_PROJECTION_POINTS, replace=False)) if len(x_f) > MAX_PROJECTION_POINTS else slice(None)
    a, b = x_r[pick_r], x_f[pick_f]
    emb, axes = pca_2d(np.concatenate([a, b]))
    return {"axes": axes, "real": _rounded(emb[: len(a)]), "fake": _rounded(emb[len(a) :]), "of_real": int(len(x_r)), "of_fake": int(len(x_f))}


def _means_projection(labels: list[int], means_r: list, means_f: list) -> dict[str, Any] | None:
    keep = [i for i in range(len(labels)) if means_r[i] is not None and means_f[i] is not None]
    if len(keep) < 2:
        return None
    both = np.concatenate([np.stack([means_r[i] for i in keep]), np.stack([means_f[i] for i in keep])])
    emb, axes = pca_2d(both)
    return {"axes": axes, "label": [labels[i] for i in keep], "real": _rounded(emb[: len(keep)]), "fake": _rounded(emb[len(keep) :])}


def _write_batch(details: list[dict[str, Any]], real_images, fake_images, writer: _SiteWriter) -> None:
    """Read the classes' images with one take per image store, then write each class's grids and detail."""
    positions = {side: [np.asarray(d[side]["sample"], dtype=np.int64) for d in details] for side in ("real", "fake", "near")}
    need_r = np.unique(np.concatenate([np.zeros(0, np.int64), *positions["real"], *positions["near"]]))
    need_f = np.unique(np.concatenate([np.zeros(0, np.int64), *positions["fake"]]))
    pix = {"real": (need_r, real_images.take(need_r)), "fake": (need_f, fake_images.take(need_f))}
    pix["near"] = pix["real"]
    for i, detail in enumerate(details):
        stem = f"classes/c{detail['label']:04d}"
        detail["grids"] = {}
        for side, (need, images) in pix.items():
            if positions[side][i].size:
                writer.write(f"{stem}-{side}.jpg", grid_jpeg(images[np.searchsorted(need, positions[side][i])]))
                detail["grids"][side] = f"{stem}-{side}.jpg"
        payload = json.dumps({k: _json_number(v) for k, v in detail.items()}, allow_nan=False, separators=(",", ":"))
        writer.write(f"{stem}.js", f"window.imzarrClassLoaded({detail['label']},{payload});\n")


def _run_data(ds: xr.Dataset, real: _Side, fake: _Side) -> dict[str, Any]:
    columns = table_columns(ds)
    values = {}
    for col in columns:
        raw = ds[col["key"]].values
        values[col["key"]] = [_json_number(v) for v in raw.tolist()] if col["kind"] == "number" else [str(v) for v in raw.tolist()]
    return {
        "columns": columns,
        "values": values,
        "overall": overall_metrics(ds),
        "counts": {"n_real": _json_number(ds.attrs.get("n_real")), "n_fake": _json_number(ds.attrs.get("n_fake")), "classes": int(ds.sizes.get("label", 0))},
        "trained": _trained(ds, [real, fake]),
        "thumbs_per_side": THUMBS_PER_SIDE,
    }


# ---------------------------------------------------------------- the page


def _describe_noise(noise: Any) -> str:
    if not noise:
        return "none"
    if isinstance(noise, dict) and "recipe" in noise:
        return f"{noise['recipe']}, seed {noise.get('seed', '?')}"
    return json.dumps(noise, sort_keys=True, ensure_ascii=False)


def _per_side(rows: list[tuple[str, str]], what: str, real: str, fake: str) -> None:
    """One row when both feature sets agree, else one per side."""
    if real == fake:
        rows.append((what, real))
    else:
        rows += [(f"{what} (real)", real), (f"{what} (generated)", fake)]


def _provenance_rows(ds: xr.Dataset, real: _Side, fake: _Side, compare_url: str | None) -> list[tuple[str, str]]:
    a = ds.attrs
    rows: list[tuple[str, str]] = []
    models = [side.attrs.get("model") or {} for side in (real, fake)]
    _per_side(rows, "model", *(describe_model(m) for m in models))
    _per_side(rows, "model sha256", *(str(m.get("sha256") or "not recorded") for m in models))
    space = a.get("variable") or a.get("layer")
    rows.append(("feature layer", f"{space} (module {a.get('module_path', '?')}); features: {a.get('pool', '?')}, k = {a.get('k', '?')}"))
    rows.append(("σ", describe_sigma(a.get("sigma", real.attrs.get("sigma")))))
    _per_side(rows, "noise", *(_describe_noise(side.attrs.get("noise")) for side in (real, fake)))
    _per_side(rows, "pooling at extraction", *(str(side.attrs.get("pooling", "?")) for side in (real, fake)))
    rows.append(("compare report", f"{compare_url or '(in memory)'}"))
    for role, side in (("real", real), ("generated", fake)):
        src = side.attrs.get("source") or {}
        rows.append((f"{role} activation store", f"{side.url} (fingerprint {short_sha(side.attrs.get('settings_fingerprint'))})"))
        rows.append((f"{role} image store", f"{src.get('url')} (fingerprint {short_sha(src.get('fingerprint'))})"))
    made_with = sorted({str((s.attrs.get("versions") or {}).get("imzarr", "?")) for s in (real, fake)})
    rows.append(("imzarr", f"{imzarr_version()} (report); features made with {', '.join(made_with)}"))
    rows.append(("date", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    return rows


def format_number(value: Any) -> str:
    """How the page shows a number (the JavaScript's `fmt` follows the same rule): 4 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _index_html(ds: xr.Dataset, real: _Side, fake: _Side, compare_url: str | None, run: dict[str, Any]) -> str:
    e = html.escape
    a = ds.attrs
    title = f"imzarr report: {a.get('layer', '')} — {run['counts']['classes']} classes"
    subtitle = f"{a.get('model', 'model not recorded')} · layer {a.get('layer', '?')} ({a.get('pool', '?')}) · σ {describe_sigma(a.get('sigma'))}"
    banner = "" if run["trained"] else f'<div id="untrained-banner" class="banner" role="alert">{e(UNTRAINED_BANNER)}</div>'
    prov = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _provenance_rows(ds, real, fake, compare_url))
    overall = "".join(
        f'<div class="metric" title="{e(m["description"])}"><span class="name">{e(m["long_name"])}</span>'
        f'<span class="value" data-key="{e(m["key"])}" data-value="{e(json.dumps(m["value"]))}">{e(format_number(m["value"]))}</span></div>'
        for m in run["overall"]
    )
    counts = run["counts"]
    count_line = (
        f'<span data-key="n_real" data-value="{counts["n_real"]}">{format_number(counts["n_real"])}</span> real and '
        f'<span data-key="n_fake" data-value="{counts["n_fake"]}">{format_number(counts["n_fake"])}</span> generated samples; '
        f'<span data-key="classes" data-value="{counts["classes"]}">{counts["classes"]:,}</span> classes in both'
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="assets/report.css">
</head>
<body>
{banner}
<header>
<h1>Real vs generated, per class</h1>
<p class="sub">{e(subtitle)}</p>
<details id="provenance"><summary>Provenance</summary><table class="prov">{prov}</table></details>
</header>
<section id="overall"><h2>Overall</h2><div class="metrics">{overall}</div><p class="counts">{count_line}</p></section>
<main>
<section id="classes">
<div class="toolbar"><input id="filter" type="search" placeholder="Filter by name or WNID" aria-label="filter classes"><span id="shown"></span></div>
<div class="table-wrap"><table id="class-table"><thead></thead><tbody></tbody></table></div>
</section>
<section id="detail"><p class="hint">Choose a class in the table or the projection to see its samples.</p></section>
</main>
<section id="run-projection"><h2>Class means, real and generated</h2><p class="hint">Each class's real mean (circle) joined to its generated mean (square), in one PCA of all class means. Click a point to open its class.</p><div id="means-plot"></div></section>
<script src="data/run.js"></script>
<script src="assets/report.js"></script>
</body>
</html>
"""


def _log(log: TextIO | None, message: str) -> None:
    if log is not None:
        print(f"[report] {message}", file=log, flush=True)

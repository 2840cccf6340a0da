"""Analysis benchmark: what a notebook gets from `xr.open_zarr(store)` with default arguments.

Two questions, each for the layout the project writes now ("as written": made with the writers' own array
functions, called as the converter and the extractor call them, so these rows follow any change to them) and
for a layout to compare with:
- the mean of a whole variable (images; float16 pooled and unpooled activations): samples/s with default dask
  chunks against the best explicit chunking (`chunks={"sample": shard}`); goal ≥ 0.8×;
- grouping the image store by label: `xr.open_zarr`, `ds.label.load()` and `ds.image.groupby("label")`, at
  1,281,167 samples (`quick`: 131,072); goal < 0.2 s.

Image stores are compared with the layout written before issue #12 (64-image inner chunks, every per-sample
array listed as a coordinate and chunked per shard); activation stores with the proposed layout: inner chunks of
about INNER_CHUNK_TARGET_BYTES (xarray takes the inner chunk, not the shard, as its dask chunk: 64-sample chunks
are small, and per-chunk costs dominate); numeric coordinates in one chunk; text arrays left out of the
variables' `coordinates` attribute (a DataArray drags every coordinate along, so `ds.label.load()` would decode
every string). Stores are synthetic and raw (no codec); page cache is warmed by reading the files right before
each timed run (this VM evicts pages unused for ~60 s).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import xarray as xr
import zarr

from extractor.activation_writer import create_activation_arrays, default_shard_size
from schemas.activation_store import COORDINATES as ACTIVATION_COORDINATES
from schemas.activation_store import activation_array_attrs
from schemas.classes import NUM_CLASSES, class_table
from schemas.image_layout import DEFAULT_SHARD, NUMERIC_COORDINATES, create_image_arrays
from schemas.image_store import COORDINATES as IMAGE_COORDINATES
from schemas.variable_attrs import TEXT_VARIABLES, image_store_array_attrs
from tests.benchmarks.run import QuietGate, Row, make_row, warm_files

INNER_CHUNK_TARGET_BYTES = 8 << 20  # proposed: largest power of two of samples within this, capped at the shard
MEAN_GOAL_RATIO = 0.8
GROUPING_GOAL_S = 0.2
FULL_IMAGENET = 1_281_167
ROUNDS = 3
LAYER = "midblock"


def proposed_inner_chunk(bytes_per_sample: int, shard: int) -> int:
    """Largest power of two of samples whose bytes fit INNER_CHUNK_TARGET_BYTES, at least 1, at most the shard."""
    fit = max(1, INNER_CHUNK_TARGET_BYTES // max(bytes_per_sample, 1))
    return int(min(shard, 1 << (fit.bit_length() - 1)))


# ---------------------------------------------------------------- stores


def _fill(url: str, var: str, n: int, shard: int, block: np.ndarray) -> None:
    """Write every shard of `var` whole (a repeated block: values do not matter to raw-byte reads)."""
    array = zarr.open_array(url, path=var, mode="r+").with_config({"write_empty_chunks": True})
    for a in range(0, n, shard):
        array[a : min(n, a + shard)] = block[: min(shard, n - a)]


def _coordinate_values(n: int, names: list[str]) -> dict[str, np.ndarray]:
    labels = np.sort(np.random.default_rng(0).integers(0, NUM_CLASSES, n)).astype(np.int16)
    table = class_table()
    synsets = table.synsets_of(labels)
    values = {
        "label": labels,
        "synset": synsets,
        "class_name": table.names_of(labels),
        "global_index": np.arange(n, dtype=np.int64),
        "source_file": np.char.add(np.char.add("train/", synsets.astype(str)), ".JPEG").astype(object),
        "source_row": np.arange(n, dtype=np.int64),
        "source_sample": np.arange(n, dtype=np.int64),
    }
    return {name: values[name] for name in names}


def _write_coordinates(url: str, n: int, names: list[str]) -> None:
    group = zarr.open_group(url, mode="r+")
    for name, values in _coordinate_values(n, names).items():
        group[name][:] = values


def _proposed_coordinates(group: zarr.Group, n: int, names: list[str], shard: int) -> None:
    """Numeric coordinates in one chunk (a client writes them whole); text arrays per shard, as now."""
    attrs = image_store_array_attrs([c for c in names if c in IMAGE_COORDINATES]) | activation_array_attrs({}, "none", 1.0, "float32", False)
    for name in names:
        text = name in TEXT_VARIABLES
        group.create_array(
            name, shape=(n,), dtype=str if text else ("int16" if name == "label" else "int64"), chunks=(shard if text else n,),
            fill_value="" if text else -1, compressors="auto" if text else None, dimension_names=("sample",), attributes=attrs[name],
        )


def _finish(url: str) -> str:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(url)
    return url


EARLIER_IMAGE_INNER = 64  # the image store's inner chunk before issue #12


def _image_arrays(group: zarr.Group, n: int, resolution: int, written: bool) -> None:
    """`image` and its per-sample arrays: as the converter creates them now, or as it did before issue #12."""
    names = list(IMAGE_COORDINATES)
    if written:
        numeric = _coordinate_values(n, list(NUMERIC_COORDINATES))
        create_image_arrays(group, n, resolution, DEFAULT_SHARD, None, coordinates=numeric)  # the converter's call
        return
    group.create_array(
        "image", shape=(n, 3, resolution, resolution), dtype="uint8", chunks=(EARLIER_IMAGE_INNER, 3, resolution, resolution),
        shards=(DEFAULT_SHARD, 3, resolution, resolution), compressors=None, fill_value=0, dimension_names=("sample", "channel", "y", "x"),
        attributes={"coordinates": " ".join(names)},
    )
    for name in names:
        text = name in TEXT_VARIABLES
        group.create_array(
            name, shape=(n,), dtype=str if text else ("int16" if name == "label" else "int64"), chunks=(DEFAULT_SHARD,),
            fill_value="" if text else -1, compressors="auto" if text else None, dimension_names=("sample",),
        )


def _layout_name(written: bool) -> str:
    return "written" if written else "earlier"


def image_store(workdir: Path, n: int, written: bool) -> tuple[str, str, int]:
    """A 64-px image store (url, variable, shard): as the converter lays it out now, or as before issue #12."""
    url = str(workdir / f"images-{n}-{_layout_name(written)}.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    _image_arrays(group, n, 64, written)
    block = np.random.default_rng(1).integers(0, 256, (DEFAULT_SHARD, 3, 64, 64), dtype=np.uint8)
    _fill(url, "image", n, DEFAULT_SHARD, block)
    _write_coordinates(url, n, list(IMAGE_COORDINATES))
    return _finish(url), "image", DEFAULT_SHARD


def activation_store(workdir: Path, n: int, shape: tuple[int, ...], proposed: bool) -> tuple[str, str, int]:
    """A float16 activation store of one layer: as the extractor lays it out now, or as proposed (with attrs)."""
    tag = "x".join(map(str, shape))
    url = str(workdir / f"acts-{tag}-{n}-{'proposed' if proposed else 'written'}.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    shard = default_shard_size({LAYER: shape}, "float16")
    names = list(ACTIVATION_COORDINATES)
    attrs = activation_array_attrs({LAYER: f"model.{LAYER}"}, "mean" if len(shape) == 1 else "none", 0.5, "float16", False)
    if proposed:
        inner = proposed_inner_chunk(int(np.prod(shape)) * 2, shard)
        group.create_array(
            LAYER, shape=(n, *shape), dtype="float16", chunks=(inner, *shape), shards=(shard, *shape), compressors=None,
            fill_value=0.0, dimension_names=("sample", *(f"{LAYER}_{d}" for d in ("channel", "y", "x")[: len(shape)])), attributes=attrs[LAYER],
        )
        _proposed_coordinates(group, n, names, shard)
    else:
        create_activation_arrays(group, n, {LAYER: shape}, "float16", shard, None)
        group[LAYER].update_attributes(attrs[LAYER] | {"coordinates": " ".join(names)})  # values decoded as the writer will
    block = np.random.default_rng(2).normal(0, 1, (shard, *shape)).astype(np.float16)
    _fill(url, LAYER, n, shard, block)
    _write_coordinates(url, n, names)
    return _finish(url), LAYER, shard


def coordinates_only_store(workdir: Path, n: int, written: bool) -> str:
    """An n-sample image store of 1×1-px images: the per-sample arrays grouping by label reads, at any size."""
    url = str(workdir / f"coords-{n}-{_layout_name(written)}.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    _image_arrays(group, n, 1, written)
    _fill(url, "image", n, DEFAULT_SHARD, np.ones((DEFAULT_SHARD, 3, 1, 1), dtype=np.uint8))
    _write_coordinates(url, n, list(IMAGE_COORDINATES))
    return _finish(url)


# ---------------------------------------------------------------- timing


def _best_seconds(url: str, action: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        warm_files(url)
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def mean_rate(url: str, var: str, chunks: dict | None) -> tuple[float, int, float]:
    """(samples/s of `ds[var].mean().compute()`, dask chunk along sample, the mean) for open_zarr(url[, chunks])."""
    kwargs = {} if chunks is None else {"chunks": chunks}
    result = {}

    def action() -> None:
        with warnings.catch_warnings():
            # Explicit chunks also split one-chunk coordinates; xarray warns about those, not about the variable.
            warnings.filterwarnings("ignore", message="The specified chunks separate", category=UserWarning)
            ds = xr.open_zarr(url, **kwargs)
        result["chunk"], result["n"] = int(ds[var].data.chunksize[0]), int(ds[var].shape[0])
        result["mean"] = float(ds[var].mean().compute())

    seconds = _best_seconds(url, action)
    n = result["n"]
    return n / seconds, result["chunk"], result["mean"]


def grouping_seconds(url: str) -> float:
    """Seconds from `xr.open_zarr` to a ready `groupby("label")` (the README's `ds.label.load()` included)."""

    def action() -> None:
        ds = xr.open_zarr(url)
        ds.label.load()
        ds["image"].groupby("label")

    return _best_seconds(url, action)


# ---------------------------------------------------------------- rows


def _mean_rows(kind: str, make: Callable[[bool], tuple[str, str, int]], quiet: QuietGate, layouts: dict[str, bool]) -> list[Row]:
    """One row per layout; `layouts` maps its name in the table to the argument `make` takes."""
    rows = []
    for layout, argument in layouts.items():
        url, var, shard = make(argument)
        quiet.wait()
        default, chunk, value = mean_rate(url, var, None)
        best, _, best_value = mean_rate(url, var, {"sample": shard})
        finite = np.isfinite(value) and np.isfinite(best_value)
        ratio = default / best
        rows.append(
            make_row(
                "analysis",
                f"xr.open_zarr(...).{var}.mean(), {kind}, {layout}",
                default,
                "samples/s",
                baseline=best,
                goal=f"≥ {MEAN_GOAL_RATIO}× chunks={{'sample': shard}}, finite",
                met=bool(ratio >= MEAN_GOAL_RATIO and finite),
                note=f"default dask chunk {chunk} samples (the inner chunk), baseline {shard}; mean {value:.4g}",
            )
        )
    return rows


IMAGE_LAYOUTS = {"as written now": True, "before #12 (64-image chunks, every array a coordinate)": False}
ACTIVATION_LAYOUTS = {"as written now": False, "proposed layout": True}


def grouping_rows(workdir: Path, n: int, quiet: QuietGate) -> list[Row]:
    """Seconds to a ready `groupby("label")` on an n-sample image store, per layout."""
    rows = []
    for layout, written in IMAGE_LAYOUTS.items():
        url = coordinates_only_store(workdir, n, written)
        quiet.wait()
        seconds = grouping_seconds(url)
        rows.append(
            make_row(
                "analysis",
                f"open + ds.label.load() + groupby('label'), {n:,} samples, {layout}",
                seconds,
                "s",
                goal=f"< {GROUPING_GOAL_S} s at {FULL_IMAGENET:,}",
                met=bool(seconds < GROUPING_GOAL_S) if n == FULL_IMAGENET else None,
                note="per-sample arrays of the image store; best of 3 warm runs" + ("" if n == FULL_IMAGENET else "; quick size, goal not judged"),
            )
        )
    return rows


def run(workdir: Path, quick: bool = False) -> list[Row]:
    workdir.mkdir(parents=True, exist_ok=True)
    quiet = QuietGate()
    n_images = 16_384 if quick else 65_536
    n_pooled = 32_768 if quick else 262_144
    n_maps = 2_048 if quick else 8_192
    rows = _mean_rows(f"{n_images:,} 64-px images", lambda w: image_store(workdir, n_images, w), quiet, IMAGE_LAYOUTS)
    rows += _mean_rows(f"{n_pooled:,} × 768 float16", lambda p: activation_store(workdir, n_pooled, (768,), p), quiet, ACTIVATION_LAYOUTS)
    rows += _mean_rows(f"{n_maps:,} × 768×8×8 float16", lambda p: activation_store(workdir, n_maps, (768, 8, 8), p), quiet, ACTIVATION_LAYOUTS)
    rows += grouping_rows(workdir, 131_072 if quick else FULL_IMAGENET, quiet)
    return rows

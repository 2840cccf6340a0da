"""Runs a conversion as Dask graphs: stage 1 materializes parts that cannot be read in place, stage 2 writes
output shards, each task owning whole shards (two writers in one shard silently lose data)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.threaded
import fsspec
import numpy as np
import zarr

from schemas.image_layout import DEFAULT_INNER, DEFAULT_SHARD, create_image_arrays, write_image_shard
from converter.sources.base import ImageSource, MaterializedPart, RowFile
from schemas.classes import class_table
from schemas.errors import ImzarrError
from schemas.image_store import IMAGE_SCHEMA
from schemas.progress_report import DaskProgress, ProgressReport
from schemas.store_lifecycle import finalize_store, inspect_existing, mark_done, prepare_store, settings_fingerprint


@dataclass(frozen=True)
class ConvertOptions:
    output: str
    shuffle_seed: int | None = None
    shard_size: int = DEFAULT_SHARD
    inner_chunk: int = DEFAULT_INNER
    overwrite: bool = False
    workers: int | None = None  # default: all cores
    # Stage 1 in processes instead of threads. Threads are the default: Pillow's decode/resize and zlib/ISA-L
    # release the GIL (2 threads decoded JPEGs 2.0-2.5x faster than 1 here) and start instantly.
    processes: bool = False
    scratch_dir: str | None = None  # default: beside a local output, else the system temp folder


@dataclass(frozen=True)
class ConvertResult:
    url: str
    num_samples: int
    rejected: list[tuple[str, str]]
    already_complete: bool
    seconds: float
    ignored: int = 0


def store_settings(source: ImageSource, options: ConvertOptions) -> dict[str, Any]:
    """Everything that changes the output bytes; a store made with other settings is never resumed."""
    return {
        "schema": IMAGE_SCHEMA,
        "format": source.format,
        "resolution": source.resolution,
        "shuffle_seed": options.shuffle_seed,
        "shard_size": options.shard_size,
        "inner_chunk": options.inner_chunk,
        "sources": [dataclasses.asdict(f) for f in source.files],
        **source.settings,
    }


def convert(source: ImageSource, options: ConvertOptions) -> ConvertResult:
    """Convert (or resume, or confirm) one store; idempotent for the same source and options."""
    started = time.monotonic()
    settings = store_settings(source, options)
    if inspect_existing(options.output, IMAGE_SCHEMA, settings, options.overwrite) == "complete":
        num_samples = int(zarr.open_group(options.output, mode="r").attrs["num_samples"])
        return ConvertResult(options.output, num_samples, [], True, time.monotonic() - started)
    scratch = _scratch_dir(options, settings)
    materialized = _materialize_parts(source, scratch, options)
    plan = _plan_rows(source, materialized, options.shuffle_seed)
    n = plan["global_index"].size
    rejected = [r for m in materialized.values() for r in m.rejected]
    if n == 0:
        raise ImzarrError(f"{options.output}: no usable images ({len(rejected)} rejected)")
    shard = options.shard_size
    num_shards = -(-n // shard)
    state = prepare_store(
        options.output,
        IMAGE_SCHEMA,
        settings,
        num_shards,
        lambda g: create_image_arrays(g, n, source.resolution, shard, options.inner_chunk),
        options.overwrite,
        initial_attrs=_final_attrs(source, options, n, rejected),
    )
    row_files = {i: m.row_file for i, m in materialized.items()}
    for i, part in enumerate(source.parts):
        row_files.setdefault(i, part.row_file())
    tasks = []
    for k in state.pending:
        shard_plan = _shard_plan(plan, k * shard, shard)
        its_files = {int(p): row_files[int(p)] for p in np.flatnonzero(np.bincount(shard_plan["part"]))}
        tasks.append(dask.delayed(_write_shard, pure=False)(options.output, k, k * shard, shard_plan, _opaque(its_files)))
    _run(tasks, dask.threaded.get, options.workers, ProgressReport(n, f"writing {Path(options.output).name}"), done=(num_shards - len(state.pending)) * shard)
    finalize_store(options.output, {})
    shutil.rmtree(scratch, ignore_errors=True)
    return ConvertResult(options.output, n, rejected, False, time.monotonic() - started, len(source.ignored))


def _scratch_dir(options: ConvertOptions, settings: dict[str, Any]) -> Path:
    tag = settings_fingerprint(settings)[:16]
    if options.scratch_dir:
        return Path(options.scratch_dir) / f"imzarr-scratch-{tag}"
    fs, path = fsspec.core.url_to_fs(options.output)
    if "file" in np.atleast_1d(fs.protocol):
        return Path(path).with_name(Path(path).name + f".scratch-{tag}")
    return Path(tempfile.gettempdir()) / f"imzarr-scratch-{hashlib.sha256(options.output.encode()).hexdigest()[:12]}-{tag}"


def _materialize_parts(source: ImageSource, scratch: Path, options: ConvertOptions) -> dict[int, MaterializedPart]:
    """Stage 1: parts without in-place rows are written to scratch files; finished ones are reused on a re-run."""
    needed = [i for i, p in enumerate(source.parts) if p.row_file() is None]
    done: dict[int, MaterializedPart] = {}
    todo = []
    for i in needed:
        receipt = _load_receipt(scratch, i, source.parts[i])
        if receipt is not None:
            done[i] = receipt
        else:
            todo.append(i)
    if todo:
        scratch.mkdir(parents=True, exist_ok=True)
        tasks = [dask.delayed(_materialize_one, pure=False)(_opaque(source.parts[i]), str(scratch), i) for i in todo]
        total = sum(source.parts[i].num_rows for i in todo)
        if options.processes:
            from dask.multiprocessing import get as scheduler  # only on request: brings multiprocessing, cloudpickle
        else:
            scheduler = dask.threaded.get
        _run(tasks, scheduler, options.workers, ProgressReport(total, "reading sources"))
        for i in todo:
            done[i] = _load_receipt(scratch, i, source.parts[i])
    return done


def _materialize_one(part, scratch: str, i: int) -> dict:
    result = part.materialize(os.path.join(scratch, f"part-{i:06d}.raw"))
    receipt = {
        "unusable_rows": np.flatnonzero(~result.kept).tolist(),  # usually none
        "rejected": result.rejected,
        "num_rows": part.num_rows,
    }
    tmp = os.path.join(scratch, f"part-{i:06d}.json.partial")
    with open(tmp, "w") as f:
        json.dump(receipt, f)
    os.replace(tmp, os.path.join(scratch, f"part-{i:06d}.json"))
    return {"images": part.num_rows}


def _load_receipt(scratch: Path, i: int, part) -> MaterializedPart | None:
    path = scratch / f"part-{i:06d}.json"
    raw = scratch / f"part-{i:06d}.raw"
    if not (path.exists() and raw.exists()):
        return None
    receipt = json.loads(path.read_text())
    kept = np.ones(part.num_rows, dtype=bool)
    kept[np.asarray(receipt["unusable_rows"], dtype=np.int64)] = False
    rejected = [tuple(r) for r in receipt["rejected"]]
    return MaterializedPart(RowFile(str(raw), 0, part.num_rows, part.resolution), kept, rejected)


def _plan_rows(source: ImageSource, materialized: dict[int, MaterializedPart], shuffle_seed: int | None) -> dict[str, np.ndarray]:
    """Store position → (part, row) and every coordinate, in store order."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("part", "row", "global_index", "label", "source_file", "source_row")}
    offset = 0
    for i, part in enumerate(source.parts):
        kept = materialized[i].kept if i in materialized else np.ones(part.num_rows, dtype=bool)
        rows = np.flatnonzero(kept)
        files, src_rows = part.row_sources()
        cols["part"].append(np.full(rows.size, i, dtype=np.int32))
        cols["row"].append(rows)
        cols["global_index"].append(offset + rows)
        cols["label"].append(part.labels()[rows])
        cols["source_file"].append(files[rows])
        cols["source_row"].append(src_rows[rows])
        offset += part.num_rows
    plan = {k: np.concatenate(v) for k, v in cols.items()}
    if shuffle_seed is not None:
        perm = np.random.default_rng(shuffle_seed).permutation(plan["part"].size)
        plan = {k: v[perm] for k, v in plan.items()}
    if source.label_synsets is not None:
        names = np.array(list(source.label_synsets) + [""], dtype=object)
        plan["synset"] = plan["class_name"] = names[np.where(plan["label"] < 0, -1, plan["label"])]
    else:
        table = class_table()
        plan["synset"] = table.synsets_of(plan["label"])
        plan["class_name"] = table.names_of(plan["label"])
    return plan


def _opaque(value: Any) -> Any:
    """A task argument Dask passes as it is, without walking into it: a block's file list or a shard's row files
    would otherwise be walked item by item when the graph is built (seconds for 1.28 M files)."""
    return dask.delayed(value, traverse=False)


def _shard_plan(plan: dict[str, np.ndarray], start: int, shard: int) -> dict[str, np.ndarray]:
    return {k: v[start : start + shard] for k, v in plan.items()}


def _write_shard(url: str, k: int, start: int, plan: dict[str, np.ndarray], row_files: dict[int, RowFile]) -> dict:
    """Stage 2 task: gather one output shard's rows from their parts, write it whole, record it done."""
    n = plan["part"].size
    first = row_files[int(plan["part"][0])]
    images = np.empty((n, 3, first.resolution, first.resolution), dtype=np.uint8)
    for p in row_files:  # the parts this shard's rows come from
        sel = np.flatnonzero(plan["part"] == p)
        row_files[p].read_into(plan["row"][sel], images, sel)
    coords = {k2: plan[k2] for k2 in ("label", "synset", "class_name", "global_index", "source_file", "source_row")}
    write_image_shard(url, start, images, coords)
    mark_done(url, k)
    return {"images": n}


def _run(tasks: list, scheduler, workers: int | None, report: ProgressReport, done: int = 0) -> None:
    if done:
        report.update(min(done, report.total))
    try:
        with DaskProgress(report):
            # chunksize=1: the process scheduler otherwise hands out ready tasks six at a time, leaving workers idle.
            # The scheduler is passed as a function: naming it makes dask import distributed to look for a client.
            dask.compute(*tasks, scheduler=scheduler, num_workers=workers or os.cpu_count() or 1, chunksize=1)
    finally:
        report.close()


def _final_attrs(source: ImageSource, options: ConvertOptions, n: int, rejected: list) -> dict[str, Any]:
    import numpy
    import PIL
    import zarr

    from importlib.metadata import version

    return {
        "source_format": source.format,
        "source_label_order": source.label_order,
        "resolution": source.resolution,
        "shuffle_seed": options.shuffle_seed,
        "num_samples": n,
        "sources": [dataclasses.asdict(f) for f in source.files],
        "rejected": [list(r) for r in rejected],
        "ignored_files": list(source.ignored),
        "versions": {"imzarr": version("imzarr"), "zarr": zarr.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__},
        **source.attrs,
    }

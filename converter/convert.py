"""Runs a conversion as Dask graphs: stage 1 materializes parts that cannot be read in place, stage 2 writes
output shards, each task owning whole shards (two writers in one shard silently lose data)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import dask
import numpy as np
import zarr

from converter.sources.base import (
    ConvertOptionError,
    ImageSource,
    MaterializedPart,
    OutputWriteError,
    RowFile,
    SourceError,
)
from converter.sources import source_files
from converter.sources.row_checksums import Pieces, checked_member_crc
from converter.sources.source_files import is_remote
from schemas.atomic_files import write_atomically
from schemas.classes import class_table
from schemas.errors import RunFailedError
from schemas.image_layout import (
    DEFAULT_SHARD,
    LAYOUT_VERSION,
    NUMERIC_COORDINATES,
    TEXT_COORDINATES,
    create_image_arrays,
    preferred_inner_chunk,
    write_image_shard,
)
from schemas.image_store import IMAGE_SCHEMA, image_group_attrs
from schemas.option_values import optional_whole_number, shown, whole_number
from schemas.progress_report import ProgressReport
from schemas.output_paths import check_scratch_location, local_path
from schemas.remote_storage import remote_storage_errors, translate_remote_error
from schemas.store_identity import InputChangedError, check_output_generation
from schemas.store_integrity import record_checksums, record_unit_checksums
from schemas.store_lifecycle import (
    finalize_store,
    give_back_early_lock,
    inspect_existing,
    mark_done,
    path_state,
    prepare_store,
    process_alive,
    release_writer_lock,
    settings_fingerprint,
    take_writer_lock_early,
)
from schemas.task_runner import SchedulerSpec, check_scheduler_reachable, refuse_memory_urls, run_tasks, scheduler_host_port


@dataclass(frozen=True)
class ConvertOptions:
    output: str
    shuffle_seed: int | None = None
    shard_size: int = DEFAULT_SHARD
    inner_chunk: int | None = None  # default: by the resolution (schemas.image_layout.preferred_inner_chunk)
    overwrite: bool = False
    workers: int | None = None  # default: all cores
    # Stage 1 in processes instead of threads. Threads are the default: Pillow's decode/resize and zlib/ISA-L
    # release the GIL (2 threads decoded JPEGs 2.0-2.5x faster than 1 here) and start instantly.
    processes: bool = False
    scratch_dir: str | None = None  # default: beside a local output, else the system temp folder
    # tcp://host:port of a running dask.distributed scheduler: its workers read sources and write shards
    # themselves (scratch must then be a folder every worker sees). None: this machine.
    scheduler: str | None = None

    def __post_init__(self) -> None:
        # Recorded in JSON (the store's settings): numpy integers from a notebook become ints here.
        for name, minimum in (("shard_size", 1), ("inner_chunk", 1), ("workers", 1), ("shuffle_seed", 0)):
            value = getattr(self, name)
            try:  # every one may be None (its default) but the shard size
                object.__setattr__(self, name, whole_number(value, minimum) if name == "shard_size" else optional_whole_number(value, minimum))
            except ValueError as exc:
                raise ConvertOptionError("--" + name.replace("_", "-"), shown(value), str(exc)) from None

    def to_dict(self, source: ImageSource) -> dict[str, Any]:
        """The store's `settings`: everything that changes the output bytes (these options and what the source
        says of itself); a store made with other settings is never resumed. Its hash is the settings fingerprint."""
        return {
            "schema": IMAGE_SCHEMA,
            "format": source.format,
            "resolution": source.resolution,
            "shuffle_seed": self.shuffle_seed,
            "shard_size": self.shard_size,
            "inner_chunk": effective_inner_chunk(self, source.resolution),
            # Stores of another layout are never resumed: their shard tasks wrote coordinates that ours do not.
            "layout": LAYOUT_VERSION,
            "sources": [dataclasses.asdict(f) for f in source.files],
            "labels": labels_digest(source),
            **source.settings,
        }


@dataclass(frozen=True)
class ConvertResult:
    url: str
    num_samples: int
    rejected: list[tuple[str, str]]
    already_complete: bool
    seconds: float
    ignored: int = 0
    written_before: int = 0  # images an interrupted run had written (this run resumed it)


class RejectedFilesError(RunFailedError):
    """A strict conversion rejected some files. The store is complete all the same (the rejects are recorded in
    it), so every later strict run over it fails alike; `result` says what the run did."""

    def __init__(self, result: ConvertResult):
        self.result = result
        super().__init__(
            f"{result.url}: {len(result.rejected)} files rejected (strict; they are listed in the store's `rejected`, see imzarr info): "
            "run without strict to accept the store as it is, or replace the files and re-run with --overwrite"
        )


SCRATCH_MARKER = "imzarr-scratch.json"  # in every scratch folder, naming the store it belongs to
MAX_SHARD_BYTES = 4 << 30  # one write task holds a whole output shard in memory


def validate_convert_options(options: ConvertOptions, resolution: int | None = None, num_samples: int | None = None) -> None:
    """Refuse option values no conversion can use, before anything is read or written; each error names the
    option. With the source's `resolution` (and size), also refuse shards too big for a write task's memory."""
    inner = effective_inner_chunk(options, resolution)
    if inner is not None and options.shard_size % inner:
        given = options.inner_chunk if options.inner_chunk is not None else f"auto: {inner} for {resolution}×{resolution} images"
        raise ConvertOptionError("--shard-size", options.shard_size, f"must be a multiple of --inner-chunk ({given})")
    if not options.output:
        raise ConvertOptionError("--output", repr(options.output), "must name a store path or URL")
    if options.scheduler is not None:
        scheduler_host_port(options.scheduler)
    if resolution is not None:
        # A write task holds its shard's images (a shard longer than the store holds only the store) and zarr a
        # whole inner chunk while it writes a partial one.
        rows = min(options.shard_size, num_samples if num_samples is not None else options.shard_size) + inner
        if rows * 3 * resolution**2 > MAX_SHARD_BYTES:
            raise ConvertOptionError(
                "--shard-size",
                options.shard_size,
                f"with --inner-chunk {inner}, a write task would hold {rows * 3 * resolution**2 / (1 << 30):,.1f} GiB "
                f"of {resolution}×{resolution} images (at most {MAX_SHARD_BYTES >> 30} GiB); choose smaller ones",
            )
    if options.scratch_dir is not None and os.path.exists(options.scratch_dir) and not os.path.isdir(options.scratch_dir):
        raise ConvertOptionError("--scratch-dir", options.scratch_dir, "exists and is not a folder")
    local = local_path(options.output)
    if local is not None:
        _check_creatable("--output", local)
    if options.scratch_dir is not None:
        _check_creatable("--scratch-dir", os.path.abspath(options.scratch_dir))


def effective_inner_chunk(options: ConvertOptions, resolution: int | None) -> int | None:
    """Images per inner chunk: the option's value, else by the resolution (about
    schemas.image_layout.INNER_CHUNK_BYTES), at most the shard; None while the resolution is unknown. A shard
    size that is not a multiple of it is refused: the converter keeps xarray's chunks at the preferred size."""
    chunk = options.inner_chunk if options.inner_chunk is not None else None if resolution is None else preferred_inner_chunk(resolution)
    return None if chunk is None else min(chunk, options.shard_size)  # a shard smaller than the inner chunk is one chunk


def _check_creatable(option: str, path: str) -> None:
    """The nearest existing folder at or above `path` must be a writable folder (read-only mounts included)."""
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if probe != path and not os.path.isdir(probe):
        raise ConvertOptionError(option, path, f"cannot be created: {probe} is not a folder")
    if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
        raise OutputWriteError(probe, "cannot write (folder is read-only)")


def labels_digest(source: ImageSource) -> str:
    """sha256 of every row's label in source order: whatever decides the labels (a label file, the set of class
    folders) is part of what a resumed or confirmed store must match."""
    digest = hashlib.sha256()
    for part in source.parts:
        digest.update(np.ascontiguousarray(part.labels(), dtype="<i2").tobytes())
    return "sha256:" + digest.hexdigest()


def convert(source: ImageSource, options: ConvertOptions) -> ConvertResult:
    """Convert (or resume, or confirm) one store; idempotent for the same source and options."""
    with remote_storage_errors(*source.input_paths, options.output):  # a stalled or unreachable object store: one line naming it
        return _convert(source, options)


def _convert(source: ImageSource, options: ConvertOptions) -> ConvertResult:
    started = time.monotonic()
    validate_convert_options(options, source.resolution, sum(p.num_rows for p in source.parts))
    if options.scratch_dir is not None:
        check_scratch_location(options.scratch_dir, options.output, source.input_paths)
    settings = options.to_dict(source)
    if inspect_existing(options.output, IMAGE_SCHEMA, settings, options.overwrite, source.input_paths) == "complete":
        return _already_complete(options, started)
    refuse_memory_urls(_scheduler(options, processes=False), [*source.input_paths, options.output, options.scratch_dir])
    refuse_memory_urls(_scheduler(options, processes=options.processes), source.input_paths)  # stage 1's processes read them
    check_scheduler_reachable(_scheduler(options, processes=False))  # before the scratch folder or the store exists
    # One writer from the start: a second identical command is refused here (naming the holder) before it reads a
    # source, or, if the first finished while it started, finds the store complete just below.
    with _output_errors(options.output):
        made_folder = take_writer_lock_early(options.output)
    try:
        status = inspect_existing(options.output, IMAGE_SCHEMA, settings, options.overwrite, source.input_paths)
        if status == "complete":
            release_writer_lock(options.output)
            return _already_complete(options, started)
        return _convert_locked(source, options, settings, started, status)
    except BaseException:
        # Before the store exists (stage 1 failed) the lock is given back; after, it is held to the end of the
        # process as any writer's, since tasks of a failed graph may still be writing.
        with contextlib.suppress(Exception):
            if path_state(options.output) == "missing":
                give_back_early_lock(options.output, made_folder)
        raise


def _already_complete(options: ConvertOptions, started: float) -> ConvertResult:
    remove_own_scratch(options)  # a kill between `complete` and the tidy-up left them
    attrs = zarr.open_group(options.output, mode="r").attrs
    rejected = [tuple(r) for r in attrs.get("rejected", [])]  # as the run that made it found them (--strict)
    return ConvertResult(options.output, int(attrs["num_samples"]), rejected, True, time.monotonic() - started, written_before=int(attrs["num_samples"]))


def _convert_locked(source: ImageSource, options: ConvertOptions, settings: dict[str, Any], started: float, status: str) -> ConvertResult:
    """Stage 1, the store, stage 2 and the finish, with the writer lock held (`status`: the output as inspected
    under it)."""
    scratch = _scratch_dir(options, settings)
    try:
        materialized = _materialize_parts(source, scratch, options)
    except SourceError:
        # Bad input: the fix changes the input's fingerprint, hence the settings, so no rerun can reuse this folder.
        _remove_scratch_if_ours(scratch, options.output)
        raise
    plan = _plan_rows(source, materialized, options.shuffle_seed)
    n = plan["global_index"].size
    rejected = [r for _, m in sorted(materialized.items()) for r in m.rejected]  # in input order, however the parts finished or resumed
    if n == 0:
        _remove_scratch_if_ours(scratch, options.output)
        empty = [p.relpath for p in source.parts if p.num_rows == 0]
        held = f"; {', '.join(empty[:3])}{' …' if len(empty) > 3 else ''} hold{'s' if len(empty) == 1 else ''} no rows" if empty else ""
        named = "; ".join(f"{path}: {reason}" for path, reason in rejected[:3]) + (f"; … {len(rejected) - 3} more" if len(rejected) > 3 else "")
        raise SourceError(", ".join(source.input_paths), f"no usable images ({len(rejected)} rejected{': ' + named if rejected else ''}{held})")
    shard = options.shard_size
    num_shards = -(-n // shard)
    inner = effective_inner_chunk(options, source.resolution)
    # The plan fixes every numeric coordinate up front: written once, whole, while the arrays are created (before
    # the done record and the settings exist, so a kill there leaves a store that is rebuilt, never resumed).
    numeric = {name: plan[name] for name in NUMERIC_COORDINATES}
    with _output_errors(options.output):
        state = prepare_store(
            options.output,
            IMAGE_SCHEMA,
            settings,
            num_shards,
            lambda g: create_image_arrays(g, n, source.resolution, shard, inner, coordinates=numeric),
            options.overwrite,
            initial_attrs={**_final_attrs(source, options, n, rejected), **_group_attrs(source, plan["label"])},
            inspected=status,
        )
    row_files = {i: m.row_file for i, m in materialized.items()}
    for i, part in enumerate(source.parts):
        if i not in row_files:  # (row_file reads the member's header: only for parts read in place)
            row_files[i] = part.row_file()
    tasks = []
    for k in state.pending:
        shard_plan = _shard_plan(plan, k * shard, shard)
        its_files = {int(p): row_files[int(p)] for p in np.flatnonzero(np.bincount(shard_plan["part"]))}
        tasks.append(dask.delayed(_write_shard, pure=False)(options.output, k, k * shard, shard_plan, _opaque(its_files), state.generation))
    before = n - sum(min(shard, n - k * shard) for k in state.pending)  # images a killed run wrote already
    receipts = run_tasks(tasks, _scheduler(options, processes=False), ProgressReport(n, f"writing {Path(options.output).name}", already=before))
    refuse_changed_inputs(source)
    check_read_members(row_files, receipts)
    with _output_errors(options.output):
        record_checksums(options.output)
        finalize_store(options.output, {})
    remove_own_scratch(options)
    return ConvertResult(options.output, n, rejected, False, time.monotonic() - started, len(source.ignored), before)


def refuse_changed_inputs(source: ImageSource) -> None:
    """InputChangedError when an input file read after the source was opened (an NPZ shard, a label file) has
    another fingerprint now (replaced, rewritten, removed): its images may then come from both versions and the
    labels from the old one, so the store is left unfinished rather than marked complete."""
    changed = []
    for path, stamp in source.input_stamps:
        try:
            now = source_files.fingerprint(path)
        except FileNotFoundError:
            now = None
        if now != stamp:
            changed.append(path)
    if changed:
        raise InputChangedError(
            f"{', '.join(changed[:5])}{' …' if len(changed) > 5 else ''}: changed while the conversion read it; the store is "
            "left unfinished (its images could come from both versions): re-run with --overwrite to convert the inputs as they are now"
        )


def check_read_members(row_files: dict[int, RowFile], receipts: list[dict]) -> None:
    """SourceError for a zip member read in place whose CRC-32 does not hold (a flipped bit in a stored `.npz`
    member): the store is left unfinished rather than marked complete with wrong pixels. Rows an earlier, killed
    run converted are read again for the check."""
    pieces: dict[int, list[Pieces]] = {}
    for receipt in receipts:
        for piece in receipt.get("row_crcs", ()):
            pieces.setdefault(piece[0], []).append(piece)
    for part, row_file in row_files.items():
        if row_file.checksum is None:
            continue
        if not checked_member_crc(row_file.checksum, row_file.num_rows, row_file.row_bytes, pieces.get(part, []), row_file.read_blocks):
            raise SourceError(row_file.path, f"{row_file.checksum.name} fails its CRC-32 check (corrupt data); the store is left unfinished")


@contextlib.contextmanager
def _output_errors(url: str) -> Iterator[None]:
    """An OSError while writing the store (read-only, disk full) becomes one line naming the file. botocore's
    timeouts are OSErrors too: those are left to `remote_storage_errors`, which names the endpoint."""
    try:
        yield
    except OSError as exc:
        if translate_remote_error(exc) is not None:
            raise
        raise OutputWriteError.from_os_error(url, exc) from None


def _scratch_dir(options: ConvertOptions, settings: dict[str, Any]) -> Path:
    parent, prefix = _scratch_parent_and_prefix(options)
    return parent / f"{prefix}{settings_fingerprint(settings)[:16]}"


def _scratch_parent_and_prefix(options: ConvertOptions) -> tuple[Path, str]:
    """Where this store's scratch folders live and how their names start (the settings tag follows)."""
    if options.scratch_dir:
        return Path(options.scratch_dir), "imzarr-scratch-"
    local = local_path(options.output)
    if local is not None:
        return Path(local).parent, Path(local).name + ".scratch-"
    return Path(tempfile.gettempdir()), f"imzarr-scratch-{hashlib.sha256(options.output.encode()).hexdigest()[:12]}-"


def _store_identity(output: str) -> str:
    """The store a scratch folder belongs to, as its marker records it."""
    local = local_path(output)
    return local if local is not None else output


def _claim_scratch(scratch: Path, output: str) -> None:
    """Create the scratch folder with a marker naming its store and this process, or take over one of ours."""
    if (scratch.exists() or scratch.is_symlink()) and _scratch_marker(scratch, output) is None:
        raise OutputWriteError(scratch, f"exists but is not an imzarr scratch folder of {output}; move it away or pass --scratch-dir")
    marker = {"made_by": "imzarr convert", "store": _store_identity(output), "pid": os.getpid(), "host": socket.gethostname()}
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        write_atomically(str(scratch / SCRATCH_MARKER), [json.dumps(marker).encode()])
    except OSError as exc:
        raise OutputWriteError.from_os_error(scratch, exc) from None


def _scratch_marker(folder: Path, output: str) -> dict | None:
    """The marker of a real folder (not a link) that our conversions made for this store, else None."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        marker = json.loads((folder / SCRATCH_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(marker, dict) and marker.get("made_by") == "imzarr convert" and marker.get("store") == _store_identity(output):
        return marker
    return None


def _used_by_another_process(marker: dict) -> bool:
    """Whether the run that last claimed the folder may still be writing it: alive on this host, or on another
    host (which cannot be checked from here)."""
    if marker.get("host") != socket.gethostname():
        return True
    pid = marker.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    return process_alive(pid)


def _remove_scratch_if_ours(folder: Path, output: str) -> None:
    """Remove a scratch folder only if our marker names this store and no other live run is using it."""
    marker = _scratch_marker(folder, output)
    if marker is not None and not _used_by_another_process(marker):
        shutil.rmtree(folder, ignore_errors=True)


def remove_own_scratch(options: ConvertOptions) -> None:
    """Remove the scratch folders this store's conversions left (any settings); never one without our marker."""
    parent, prefix = _scratch_parent_and_prefix(options)
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for folder in candidates:
        _remove_scratch_if_ours(folder, options.output)


def _scheduler(options: ConvertOptions, processes: bool) -> SchedulerSpec:
    """Local threads (or processes, stage 1 on request), or the cluster at `options.scheduler`."""
    return SchedulerSpec(address=options.scheduler, workers=options.workers, processes=processes)


def _materialize_parts(source: ImageSource, scratch: Path, options: ConvertOptions) -> dict[int, MaterializedPart]:
    """Stage 1: parts without in-place rows are written to scratch files; finished ones are reused on a re-run."""
    needed = [i for i, p in enumerate(source.parts) if (rf := p.row_file()) is None or _download_first(rf, options)]
    done: dict[int, MaterializedPart] = {}
    todo = []
    reusable = _scratch_marker(scratch, options.output) is not None
    for i in needed:
        receipt = _load_receipt(scratch, i, source.parts[i]) if reusable else None
        if receipt is not None:
            done[i] = receipt
        else:
            todo.append(i)
    if todo:
        _claim_scratch(scratch, options.output)
        tasks = [dask.delayed(_materialize_one, pure=False)(_opaque(source.parts[i]), str(scratch), i) for i in todo]
        total = sum(source.parts[i].num_rows for i in todo)
        run_tasks(tasks, _scheduler(options, processes=options.processes), ProgressReport(total, "reading sources"))
        for i in todo:
            receipt = _load_receipt(scratch, i, source.parts[i])
            if receipt is None:  # another run of the same store finished and tidied its scratch meanwhile
                raise OutputWriteError(scratch, "was removed while this run was using it; re-run the same command")
            done[i] = receipt
    return done


def _download_first(row_file: RowFile, options: ConvertOptions) -> bool:
    """Whether rows in object storage are copied to scratch before stage 2: yes when shuffled, where every output
    shard would read scattered single rows of every part (one request each: 24 img/s against moto, measured),
    while one sequential download per part reads each byte once."""
    return options.shuffle_seed is not None and is_remote(row_file.path)


def _materialize_one(part, scratch: str, i: int) -> dict:
    result = part.materialize(os.path.join(scratch, f"part-{i:06d}.raw"))
    receipt = {
        "unusable_rows": np.flatnonzero(~result.kept).tolist(),  # usually none
        "rejected": result.rejected,
        "num_rows": part.num_rows,
        # An ADM sample file's rows stay interleaved (hwc) in scratch; the reader must know.
        "layout": result.row_file.layout,
    }
    write_atomically(os.path.join(scratch, f"part-{i:06d}.json"), [json.dumps(receipt).encode()])
    return {"images": part.num_rows}


def _load_receipt(scratch: Path, i: int, part) -> MaterializedPart | None:
    path = scratch / f"part-{i:06d}.json"
    raw = scratch / f"part-{i:06d}.raw"
    if not (path.exists() and raw.exists()):
        return None
    receipt = json.loads(path.read_text())
    if "layout" not in receipt:  # written before receipts named their rows' layout: made again, never guessed
        return None
    kept = np.ones(part.num_rows, dtype=bool)
    kept[np.asarray(receipt["unusable_rows"], dtype=np.int64)] = False
    rejected = [tuple(r) for r in receipt["rejected"]]
    return MaterializedPart(RowFile(str(raw), 0, part.num_rows, part.resolution, receipt["layout"]), kept, rejected)


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


def _write_shard(url: str, k: int, start: int, plan: dict[str, np.ndarray], row_files: dict[int, RowFile], generation: str | None = None) -> dict:
    """Stage 2 task: gather one output shard's rows from their parts, write it whole, record it done."""
    n = plan["part"].size
    first = row_files[int(plan["part"][0])]
    images = np.empty((n, 3, first.resolution, first.resolution), dtype=np.uint8)
    pieces = []
    for p in row_files:  # the parts this shard's rows come from
        sel = np.flatnonzero(plan["part"] == p)
        row_files[p].read_into(plan["row"][sel], images, sel)
        if row_files[p].checksum is not None:  # rows read in place: their CRC-32 pieces, for the member's check
            pieces.append(row_files[p].piece_checksums(int(p), plan["row"][sel], images, sel))
    coords = {name: plan[name] for name in TEXT_COORDINATES}  # the numeric ones were written at creation
    with _output_errors(url):
        # A task that outlived its run (Ctrl-C, a lost scheduler) writes nothing into a store rebuilt since: the
        # shard writer checks the store's generation before committing, and again here before the receipts.
        checksums = write_image_shard(url, start, images, coords, generation)
        check_output_generation(url, generation)
        # The crc32c of every file written is recorded before the shard counts as done (schemas/store_integrity.py).
        record_unit_checksums(url, k, checksums)
        mark_done(url, k)
    return {"images": n, "row_crcs": pieces}


def _group_attrs(source: ImageSource, labels: np.ndarray) -> dict[str, Any]:
    """`Conventions` and the class table; labels numbered from folder names are named by those folders."""
    names = list(source.label_synsets) if source.label_synsets is not None else None
    return image_group_attrs(labels, names, names)


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

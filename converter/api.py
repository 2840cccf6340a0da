"""The converter from Python (a notebook, a pipeline): the same conversions as `imzarr convert npz|jpeg`,
with the same defaults, safety checks and resumability."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from converter.convert import ConvertOptions, ConvertResult, convert, validate_convert_options
from schemas.image_layout import DEFAULT_SHARD
from schemas.output_paths import check_output_location


def convert_npz(
    sources: str | Path | Sequence[str | Path],
    output: str,
    *,
    label_order: str | None = None,
    allow_pickle: bool = False,
    shuffle_seed: int | None = None,
    shard_size: int = DEFAULT_SHARD,
    inner_chunk: int | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    processes: bool = False,
    scratch_dir: str | None = None,
    scheduler: str | None = None,
) -> ConvertResult:
    """Downsampled-ImageNet `.npz` shards (files or folders) or ADM sample files → one image store at `output`."""
    from converter.sources.npz import open_npz_source

    paths = [os.fspath(p) for p in ([sources] if isinstance(sources, (str, Path)) else sources)]
    options = _options(output, shuffle_seed, shard_size, inner_chunk, overwrite, workers, processes, scratch_dir, scheduler)
    check_output_location(output, paths)
    return convert(open_npz_source(paths, label_order, allow_pickle), options)


def convert_jpeg(
    root: str | Path,
    output: str,
    *,
    recipe: str | None = None,
    size: int = 64,
    val_labels: str | None = None,
    label_from_folders: bool = False,
    fast_draft: bool = False,
    shuffle_seed: int | None = None,
    shard_size: int = DEFAULT_SHARD,
    inner_chunk: int | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    processes: bool = False,
    scratch_dir: str | None = None,
    scheduler: str | None = None,
) -> ConvertResult:
    """A JPEG class-folder tree (or a flat val folder with `val_labels`) → one image store at `output`."""
    from converter.sources.jpeg import open_jpeg_source

    options = _options(output, shuffle_seed, shard_size, inner_chunk, overwrite, workers, processes, scratch_dir, scheduler)
    check_output_location(output, [os.fspath(root), val_labels])
    return convert(open_jpeg_source(root, recipe, size, val_labels, label_from_folders, fast_draft), options)


def _options(output, shuffle_seed, shard_size, inner_chunk, overwrite, workers, processes, scratch_dir, scheduler) -> ConvertOptions:
    options = ConvertOptions(
        output=os.fspath(output),
        shuffle_seed=shuffle_seed,
        shard_size=shard_size,
        inner_chunk=inner_chunk,
        overwrite=overwrite,
        workers=workers,
        processes=processes,
        scratch_dir=scratch_dir,
        scheduler=scheduler,
    )
    validate_convert_options(options)
    return options

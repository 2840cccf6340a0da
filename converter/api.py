"""The converter from Python (a notebook, a pipeline): the same conversions as `imzarr convert npz|jpeg`,
with the same defaults, safety checks and resumability."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converter.convert import ConvertOptions, ConvertResult, convert, validate_convert_options
from converter.sources.base import ConvertOptionError
from schemas.output_paths import local_file_url_to_path
from schemas.output_paths import check_output_location


def convert_npz(
    sources: str | Path | Sequence[str | Path],
    output: str,
    *,
    label_order: str | None = None,
    allow_pickle: bool = False,
    **options: Any,
) -> ConvertResult:
    """Downsampled-ImageNet `.npz` shards (files or folders) or ADM sample files → one image store at `output`.

    `options` are ConvertOptions fields (shuffle_seed, shard_size, inner_chunk, overwrite, workers, processes,
    scratch_dir, scheduler), with the CLI's defaults."""
    from converter.sources.npz import open_npz_source

    paths = local_file_url_to_path([os.fspath(p) for p in ([sources] if isinstance(sources, (str, Path)) else sources)])
    output = local_file_url_to_path(os.fspath(output))  # file:// URLs as the CLI takes them
    checked = _checked_options(output, options)
    check_output_location(output, paths)
    return convert(open_npz_source(paths, label_order, allow_pickle), checked)


def convert_jpeg(
    root: str | Path,
    output: str,
    *,
    recipe: str | None = None,
    size: int = 64,
    val_labels: str | None = None,
    label_from_folders: bool = False,
    fast_draft: bool = False,
    **options: Any,
) -> ConvertResult:
    """A JPEG class-folder tree (or a flat val folder with `val_labels`) → one image store at `output`.

    `options` are ConvertOptions fields, as for `convert_npz`."""
    from converter.sources.jpeg import open_jpeg_source

    root, output, val_labels = local_file_url_to_path([os.fspath(root), os.fspath(output), val_labels])  # file:// as the CLI
    checked = _checked_options(output, options)
    check_output_location(output, [root, val_labels])
    return convert(open_jpeg_source(root, recipe, size, val_labels, label_from_folders, fast_draft), checked)


def _checked_options(output: str | Path, options: dict[str, Any]) -> ConvertOptions:
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ConvertOptions)})  # `output` is a parameter
    if unknown:
        raise ConvertOptionError("options", unknown, f"not conversion options; choose from {run_option_names()}")
    converted = ConvertOptions(output=os.fspath(output), **options)
    validate_convert_options(converted)
    return converted


def run_option_names() -> list[str]:
    """The ConvertOptions fields besides `output`: what `--shard-size`, `--workers`, … set."""
    return [f.name for f in dataclasses.fields(ConvertOptions) if f.name != "output"]

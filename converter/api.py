"""The converter's front door, for Python (a notebook, a pipeline) and for `imzarr convert npz|jpeg` alike: each
function takes the command's options as keywords, applies every default and refusal, and converts."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converter.convert import ConvertOptions, ConvertResult, RejectedFilesError, convert
from converter.sample import write_sample_shards
from converter.sources.npz import LABEL_ORDERS
from schemas.image_layout import DEFAULT_SHARD
from schemas.keywords import keyword_names, keyword_parameters, refuse_unknown_keywords, takes_keywords_of
from schemas.output_paths import absolute_url, local_file_url_to_path
from schemas.remote_storage import remote_storage_errors

__all__ = ["DEFAULT_SHARD", "LABEL_ORDERS", "ConvertResult", "RejectedFilesError", "convert_jpeg", "convert_npz", "run_option_names", "write_sample_shards"]


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

    paths = [os.fspath(p) for p in ([sources] if isinstance(sources, (str, Path)) else sources)]
    paths, checked = _located(paths, output, options, convert_npz)
    with remote_storage_errors(*paths, checked.output):  # listing the shards of an object store may fail first
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
    strict: bool = False,
    **options: Any,
) -> ConvertResult:
    """A JPEG class-folder tree (or a flat val folder with `val_labels`) → one image store at `output`.

    `strict`: raise RejectedFilesError (a failed run, exit 1) when any file was rejected, on this run or, over a
    store that is already complete, on the run that made it. `options` are ConvertOptions fields, as for
    `convert_npz`."""
    from converter.sources.jpeg import open_jpeg_source
    from converter.sources.jpeg_recipes import truncated_images_rejected

    (root, val_labels), checked = _located([os.fspath(root), val_labels], output, options, convert_jpeg)
    with remote_storage_errors(root, val_labels, checked.output), truncated_images_rejected():  # listing the tree of an object store may fail first
        result = convert(open_jpeg_source(root, recipe, size, val_labels, label_from_folders, fast_draft), checked)
    if strict and result.rejected:
        raise RejectedFilesError(result)
    return result


def _located(inputs: list[str | None], output: str | Path, options: dict[str, Any], entry: Any) -> tuple[list[str | None], ConvertOptions]:
    """The inputs and the options as the conversion takes them: file:// URLs as paths, absolute paths for a
    cluster's workers (they run in other folders). Whether the output overlaps an input is convert's first check
    of the output (`inspect_existing`), before anything is written. A keyword `entry` does not take is named
    with its close match."""
    refuse_unknown_keywords(options, keyword_names(entry), entry.__name__)
    inputs, output = local_file_url_to_path(inputs), local_file_url_to_path(os.fspath(output))
    scratch_dir = local_file_url_to_path(options.get("scratch_dir"))
    if options.get("scheduler"):
        inputs, output, scratch_dir = [absolute_url(p) for p in inputs], absolute_url(output), absolute_url(scratch_dir)
    return inputs, ConvertOptions(output=output, **(options | {"scratch_dir": scratch_dir}))


def run_option_names() -> list[str]:
    """The ConvertOptions fields besides `output`: what `--shard-size`, `--workers`, … set."""
    return [f.name for f in dataclasses.fields(ConvertOptions) if f.name != "output"]


takes_keywords_of(convert_npz, keyword_parameters(dataclasses.fields(ConvertOptions)[1:]))
takes_keywords_of(convert_jpeg, keyword_parameters(dataclasses.fields(ConvertOptions)[1:]))

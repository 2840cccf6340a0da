"""`imzarr show`: a contact sheet PNG of a store's images, one row per class with its name at the row start.

A header names the store and where its images came from (source format, or the model with its short sha256,
"UNTRAINED" in red for random weights, and σ); each row says how many of the class's samples it shows ("8 of 300").

Works on an image store (`image`) or on an activation store's `reconstruction` variable. Rows group samples by
the `synset` coordinate, so stores whose folder-named classes have no ImageNet label (-1) are shown too.
Tiles are upscaled by an integer factor (nearest neighbour: every stored pixel stays visible as a square).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from PIL import Image, ImageDraw

from extractor.analysis.provenance import describe_model
from extractor.selection import SelectionError, class_entries, present_class_wnids
from schemas.activation_store import ACTIVATION_SCHEMA, RECONSTRUCTION_VAR, validate_activation_store
from schemas.errors import ImzarrError
from schemas.image_store import IMAGE_SCHEMA, IMAGE_VAR, validate_image_store
from schemas.option_values import whole_numbers
from schemas.output_paths import write_output_file

MIN_TILE = 64  # pixels: smaller stored images are upscaled to at least this
GAP = 4
LABEL_WIDTH = 180
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
MUTED = (150, 150, 150)
WARNING = (240, 90, 80)
LINE_HEIGHT = 14
HEADER_LINES = 3
HEADER_HEIGHT = GAP + HEADER_LINES * LINE_HEIGHT + GAP


class ContactSheetError(ImzarrError):
    """The sheet cannot be made: wrong variable, no reconstructions, or a class the store does not hold."""


def sheet_counts(per_class: object, max_classes: object) -> tuple[int, int]:
    """Images per row and rows, as ints; ContactSheetError unless each is a whole number ≥ 1."""
    counts = whole_numbers({"--per-class": (per_class, 1), "--max-classes": (max_classes, 1)}, ContactSheetError)
    return counts["--per-class"], counts["--max-classes"]


def write_contact_sheet(
    store_url: str,
    output_png: str | Path,
    classes: str | int | Sequence[str | int] | None = None,
    per_class: int = 8,
    max_classes: int = 10,
    variable: str = "image",
) -> str:
    """Write a grid PNG: one row per class (the given classes — WNIDs, names or label indices — or the store's first
    `max_classes` classes in label order), the first `per_class` samples of each, under a header naming the
    store and its provenance. On an activation store `variable` "image" means its reconstructions."""
    per_class, max_classes = sheet_counts(per_class, max_classes)
    entries = class_entries(classes)  # before the store is opened: '' or a repeat is refused as everywhere
    labels, synsets, names, read, attrs = _open(store_url, variable)
    chosen = _choose_classes(store_url, labels, synsets, entries, max_classes)
    members = [np.flatnonzero(synsets == wnid) for wnid in chosen]
    rows = [m[:per_class] for m in members]
    images = read(np.concatenate(rows)) if rows else np.zeros((0, 3, 1, 1), np.uint8)
    size = int(images.shape[-1])
    scale = max(1, math.ceil(MIN_TILE / size))
    tile = size * scale
    width, height = sheet_size(len(chosen), per_class, tile)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _draw_header(draw, width, store_url, attrs, variable, len(synsets))
    pos = 0
    for r, (wnid, idx) in enumerate(zip(chosen, rows)):
        _draw_label(draw, r, tile, str(names[idx[0]]), wnid, idx.size, members[r].size)
        for c in range(idx.size):
            hwc = images[pos].transpose(1, 2, 0)
            big = np.repeat(np.repeat(hwc, scale, axis=0), scale, axis=1)
            sheet.paste(Image.fromarray(np.ascontiguousarray(big), "RGB"), tile_origin(r, c, tile))
            pos += 1
    png = io.BytesIO()
    sheet.save(png, format="PNG")
    return write_output_file(str(output_png), png.getvalue())


def sheet_size(num_rows: int, per_class: int, tile: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet with these rows, columns and tile size (header included)."""
    return LABEL_WIDTH + per_class * (tile + GAP), HEADER_HEIGHT + GAP + num_rows * (tile + GAP)


def tile_origin(row: int, col: int, tile: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of a tile."""
    return LABEL_WIDTH + col * (tile + GAP), HEADER_HEIGHT + GAP + row * (tile + GAP)


def _open(url: str, variable: str):
    """Per-sample labels, synsets and class names, a reader of uint8 (n, 3, S, S) images at given indices, group attrs."""
    try:
        schema = dict(zarr.open_group(url, mode="r").attrs).get("schema")
    except Exception:  # let the validator word the "not a store" error
        schema = IMAGE_SCHEMA
    if schema == ACTIVATION_SCHEMA:
        if variable not in (IMAGE_VAR, RECONSTRUCTION_VAR):
            raise ContactSheetError(f"{url}: an activation store's only images are {RECONSTRUCTION_VAR!r}, not {variable!r}")
        group = validate_activation_store(url)
        if RECONSTRUCTION_VAR not in group:
            raise ContactSheetError(f"{url}: no {RECONSTRUCTION_VAR!r} variable; it was extracted without --reconstructions")
        array = group[RECONSTRUCTION_VAR]
        return (
            np.asarray(group["label"][:]),
            np.asarray(group["synset"][:]).astype(object),
            np.asarray(group["class_name"][:]).astype(object),
            lambda idx: _take(array, idx),
            dict(group.attrs),
        )
    if variable != IMAGE_VAR:
        raise ContactSheetError(f"{url}: an image store shows {IMAGE_VAR!r}; {variable!r} exists only in activation stores")
    store = validate_image_store(url)
    return store.coordinate("label"), store.coordinate("synset"), store.coordinate("class_name"), store.take, store.attrs


def _choose_classes(url: str, labels: np.ndarray, synsets: np.ndarray, classes: tuple[str, ...] | None, max_classes: int) -> list[str]:
    """The given classes as `extract --classes` takes them (a store's own folders by name or label), or the
    first `max_classes` present in label order."""
    if classes is None:
        return sorted(set(synsets.tolist()) - {""})[:max_classes]  # sorted WNIDs are label order
    try:
        return list(present_class_wnids(classes, labels, synsets))
    except SelectionError as exc:
        raise ContactSheetError(f"{url}: {exc}") from None


def _take(array: zarr.Array, indices: np.ndarray) -> np.ndarray:
    """Rows at any indices, each run of adjacent sorted indices read as one slice."""
    out = np.empty((indices.size, *array.shape[1:]), dtype=array.dtype)
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    breaks = np.flatnonzero(np.diff(sorted_idx) > 1) + 1
    for run in np.split(np.arange(sorted_idx.size), breaks):
        if run.size:
            lo, hi = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1
            out[order[run]] = array[lo:hi][sorted_idx[run] - lo]
    return out


def _draw_header(draw: ImageDraw.ImageDraw, width: int, url: str, attrs: dict, variable: str, num_samples: int) -> None:
    """Three lines: the store, what its images are, and the model that made them (UNTRAINED in red); ASCII only,
    since PIL's default bitmap font has no σ."""
    limit = width - 2 * GAP
    name = url.rstrip("/").rsplit("/", 1)[-1] or url
    model = attrs.get("model")
    if attrs.get("schema") == ACTIVATION_SCHEMA:
        what = f"reconstructions D(x) at sigma = {attrs.get('sigma')}, {num_samples:,} samples"
    elif model:
        what = f"generated images (sigma = {attrs.get('sigma')}), {num_samples:,} samples"
    else:
        what = f"{attrs.get('source_format', 'images')} images, {num_samples:,} samples"
    lines = [(_fit(draw, name, limit), TEXT), (_fit(draw, what, limit), MUTED)]
    if model:
        lines.append((_fit(draw, "model: " + describe_model(model), limit), TEXT if model.get("trained") is True else WARNING))
    y = GAP
    for text, colour in lines:
        draw.text((GAP, y), text, fill=colour)
        y += LINE_HEIGHT


def _draw_label(draw: ImageDraw.ImageDraw, row: int, tile: int, name: str, wnid: str, count: int, total: int) -> None:
    x, y = GAP, tile_origin(row, 0, tile)[1] + 2
    lines = [(_fit(draw, name.split(",")[0]), TEXT), (wnid, MUTED), (f"{count} of {total:,}", MUTED)]
    for text, colour in lines:
        draw.text((x, y), text, fill=colour)
        y += LINE_HEIGHT


def _fit(draw: ImageDraw.ImageDraw, text: str, limit: int = LABEL_WIDTH - 2 * GAP) -> str:
    if draw.textlength(text) <= limit:
        return text
    while text and draw.textlength(text + "...") > limit:  # ASCII: every default font has it
        text = text[:-1]
    return text + "..."

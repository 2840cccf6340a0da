"""The embedded sample: procedurally drawn 64×64 images in the real downsampled-ImageNet shard format."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from schemas.atomic_files import write_atomically
from schemas.classes import class_table
from schemas.errors import ImzarrError, PathError
from schemas.option_values import SEED_64, whole_numbers

# Ten classes with distinct looks; the shards store their 1-based downsampled (map_clsloc) labels.
SAMPLE_WNIDS = (
    "n01440764",  # tench
    "n02119789",  # kit fox
    "n01530575",  # brambling
    "n02123045",  # tabby
    "n03417042",  # garbage truck
    "n03888257",  # parachute
    "n04037443",  # racer
    "n09472597",  # volcano
    "n07747607",  # orange
    "n03000684",  # chain saw
)


def draw_class_images(class_ids: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 3, S, S): class c has its own hue, shape and texture; position, scale and noise vary."""
    n = class_ids.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hues = np.linspace(0, 1, 10, endpoint=False)[class_ids % 10]
    base = np.stack([np.cos(2 * np.pi * (hues + k / 3)) * 0.5 + 0.5 for k in range(3)], axis=1)  # (n, 3)
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)).astype(np.float32)
    radius = rng.uniform(0.15, 0.35, (n, 1, 1)).astype(np.float32)
    dy, dx = yy[None] - cy, xx[None] - cx
    shape_kind = class_ids % 5
    masks = np.stack(
        [
            dy**2 + dx**2 < radius**2,  # disc
            (np.abs(dy) < radius) & (np.abs(dx) < radius),  # square
            np.abs(dy + dx) < radius * 0.5,  # diagonal bar
            (np.sin(dx * 40) > 0) & (dy**2 + dx**2 < radius**2 * 2),  # striped disc
            np.abs(dy) + np.abs(dx) < radius,  # diamond
        ]
    )[shape_kind, np.arange(n)]
    background = 0.25 + 0.5 * (yy[None] * (class_ids[:, None, None] >= 5))  # a vertical gradient for half
    img = background[:, None] * (1 - base[:, :, None, None]) + masks[:, None] * base[:, :, None, None]
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


class SampleOptionError(ImzarrError):
    """A sample size that is not a whole number ≥ 1."""


class SampleExistsError(PathError):
    """A file where the sample would write one of its shards, holding something else (real shards share the names)."""


def write_sample_shards(out_dir: str | Path, per_shard: int = 1000, train_shards: int = 3, val_size: int = 500, seed: int = 0) -> list[Path]:
    """Write train_data_batch_{1..k}.npz (stored, with `mean`) and val_data.npz (deflated, no `mean`).

    Idempotent, and never over another file: a shard already there with the same arrays is kept; anything else
    under a shard's name (real ImageNet shards are named so, or a sample of other sizes) is refused before any
    file is written. Each file appears whole or not at all. The shards are drawn twice (to check, then to write),
    so that one at a time is in memory."""
    counts = whole_numbers({"--per-shard": (per_shard, 1), "--train-shards": (train_shards, 1), "--val-size": (val_size, 1), "seed": (seed, *SEED_64)}, SampleOptionError)
    per_shard, train_shards, val_size, seed = counts.values()
    out = Path(out_dir)
    missing = []
    for path, arrays, _ in _sample_shards(out, per_shard, train_shards, val_size, seed):
        if not os.path.lexists(path):
            missing.append(path)
        elif not _holds(path, arrays):
            raise SampleExistsError(path, "exists and is not this sample's shard; write the sample into an empty folder")
    written = []
    for path, arrays, deflated in _sample_shards(out, per_shard, train_shards, val_size, seed):
        if path in missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            (np.savez_compressed if deflated else np.savez)(buffer, **arrays)
            write_atomically(path, [buffer.getbuffer()])
        written.append(path)
    return written


def _sample_shards(out: Path, per_shard: int, train_shards: int, val_size: int, seed: int) -> Iterator[tuple[Path, dict[str, np.ndarray], bool]]:
    """(path, arrays, deflated) of each shard in order, drawn one at a time from one seeded generator."""
    rng = np.random.default_rng(seed)
    table = class_table()
    ds_labels = np.array([table.downsampled_labels[table.index_of_wnid(w)] for w in SAMPLE_WNIDS], dtype=np.int64)
    for i in range(1, train_shards + 2):
        is_val = i > train_shards
        n = val_size if is_val else per_shard
        cls = rng.integers(0, len(SAMPLE_WNIDS), n)
        data = draw_class_images(cls, 64, rng).reshape(n, -1)
        arrays = {"data": data, "labels": ds_labels[cls]}
        if is_val:
            yield out / "val" / "val_data.npz", arrays, True
        else:
            yield out / "train" / f"train_data_batch_{i}.npz", {**arrays, "mean": data.mean(axis=0)}, False


def _holds(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Whether the file at `path` is an .npz of exactly these arrays (a sample written before); members' headers are
    compared before any is read, so a real shard (gigabytes) is told apart without loading it."""
    try:
        with np.load(path, allow_pickle=False) as found:
            if sorted(found.files) != sorted(arrays):
                return False
            for key, value in arrays.items():
                with found.zip.open(f"{key}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):
                        continue  # not a header np.savez writes for these arrays: the comparison below decides
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member)
                if tuple(shape) != value.shape or np.dtype(dtype) != value.dtype:
                    return False
            return all(np.array_equal(found[k], v) for k, v in arrays.items())
    except Exception:  # not a zip, not an .npz, unreadable: not ours
        return False

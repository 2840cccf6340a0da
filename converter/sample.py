"""The embedded sample: procedurally drawn 64×64 images in the real downsampled-ImageNet shard format."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from schemas.atomic_files import write_atomically
from schemas.classes import class_table
from schemas.errors import PathError

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


class SampleExistsError(PathError):
    """A file where the sample would write one of its shards, holding something else (real shards share the names)."""


def write_sample_shards(out_dir: str | Path, per_shard: int = 1000, train_shards: int = 3, val_size: int = 500, seed: int = 0) -> list[Path]:
    """Write train_data_batch_{1..k}.npz (stored, with `mean`) and val_data.npz (deflated, no `mean`).

    Idempotent, and never over another file: a shard already there with the same arrays is kept; anything else
    under a shard's name (real ImageNet shards are named so, or a sample of other sizes) is refused before any
    file is written. Each file appears whole or not at all."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    table = class_table()
    ds_labels = np.array([table.downsampled_labels[table.index_of_wnid(w)] for w in SAMPLE_WNIDS], dtype=np.int64)
    shards: list[tuple[Path, dict[str, np.ndarray], bool]] = []
    for i in range(1, train_shards + 2):
        is_val = i > train_shards
        n = val_size if is_val else per_shard
        cls = rng.integers(0, len(SAMPLE_WNIDS), n)
        data = draw_class_images(cls, 64, rng).reshape(n, -1)
        arrays = {"data": data, "labels": ds_labels[cls]}
        if is_val:
            shards.append((out / "val" / "val_data.npz", arrays, True))
        else:
            shards.append((out / "train" / f"train_data_batch_{i}.npz", {**arrays, "mean": data.mean(axis=0)}, False))
    to_write = []
    for path, arrays, deflated in shards:
        if os.path.lexists(path):
            if not _holds(path, arrays):
                raise SampleExistsError(path, "exists and is not this sample's shard; write the sample into an empty folder")
        else:
            to_write.append((path, arrays, deflated))
    for path, arrays, deflated in to_write:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        (np.savez_compressed if deflated else np.savez)(buffer, **arrays)
        write_atomically(path, [buffer.getbuffer()])
    return [path for path, _, _ in shards]


def _holds(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Whether the file at `path` is an .npz of exactly these arrays (a sample written before)."""
    try:
        with np.load(path, allow_pickle=False) as found:
            return sorted(found.files) == sorted(arrays) and all(np.array_equal(found[k], v) and found[k].dtype == v.dtype for k, v in arrays.items())
    except Exception:  # not a zip, not an .npz, unreadable: not ours
        return False

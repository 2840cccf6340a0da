"""The embedded sample: procedurally drawn 64×64 images in the real downsampled-ImageNet shard format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.classes import class_table

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


def write_sample_shards(out_dir: str | Path, per_shard: int = 1000, train_shards: int = 3, val_size: int = 500, seed: int = 0) -> list[Path]:
    """Write train_data_batch_{1..k}.npz (stored, with `mean`) and val_data.npz (deflated, no `mean`)."""
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "val").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table = class_table()
    ds_labels = np.array([table.downsampled_labels[table.index_of_wnid(w)] for w in SAMPLE_WNIDS], dtype=np.int64)
    written = []
    for i in range(1, train_shards + 2):
        is_val = i > train_shards
        n = val_size if is_val else per_shard
        cls = rng.integers(0, len(SAMPLE_WNIDS), n)
        data = draw_class_images(cls, 64, rng).reshape(n, -1)
        arrays = {"data": data, "labels": ds_labels[cls]}
        if is_val:
            path = out / "val" / "val_data.npz"
            np.savez_compressed(path, **arrays)
        else:
            path = out / "train" / f"train_data_batch_{i}.npz"
            np.savez(path, **arrays, mean=data.mean(axis=0))
        written.append(path)
    return written

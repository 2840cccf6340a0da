"""Test and benchmark data made at run time: photo-like images and shard files in the real formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def photo_like(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 3, S, S) smooth gradients, blobs and mild noise: compresses like photos, unlike random bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    step = 256
    for a in range(0, n, step):
        b = min(n, a + step)
        m = b - a
        coef = rng.uniform(-1, 1, (m, 3, 4, 1, 1)).astype(np.float32)
        img = 0.5 + 0.25 * (coef[:, :, 0] * yy + coef[:, :, 1] * xx + coef[:, :, 2] * np.sin(6 * yy * (1 + coef[:, :, 3])))
        cy, cx, r = rng.uniform(0.2, 0.8, (3, m, 1, 1, 1)).astype(np.float32)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
        img += 0.3 * blob * rng.uniform(-1, 1, (m, 3, 1, 1)).astype(np.float32)
        img += rng.normal(0, 0.03, img.shape).astype(np.float32)
        out[a:b] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


def write_npz_shard(path: Path, images: np.ndarray, labels: np.ndarray, compressed: bool = False, mean: bool = True) -> Path:
    """A downsampled-ImageNet shard: data (N, 3·S·S) planes, labels int64, mean float64 (train files)."""
    data = images.reshape(images.shape[0], -1)
    arrays = {"data": data, "labels": labels.astype(np.int64)}
    if mean:
        arrays["mean"] = data.mean(axis=0)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def write_adm_samples(path: Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    """An ADM/guided-diffusion sample file: arr_0 uint8 NHWC, optional arr_1 sorted-order labels."""
    arrays = {"arr_0": np.ascontiguousarray(images.transpose(0, 2, 3, 1))}
    if labels is not None:
        arrays["arr_1"] = labels.astype(np.int64)
    np.savez(path, **arrays)
    return path


def write_pickle_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A legacy extension-less batch: a pickled dict with data and a list of labels."""
    with open(path, "wb") as f:
        pickle.dump({"data": images.reshape(images.shape[0], -1), "labels": labels.tolist()}, f, protocol=4)
    return path

"""Extraction on CPU with the small preset: end to end vs the model's forward alone, and the write path.

Goals (issue): end-to-end images/s ≥ 0.85 of forward-only on in-memory batches, measured in the same run;
activation write MB/s next to a bare zarr write of the same bytes; peak RSS.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from tests.benchmarks.run import make_row, run_child
from tests.support.synthetic import photo_like, write_npz_shard

LAYER = "encoder_bottleneck"
BATCH = 64


def bench_image_store(workdir: Path, n: int) -> str:
    """A converted image store of n photo-like 64×64 images (reused when already there)."""
    shard = workdir / "val_data.npz"
    write_npz_shard(shard, photo_like(n, 64, seed=11), np.random.default_rng(0).integers(1, 1001, n), mean=False)
    url = str(workdir / "images.zarr")
    if (workdir / "images.zarr" / "zarr.json").exists():
        return url
    proc = run_child([sys.executable, "-m", "converter", "npz", str(shard), "-o", url])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return url


def _forward_only(store_url: str, n: int) -> float:
    """images/s of the extractor's forward path on batches already in memory (noise, capture, cast, checks)."""
    from extractor.forward import ForwardSettings, PreparedForward
    from extractor.shard_forward import ShardForward
    from extractor.models import ModelSpec
    from schemas.image_store import validate_image_store

    store = validate_image_store(store_url)
    images = torch.from_numpy(store.read(0, n))
    labels, gidx = store.coordinate("label")[:n], store.coordinate("global_index")[:n]
    with PreparedForward(ForwardSettings(ModelSpec(preset="tiny-random"), (LAYER,)), "cpu", store.resolution) as forward:
        ShardForward(forward, BATCH, None).run(0, images[:BATCH], labels[:BATCH], gidx[:BATCH])  # warm-up
        runner = ShardForward(forward, n, None)
        start = time.perf_counter()
        for a in range(0, n, BATCH):
            runner.run(a, images[a : a + BATCH], labels[a : a + BATCH], gidx[a : a + BATCH])
        return n / (time.perf_counter() - start)


def _write_rates(acts_url: str, workdir: Path) -> tuple[float, float, int]:
    """MB/s of the extractor's shard writer (direct shard files) vs a bare zarr write of the same bytes and layout."""
    from extractor.activation_writer import create_activation_arrays
    from schemas.shard_writer import ShardOutput

    src = zarr.open_group(acts_url, mode="r")
    data = src[LAYER][:]
    shard = src[LAYER].shards[0]
    n = data.shape[0]
    coords = {name: src[name][:] for name in ("label", "synset", "class_name", "global_index", "source_file", "source_sample")}
    ours = zarr.open_group(str(workdir / "write_ours.zarr"), mode="w")
    create_activation_arrays(ours, n, {LAYER: data.shape[1:]}, str(data.dtype), shard, None)
    start = time.perf_counter()
    for a in range(0, n, shard):
        output = ShardOutput(str(workdir / "write_ours.zarr"), a // shard, a, {LAYER: np.ascontiguousarray(data[a : a + shard])})
        output.ready(0, min(shard, n - a))
        output.commit({k: v[a : a + shard] for k, v in coords.items()})
    ours_s = time.perf_counter() - start
    bare = zarr.create_array(str(workdir / "write_bare.zarr"), shape=data.shape, dtype=data.dtype, chunks=src[LAYER].chunks, shards=src[LAYER].shards, compressors=None, fill_value=0.0)
    start = time.perf_counter()
    for a in range(0, n, shard):
        bare[a : a + shard] = data[a : a + shard]
    bare_s = time.perf_counter() - start
    return data.nbytes / ours_s / 1e6, data.nbytes / bare_s / 1e6, data.nbytes


def run(workdir: Path, quick: bool = False) -> list[dict]:
    n = 2_000 if quick else 20_000
    torch.set_num_threads(max(1, torch.get_num_threads()))
    store = bench_image_store(workdir, n)
    forward_rate = _forward_only(store, min(n, 2_560))
    acts = str(workdir / "acts.zarr")
    proc = run_child([sys.executable, "-m", "extractor", "extract", store, "-o", acts, "--preset", "tiny-random", "--layers", LAYER, "--device", "cpu"])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    reported = float(re.search(r"\(([\d,.]+) images/s\)", proc.stdout).group(1).replace(",", ""))
    ours_mb, bare_mb, nbytes = _write_rates(acts, workdir)
    e2e = n / proc.wall_s
    return [
        make_row("extract", f"forward only, tiny-random → {LAYER}, batch {BATCH}, CPU", forward_rate, "img/s", note="in-memory batches, same preprocessing and capture"),
        make_row("extract", f"end to end, {n:,} images (extraction loop)", reported, "img/s", baseline=forward_rate, goal="≥ 0.85 of forward only",
                 met=reported >= 0.85 * forward_rate, note="rate printed by imzarr extract (excludes interpreter start)"),
        make_row("extract", f"end to end, {n:,} images (whole command)", e2e, "img/s", baseline=forward_rate,
                 note=f"wall {proc.wall_s:.1f} s incl. Python/torch start and model build"),
        make_row("extract", "activation write (shard writer)", ours_mb, "MB/s", baseline=bare_mb, goal="≈ bare zarr write",
                 met=ours_mb >= 0.8 * bare_mb, note=f"{nbytes / 1e6:,.0f} MB float16; baseline = zarr array writes of the same shards"),
        make_row("extract", "peak RSS of the extraction", proc.max_rss_bytes / 2**20, "MiB", goal="bounded", note=f"output {nbytes / 2**20:,.0f} MiB"),
    ]

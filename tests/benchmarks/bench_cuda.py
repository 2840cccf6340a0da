"""Extraction on a CUDA device with the full DMD2 ImageNet-64 network (random init): rows only where one is present.

The issue's rows: the network through `encoder_bottleneck` + `midblock` (the forward stops after the midblock),
fp32 (IEEE: no TF32 convolutions) and bf16 autocast, batch 256, eager and with `--compile`. Forward-only is the network on a batch already on
the device (CUDA events around the calls); the pipeline rows are the whole `extract` from a converted 64×64 image
store on local disk to an activation store beside it (image reads, device noise, capture, checks and casts,
pinned copies, shard writes, done records). Each pipeline row gives img/s, its share of forward-only, achieved
TFLOP/s and the projected time for the 1,281,167 ImageNet training images. Every row is also printed the moment it
is measured (`cuda-row: …`), so a run stopped early keeps what it had.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tests.benchmarks.bench_extract import bench_image_store
from tests.benchmarks.run import make_row

PRESET = "dmd2-imagenet64"
LAYERS = ("encoder_bottleneck", "midblock")
BATCH = 256
IMAGENET_TRAIN = 1_281_167


def _emit(rows: list[dict], row: dict) -> None:
    rows.append(row)
    print("cuda-row:", json.dumps(row), flush=True)


def gflop_per_image(forward) -> float:
    """FLOPs of one image through the captured layers (the forward stops after the last), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, 64, 64, device="cuda")
    one_hot = torch.zeros(1, forward.loaded.label_dim, device="cuda")
    with FlopCounterMode(display=False) as counter:
        forward.run(x, one_hot, need_output=False)
    return counter.get_total_flops() / 1e9


def forward_only_rate(forward, batch: int = BATCH, iters: int = 10, through_extractor: bool = True) -> float:
    """img/s of the network alone on a device-resident batch, median of `iters` calls timed with CUDA events:
    through the extractor's PreparedForward (lock, precision, hooks, pooling), or capture_layers bare."""
    from extractor.models import capture_layers

    fwd = forward.settings

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 3, 64, 64, device="cuda", generator=gen) * 80
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 1000, (batch,), device="cuda", generator=gen), 1000).float()
    sigma = torch.full((batch,), 80.0, device="cuda")

    def call() -> None:
        if through_extractor:
            forward.run(x, one_hot, need_output=False, sigma=sigma)
        else:
            with torch.inference_mode():
                capture_layers(forward.loaded.module, x, sigma, one_hot, list(fwd.layers), fwd.pool)

    for _ in range(3):
        call()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return batch / float(np.median(times))


def pipeline_rate(
    store: str, out: Path, n: int, compute: str, pool: str = "none", batch: int | None = BATCH, workers: int = 2, compile_blocks: bool = False
) -> float:
    """img/s of one whole extraction (after the model is loaded: a first run in the process pays that)."""
    from extractor.extraction import (
        ExtractOptions,
        ForwardSettings,
        RunOptions,
        extract,
    )
    from extractor.models import ModelSpec
    from extractor.selection import SelectionSpec
    from schemas.task_runner import SchedulerSpec

    shutil.rmtree(out, ignore_errors=True)
    fwd = ForwardSettings(ModelSpec(preset=PRESET), LAYERS, pool=pool, compute_dtype=compute)
    options = ExtractOptions(store, str(out), fwd, SelectionSpec(num_samples=n),
                             RunOptions(batch_size=batch, device="cuda", shard_size=512, scheduler=SchedulerSpec(workers=workers), compile=compile_blocks))
    torch.cuda.synchronize()
    start = time.perf_counter()
    extract(options)
    rate = n / (time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    return rate


def run(workdir: Path, quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return [make_row("cuda", "CUDA rows", None, "", note="skipped: no CUDA device on this machine")]
    from extractor.forward import ForwardSettings, PreparedForward, prepare_module
    from extractor.models import ModelSpec

    card = torch.cuda.get_device_name(0)
    rows: list[dict] = []
    n_fast, n_fp32 = (4_096, 1_024) if quick else (32_768, 4_096)
    started = time.perf_counter()
    store = bench_image_store(workdir, n_fast)
    print(f"cuda: image store of {n_fast:,} images in {time.perf_counter() - started:.1f} s", flush=True)

    def settings(compute: str, pool: str = "none") -> PreparedForward:
        forward = PreparedForward(ForwardSettings(ModelSpec(preset=PRESET), LAYERS, pool=pool, compute_dtype=compute), "cuda", 64)
        prepare_module(forward.loaded.module, "cuda")  # the memory layout extraction runs it in
        return forward

    with settings("fp32") as forward:
        gflop = gflop_per_image(forward)
    forward_rates = {}
    for compute in ("fp32", "bf16"):
        with settings(compute) as forward:
            rate = forward_rates[compute] = forward_only_rate(forward)
        _emit(rows, make_row("cuda", f"forward only, {PRESET} to midblock, batch {BATCH}, {compute}", rate, "img/s",
                             note=f"{rate * gflop / 1e3:.1f} TFLOP/s ({gflop:.1f} GFLOP/img); {card}"))
    # What torch's own float32 default (TF32 convolutions, which imzarr's fp32 turns off) would give: capture_layers
    # bare, outside forward_batch's IEEE setting.
    before, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, True
    try:
        with settings("fp32") as forward:
            rate = forward_only_rate(forward, through_extractor=False)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    _emit(rows, make_row("cuda", f"forward only, {PRESET} to midblock, batch {BATCH}, fp32 with TF32 convolutions", rate, "img/s",
                         note=f"{rate * gflop / 1e3:.1f} TFLOP/s; informational: torch's default, not used by imzarr; {card}"))

    cases = [("bf16", "none", n_fast, BATCH, 2), ("bf16", "mean", n_fast, BATCH, 2), ("fp32", "none", n_fp32, BATCH, 2),
             ("bf16", "none", n_fast, BATCH, 4), ("bf16", "none", n_fast, None, 2)]
    pipeline_rate(store, workdir / "warm.zarr", 1_024, "bf16")  # first touch of pinned buffers, cuDNN plans
    for compute, pool, n, batch, workers in cases:
        label = f"batch {batch}"
        if batch is None:
            with settings(compute, pool) as forward:
                label = f"automatic batch ({forward.batch_size})"
        rate = pipeline_rate(store, workdir / "acts.zarr", n, compute, pool, batch, workers)
        minutes = IMAGENET_TRAIN / rate / 60
        _emit(rows, make_row("cuda", f"extract, {PRESET}, {compute}, {'unpooled' if pool == 'none' else 'pooled ' + pool}, {label}, {workers} threads",
                             rate, "img/s", baseline=forward_rates[compute],
                             note=f"ratio: share of forward-only; {rate * gflop / 1e3:.1f} TFLOP/s; 1.28 M images in {minutes:.1f} min; "
                                  f"{n:,} images, float16 storage; {card}"))
    # Last, since it wraps the cached network's blocks: --compile (its first run pays ~25 s of compiling).
    with settings("bf16") as forward:
        prepare_module(forward.loaded.module, "cuda", compile_blocks=True)
        compiled = forward_only_rate(forward)
    # extract's layer probe runs one image: a batch size the blocks compile for once, outside the timed rows
    pipeline_rate(store, workdir / "warm.zarr", 1_024, "bf16", compile_blocks=True)
    _emit(rows, make_row("cuda", f"forward only, {PRESET} to midblock, batch {BATCH}, bf16, compiled blocks", compiled, "img/s",
                         baseline=forward_rates["bf16"], note=f"ratio: against eager; {compiled * gflop / 1e3:.1f} TFLOP/s; {card}"))
    for pool in ("none", "mean"):
        rate = pipeline_rate(store, workdir / "acts.zarr", n_fast, "bf16", pool, compile_blocks=True)
        _emit(rows, make_row("cuda", f"extract, {PRESET}, bf16, {'unpooled' if pool == 'none' else 'pooled mean'}, batch {BATCH}, --compile",
                             rate, "img/s", baseline=compiled,
                             note=f"ratio: share of compiled forward-only; {rate * gflop / 1e3:.1f} TFLOP/s; "
                                  f"1.28 M images in {IMAGENET_TRAIN / rate / 60:.1f} min; {n_fast:,} images; {card}"))
    free, total = torch.cuda.mem_get_info()
    print(f"cuda: done in {time.perf_counter() - started:.0f} s; device memory free {free / 2**30:.0f} of {total / 2**30:.0f} GiB; "
          f"{os.cpu_count()} CPU cores", flush=True)
    return rows

"""The extraction pipeline's ceiling: the whole of `extract` with a zero-cost stand-in network, on CPU.

Two (768, 8, 8) layers per image (the shapes of the issue), float16, 512-sample shards, two local workers:
everything but the network runs as in a real extraction (image reads, device noise, capture, pooling, cast,
NaN/Inf checks, direct shard writes, coordinates, done records, finalize). Pooled outputs measure the per-image
overhead (goal ≥ 10,000 img/s on 2 cores); unpooled outputs are mostly bytes, so they are compared with a raw
`os.write` of the same bytes into as many files (goal ≥ 0.8×); so are the shard writes alone. Each figure is the
best of `ROUNDS` runs, after a warm-up, each run starting from a synced page cache (the VM's writeback of earlier
runs' gigabytes otherwise swung the raw baseline between 3,000 and 26,000 img/s); the machine's load from other
work is measured during each run and reported. A context row writes the same bytes with an fsync per file: the
disk's own rate, which a long unpooled run meets once the page cache is full. One more row times the noise
alone: the compiled CPU loop against the recipe's torch ops; the last bounds the unpooled rate from the work no
pipeline can skip (cast and check, noise, the write), each timed alone, spread perfectly over the cores.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from tests.benchmarks.bench_extract import bench_image_store
from tests.benchmarks.run import QuietGate, make_row, others_busy_cores
from tests.support.stand_in import StandInNetwork, serving

LAYERS = ("model.enc.8x8_a", "model.enc.8x8_b")
LAYER_SHAPE = (768, 8, 8)
SHARD = 512
ROUNDS = 3


def _network() -> StandInNetwork:
    return StandInNetwork({"8x8_a": LAYER_SHAPE, "8x8_b": LAYER_SHAPE}, {"8x8_in0": LAYER_SHAPE})


def _extract_rate(store: str, out: Path, n: int, pool: str, noise: bool) -> tuple[float, float]:
    """(img/s of one whole extraction, other work's load in cores meanwhile)."""
    from extractor.extraction import ExtractOptions, ForwardSettings, RunOptions, extract
    from extractor.models import ModelSpec
    from extractor.selection import SelectionSpec

    shutil.rmtree(out, ignore_errors=True)
    fwd = ForwardSettings(ModelSpec(preset="tiny-random"), LAYERS, pool=pool, noise=noise)
    options = ExtractOptions(store, str(out), fwd, SelectionSpec(num_samples=n), RunOptions(batch_size=128, device="cpu", shard_size=SHARD))
    os.sync()  # start from a clean page cache: earlier runs' dirty pages would be written back meanwhile
    machine, own = _cpu_seconds()
    start = time.perf_counter()
    extract(options)
    wall = time.perf_counter() - start
    load = max(0.0, (_cpu_seconds()[0] - machine - (_cpu_seconds()[1] - own)) / wall)
    return n / wall, load


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the machine was busy, CPU seconds of this process) since boot / start."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    usage = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), usage.user + usage.system


def _raw_write_rate(folder: Path, n: int, bytes_per_image: int, fsync: bool = False) -> float:
    """img/s of os.write of the same bytes into files of SHARD images each (one per shard and layer); with `fsync`
    each file is synced before it is closed: what the disk itself takes once the page cache is full (an unpooled
    extraction of 1.28 M images is ~250 GB, far past any page cache)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    per_layer = bytes_per_image // len(LAYERS)
    block = np.random.default_rng(0).integers(0, 255, SHARD * per_layer, dtype=np.uint8).tobytes()
    os.sync()
    start = time.perf_counter()
    for k, first in enumerate(range(0, n, SHARD)):
        count = min(SHARD, n - first)
        for layer in range(len(LAYERS)):
            fd = os.open(folder / f"{layer}_{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            view = memoryview(block)[: count * per_layer]
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
            os.close(fd)
    return n / (time.perf_counter() - start)


def _shard_write_rate(folder: Path, n: int) -> float:
    """img/s of the extractor's shard writes alone (both layers, coordinates, done record), data already in memory."""
    from extractor.activation_writer import create_activation_arrays
    from schemas.shard_writer import ShardOutput
    from schemas.activation_store import ACTIVATION_SCHEMA
    from schemas.store_lifecycle import mark_done, prepare_store

    shutil.rmtree(folder, ignore_errors=True)
    url = str(folder)
    shapes = {name: LAYER_SHAPE for name in LAYERS}
    num_shards = -(-n // SHARD)
    prepare_store(url, ACTIVATION_SCHEMA, {"bench": n}, num_shards, lambda g: create_activation_arrays(g, n, shapes, "float16", SHARD, None), True)
    values = np.random.default_rng(0).standard_normal((SHARD, *LAYER_SHAPE)).astype(np.float16)
    index = np.arange(n)
    coords = {"label": (index % 1000).astype(np.int16), "synset": np.full(n, "n01440764", dtype=object),
              "class_name": np.full(n, "tench", dtype=object), "global_index": index, "source_file": np.full(n, "", dtype=object),
              "source_sample": index}
    os.sync()
    start = time.perf_counter()
    for k in range(num_shards):
        first, count = k * SHARD, min(SHARD, n - k * SHARD)
        output = ShardOutput(url, k, first, {name: values[:count] for name in LAYERS})
        output.ready(0, count)
        output.commit({c: v[first : first + count] for c, v in coords.items()})
        mark_done(url, k)
    return n / (time.perf_counter() - start)


def _noise_row(batch: int = 128, rounds: int = 5) -> dict:
    """Noise for 64×64 images on one core: the compiled CPU loop against the recipe's torch ops, same bits."""
    import torch

    from extractor.noise import NoiseGenerator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = {}
        for compiled in (True, False):
            generator, out = NoiseGenerator(0, (3, 64, 64), "cpu", compiled=compiled), torch.empty(batch, 3, 64, 64)
            generator(np.arange(batch), out=out)  # compile / first touch
            best = float("inf")
            for k in range(rounds):
                start = time.perf_counter()
                generator(np.arange(batch) + k * batch, out=out)
                best = min(best, time.perf_counter() - start)
            rates[compiled] = batch / best
    finally:
        torch.set_num_threads(threads)
    return make_row("ceiling", "noise, 3×64×64 per image, one core: compiled loop", rates[True], "img/s", baseline=rates[False],
                    note="baseline: the recipe's torch ops on CPU; bit-identical outputs (tests/extractor/test_noise.py)")


def _cast_rate(batch: int = 128, rounds: int = 5) -> float:
    """img/s of the one-pass float16 cast with NaN/Inf flags of both layers on one core (extractor.cast_cpu)."""
    from extractor.cast_cpu import cast_to_float16

    values = np.random.default_rng(2).standard_normal((batch, int(np.prod(LAYER_SHAPE))), dtype=np.float32)
    out = np.empty(values.shape, np.float16)
    cast_to_float16(values, out)  # compile / first touch
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _layer in LAYERS:
            cast_to_float16(values, out)
        best = min(best, time.perf_counter() - start)
    return batch / best


def _bound_row(cast: float, noise: float, raw: float) -> dict:
    """What the unpooled goal asks, against the work no pipeline can skip: per image the cast and check, the
    noise and the raw write itself (each timed alone on one core), spread perfectly over every core at no other
    cost. Below 0.8 × raw, the goal is out of this machine's reach."""
    cores = len(os.sched_getaffinity(0))
    per_image = 1 / cast + 1 / noise + 1 / raw
    bound = cores / per_image
    return make_row("ceiling", f"  bound for unpooled: cast + noise + write per image, {cores} cores perfectly used", bound, "img/s", baseline=raw,
                    note=f"per image {1e6 / cast:.0f} µs cast and check + {1e6 / noise:.0f} µs noise + {1e6 / raw:.0f} µs raw write, one core each; no Python, reads or scheduling")


def run(workdir: Path, quick: bool = False) -> list[dict]:
    n_pooled = 4_096 if quick else 20_480
    n_full = 2_048 if quick else 4_096
    store = bench_image_store(workdir, n_pooled)
    gate = QuietGate(budget_s=60)
    rows = []
    raw_unpooled = 0.0
    with serving(_network()):
        _extract_rate(store, workdir / "warm.zarr", 1_024, "mean", True)  # imports, first-touch of buffers
        _extract_rate(store, workdir / "warm.zarr", 1_024, "none", True)
        for pool, n in (("mean", n_pooled), ("none", n_full)):
            for noise in (True, False):
                results = []
                for _ in range(ROUNDS):
                    gate.wait()
                    results.append(_extract_rate(store, workdir / "acts.zarr", n, pool, noise))
                rate, load = max(results)
                label = "pooled (mean)" if pool == "mean" else "unpooled"
                bytes_per_image = len(LAYERS) * int(np.prod(LAYER_SHAPE if pool == "none" else LAYER_SHAPE[:1])) * 2
                note = f"{n:,} images, {bytes_per_image:,} B/img float16; others' load {load:.2f} cores; best of {ROUNDS}"
                if pool == "mean":
                    rows.append(make_row("ceiling", f"extract {label}, stand-in network, {'noise' if noise else 'no noise'}", rate, "img/s",
                                         goal="≥ 10,000 img/s" if noise else "", met=rate >= 10_000 if noise else None, note=note))
                    continue
                raws = []
                for _ in range(ROUNDS):
                    gate.wait()
                    raws.append(_raw_write_rate(workdir / "raw", n, bytes_per_image))
                raw = max(raws)
                rows.append(make_row("ceiling", f"extract {label}, stand-in network, {'noise' if noise else 'no noise'}", rate, "img/s",
                                     baseline=raw, goal="≥ 0.8 × raw write" if noise else "", met=rate >= 0.8 * raw if noise else None,
                                     note=note + f"; baseline: os.write of the same bytes into as many files, {raw * bytes_per_image / 1e6:,.0f} MB/s"))
                if noise:
                    raw_unpooled = raw  # the bound row's baseline
                    gate.wait()
                    disk = _raw_write_rate(workdir / "raw", n, bytes_per_image, fsync=True)
                    rows.append(make_row("ceiling", "  the disk itself: the same raw writes, each file fsync'ed", disk, "img/s",
                                         note=f"{disk * bytes_per_image / 1e6:,.0f} MB/s; the unpooled extraction above is {rate / disk:.2f}× this"))
    noise_row = _noise_row()
    rows += [noise_row, _bound_row(_cast_rate(), noise_row["value"], raw_unpooled)]
    n_write = 2_048
    writes, raws = [], []
    for _ in range(ROUNDS):
        gate.wait()
        writes.append(_shard_write_rate(workdir / "writes.zarr", n_write))
        raws.append(_raw_write_rate(workdir / "raw", n_write, bytes_per_image))
    rows.append(make_row("ceiling", "shard writes alone: 2 layers + coordinates + done record", max(writes), "img/s", baseline=max(raws),
                         goal="≥ 0.8 × raw write", met=max(writes) >= 0.8 * max(raws),
                         note=f"{n_write:,} images of {bytes_per_image:,} B; direct shard and coordinate chunk files; best of {ROUNDS}"))
    shutil.rmtree(workdir / "raw", ignore_errors=True)
    shutil.rmtree(workdir / "writes.zarr", ignore_errors=True)
    rows.append(make_row("ceiling", "others' load before the runs", others_busy_cores(1.0), "cores", note="2-core machine shared with other developers"))
    return rows

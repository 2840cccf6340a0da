"""Conversion and read benchmarks: NPZ shards and JPEG trees through the real CLI, against bare limits.

Every pipeline that is compared (the converter, the bare np.load + zarr write, the plain JPEG loop, zarr-python's
own readers) runs in a child process of its own, timed from spawn to exit, so each pays its own interpreter
start and imports and its peak memory can be measured; the children's internal timers go into the notes.
In-process reads (ImageStore, the old np.load way, xarray) run in this process on page-cache-warm files.
Cold is the first run of a pipeline in this process's life; warm follows a warm-up conversion of a small shard.
Each timed run first waits (within a budget) until other users' jobs leave the cores free, and its note says
how busy they were meanwhile: this machine is shared, and a neighbour holding one of two cores halves scaling.

Sizes: shards of 128,116 images of 64×64 (`quick`: 12,000) and 2,000 JPEGs (`quick`: 400). Generated inputs
are kept in the workdir with a `ready.json` marker, so a kept `--workdir` skips the (minute-long) generation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tests.benchmarks.run import ChildRun, QuietGate, Row, error_row, make_row, run_child

RESOLUTION = 64
IMAGE_BYTES = 3 * RESOLUTION * RESOLUTION
MB = 1e6  # throughput and memory are reported in decimal megabytes
SEED = 20240601
CONVERT_TIMEOUT_S = 600.0
ZARR_REFERENCE_TIMEOUT_S = 30.0  # the brief: skip zarr-python's own readers when they take longer
ZARR_REFERENCE_RSS_LIMIT = 6_000_000_000  # oindex on sharded arrays has reached 12.5 GB here; stop it well before
CHECK_ROWS = 1_000  # rows kept at generation time to check every store's pixels without reloading a shard

# JPEG inputs: ImageNet-typical sizes (most are 500×375 or 375×500) and enough noise for ~85 kB files at
# quality 90 (ImageNet's mean is ~110 kB), so entropy decoding is not unrealistically cheap.
JPEG_QUALITY = 90
JPEG_NOISE_SIGMA = 16.0
JPEG_BASE_SIZE = 96
JPEG_GENERATION_BLOCK = 256
JPEG_RECIPE = "edm-center-crop"


@dataclass(frozen=True)
class Sizes:
    shard_images: int
    warmup_images: int
    random_reads: int
    prefix_reads: int
    jpeg_files: int
    jpeg_folders: int
    jpeg_repeats: int  # runs of each JPEG pipeline; the fastest counts, all are in the note


FULL = Sizes(shard_images=128_116, warmup_images=8_192, random_reads=10_000, prefix_reads=10_000, jpeg_files=2_000, jpeg_folders=10, jpeg_repeats=3)
QUICK = Sizes(shard_images=12_000, warmup_images=2_048, random_reads=10_000, prefix_reads=10_000, jpeg_files=400, jpeg_folders=10, jpeg_repeats=1)


# Every timed run first waits (within a budget) for other users' jobs to free the cores; run() makes a fresh one.
_quiet = QuietGate()


def _log(message: str) -> None:
    print(f"[bench_convert {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _mb(nbytes: float) -> float:
    return nbytes / MB


# ================================================================ inputs


@dataclass(frozen=True)
class NpzInputs:
    """Generated shards: A stored and deflated (same pixels), B stored (inverted A), small warm-up shards."""

    num_images: int
    stored_a: Path
    stored_b: Path
    deflated_a: Path
    warmup_stored: Path
    warmup_deflated: Path
    check_indices: np.ndarray  # sorted rows of shard A
    check_rows_a: np.ndarray  # their pixels (n, 3, S, S); shard B holds 255 - these

    @property
    def pixel_bytes(self) -> int:
        return self.num_images * IMAGE_BYTES


def prepare_npz_inputs(folder: Path, sizes: Sizes) -> NpzInputs:
    """Write the shards unless a finished set for the same sizes is already there."""
    spec = {"version": 1, "images": sizes.shard_images, "warmup": sizes.warmup_images, "seed": SEED}
    paths = _npz_paths(folder, sizes.shard_images)
    marker = folder / "ready.json"
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        marker.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        _generate_npz_inputs(paths, sizes)
        marker.write_text(json.dumps(spec))
    with np.load(paths["checks"]) as checks:
        idx, rows = checks["indices"], checks["rows"]
    return NpzInputs(
        sizes.shard_images, paths["stored_a"], paths["stored_b"], paths["deflated_a"],
        paths["warmup_stored"], paths["warmup_deflated"], idx, rows,
    )


def _npz_paths(folder: Path, n: int) -> dict[str, Path]:
    return {
        "stored_a": folder / f"stored-a-{n}.npz",
        "stored_b": folder / f"stored-b-{n}.npz",
        "deflated_a": folder / f"deflated-a-{n}.npz",
        "warmup_stored": folder / "warmup-stored.npz",
        "warmup_deflated": folder / "warmup-deflated.npz",
        "checks": folder / "checks.npz",
    }


def _generate_npz_inputs(paths: dict[str, Path], sizes: Sizes) -> None:
    from tests.support.synthetic import photo_like, write_npz_shard

    n = sizes.shard_images
    rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    _log(f"generating {n:,} photo-like images ({_mb(n * IMAGE_BYTES):,.0f} MB) …")
    images = photo_like(n, RESOLUTION, seed=SEED)  # built once in memory (~1.6 GB at full size)
    labels = rng.integers(1, 1001, n)
    write_npz_shard(paths["stored_a"], images, labels, compressed=False)
    _log("writing the deflated shard (np.savez_compressed, about a minute at full size) …")
    write_npz_shard(paths["deflated_a"], images, labels, compressed=True)
    check_indices = np.sort(rng.choice(n, min(CHECK_ROWS, n), replace=False))
    np.savez(paths["checks"], indices=check_indices, rows=images[check_indices])
    # Shard B must differ from A (so a read from the wrong shard shows) without a second generation pass.
    np.subtract(255, images, out=images)
    write_npz_shard(paths["stored_b"], images, labels[::-1], compressed=False)
    del images
    warmup = photo_like(sizes.warmup_images, RESOLUTION, seed=SEED + 1)
    warmup_labels = rng.integers(1, 1001, sizes.warmup_images)
    write_npz_shard(paths["warmup_stored"], warmup, warmup_labels, compressed=False)
    write_npz_shard(paths["warmup_deflated"], warmup, warmup_labels, compressed=True)
    _log(f"NPZ inputs ready in {time.perf_counter() - started:.0f} s")


@dataclass(frozen=True)
class JpegTree:
    root: Path
    num_files: int
    mean_file_bytes: float
    mean_width: float
    mean_height: float


def prepare_jpeg_tree(folder: Path, sizes: Sizes) -> JpegTree:
    """`<wnid>/<wnid>_NNNNN.JPEG` files of photo-like content at ImageNet-like sizes."""
    root = folder / "tree"
    spec = {"version": 1, "files": sizes.jpeg_files, "folders": sizes.jpeg_folders, "seed": SEED, "sigma": JPEG_NOISE_SIGMA}
    marker = folder / "ready.json"
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        marker.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        _write_jpeg_tree(root, sizes.jpeg_files, sizes.jpeg_folders)
        marker.write_text(json.dumps(spec))
    return _describe_jpeg_tree(root)


def _write_jpeg_tree(root: Path, num_files: int, num_folders: int) -> None:
    from PIL import Image

    from schemas.classes import class_table
    from tests.support.synthetic import photo_like

    started = time.perf_counter()
    wnids = class_table().wnids
    folders = [wnids[i * len(wnids) // num_folders] for i in range(num_folders)]  # real WNIDs, spread over classes
    for wnid in folders:
        (root / wnid).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED + 3)
    # One noise field, windows of it per image: fresh normal noise per image would cost more than the encoding.
    noise = rng.normal(0, JPEG_NOISE_SIGMA, (520, 520, 3)).astype(np.int16)
    for start in range(0, num_files, JPEG_GENERATION_BLOCK):
        count = min(JPEG_GENERATION_BLOCK, num_files - start)
        bases = photo_like(count, JPEG_BASE_SIZE, seed=SEED + 4 + start)  # generated in blocks: bounded memory
        for j in range(count):
            i = start + j
            width, height = _imagenet_like_size(rng)
            smooth = Image.fromarray(bases[j].transpose(1, 2, 0)).resize((width, height), Image.Resampling.BICUBIC)
            y, x = rng.integers(0, 520 - height + 1), rng.integers(0, 520 - width + 1)
            pixels = np.clip(np.asarray(smooth, dtype=np.int16) + noise[y : y + height, x : x + width], 0, 255).astype(np.uint8)
            wnid = folders[i % num_folders]
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i:05d}.JPEG", quality=JPEG_QUALITY)
    _log(f"{num_files:,} JPEGs written in {time.perf_counter() - started:.0f} s")


def _imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): long side 450–500, short side 333–400, three in four landscape."""
    long_side = int(rng.choice([500, 500, 500, int(rng.integers(450, 501))]))
    short_side = int(rng.choice([375, 375, 333, int(rng.integers(333, 401))]))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def _describe_jpeg_tree(root: Path) -> JpegTree:
    from PIL import Image

    files = sorted(root.rglob("*.JPEG"))
    sizes = [Image.open(f).size for f in files[:: max(1, len(files) // 200)]]  # headers only: cheap
    return JpegTree(
        root,
        len(files),
        float(np.mean([f.stat().st_size for f in files])),
        float(np.mean([w for w, _ in sizes])),
        float(np.mean([h for _, h in sizes])),
    )


# ================================================================ child processes


def _child_command(mode: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "tests.benchmarks.bench_convert", mode, *map(str, args)]


def _run_json_child(mode: str, *args: object, timeout_s: float = CONVERT_TIMEOUT_S) -> tuple[ChildRun, dict[str, Any]]:
    _quiet.wait()
    child = run_child(_child_command(mode, *args), timeout_s=timeout_s)
    if not child.ok:
        raise RuntimeError(f"benchmark child {mode}: {child.describe_failure()}")
    return child, child.last_json()


def create_store_like_array(path: Path, num_images: int) -> Any:
    """A zarr array with the converter's image layout: same chunking, sharding, codec (none), fill value."""
    import zarr

    from schemas.image_layout import DEFAULT_SHARD, inner_chunk_for

    s = RESOLUTION
    return zarr.create_array(
        store=str(path),
        shape=(num_images, 3, s, s),
        dtype="uint8",
        chunks=(inner_chunk_for(s, DEFAULT_SHARD), 3, s, s),
        shards=(DEFAULT_SHARD, 3, s, s),
        compressors=None,
        fill_value=0,
        zarr_format=3,
        overwrite=True,
    )


def child_bare_limit(shard: str, output: str) -> dict[str, Any]:
    """The bare limit: np.load the whole `data` member, then one pass of whole-shard zarr-python writes.

    Shard-aligned slices, because one `array[:] = data` call was 2–3× slower here (zarr 3.1.6: 85–170 MB/s
    against 330–490 MB/s for the same bytes), and the limit should be the best plain way.
    """
    started = time.perf_counter()
    with np.load(shard) as npz:
        data = npz["data"]
    loaded = time.perf_counter()
    n = data.shape[0]
    images = data.reshape(n, 3, RESOLUTION, RESOLUTION)
    array = create_store_like_array(Path(output), n)
    shard_size = array.shards[0]
    for start in range(0, n, shard_size):
        array[start : start + shard_size] = images[start : start + shard_size]
    return {"load_s": loaded - started, "write_s": time.perf_counter() - loaded, "images": n}


def child_zarr_read(store: str, indices_file: str, method: str) -> dict[str, Any]:
    """zarr-python reading the sample indices: `oindex`, or one slice per inner chunk touched."""
    import zarr

    image = zarr.open_array(store, path="image", mode="r")
    indices = np.sort(np.load(indices_file))
    started = time.perf_counter()
    if method == "oindex":
        out = image.oindex[indices]
    else:
        out = _read_by_inner_chunk(image, indices)
    return {"seconds": time.perf_counter() - started, "images": int(out.shape[0])}


def _read_by_inner_chunk(image: Any, sorted_indices: np.ndarray) -> np.ndarray:
    inner = image.chunks[0]
    out = np.empty((sorted_indices.size, *image.shape[1:]), dtype=image.dtype)
    chunk_of = sorted_indices // inner
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    for group in np.split(np.arange(sorted_indices.size), bounds):
        lo, hi = int(sorted_indices[group[0]]), int(sorted_indices[group[-1]]) + 1
        out[group] = image[lo:hi][sorted_indices[group] - lo]  # the span of the chunk that holds wanted rows
    return out


def child_jpeg_loop(root: str, output: str) -> dict[str, Any]:
    """The plain single-process loop a researcher would write: PIL open and convert to RGB, the recipe, stack,
    one zarr write; each phase timed on its own."""
    from PIL import Image

    from converter.sources.jpeg_recipes import get_recipe

    started = time.perf_counter()
    tree = Path(root)
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.JPEG"))  # the tree's canonical order
    resize = get_recipe(JPEG_RECIPE)
    images = np.empty((len(files), 3, RESOLUTION, RESOLUTION), dtype=np.uint8)
    decode_s = resize_s = 0.0
    for i, rel in enumerate(files):
        t0 = time.perf_counter()
        rgb = Image.open(tree / rel).convert("RGB")
        t1 = time.perf_counter()
        images[i] = resize(rgb, RESOLUTION)
        decode_s, resize_s = decode_s + (t1 - t0), resize_s + (time.perf_counter() - t1)
    t_write = time.perf_counter()
    create_store_like_array(Path(output), len(files))[:] = images
    write_s = time.perf_counter() - t_write
    return {"decode_s": decode_s, "resize_s": resize_s, "write_s": write_s, "total_s": time.perf_counter() - started, "images": len(files)}


CHILD_MODES: dict[str, Callable[..., dict[str, Any]]] = {
    "bare": child_bare_limit,
    "zarr-read": child_zarr_read,
    "jpeg-loop": child_jpeg_loop,
}


# ================================================================ measuring the converter


@dataclass(frozen=True)
class Conversion:
    """One `python -m converter …` run."""

    wall_s: float
    inprocess_s: float  # the CLI's own timer: convert() start to finish, no interpreter start or source scan
    stage1_s: float  # materializing (inflate / decode+resize) into scratch files; 0 when nothing needs it
    stage2_s: float  # writing the output shards
    cpu_s: float
    others_cores: float
    max_rss_bytes: int
    tree_peak_rss_bytes: int

    def time_words(self) -> str:
        stages = f"stage 1 {self.stage1_s:.1f} s, " if self.stage1_s else ""
        rest = self.wall_s - self.stage1_s - self.stage2_s
        return (
            f"wall {self.wall_s:.1f} s = {stages}stage 2 {self.stage2_s:.1f} s, other {rest:.1f} s (start, imports, scan, setup, "
            f"finalize); CPU {self.cpu_s:.1f} s; {_noise_words(self.others_cores)}"
        )


_REPORTED_SECONDS = re.compile(r"converted, .* in ([0-9.]+) s \(")
# The converter's progress lines when stderr is not a terminal: "<desc>: done/total img (rate img/s, ETA …)".
_PROGRESS_LINE = re.compile(r"^(reading sources|writing [^:]+): (\d+)/(\d+) img \(([\d,]+) img/s", re.MULTILINE)


def stage_seconds(stderr: str) -> dict[str, float]:
    """Seconds from each stage's start to its last progress line (done / rate)."""
    seconds: dict[str, float] = {}
    for desc, done, _total, rate in _PROGRESS_LINE.findall(stderr):
        stage = "stage1" if desc == "reading sources" else "stage2"
        seconds[stage] = int(done) / max(float(rate.replace(",", "")), 1e-9)
    return seconds


def convert_cli(args: list[str], output: Path, env: dict[str, str] | None = None) -> Conversion:
    """Convert into a fresh output through the real command line."""
    shutil.rmtree(output, ignore_errors=True)
    _quiet.wait()
    child = run_child([sys.executable, "-m", "converter", *args, "-o", str(output)], timeout_s=CONVERT_TIMEOUT_S, env=env)
    if not child.ok:
        raise RuntimeError(f"python -m converter {' '.join(args)}: {child.describe_failure()}")
    found = _REPORTED_SECONDS.search(child.stdout)
    stages = stage_seconds(child.stderr)
    return Conversion(
        wall_s=child.wall_s,
        inprocess_s=float(found.group(1)) if found else float("nan"),
        stage1_s=stages.get("stage1", 0.0),
        stage2_s=stages.get("stage2", 0.0),
        cpu_s=child.cpu_s,
        others_cores=child.others_cores,
        max_rss_bytes=child.max_rss_bytes,
        tree_peak_rss_bytes=child.tree_peak_rss_bytes,
    )


@dataclass(frozen=True)
class BareRun:
    wall_s: float
    load_s: float
    write_s: float
    cpu_s: float
    others_cores: float
    max_rss_bytes: int


def bare_limit(shard: Path, output: Path) -> BareRun:
    child, result = _run_json_child("bare", shard, output)
    shutil.rmtree(output, ignore_errors=True)
    return BareRun(child.wall_s, result["load_s"], result["write_s"], child.cpu_s, child.others_cores, child.max_rss_bytes)


def pixels_match(store: Path, indices: np.ndarray, expected: np.ndarray) -> bool:
    from schemas.image_store import validate_image_store

    return bool(np.array_equal(validate_image_store(str(store)).take(indices), expected))


def _timed_repeats(count: int, fn: Callable[[], Any]) -> tuple[list[float], Any]:
    """Wall times of `count` calls and the last result."""
    times, result = [], None
    for _ in range(count):
        _quiet.wait()
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return times, result


def _spread_words(times: list[float]) -> str:
    return f"median of {len(times)} runs {float(np.median(times)):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def _noise_words(others_cores: float) -> str:
    # Other engineers' jobs share this machine's cores; say how much of it they held during the run.
    return f"others used {others_cores:.1f} of {_cores()} cores meanwhile"


def _cores() -> int:
    return os.cpu_count() or 1


# ================================================================ NPZ throughput


@dataclass(frozen=True)
class ShardRuns:
    kind: str  # "stored" | "deflated"
    cold: Conversion
    warm: Conversion
    bare_cold: BareRun
    bare_warm: BareRun
    correct: bool


def measure_shard_conversion(kind: str, shard: Path, warmup_shard: Path, inputs: NpzInputs, out: Path) -> ShardRuns:
    """Cold: the first run of each pipeline; warm: after a warm-up conversion of a small shard."""
    out.mkdir(parents=True, exist_ok=True)
    store = out / f"{kind}.zarr"
    _log(f"{kind}: bare limit (cold) …")
    bare_cold = bare_limit(shard, out / "bare.zarr")
    _log(f"{kind}: converter (cold) …")
    cold = convert_cli(["npz", str(shard)], store)
    convert_cli(["npz", str(warmup_shard)], out / "warmup.zarr")
    shutil.rmtree(out / "warmup.zarr", ignore_errors=True)
    _log(f"{kind}: bare limit (warm) …")
    bare_warm = bare_limit(shard, out / "bare.zarr")
    _log(f"{kind}: converter (warm) …")
    warm = convert_cli(["npz", str(shard)], store)
    correct = pixels_match(store, inputs.check_indices, inputs.check_rows_a)
    shutil.rmtree(store, ignore_errors=True)
    return ShardRuns(kind, cold, warm, bare_cold, bare_warm, correct)


def shard_conversion_rows(runs: ShardRuns, inputs: NpzInputs) -> list[Row]:
    n, nbytes = inputs.num_images, inputs.pixel_bytes
    mbs, bare_mbs = _mb(nbytes) / runs.warm.wall_s, _mb(nbytes) / runs.bare_warm.wall_s
    cold_mbs, bare_cold_mbs = _mb(nbytes) / runs.cold.wall_s, _mb(nbytes) / runs.bare_cold.wall_s
    ratio = mbs / bare_mbs
    if runs.kind == "stored":
        goal, met = "≥ 200 MB/s and ≥ 0.8× bare", mbs >= 200 and ratio >= 0.8
    else:
        goal, met = "≥ 0.8× bare", ratio >= 0.8
    label = f"npz {runs.kind} shard ({n:,} img) → store"
    inproc = _mb(nbytes) / runs.warm.inprocess_s
    bare_inproc = _mb(nbytes) / (runs.bare_warm.load_s + runs.bare_warm.write_s)
    warm_note = (
        f"{runs.warm.time_words()}; CLI's own timer {runs.warm.inprocess_s:.1f} s = {inproc:,.0f} MB/s vs bare in-process "
        f"{bare_inproc:,.0f} MB/s{'' if runs.correct else '; WRONG PIXELS in the store'}"
    )
    return [
        make_row("convert", f"{label}, warm", mbs, "MB/s", baseline=bare_mbs, goal=goal, met=met and runs.correct, note=warm_note),
        make_row("convert", f"{label}, warm", n / runs.warm.wall_s, "images/s", baseline=n / runs.bare_warm.wall_s, note="same run as the row above"),
        make_row(
            "convert", f"{label}, cold (first run)", cold_mbs, "MB/s", baseline=bare_cold_mbs,
            note=f"{_cold_warm_words(cold_mbs, mbs)}; {runs.cold.time_words()}",
        ),
        make_row(
            "convert", f"bare limit {runs.kind}: np.load(data) + zarr writes shard by shard", bare_mbs, "MB/s",
            note=(
                f"one thread; warm: load {runs.bare_warm.load_s:.1f} s, write {runs.bare_warm.write_s:.1f} s, start+imports "
                f"{runs.bare_warm.wall_s - runs.bare_warm.load_s - runs.bare_warm.write_s:.1f} s, {_noise_words(runs.bare_warm.others_cores)}; "
                f"cold: {bare_cold_mbs:,.0f} MB/s, load {runs.bare_cold.load_s:.1f} s, write {runs.bare_cold.write_s:.1f} s"
            ),
        ),
        make_row(
            "convert", f"peak RSS converting the {runs.kind} shard", _mb(runs.warm.max_rss_bytes), "MB",
            goal="< 1000 MB", met=runs.warm.max_rss_bytes < 1e9,
            note=f"cold run {_mb(runs.cold.max_rss_bytes):,.0f} MB; bare limit {_mb(runs.bare_warm.max_rss_bytes):,.0f} MB",
        ),
    ]


def _cold_warm_words(cold: float, warm: float) -> str:
    change = cold / warm - 1
    return "same as warm (within 10%)" if abs(change) < 0.1 else f"{abs(change):.0%} {'slower' if change < 0 else 'faster'} than warm"


def bench_shard_throughput(kind: str, inputs: NpzInputs, out: Path) -> tuple[list[Row], ShardRuns]:
    shard = inputs.stored_a if kind == "stored" else inputs.deflated_a
    warmup = inputs.warmup_stored if kind == "stored" else inputs.warmup_deflated
    runs = measure_shard_conversion(kind, shard, warmup, inputs, out)
    return shard_conversion_rows(runs, inputs), runs


# ================================================================ random access


READ_REPEATS = 5  # in-process reads are short: the median of several resists other users' bursts


def old_way_take(shards: list[Path], rows_per_shard: int, indices: np.ndarray) -> np.ndarray:
    """Before the store: np.load each shard's whole `data` member and fancy-index the wanted rows."""
    out = np.empty((indices.size, 3, RESOLUTION, RESOLUTION), dtype=np.uint8)
    for k, shard in enumerate(shards):
        local = indices - k * rows_per_shard
        wanted = (local >= 0) & (local < rows_per_shard)
        with np.load(shard) as npz:
            data = npz["data"]
        out[wanted] = data[local[wanted]].reshape(-1, 3, RESOLUTION, RESOLUTION)
        del data  # one shard in memory at a time
    return out


def zarr_reference_row(method: str, store: Path, indices_file: Path, count: int, take_rate: float) -> Row:
    """zarr-python's own reader in a child: stopped after 30 s or 6 GB, then reported as skipped."""
    name = {"oindex": "zarr-python z.oindex[sorted]", "chunk": "zarr-python one slice per inner chunk"}[method]
    _quiet.wait()
    child = run_child(
        _child_command("zarr-read", store, indices_file, method),
        timeout_s=ZARR_REFERENCE_TIMEOUT_S,
        rss_limit_bytes=ZARR_REFERENCE_RSS_LIMIT,
    )
    if not child.ok:
        return make_row("convert", f"random {count:,}: {name}", None, "images/s", note=f"skipped: {child.describe_failure()}; reference only")
    seconds = child.last_json()["seconds"]
    return make_row(
        "convert", f"random {count:,}: {name}", count / seconds, "images/s", baseline=take_rate,
        note=f"one run, {seconds:.2f} s in-process, peak RSS {_mb(child.max_rss_bytes):,.0f} MB; baseline = ImageStore.take; reference only",
    )


def bench_random_access(inputs: NpzInputs, sizes: Sizes, out: Path, single_shard_mbs: float) -> list[Row]:
    from schemas.image_store import validate_image_store

    out.mkdir(parents=True, exist_ok=True)
    store = out / "two-shards.zarr"
    _log("random access: converting two stored shards into one store …")
    conversion = convert_cli(["npz", str(inputs.stored_a), str(inputs.stored_b)], store)
    total = 2 * inputs.num_images
    count = min(sizes.random_reads, total)
    indices = np.random.default_rng(SEED + 2).choice(total, count, replace=False)  # unsorted, as a loader asks
    image_store = validate_image_store(str(store))
    take_times, taken = _timed_repeats(READ_REPEATS, lambda: image_store.take(indices))
    _log("random access: the old way (np.load every shard) …")
    old_times, old = _timed_repeats(1, lambda: old_way_take([inputs.stored_a, inputs.stored_b], inputs.num_images, indices))
    same = bool(np.array_equal(taken, old))
    take_rate, old_rate = count / float(np.median(take_times)), count / old_times[0]
    rows = [
        make_row(
            "convert", f"2 stored shards ({total:,} img) → one store", _mb(total * IMAGE_BYTES) / conversion.wall_s, "MB/s",
            baseline=single_shard_mbs,
            note=f"{conversion.time_words()}; peak RSS {_mb(conversion.max_rss_bytes):,.0f} MB; baseline = one stored shard, warm",
        ),
        make_row(
            "convert", f"random {count:,} of {total:,}: ImageStore.take", take_rate, "images/s", baseline=old_rate,
            goal="≥ 10× old and ≥ 5,000 img/s", met=same and take_rate >= 5000 and take_rate >= 10 * old_rate,
            note=f"{_spread_words(take_times)}; page cache warm; baseline = old way{'' if same else '; DIFFERENT PIXELS from the old way'}",
        ),
        make_row(
            "convert", f"random {count:,}: old way, np.load + fancy index", old_rate, "images/s",
            note=f"one run, {old_times[0]:.1f} s to load {2 * _mb(inputs.pixel_bytes):,.0f} MB for {_mb(count * IMAGE_BYTES):.0f} MB wanted",
        ),
    ]
    indices_file = out / "indices.npy"
    np.save(indices_file, indices)
    for method in ("chunk", "oindex"):
        _log(f"random access: zarr-python reference ({method}, ≤ {ZARR_REFERENCE_TIMEOUT_S:.0f} s) …")
        rows.append(zarr_reference_row(method, store, indices_file, count, take_rate))
    shutil.rmtree(store, ignore_errors=True)
    return rows


# ================================================================ prefix read of a shuffled store


def prefix_matches_source(image_store: Any, prefix: np.ndarray, inputs: NpzInputs) -> bool:
    """Check the prefix rows whose source rows were kept at generation time (global_index = source row)."""
    source_rows = image_store.coordinate("global_index")[: prefix.shape[0]]
    position_in_checks = np.searchsorted(inputs.check_indices, source_rows)
    position_in_checks = np.minimum(position_in_checks, inputs.check_indices.size - 1)
    hit = inputs.check_indices[position_in_checks] == source_rows
    return bool(hit.any()) and bool(np.array_equal(prefix[hit], inputs.check_rows_a[position_in_checks[hit]]))


def xarray_prefix_seconds(store: Path, count: int) -> list[float]:
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated-metadata notices are not what is measured
        dataset = xr.open_zarr(str(store))
        times, _ = _timed_repeats(READ_REPEATS, lambda: dataset.image[:count].values)
    return times


def bench_prefix_read(inputs: NpzInputs, sizes: Sizes, out: Path, unshuffled_mbs: float) -> list[Row]:
    from schemas.image_store import validate_image_store

    out.mkdir(parents=True, exist_ok=True)
    store = out / "shuffled.zarr"
    _log("prefix read: converting the stored shard with --shuffle-seed 0 …")
    conversion = convert_cli(["npz", str(inputs.stored_a), "--shuffle-seed", "0"], store)
    count = min(sizes.prefix_reads, inputs.num_images)
    image_store = validate_image_store(str(store))
    read_times, prefix = _timed_repeats(READ_REPEATS, lambda: image_store.read(0, count))
    correct = prefix_matches_source(image_store, prefix, inputs)
    xr_times = xarray_prefix_seconds(store, count)
    rate, xr_rate = count / float(np.median(read_times)), count / float(np.median(xr_times))
    rows = [
        make_row(
            "convert", "npz stored shard → store, --shuffle-seed 0", _mb(inputs.pixel_bytes) / conversion.wall_s, "MB/s",
            baseline=unshuffled_mbs,
            note=f"{conversion.time_words()}; peak RSS {_mb(conversion.max_rss_bytes):,.0f} MB; baseline = unshuffled, warm",
        ),
        make_row(
            "convert", f"prefix {count:,} of shuffled store: ImageStore.read", rate, "images/s", baseline=xr_rate,
            goal="≥ 50,000 img/s", met=correct and rate >= 50_000,
            note=f"{_spread_words(read_times)}; baseline = xarray{'' if correct else '; WRONG PIXELS'}",
        ),
        make_row(
            "convert", f"prefix {count:,}: xr.open_zarr(store).image[:{count}].values", xr_rate, "images/s",
            note=f"{_spread_words(xr_times)}; reference only",
        ),
    ]
    shutil.rmtree(store, ignore_errors=True)
    return rows


# ================================================================ JPEG


@dataclass(frozen=True)
class LoopRun:
    wall_s: float
    decode_s: float
    resize_s: float
    write_s: float
    total_s: float  # the loop's own timer, from listing the files to the written array
    others_cores: float


def jpeg_loop(tree: Path, output: Path) -> LoopRun:
    child, result = _run_json_child("jpeg-loop", tree, output)
    return LoopRun(child.wall_s, result["decode_s"], result["resize_s"], result["write_s"], result["total_s"], child.others_cores)


def same_images(store: Path, loop_array: Path) -> bool:
    import zarr

    from schemas.image_store import validate_image_store

    expected = zarr.open_array(str(loop_array), mode="r")[:]
    return bool(np.array_equal(validate_image_store(str(store)).read(0, expected.shape[0]), expected))


# Threads are the shipped default (Pillow releases the GIL while decoding and resizing); processes on request.
JPEG_VARIANTS: dict[str, tuple[list[str], dict[str, str] | None]] = {
    "--workers 1": (["--workers", "1"], None),
    "--workers 2": (["--workers", "2"], None),
    "--workers 2 --processes": (["--workers", "2", "--processes"], None),
}


def measure_jpeg(tree: JpegTree, sizes: Sizes, out: Path) -> tuple[list[LoopRun], dict[str, list[Conversion]], bool]:
    """Rounds of (plain loop, every converter variant), interleaved so background load hits all alike."""
    out.mkdir(parents=True, exist_ok=True)
    loops: list[LoopRun] = []
    runs: dict[str, list[Conversion]] = {name: [] for name in JPEG_VARIANTS}
    correct = True
    for repeat in range(sizes.jpeg_repeats):
        _log(f"jpeg: round {repeat + 1}/{sizes.jpeg_repeats} (plain loop, then the converter variants) …")
        loops.append(jpeg_loop(tree.root, out / "loop.zarr"))
        for name, (args, env) in JPEG_VARIANTS.items():
            store = out / "converted.zarr"
            runs[name].append(convert_cli(["jpeg", str(tree.root), *args], store, env=env))
            correct = correct and same_images(store, out / "loop.zarr")
            shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(out / "loop.zarr", ignore_errors=True)
    return loops, runs, correct


def jpeg_rows(tree: JpegTree, loops: list[LoopRun], runs: dict[str, list[Conversion]], correct: bool) -> list[Row]:
    n = tree.num_files
    loop = min(loops, key=lambda r: r.wall_s)
    loop_rate = n / loop.wall_s
    rows = [
        make_row(
            "jpeg", f"plain loop, 1 process ({n:,} JPEGs)", loop_rate, "images/s",
            note=(
                f"fastest of {len(loops)}: wall {loop.wall_s:.2f} s (all: {', '.join(f'{r.wall_s:.2f}' for r in loops)}); own timer "
                f"{loop.total_s:.2f} s; {_noise_words(loop.others_cores)}; files ~{tree.mean_width:.0f}×{tree.mean_height:.0f}, "
                f"mean {tree.mean_file_bytes / 1e3:.0f} kB, q{JPEG_QUALITY}"
            ),
        )
    ]
    for name, conversions in runs.items():
        rows.append(jpeg_converter_row(name, conversions, n, loop, correct))
    return rows + loop_breakdown_rows(loop, n)


def jpeg_converter_row(name: str, conversions: list[Conversion], n: int, loop: LoopRun, correct: bool) -> Row:
    best = min(conversions, key=lambda c: c.wall_s)
    rate, loop_rate = n / best.wall_s, n / loop.wall_s
    is_goal_row = name == "--workers 2"
    goal, met = ("≥ 1.8× loop", correct and rate / loop_rate >= 1.8) if is_goal_row else ("", None)
    note = (
        f"fastest of {len(conversions)} (all: {', '.join(f'{c.wall_s:.2f}' for c in conversions)} s): {best.time_words()}; "
        f"CLI's timer {best.inprocess_s:.2f} s = {loop.total_s / best.inprocess_s:.2f}× the loop's own timer; peak RSS "
        f"{_mb(best.max_rss_bytes):,.0f} MB largest process, {_mb(best.tree_peak_rss_bytes):,.0f} MB all processes"
        f"{'' if correct else '; PIXELS DIFFER from the plain loop'}"
    )
    return make_row("jpeg", f"python -m converter jpeg {name}", rate, "images/s", baseline=loop_rate, goal=goal, met=met, note=note)


def loop_breakdown_rows(loop: LoopRun, n: int) -> list[Row]:
    """Where the plain loop's wall time goes, per image."""
    other = loop.wall_s - loop.decode_s - loop.resize_s - loop.write_s
    parts = [
        ('decode (Image.open(…).convert("RGB"))', loop.decode_s),
        (f"resize ({JPEG_RECIPE})", loop.resize_s),
        ("zarr write (one call)", loop.write_s),
        ("interpreter start, imports, listing, stacking", other),
    ]
    return [
        make_row("jpeg", f"plain loop time: {name}", 1e3 * seconds / n, "ms/img", note=f"{seconds / loop.wall_s:.0%} of the loop's wall time ({seconds:.2f} s)")
        for name, seconds in parts
    ]


def bench_jpeg(sizes: Sizes, out: Path) -> list[Row]:
    tree = prepare_jpeg_tree(out / "inputs", sizes)
    loops, runs, correct = measure_jpeg(tree, sizes, out / "runs")
    return jpeg_rows(tree, loops, runs, correct)


# ================================================================ entry point


def _guarded(group: str, name: str, fn: Callable[[], Any], fallback: Any = None) -> tuple[list[Row], Any]:
    """Run one section; on failure, an error row (the other sections' rows are kept) and `fallback`."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        return [error_row(group, name, exc)], fallback


def run(workdir: Path, quick: bool = False) -> list[Row]:
    global _quiet
    _quiet = QuietGate()
    sizes = QUICK if quick else FULL
    started = time.perf_counter()
    inputs = prepare_npz_inputs(workdir / "npz-inputs", sizes)
    rows, stored = _guarded("convert", "npz stored throughput", lambda: bench_shard_throughput("stored", inputs, workdir / "throughput"))
    stored_mbs = _mb(inputs.pixel_bytes) / stored.warm.wall_s if stored else float("nan")
    sections: list[tuple[str, str, Callable[[], list[Row]]]] = [
        ("convert", "npz deflated throughput", lambda: bench_shard_throughput("deflated", inputs, workdir / "throughput")[0]),
        ("convert", "random access", lambda: bench_random_access(inputs, sizes, workdir / "random", stored_mbs)),
        ("convert", "prefix read", lambda: bench_prefix_read(inputs, sizes, workdir / "prefix", stored_mbs)),
        ("jpeg", "jpeg conversion", lambda: bench_jpeg(sizes, workdir / "jpeg")),
    ]
    for group, name, section in sections:
        section_rows, _ = _guarded(group, name, lambda: (section(), None))
        rows += section_rows
    _log(f"done in {time.perf_counter() - started:.0f} s")
    return rows + [quiet_wait_row()]


def quiet_wait_row() -> Row:
    return make_row(
        "convert", "waiting for other users' jobs before timed runs", _quiet.waited_s, "s",
        note=f"each timed run starts once others use < {_quiet.threshold_cores} cores (≤ {_quiet.per_call_s:.0f} s per run, "
        f"≤ {_quiet.budget_s:.0f} s in all); the notes say how busy the others were during each run",
    )


def _child_main(argv: list[str]) -> int:
    mode, *args = argv
    print(json.dumps(CHILD_MODES[mode](*args)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

"""Reference statistics and compare at the scale papers use: 1,281,167 × 2048 float16 features (ImageNet's train
split at pool3; `quick`: 100,000 × 256) against 50,000 generated (`quick`: 10,000).

Rows:
- `layer_statistics` (mu, sigma of the whole layer, as `imzarr stats` writes them) in a child process: wall time
  and peak RSS, against numpy's `np.cov(x, rowvar=False, dtype=float32)` over the same features held in memory as
  float32, timed in another child of the same run. np.cov copies its input, so the whole matrix needs twice its
  10.5 GB as float32, more than this 23 GB machine can spare beside other jobs: the baseline times np.cov on the
  first BASELINE_ROWS rows (loaded before timing) and scales by N / BASELINE_ROWS (its work, a copy, a centring and
  one syrk, is linear in the rows). Goals: peak RSS < 2 GB, time ≤ 1.5× the baseline.
- `compare_stores` of the 1.28 M store against the 50,000 one with the default metrics (FD and KID over all
  samples, PRDC on the 10,000-per-side subset, per-class FD/KID/PRDC over all samples): wall and peak RSS.
  Goals: < 15 min, < 2 GB.

The big stores are built once in a cache folder (IMZARR_BENCH_CACHE, default data/bench-cache) and reused by later
runs (a marker file records the recipe); every feature is its class's mean plus noise, so per-class metrics have
structure. The machine is shared: each row notes how many cores others used meanwhile.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from schemas.classes import NUM_CLASSES
from tests.benchmarks.run import DEFAULT_WORK_PARENT, QuietGate, Row, make_row, run_child
from tests.support.synthetic import write_activation_store

FULL_N, FULL_DIM, GENERATED_N = 1_281_167, 2048, 50_000
QUICK_N, QUICK_DIM, QUICK_GENERATED_N = 100_000, 256, 10_000
BASELINE_ROWS = 262_144  # np.cov's share: 2 GB as float32, 4 GB with its copy
LAYER = "pool3"
SEED = 20261206
GB = 1e9
RSS_GOAL = 2 * GB
TIME_RATIO_GOAL = 1.5
COMPARE_GOAL_S = 15 * 60
CHILD_TIMEOUT_S = 3600.0

STATS_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from extractor.analysis.reference_statistics import layer_statistics
t1 = time.perf_counter()
s = layer_statistics(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "stats_s": t2 - t1, "count": s.count, "trace": float(np.trace(s.sigma))}))
"""

BASELINE_CHILD = """
import json, sys, time
import numpy as np, zarr
array = zarr.open_group(sys.argv[1], mode="r")[sys.argv[2]]
rows = min(int(sys.argv[3]), array.shape[0])
x = np.empty((rows, array.shape[1]), dtype=np.float32)
for a in range(0, rows, 65536):
    x[a : a + 65536] = array[a : min(rows, a + 65536)]
t0 = time.perf_counter()
c = np.cov(x, rowvar=False, dtype=np.float32)
t1 = time.perf_counter()
print(json.dumps({"rows": rows, "cov_s": t1 - t0, "trace": float(np.trace(c))}))
"""

COMPARE_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from extractor.analysis.compare import compare_stores
t1 = time.perf_counter()
ds = compare_stores(sys.argv[1], sys.argv[2], sys.argv[3], output=sys.argv[4], scratch_dir=sys.argv[5], log=sys.stderr)
t2 = time.perf_counter()
keys = ("fd", "kid", "kid_std", "precision", "recall", "density", "coverage", "prdc_subset_real", "prdc_subset_fake")
print(json.dumps({"import_s": t1 - t0, "compare_s": t2 - t1, "classes": int(ds.sizes["label"]), **{k: ds.attrs[k] for k in keys}}))
"""


def cache_dir() -> Path:
    folder = Path(os.environ.get("IMZARR_BENCH_CACHE", str(DEFAULT_WORK_PARENT.parent / "bench-cache"))) / "reference_stats"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def make_store(folder: Path, name: str, n: int, dim: int, kind: int) -> str:
    """A pooled float16 store of n samples (labels uniform over the classes), reused while its recipe matches."""
    url, marker = str(folder / f"{name}-{n}x{dim}.zarr"), folder / f"{name}-{n}x{dim}.json"
    recipe = {"n": n, "dim": dim, "seed": SEED, "kind": kind, "recipe": 1}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return url
    rng = np.random.default_rng(SEED)
    class_means = rng.normal(0.0, 1.0, (NUM_CLASSES, dim)).astype(np.float32) + 0.5
    labels = np.random.default_rng([SEED, kind]).integers(0, NUM_CLASSES, n)
    spread = 0.7 if kind == 0 else 0.8

    def block(a: int, b: int) -> np.ndarray:
        noise = np.random.default_rng([SEED, kind, a]).standard_normal((b - a, dim), dtype=np.float32)
        noise *= spread
        noise += class_means[labels[a:b]]
        return noise

    marker.unlink(missing_ok=True)
    write_activation_store(url, labels, block, (dim,), layer=LAYER, shard=8192)
    marker.write_text(json.dumps(recipe))
    return url


def run(workdir: Path, quick: bool = False) -> list[Row]:
    n, dim, n_gen = (QUICK_N, QUICK_DIM, QUICK_GENERATED_N) if quick else (FULL_N, FULL_DIM, GENERATED_N)
    folder = cache_dir()
    real = make_store(folder, "real", n, dim, 0)
    generated = make_store(folder, "generated", n_gen, dim, 1)
    label = f"{n:,}×{dim} f16"
    gate = QuietGate()
    rows: list[Row] = []

    load = gate.wait()
    stats = run_child([sys.executable, "-c", STATS_CHILD, real, LAYER], timeout_s=CHILD_TIMEOUT_S)
    load_base = gate.wait()
    base = run_child([sys.executable, "-c", BASELINE_CHILD, real, LAYER, str(BASELINE_ROWS)], timeout_s=CHILD_TIMEOUT_S)
    if not (stats.ok and base.ok):
        failed = stats if not stats.ok else base
        return [make_row("stats", f"layer_statistics {label}", None, "s", met=False, note=f"FAILED: {failed.describe_failure()}")]
    got, ref = stats.last_json(), base.last_json()
    baseline_s = ref["cov_s"] * n / ref["rows"]
    ratio = got["stats_s"] / baseline_s
    rows.append(
        make_row(
            "stats",
            f"layer_statistics {label} (mu, sigma; child process)",
            got["stats_s"],
            "s",
            baseline=baseline_s,
            goal=f"≤ {TIME_RATIO_GOAL}× np.cov in memory",
            met=ratio <= TIME_RATIO_GOAL,
            note=(
                f"baseline: np.cov(float32) over {ref['rows']:,} rows held in memory took {ref['cov_s']:.1f} s, scaled by "
                f"{n / ref['rows']:.2f} (the whole matrix with np.cov's copy needs {2 * n * dim * 4 / GB:.0f} GB); imports "
                f"{got['import_s']:.1f} s not counted; others used {stats.others_cores:.1f} / {base.others_cores:.1f} cores "
                f"(ours / baseline; {load:.1f} / {load_base:.1f} at start) of {os.cpu_count()}; CPU {stats.cpu_s:.0f} s"
            ),
        )
    )
    rows.append(
        make_row(
            "stats",
            f"layer_statistics {label} peak RSS",
            stats.max_rss_bytes / 1e6,
            "MB",
            goal="< 2 GB",
            met=stats.max_rss_bytes < RSS_GOAL,
            note=f"the features are {n * dim * 2 / GB:.1f} GB stored (float16), {n * dim * 4 / GB:.1f} GB as float32; np.cov's child peaked at {base.max_rss_bytes / GB:.1f} GB for {ref['rows']:,} rows",
        )
    )

    load = gate.wait()
    report = str(workdir / "compare-report.zarr")
    child = run_child([sys.executable, "-c", COMPARE_CHILD, real, generated, LAYER, report, str(workdir)], timeout_s=CHILD_TIMEOUT_S)
    name = f"compare_stores {label} vs {n_gen:,}, {NUM_CLASSES} classes, fd+kid+prdc, per class"
    if not child.ok:
        return rows + [make_row("compare-scale", name, None, "s", met=False, note=f"FAILED: {child.describe_failure()}")]
    r = child.last_json()
    rows.append(
        make_row(
            "compare-scale",
            f"{name} (wall)",
            child.wall_s,
            "s",
            goal="< 15 min",
            met=child.wall_s < COMPARE_GOAL_S,
            note=(
                f"comparison {r['compare_s']:.0f} s; PRDC on {r['prdc_subset_real']:,}×{r['prdc_subset_fake']:,}; CPU {child.cpu_s:.0f} s; "
                f"others used {child.others_cores:.1f} of {os.cpu_count()} cores ({load:.1f} at start); FD {r['fd']:.2f}, KID {r['kid']:.4f} ± {r['kid_std']:.4f}, "
                f"precision {r['precision']:.3f}, recall {r['recall']:.3f}, density {r['density']:.3f}, coverage {r['coverage']:.3f}"
            ),
        )
    )
    rows.append(
        make_row(
            "compare-scale",
            f"{name} peak RSS",
            child.max_rss_bytes / 1e6,
            "MB",
            goal="< 2 GB",
            met=child.max_rss_bytes < RSS_GOAL,
            note=f"scratch: float32 spills of both sets ({(n + n_gen) * dim * 4 / GB:.1f} GB on disk)",
        )
    )
    return rows

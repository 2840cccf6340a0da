"""Feature networks on CPU (CUDA too when present): FID Inception-v3 `pool3` and DINOv2 ViT-S/14 `cls`, batch 64.

For each: the bare forward of the preset on a uint8 batch (its own resize and normalisation included), then
`extract` of the same layer over an image store, whose rate is compared with the forward's. Goal: extraction
≥ 0.85× the forward alone (reading, the storage cast, checks and writing hidden behind the network).
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
import torch

from extractor.api import extract
from extractor.models import cached_model, capture_layers
from extractor.models.registry import ModelSpec
from tests.benchmarks.run import make_row

GROUP = "feature models"
BATCH = 64
STORE_IMAGES = 512
MODELS = (("fid-inception", "pool3"), ("dinov2-vits14", "cls"))


def _forward_rate(preset: str, layer: str, device: str, iters: int) -> float:
    loaded = cached_model(ModelSpec(preset=preset), device)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (BATCH, 3, 64, 64), dtype=np.uint8)).float().to(device)
    with torch.inference_mode():
        capture_layers(loaded.module, x, None, None, [layer], "none")  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            capture_layers(loaded.module, x, None, None, [layer], "none")
        if device == "cuda":
            torch.cuda.synchronize()
    return BATCH * iters / (time.perf_counter() - start)


def _image_store(workdir: pathlib.Path) -> str:
    from converter.api import convert_npz
    from converter.sample import write_sample_shards

    store = workdir / "images.zarr"
    if not (store / "zarr.json").exists():
        write_sample_shards(str(workdir / "sample"), STORE_IMAGES, 1, 10)
        convert_npz(workdir / "sample" / "train", str(store))
    return str(store)


def run(workdir: pathlib.Path, quick: bool = False) -> list[dict]:
    store = _image_store(workdir)
    threads = torch.get_num_threads()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        where = f"CUDA {torch.cuda.get_device_name()}" if device == "cuda" else f"CPU, {threads} threads"
        for preset, layer in MODELS:
            forward = _forward_rate(preset, layer, device, iters=1 if quick else 3)
            out = workdir / f"{preset}-{device}.zarr"
            start = time.perf_counter()
            done = extract(store, str(out), layers=[layer], preset=preset, device=device, batch_size=BATCH, overwrite=True)
            rate = done.num_samples / (time.perf_counter() - start)
            rows.append(make_row(GROUP, f"forward only, {preset} → {layer}, batch {BATCH}", forward, "img/s", note=f"{where}; includes its resize"))
            rows.append(make_row(GROUP, f"extract {STORE_IMAGES} images, {preset} → {layer}, batch {BATCH}", rate, "img/s",
                                 baseline=forward, goal="≥ 0.85× forward", met=rate >= 0.85 * forward,
                                 note=f"{where}; whole command in-process: model load, store, writes"))
            out_path = pathlib.Path(out)
            if out_path.exists():
                import shutil

                shutil.rmtree(out_path)
    return rows

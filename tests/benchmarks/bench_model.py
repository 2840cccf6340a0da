"""Forward throughput of the EDM/DMD2 network on CPU (the CUDA rows, forward and whole extraction, are bench_cuda's)."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import torch

from extractor.models import EDMPrecond, autocast_context, build_preset, capture_layers

GFLOP_PER_IMAGE_FULL = 219.3  # dmd2-imagenet64 forward, one 64x64 image


def _seconds_per_call(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def _inputs(batch: int, res: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, 3, res, res, generator=gen) * 80).to(device)
    sigma = torch.full((batch,), 80.0, device=device)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    return x, sigma, labels


def _row(name: str, value: float, note: str, goal: str = "") -> dict:
    return dict(group="model", name=name, value=float(value), unit="img/s", baseline=None, ratio=None, goal=goal,
                met=None, note=note)  # fmt: skip


def _forward_rate(
    model: EDMPrecond, batch: int, device: torch.device, dtype: str, iters: int, encoder_only: bool = False
) -> float:
    x, sigma, labels = _inputs(batch, model.img_resolution, device)

    def step() -> None:
        with torch.inference_mode(), autocast_context(device, dtype):
            if encoder_only:
                capture_layers(model, x, sigma, labels, ["encoder_bottleneck"])
            else:
                model(x, sigma, labels)

    return batch / _seconds_per_call(step, device, iters)


def run(workdir: pathlib.Path) -> list[dict]:
    """Benchmark rows (workdir is unused: nothing is written)."""
    del workdir
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    rows = []

    tiny = build_preset("tiny-random").eval()
    rate = _forward_rate(tiny, 64, cpu, "fp32", iters=3)
    rows.append(_row("forward, tiny-random, batch 64, CPU fp32", rate, f"full D(x); {threads} CPU threads"))
    rate = _forward_rate(tiny, 64, cpu, "fp32", iters=3, encoder_only=True)
    rows.append(_row("encoder to bottleneck, tiny-random, batch 64, CPU fp32", rate,
                     f"capture_layers(['encoder_bottleneck']) with early stop; {threads} CPU threads",
                     goal=">= 100 img/s on 2 CPU cores"))  # fmt: skip
    tiny_cl = tiny.to(memory_format=torch.channels_last)
    rate = _forward_rate(tiny_cl, 64, cpu, "fp32", iters=3, encoder_only=True)
    rows.append(_row("encoder to bottleneck, tiny-random, batch 64, CPU fp32 channels_last", rate,
                     f"same, weights in channels_last memory format; {threads} CPU threads",
                     goal=">= 100 img/s on 2 CPU cores"))  # fmt: skip

    full = build_preset("dmd2-imagenet64").eval()
    rate = _forward_rate(full, 2, cpu, "fp32", iters=2)
    rows.append(_row("forward, dmd2-imagenet64 (random init), batch 2, CPU fp32", rate,
                     f"{rate * GFLOP_PER_IMAGE_FULL:.0f} GFLOP/s; {threads} CPU threads"))  # fmt: skip

    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for result in run(pathlib.Path(tmp)):
            print(result)

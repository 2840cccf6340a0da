"""Image store → network → labeled activation store. From Python: `extract` (to a store), `generate` (samples to
an image store) and `features` (an in-memory batch to an xr.Dataset); `extractor.image_dataset.ImageStoreDataset`
for PyTorch."""

from __future__ import annotations

from typing import Any

__all__ = ["extract", "features", "generate"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import extractor` (and every `imzarr` command) stays free of torch.
    if name in __all__:
        from extractor import api

        return getattr(api, name)
    raise AttributeError(f"module 'extractor' has no attribute {name!r}")

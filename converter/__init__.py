"""NPZ shards or JPEG trees → one Zarr v3 image store. From Python: `convert_npz`, `convert_jpeg`."""

from __future__ import annotations

from typing import Any

__all__ = ["convert_jpeg", "convert_npz"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import converter` (and every `imzarr` command) stays light.
    if name in __all__:
        from converter import api

        return getattr(api, name)
    raise AttributeError(f"module 'converter' has no attribute {name!r}")

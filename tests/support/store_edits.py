"""Edits that tests make to a finished store's group attributes (an older store's, a moved one's), re-consolidated
so that readers see them as they see any finished store's."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import zarr


def update_group_attrs(url: str, changes: dict[str, Any]) -> str:
    """Set `changes` in the store's root group attributes and re-consolidate its metadata; returns `url`."""
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    group.attrs.update(changes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(url)
    return url


def copy_with_group_attrs(source: str, copy: str | Path, changes: dict[str, Any]) -> str:
    """A copy of the store at `source` with `changes` in its root group attributes."""
    return update_group_attrs(str(shutil.copytree(source, copy)), changes)

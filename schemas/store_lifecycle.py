"""Crash-safety contract shared by every imzarr store writer.

A store is created with its settings and a fingerprint of them, `complete: false`, and a per-unit done record
(`_progress/done`, one chunk per unit of work, so concurrent tasks never share a chunk). Tasks mark their unit
after their data is written; the writer sets `complete: true` last, after removing the record and consolidating
metadata. Zarr skips all-zero chunks by default, so which chunks exist never tells what work is finished: only
the done record does.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import fsspec
import numpy as np
import zarr

from schemas.errors import ImzarrError

PROGRESS_GROUP = "_progress"
DONE_ARRAY = f"{PROGRESS_GROUP}/done"


class StoreExistsError(ImzarrError):
    """The output path holds a store made with other settings, or something that is not an imzarr store."""


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """A stable sha256 of JSON-able settings (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class StoreState:
    """What `prepare_store` found or made: the group, and which units are already done."""

    url: str
    done: np.ndarray  # bool [num_units]
    already_complete: bool

    @property
    def pending(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done)]


def path_state(url: str) -> str:
    """'missing' (nothing, or an empty folder), 'store' (a Zarr group) or 'foreign' (anything else)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return "missing"
    if fs.isfile(path):
        return "foreign"
    if not fs.ls(path, detail=False):
        return "missing"
    try:
        zarr.open_group(url, mode="r", use_consolidated=False)
    except Exception:
        return "foreign"
    return "store"


def inspect_existing(url: str, schema: str, settings: dict[str, Any], overwrite: bool) -> str:
    """'new' (nothing there, or replace it), 'resume' (same settings, unfinished) or 'complete'; refuse the rest."""
    state = path_state(url)
    if state == "missing":
        return "new"
    if state == "foreign":
        raise StoreExistsError(f"{url}: exists and is not an imzarr store; choose another output path")
    attrs = dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs)
    if "schema" not in attrs:
        raise StoreExistsError(f"{url}: holds a Zarr group that is not an imzarr store; choose another output path")
    if attrs["schema"] == schema and attrs.get("settings_fingerprint") == settings_fingerprint(settings):
        return "complete" if attrs.get("complete") is True else "resume"
    if overwrite:
        return "new"
    if attrs["schema"] != schema:
        raise StoreExistsError(f"{url}: holds a {attrs['schema']} store, not {schema}; pass --overwrite to replace it")
    raise StoreExistsError(
        f"{url}: was made with other inputs or options ({_settings_diff(attrs.get('settings'), settings)}); "
        "re-run with the original ones to resume, or pass --overwrite to replace it"
    )


def prepare_store(
    url: str,
    schema: str,
    settings: dict[str, Any],
    num_units: int,
    create_arrays: Callable[[zarr.Group], None],
    overwrite: bool,
    initial_attrs: dict[str, Any] | None = None,
) -> StoreState:
    """Create the store, or reopen one made with the same settings to resume; refuse anything else."""
    status = inspect_existing(url, schema, settings, overwrite)
    if status == "complete":
        return StoreState(url, np.ones(num_units, dtype=bool), already_complete=True)
    if status == "resume":
        return StoreState(url, read_done(url, num_units), already_complete=False)
    group = zarr.open_group(url, mode="w", zarr_format=3)
    # One metadata write: `group.attrs.update` would rewrite zarr.json once per key.
    group.update_attributes(
        {
            "schema": schema,
            "complete": False,
            "settings_fingerprint": settings_fingerprint(settings),
            "settings": settings,
            **(initial_attrs or {}),
        }
    )
    create_arrays(group)
    group.create_array(
        DONE_ARRAY, shape=(max(num_units, 1),), chunks=(1,), dtype="int8", fill_value=0, compressors=None
    )
    return StoreState(url, np.zeros(num_units, dtype=bool), already_complete=False)


def _settings_diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "settings unknown"
    changed = sorted(k for k in set(old) | set(new) if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str))
    return "changed: " + ", ".join(changed[:6]) if changed else "same settings, different fingerprint"


def read_done(url: str, num_units: int) -> np.ndarray:
    arr = zarr.open_array(url, path=DONE_ARRAY, mode="r")
    return np.asarray(arr[:num_units]) == 1


def mark_done(url: str, unit: int) -> None:
    """Record one finished unit; call only after its data is fully written."""
    zarr.open_array(url, path=DONE_ARRAY, mode="r+")[unit] = 1


def finalize_store(url: str, final_attrs: dict[str, Any]) -> None:
    """Set the final attributes, drop the progress record, consolidate, then mark complete."""
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    if final_attrs:
        group.update_attributes(final_attrs)
    if PROGRESS_GROUP in group:
        del group[PROGRESS_GROUP]
    group.attrs["complete"] = True  # a write of its own, after everything else: a crash before it leaves "incomplete"
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet; xarray opens v3 stores without warnings only with it.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(url)

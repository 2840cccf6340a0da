"""The activation-store contract (`imzarr.activations/1`) and its validator.

A Zarr v3 group with one variable per requested layer, named as requested (`encoder_bottleneck`,
`model.dec.8x8_in1`), dims (sample, <var>_channel, <var>_y, <var>_x), or (sample, <var>_channel) when pooled;
optionally `reconstruction` uint8 (sample, channel, y, x); coordinates copied from the image store for the
selected samples; attributes that say exactly how the values were made (REQUIRED_ATTRS).
"""

from __future__ import annotations

import json

import numpy as np
import zarr

from schemas.errors import StoreValidationError
from schemas.image_store import COORDINATES as IMAGE_COORDINATES

ACTIVATION_SCHEMA = "imzarr.activations/1"
SAMPLE_DIM = "sample"
RECONSTRUCTION_VAR = "reconstruction"
RECONSTRUCTION_DIMS = (SAMPLE_DIM, "channel", "y", "x")
# The image store's sample coordinates, except source_row; source_sample = position in the source image store.
COORDINATES: dict[str, str] = {k: v for k, v in IMAGE_COORDINATES.items() if k != "source_row"} | {"source_sample": "int64"}
REQUIRED_ATTRS = (
    "schema", "complete", "model", "layers", "sigma", "noise", "pooling", "dtypes", "selection", "source", "versions", "device",
)
STORAGE_DTYPES = ("float16", "float32")


def layer_dims(var: str, pooled: bool) -> tuple[str, ...]:
    """Dimension names of one layer's variable."""
    return (SAMPLE_DIM, f"{var}_channel") if pooled else (SAMPLE_DIM, f"{var}_channel", f"{var}_y", f"{var}_x")


def validate_activation_store(url: str, require_complete: bool = True) -> zarr.Group:
    """Open an activation store and check it against the contract; StoreValidationError says what is wrong."""
    try:
        group = zarr.open_group(url, mode="r")
    except Exception as exc:
        raise StoreValidationError(f"{url}: not a Zarr group ({type(exc).__name__}: {exc})") from None
    attrs = dict(group.attrs)
    if attrs.get("schema") != ACTIVATION_SCHEMA:
        raise StoreValidationError(f"{url}: schema is {attrs.get('schema')!r}, expected {ACTIVATION_SCHEMA!r}")
    if require_complete and attrs.get("complete") is not True:
        raise StoreValidationError(f"{url}: store is not complete; re-run the same extract command to finish it")
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise StoreValidationError(f"{url}: missing group attributes {missing}")
    layers = attrs["layers"]
    if not layers:
        raise StoreValidationError(f"{url}: no layers recorded")
    pooled = attrs["pooling"] != "none"
    n = None
    for var in layers:
        if var not in group:
            raise StoreValidationError(f"{url}: layer variable {var!r} is missing")
        arr = group[var]
        dims = tuple(arr.metadata.dimension_names or ())
        if dims != layer_dims(var, pooled):
            raise StoreValidationError(f"{url}: {var} has dims {dims}, expected {layer_dims(var, pooled)}")
        if str(arr.dtype) != attrs["dtypes"]["storage"]:
            raise StoreValidationError(f"{url}: {var} is {arr.dtype}, attrs say {attrs['dtypes']['storage']}")
        n = arr.shape[0] if n is None else n
        if arr.shape[0] != n:
            raise StoreValidationError(f"{url}: {var} has {arr.shape[0]} samples, other layers {n}")
    if RECONSTRUCTION_VAR in group:
        rec = group[RECONSTRUCTION_VAR]
        if rec.dtype != np.uint8 or tuple(rec.metadata.dimension_names or ()) != RECONSTRUCTION_DIMS or rec.shape[0] != n:
            raise StoreValidationError(f"{url}: {RECONSTRUCTION_VAR} must be uint8 {RECONSTRUCTION_DIMS} with {n} samples")
    for name, kind in COORDINATES.items():
        if name not in group:
            raise StoreValidationError(f"{url}: missing coordinate array {name!r}")
        arr = group[name]
        if tuple(arr.metadata.dimension_names or ()) != (SAMPLE_DIM,) or arr.shape[0] != n:
            raise StoreValidationError(f"{url}: coordinate {name} must be ({SAMPLE_DIM},) with {n} entries")
        if kind == "U" and "VariableLengthUTF8" not in type(arr.metadata.data_type).__name__:
            raise StoreValidationError(f"{url}: {name} must be variable-length UTF-8")
        if kind != "U" and arr.dtype != np.dtype(kind):
            raise StoreValidationError(f"{url}: {name} has dtype {arr.dtype}, expected {kind}")
    if attrs["selection"].get("count") != n:
        raise StoreValidationError(f"{url}: selection count {attrs['selection'].get('count')} ≠ {n} samples stored")
    return group


def describe_activation_store(url: str) -> str:
    """A human summary of a validated activation store."""
    attrs = dict(zarr.open_group(url, mode="r").attrs)
    group = validate_activation_store(url, require_complete=False)
    model = attrs["model"]
    lines = [
        f"store        {url}",
        f"schema       {ACTIVATION_SCHEMA}  complete: {'yes' if attrs.get('complete') is True else 'NO (unfinished: re-run the extract command)'}",
        f"samples      {attrs['selection'].get('count')}  from {attrs['source'].get('url')}",
        f"model        {model.get('name')}  trained: {model.get('trained')}" + ("" if model.get("trained") else "  (UNTRAINED: random weights, for demos and tests)"),
        f"sigma        {attrs['sigma']}  noise {json.dumps(attrs['noise'])}  pooling {attrs['pooling']}  dtypes {json.dumps(attrs['dtypes'])}",
    ]
    for var, path in attrs["layers"].items():
        arr = group[var]
        lines.append(f"layer        {var} ({path}): {arr.shape} {arr.dtype}")
    if RECONSTRUCTION_VAR in group:
        lines.append(f"reconstruct  {group[RECONSTRUCTION_VAR].shape} uint8")
    lines.append(f"selection    {json.dumps(attrs['selection'])}")
    lines.append(f"device       {attrs['device']}")
    return "\n".join(lines)

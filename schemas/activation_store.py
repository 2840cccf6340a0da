"""The activation-store contract (`imzarr.activations/1`) and its validator.

A Zarr v3 group with one variable per requested layer, named as requested (`encoder_bottleneck`,
`model.dec.8x8_in1`, `pool3`), dims (sample, <var>_channel, <var>_y, <var>_x), or (sample, <var>_channel) when
pooled or when the layer is a vector (a feature network's `pool3`, `cls`);
optionally `reconstruction` uint8 (sample, channel, y, x); coordinates copied from the image store for the
selected samples; attributes that say exactly how the values were made (REQUIRED_ATTRS).

The network (group attribute `model`): `name`, `preset` (the preset whose architecture it has, also for
checkpoints; None when none fits), `checkpoint`, `sha256`, `config`, `trained`, and, in stores written since
feature networks exist, `family` (e.g. "edm", "fid-inception", "dinov2"), `kind` (MODEL_KINDS: "diffusion" takes
a noised image in [-1, 1], σ and class labels; "feature" embeds the clean image into a feature space),
`preprocessing` (the exact input protocol, e.g. pytorch-fid's resize to 299², FD_DINOv2's to 224²) and
`resolution` (the image side the network takes: a feature network resizes every input to it). A feature
network's store has `sigma` None and `noise` None: σ and noise belong to diffusion networks.

Layout: every array has one inner chunk size along `sample` (ACTIVATION_INNER_CHUNK_BYTES of the largest
variable, a power of two, capped at the shard) and shards of S samples; the numeric coordinates (`label`,
`global_index`, `source_sample`) are one chunk each, written once when the store is created; the text arrays
(`synset`, `class_name`, `source_file`) have one chunk per shard, written by the shard's task. No two tasks
write one chunk.

Per-array attributes (stores whose group has `Conventions`, see schemas/variable_attrs.py):
- every layer variable: `long_name`, `description`, `module_path` (the module whose output it is), `pooling`
  ("none", "mean", "max" over y and x), `sigma` (noise level σ of the input, in units of the [-1, 1] pixel
  scale; absent for feature networks, which take no σ), and `coordinates` naming its numeric per-sample
  coordinates (`label global_index source_sample`);
- float16 layers also `scale_factor` = 1.0: CF "packing" that leaves every value as stored but makes xarray
  decode the variable lazily to float64 (the type of a JSON number), because Dask sums float16 chunks in
  float16, so `xr.open_zarr(acts).layer.mean()` overflowed to NaN. Readers that ignore CF packing (zarr,
  TensorStore, NumPy) read the float16 values unchanged; float32 layers need no packing. Kept as it is (issue
  26): xarray takes the decoded type from the Python type of `scale_factor`, and a JSON attribute is always a
  float64, so no value of it decodes to float32; readers who want less memory use `ds.imzarr.as_float32()`
  (extractor/accessor.py) and stores keep reading the same;
- `reconstruction`, coordinates and text variables: `long_name` and `description`;
- group attribute `classes`: label → WNID and class name of every label present.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import zarr

from schemas.remote_storage import open_store_group
from schemas.errors import StoreValidationError
from schemas.store_integrity import check_store_files
from schemas.image_store import COORDINATES as IMAGE_COORDINATES
from schemas.image_store import SAMPLE_DIM
from schemas.vocabulary import POOL_MODES, STORAGE_DTYPES
from schemas.variable_attrs import (
    CONVENTIONS,
    REQUIRED_ARRAY_ATTRS,
    class_table_attrs,
    coordinate_attrs,
    coordinates_attribute,
    missing_array_attrs,
    sample_class_attrs,
)
from schemas.zarr_format import inner_chunk_length, is_string_data_type, read_node_metadata

ACTIVATION_SCHEMA = "imzarr.activations/1"
RECONSTRUCTION_VAR = "reconstruction"
RECONSTRUCTION_DIMS = (SAMPLE_DIM, "channel", "y", "x")
# The image store's sample coordinates, except source_row; source_sample = position in the source image store.
COORDINATES: dict[str, str] = {k: v for k, v in IMAGE_COORDINATES.items() if k != "source_row"} | {"source_sample": "int64"}
REQUIRED_ATTRS = (
    "schema", "complete", "model", "layers", "sigma", "noise", "pooling", "dtypes", "selection", "source", "versions", "device",
)
DIFFUSION_KIND, FEATURE_KIND = "diffusion", "feature"
MODEL_KINDS = (DIFFUSION_KIND, FEATURE_KIND)
# What `model` records since feature networks exist (older stores: diffusion networks, without them).
MODEL_DESCRIPTION_ATTRS = ("family", "kind", "preset", "preprocessing", "resolution")
LAYER_ATTRS = (*REQUIRED_ARRAY_ATTRS, "module_path", "pooling", "coordinates")
DIFFUSION_LAYER_ATTRS = (*LAYER_ATTRS, "sigma")
# Bytes of the largest variable per inner chunk: xarray's default dask chunk is the inner chunk (see the image
# store's layout, schemas/image_layout.py, for the measurements behind the size).
ACTIVATION_INNER_CHUNK_BYTES = 8 << 20
# Version of this layout, part of the writers' settings so a store is resumed only by code that writes it the same
# way: 1 = inner chunks of 64 samples, every coordinate one chunk per shard; 2 = the layout described above.
ACTIVATION_LAYOUT_VERSION = 2
# CF packing of float16 layers (see the module docstring): values unchanged, decoded by xarray as float64.
FLOAT16_SCALE_FACTOR = 1.0
NETWORK_INPUTS = {
    "noised": "the image scaled to [-1, 1] plus σ·noise",
    "clean": "the clean image scaled to [-1, 1]",
    "generator": "the generator's own input σ·ε",
    "feature": "the clean image, preprocessed by the feature network as the group's model.preprocessing says",
}
_POOLING_WORDS = {
    "none": "the module's output as it is: the full map (channel, y, x), or the vector (channel) of a layer that is one",
    "mean": "the mean over spatial positions (y, x) of each channel",
    "max": "the maximum over spatial positions (y, x) of each channel",
}


def layer_dims(var: str, pooled: bool) -> tuple[str, ...]:
    """Dimension names of one layer's variable."""
    return (SAMPLE_DIM, f"{var}_channel") if pooled else (SAMPLE_DIM, f"{var}_channel", f"{var}_y", f"{var}_x")


def activation_inner_chunk(bytes_per_sample: int, shard: int) -> int:
    """Samples per inner chunk within ACTIVATION_INNER_CHUNK_BYTES (schemas.zarr_format.inner_chunk_length)."""
    return inner_chunk_length(bytes_per_sample, shard, ACTIVATION_INNER_CHUNK_BYTES)


def activation_variable_attrs(
    layer: str, module_path: str, pool: str, sigma: float | None, storage_dtype: str, network_input: str = "noised"
) -> dict[str, Any]:
    """Attributes of one layer variable: what it is, which module, pooling, σ, its coordinates, and CF packing.

    `network_input` says what the network was fed (NETWORK_INPUTS): "noised" (extract), "clean" (extract
    --no-noise), "generator" (generate's own input σ·ε) or "feature" (a feature network, which takes no σ:
    `sigma` None)."""
    if network_input not in NETWORK_INPUTS:
        raise StoreValidationError(f"layer {layer}: network input {network_input!r} is not one of {sorted(NETWORK_INPUTS)}")
    if pool not in POOL_MODES:
        raise StoreValidationError(f"layer {layer}: pooling {pool!r} is not one of {POOL_MODES}")
    if storage_dtype not in STORAGE_DTYPES:
        raise StoreValidationError(f"layer {layer}: storage dtype {storage_dtype!r} is not one of {STORAGE_DTYPES}")
    if (sigma is None) != (network_input == "feature"):
        raise StoreValidationError(f"layer {layer}: σ {sigma!r} with network input {network_input!r} (σ exactly when the network is a diffusion network)")
    conditioning = "" if sigma is None else f", conditioned on σ = {sigma:g}"
    attrs: dict[str, Any] = {
        "long_name": f"activations of {module_path}",
        "description": (
            f"output of network module {module_path} (layer {layer!r}): {_POOLING_WORDS[pool]}, for "
            f"{NETWORK_INPUTS[network_input]}{conditioning}; stored as {storage_dtype}"
        ),
        "module_path": module_path,
        "pooling": pool,
        "coordinates": coordinates_attribute(list(COORDINATES)),
    }
    if sigma is not None:
        attrs["sigma"] = float(sigma)
    if storage_dtype == "float16":
        attrs["scale_factor"] = FLOAT16_SCALE_FACTOR
    return attrs


def reconstruction_attrs() -> dict[str, Any]:
    """Attributes of the optional `reconstruction` variable."""
    return {
        "long_name": "network output D(x) as an image",
        "description": "the denoised image D(x; σ) the network returns, as uint8 clamp((D + 1) · 127.5), RGB channel-first",
        "coordinates": coordinates_attribute(list(COORDINATES)),
    }


def activation_array_attrs(
    layers: dict[str, str], pool: str | dict[str, str], sigma: float | None, storage_dtype: str, reconstructions: bool, network_input: str = "noised"
) -> dict[str, dict[str, Any]]:
    """{array name: attributes} of every array of an activation store; `layers` maps variable → module path,
    `pool` is one pooling for all, or each variable's."""
    pools = pool if isinstance(pool, dict) else dict.fromkeys(layers, pool)
    arrays = {var: activation_variable_attrs(var, path, pools[var], sigma, storage_dtype, network_input) for var, path in layers.items()}
    if reconstructions:
        arrays[RECONSTRUCTION_VAR] = reconstruction_attrs()
    return arrays | coordinate_attrs(list(COORDINATES))


def activation_group_attrs(labels: np.ndarray, synsets: np.ndarray | None = None, class_names: np.ndarray | None = None) -> dict[str, Any]:
    """Group attributes that go with the per-array ones: `Conventions`, and `classes` for the labels stored, named
    as the per-sample `synsets` and `class_names` name them (an image store's own classes), else as ImageNet-1k."""
    if synsets is None or class_names is None:
        return {"Conventions": CONVENTIONS, **class_table_attrs(labels)}
    return {"Conventions": CONVENTIONS, **sample_class_attrs(labels, synsets, class_names)}


def validate_activation_store(url: str, require_complete: bool = True) -> zarr.Group:
    """Open an activation store and check it against the contract; StoreValidationError says what is wrong."""
    group = open_store_group(url)
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
        dims = _dimension_names(url, var)
        # Pooled layers are vectors; unpooled ones are maps, or vectors where the layer is one (pool3, cls).
        expected = layer_dims(var, pooled or arr.ndim == 2)
        if dims != expected:
            raise StoreValidationError(f"{url}: {var} has dims {dims}, expected {expected}")
        if str(arr.dtype) != attrs["dtypes"]["storage"]:
            raise StoreValidationError(f"{url}: {var} is {arr.dtype}, attrs say {attrs['dtypes']['storage']}")
        n = arr.shape[0] if n is None else n
        if arr.shape[0] != n:
            raise StoreValidationError(f"{url}: {var} has {arr.shape[0]} samples, other layers {n}")
    if RECONSTRUCTION_VAR in group:
        rec = group[RECONSTRUCTION_VAR]
        if rec.dtype != np.uint8 or _dimension_names(url, RECONSTRUCTION_VAR) != RECONSTRUCTION_DIMS or rec.shape[0] != n:
            raise StoreValidationError(f"{url}: {RECONSTRUCTION_VAR} must be uint8 {RECONSTRUCTION_DIMS} with {n} samples")
    for name, kind in COORDINATES.items():
        if name not in group:
            raise StoreValidationError(f"{url}: missing coordinate array {name!r}")
        arr = group[name]
        metadata = read_node_metadata(url, name)
        if tuple(metadata.get("dimension_names") or ()) != (SAMPLE_DIM,) or arr.shape[0] != n:
            raise StoreValidationError(f"{url}: coordinate {name} must be ({SAMPLE_DIM},) with {n} entries")
        if kind == "U" and not is_string_data_type(metadata.get("data_type")):
            raise StoreValidationError(f"{url}: {name} must be variable-length UTF-8")
        if kind != "U" and arr.dtype != np.dtype(kind):
            raise StoreValidationError(f"{url}: {name} has dtype {arr.dtype}, expected {kind}")
    if attrs["selection"].get("count") != n:
        raise StoreValidationError(f"{url}: selection count {attrs['selection'].get('count')} ≠ {n} samples stored")
    kind = _check_model_attrs(url, attrs)
    if "Conventions" in attrs:
        _check_array_attrs(url, group, layers, kind)
    if require_complete:
        # A listing, no reads: zarr-python reads a missing shard file as fill values (zeros), never an error.
        check_store_files(url)
    return group


def _dimension_names(url: str, array: str) -> tuple[str, ...]:
    """An array's `dimension_names` as its zarr.json records them (the spec's field, not zarr-python's objects)."""
    return tuple(read_node_metadata(url, array).get("dimension_names") or ())


def model_kind(attrs: dict[str, Any]) -> str:
    """The kind of network a store's values come from; stores written before kinds existed hold diffusion ones."""
    model = attrs.get("model")
    return model.get("kind", DIFFUSION_KIND) if isinstance(model, dict) else DIFFUSION_KIND


def _check_model_attrs(url: str, attrs: dict[str, Any]) -> str:
    """The model description is consistent: a known kind, its description complete, no σ or noise for features."""
    model = attrs["model"]
    if not isinstance(model, dict):
        raise StoreValidationError(f"{url}: model attribute is {type(model).__name__}, expected a mapping")
    if "kind" not in model:
        return DIFFUSION_KIND  # written before feature networks: a diffusion network, described as it was then
    kind = model["kind"]
    if kind not in MODEL_KINDS:
        raise StoreValidationError(f"{url}: model kind {kind!r} is not one of {MODEL_KINDS}")
    missing = [key for key in MODEL_DESCRIPTION_ATTRS if key not in model]
    if missing:
        raise StoreValidationError(f"{url}: model records its kind but lacks {missing}")
    if kind == FEATURE_KIND and (attrs["sigma"] is not None or attrs["noise"] is not None):
        raise StoreValidationError(f"{url}: a feature network's store records sigma {attrs['sigma']!r} and noise {attrs['noise']!r}; both must be null")
    return kind


def _check_array_attrs(url: str, group: zarr.Group, layers: dict[str, str], kind: str = DIFFUSION_KIND) -> None:
    """Stores that declare `Conventions` must describe every array (older stores are accepted without: they
    predate the attributes, and refusing them would lock their owners out of their own data)."""
    arrays = {var: dict(group[var].attrs) for var in layers}
    missing = missing_array_attrs(arrays, DIFFUSION_LAYER_ATTRS if kind == DIFFUSION_KIND else LAYER_ATTRS)
    others = [name for name in (RECONSTRUCTION_VAR, *COORDINATES) if name in group]
    missing += missing_array_attrs({name: dict(group[name].attrs) for name in others})
    if missing:
        raise StoreValidationError(f"{url}: declares Conventions {group.attrs['Conventions']!r} but lacks attributes {missing[:8]}")
    for var, path in layers.items():
        if arrays[var]["module_path"] != path:
            raise StoreValidationError(f"{url}: {var} says module_path {arrays[var]['module_path']!r}, the group's layers say {path!r}")
        if group[var].dtype == np.float16 and arrays[var].get("scale_factor") != FLOAT16_SCALE_FACTOR:
            raise StoreValidationError(f"{url}: float16 layer {var} needs scale_factor {FLOAT16_SCALE_FACTOR} (CF packing, so xarray reductions do not overflow)")
    if "classes" not in group.attrs:
        raise StoreValidationError(f"{url}: declares Conventions but has no `classes` attribute (label → WNID, name)")


def _json(value: object) -> str:
    """JSON for people: non-ASCII text as itself (`r cos θ`), not `\\u` escapes."""
    return json.dumps(value, ensure_ascii=False)


def describe_activation_store(url: str) -> str:
    """A human summary of a validated activation store."""
    attrs = dict(zarr.open_group(url, mode="r").attrs)
    group = validate_activation_store(url, require_complete=False)
    model = attrs["model"]
    kind = model_kind(attrs)
    if kind == FEATURE_KIND:
        inputs = f"input        clean images; {model.get('preprocessing')}  pooling {attrs['pooling']}  dtypes {_json(attrs['dtypes'])}"
    else:
        inputs = f"sigma        {attrs['sigma']}  noise {_json(attrs['noise'])}  pooling {attrs['pooling']}  dtypes {_json(attrs['dtypes'])}"
    maker = "generate" if (attrs.get("source") or {}).get("generated") else "extract"  # generate --activations-out makes them too
    lines = [
        f"store        {url}",
        f"schema       {ACTIVATION_SCHEMA}  complete: {'yes' if attrs.get('complete') is True else f'NO (unfinished: re-run the {maker} command)'}",
        f"samples      {attrs['selection'].get('count')}  from {attrs['source'].get('url')}",
        f"model        {model.get('name')} ({kind} network)  trained: {model.get('trained')}" + ("" if model.get("trained") else "  (UNTRAINED: random weights, for demos and tests)"),
        f"sha256       {model.get('sha256')}  ({'of the checkpoint file' if model.get('checkpoint') else 'of the preset state dict'})",
        inputs,
    ]
    for var, path in attrs["layers"].items():
        arr = group[var]
        lines.append(f"layer        {var} ({path}): {arr.shape} {arr.dtype}")
    if RECONSTRUCTION_VAR in group:
        lines.append(f"reconstruct  {group[RECONSTRUCTION_VAR].shape} uint8")
    if "Conventions" not in attrs:
        lines.append("attributes   none per array (written before they existed): in xarray reduce float16 layers as .astype('float32')")
    lines.append(f"selection    {_json(attrs['selection'])}")
    lines.append(f"device       {attrs['device']}")
    return "\n".join(lines)

"""What `imzarr info STORE` shows: a store of either kind validated and summarised, and its data files checked to be
all there (a listing); schemas/verify.py also reads them against their checksums."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import zarr

from schemas.errors import StoreValidationError
from schemas.image_store import IMAGE_SCHEMA, validate_image_store
from schemas.remote_storage import open_store_group
from schemas.store_integrity import Damage, missing_or_short
from schemas.variable_attrs import classes_lookup, label_names


IMZARR_SCHEMA_PREFIX = "imzarr."
IMAGE_ATTRS_SHOWN = frozenset({
    "sources", "rejected", "settings", "schema", "complete", "source_format", "source_label_order", "shuffle_seed",
    "resolution", "num_samples", "classes", "versions", "generation", "settings_fingerprint", "ignored_files",
})


def describe_store(url: str) -> str:
    """A human summary of a validated store (raises StoreValidationError when it breaks its contract)."""
    group = open_store_group(url)
    attrs = dict(group.attrs)
    schema = attrs.get("schema")
    if schema == IMAGE_SCHEMA:
        return _describe_images(url, attrs)
    from schemas.activation_store import ACTIVATION_SCHEMA, describe_activation_store

    if schema == ACTIVATION_SCHEMA:
        return describe_activation_store(url)
    if schema is None:
        raise StoreValidationError(f"{url}: a Zarr group without a `schema` attribute: not an imzarr store")
    if str(schema).startswith(IMZARR_SCHEMA_PREFIX):
        return _describe_written_whole(url, group, attrs)
    raise StoreValidationError(f"{url}: unknown schema {schema!r}")


def _describe_written_whole(url: str, group: zarr.Group, attrs: dict) -> str:
    """Stores written in one go from others (compare reports, statistics stores): their arrays and their plain
    attributes, one per line; nested ones (provenance records) by name only."""
    lines = [f"store        {url}", f"schema       {attrs['schema']}"]
    for name, array in sorted(group.arrays()):
        dims = ", ".join(array.metadata.dimension_names or ())
        lines.append(f"array        {name}  {array.dtype}  {' × '.join(map(str, array.shape))}  ({dims})")
    plain = {k: v for k, v in attrs.items() if k != "schema" and not isinstance(v, (dict, list))}
    nested = [k for k, v in attrs.items() if isinstance(v, (dict, list))]
    width = max([12, *map(len, plain)])
    lines += [f"{key:<{width}} {value}" for key, value in plain.items()]
    if nested:
        lines.append("also         " + ", ".join(nested))
    return "\n".join(lines)


def _describe_images(url: str, attrs: dict) -> str:
    complete = attrs.get("complete") is True
    store = validate_image_store(url, require_complete=False)
    labels = store.coordinate("label")
    counts = Counter(labels.tolist())
    ranked = counts.most_common()
    recorded = classes_lookup(attrs)

    def fmt(items):
        # Named as the store records its classes (its own numbered folders included), else as ImageNet-1k.
        _, names = label_names(np.array([c for c, _ in items], dtype=np.int64), recorded)
        return ", ".join(f"{name or 'unknown'} ({c}): {n}" for (c, n), name in zip(items, names))

    lines = [
        f"store        {url}",
        f"schema       {IMAGE_SCHEMA}  complete: {'yes' if complete else 'NO (unfinished: re-run the command that made it)'}",
        f"samples      {store.num_samples}  resolution {store.resolution}×{store.resolution}  classes {len(counts)}",
        f"source       {attrs.get('source_format')} (label order {attrs.get('source_label_order')}), shuffle seed {attrs.get('shuffle_seed')}",
        f"chunks       image inner {store.image.chunks[0]} samples, shards {store.shard_size} samples",
        f"top classes  {fmt(ranked[:5])}",
        f"bottom       {fmt(ranked[-5:][::-1])}",
        _sources_line(attrs),
        f"rejected     {len(attrs.get('rejected', []))}" + "".join(f"{': ' if i == 0 else ', '}{r[0]} ({r[1]})" for i, r in enumerate(attrs.get("rejected", [])[:6])) + (" …" if len(attrs.get("rejected", [])) > 6 else ""),
    ]
    versions = attrs.get("versions") or {}
    lines.append("made with    " + ", ".join(f"{name} {v}" for name, v in versions.items()))
    lines.append(f"identity     generation {attrs.get('generation')}, settings fingerprint {str(attrs.get('settings_fingerprint'))[:12]}")
    ignored = attrs.get("ignored_files") or []
    if ignored:
        lines.append(f"ignored      {len(ignored)} files: " + ", ".join(map(str, ignored[:6])) + (" …" if len(ignored) > 6 else ""))
    # The class table is what the top and bottom rows show; the rest are recorded for provenance.
    rest = {k: v for k, v in attrs.items() if k not in IMAGE_ATTRS_SHOWN}
    if rest:
        lines.append("other        " + ", ".join(f"{k} {v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False)}" for k, v in rest.items()))
    return "\n".join(lines)


def _sources_line(attrs: dict) -> str:
    """What the store was made from: NPZ files by name, a JPEG tree as one entry (the tree's fingerprint), or the
    generator of a generated store."""
    sources = attrs.get("sources", [])
    paths = [str(s["path"]) for s in sources]
    if attrs.get("source_format") == "generated":
        return f"generator    {', '.join(paths)}"
    if attrs.get("source_format") == "jpeg":
        return "tree         " + ", ".join(p.removeprefix(". ").strip("()") for p in paths)  # "33 image files"
    return f"files        {len(paths)}: " + ", ".join(paths[:6]) + (" …" if len(paths) > 6 else "")


def store_damage(url: str) -> list[Damage] | None:
    """Data files a store marked complete lacks or holds short (a listing, no reads); None for an unfinished one.
    Stores written whole (reports) have no `complete` attribute: they are checked as they are."""
    try:
        complete = zarr.open_group(url, mode="r").attrs.get("complete", True) is True
    except Exception:
        return None  # describe_store words "not a store"
    return missing_or_short(url) if complete else None

"""What `imzarr info STORE` shows: a store of either kind validated and summarised, and its data files checked to be
all there (a listing); schemas/verify.py also reads them against their checksums."""

from __future__ import annotations

import json
from collections import Counter

import zarr

from schemas.classes import class_table
from schemas.errors import StoreValidationError
from schemas.image_store import IMAGE_SCHEMA, validate_image_store
from schemas.remote_storage import open_store_group
from schemas.store_integrity import Damage, missing_or_short


def describe_store(url: str) -> str:
    """A human summary of a validated store (raises StoreValidationError when it breaks its contract)."""
    attrs = dict(open_store_group(url).attrs)
    schema = attrs.get("schema")
    if schema == IMAGE_SCHEMA:
        return _describe_images(url, attrs)
    from schemas.activation_store import ACTIVATION_SCHEMA, describe_activation_store

    if schema == ACTIVATION_SCHEMA:
        return describe_activation_store(url)
    raise StoreValidationError(f"{url}: unknown schema {schema!r}")


def _describe_images(url: str, attrs: dict) -> str:
    complete = attrs.get("complete") is True
    store = validate_image_store(url, require_complete=False)
    labels = store.coordinate("label")
    counts = Counter(labels.tolist())
    table = class_table()

    def fmt(items):
        return ", ".join(f"{table.names[c] if c >= 0 else 'unknown'} ({c}): {n}" for c, n in items)

    ranked = counts.most_common()
    lines = [
        f"store        {url}",
        f"schema       {IMAGE_SCHEMA}  complete: {'yes' if complete else 'NO (unfinished: re-run the command that made it)'}",
        f"samples      {store.num_samples}  resolution {store.resolution}×{store.resolution}  classes {len(counts)}",
        f"source       {attrs.get('source_format')} (label order {attrs.get('source_label_order')}), shuffle seed {attrs.get('shuffle_seed')}",
        f"chunks       image inner {store.image.chunks[0]} samples, shards {store.shard_size} samples",
        f"top classes  {fmt(ranked[:5])}",
        f"bottom       {fmt(ranked[-5:][::-1])}",
        f"files        {len(attrs.get('sources', []))}: " + ", ".join(s["path"] for s in attrs.get("sources", [])[:6]) + (" …" if len(attrs.get("sources", [])) > 6 else ""),
        f"rejected     {len(attrs.get('rejected', []))}",
    ]
    rest = {k: v for k, v in attrs.items() if k not in ("sources", "rejected", "settings", "schema", "complete")}
    lines.append("attributes   " + json.dumps(rest, default=str, ensure_ascii=False))
    return "\n".join(lines)


def store_damage(url: str) -> list[Damage] | None:
    """Data files a store marked complete lacks or holds short (a listing, no reads); None for an unfinished one."""
    try:
        complete = zarr.open_group(url, mode="r").attrs.get("complete") is True
    except Exception:
        return None  # describe_store words "not a store"
    return missing_or_short(url) if complete else None

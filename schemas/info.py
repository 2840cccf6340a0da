"""`imzarr info STORE`: validate a store of either kind, check that its data files are all there (a listing), and
print what it holds; `imzarr verify STORE` (schemas/verify.py) also reads them against their checksums."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import zarr

from schemas.classes import class_table
from schemas.cli import add_command
from schemas.errors import StoreValidationError
from schemas.image_store import IMAGE_SCHEMA, validate_image_store
from schemas.remote_storage import open_store_group
from schemas.store_integrity import Damage, DamagedStoreError, missing_or_short, read_checksum_record


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


def add_commands(sub) -> None:
    """`imzarr info STORE` and `imzarr verify STORE` (the store commands of `schemas`)."""
    from schemas.verify import add_verify_command

    info = add_command(sub, "info", "validate a store (images or activations), check its data files are all there, and summarise it")
    info.add_argument("store", help="store path or fsspec URL")
    info.set_defaults(handler=_info)
    add_verify_command(sub)


def _info(args: argparse.Namespace) -> int:
    summary = describe_store(args.store)
    damage = store_damage(args.store)
    if damage is None:
        lines = ["data files   not checked: the store is unfinished"]
    elif damage:
        lines = [f"damaged      {d}" for d in damage]
    elif read_checksum_record(args.store) is None:
        lines = ["data files   sizes possible; no checksum record (made before imzarr recorded one), so a missing file cannot be told from one zarr left out as all fill"]
    else:
        lines = ["data files   all present, each of its expected size (`imzarr verify` reads their bytes)"]
    print(summary + "\n" + "\n".join(lines))
    if damage:
        raise DamagedStoreError(f"{args.store}: not valid: {len(damage)} data file{'s' if len(damage) > 1 else ''} missing or short, first {damage[0]}")
    return 0


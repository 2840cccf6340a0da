"""`imzarr info STORE` and `imzarr verify STORE`, the store commands of `schemas` (schemas/api.py does the work)."""

from __future__ import annotations

import argparse
import sys

from schemas import api
from schemas.cli.dispatch import add_command


def add_commands(sub) -> None:
    """`imzarr info STORE` and `imzarr verify STORE`."""
    info = add_command(sub, "info", "validate a store (images or activations), check its data files are all there, and summarise it")
    info.add_argument("store", help="store path or fsspec URL")
    info.set_defaults(handler=_info)
    verify = add_command(
        sub,
        "verify",
        "read every data file of a store and check it against the crc32c recorded when it was written",
        description=(
            "Read every chunk and shard file of a store (images or activations) and compare its crc32c with the one "
            "recorded when it was written; one line per damaged file (missing, truncated, checksum mismatch), exit 1 "
            "if any. Stores written before checksums were recorded get the presence and size checks only; an unfinished "
            "store (a run interrupted or still going) is refused, exit 1: re-run its command first."
        ),
    )
    verify.add_argument("store", help="store path or fsspec URL (s3://…, file://…)")
    verify.set_defaults(handler=_verify)


def _info(args: argparse.Namespace) -> int:
    info = api.store_info(args.store)
    print(info.text)
    info.check()
    return 0


def _verify(args: argparse.Namespace) -> int:
    verification = api.verify_store_files(args.store)
    for line in verification.damage_lines:
        print(line)
    if verification.note:
        print(verification.note, file=sys.stderr)
    verification.check()
    print(verification.summary)
    return 0

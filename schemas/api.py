"""What the command line (and a notebook) asks of `schemas`: summarise and verify a store, open one, the rules
for where a command may write, object-storage options, and the root of the errors a command reports. Importing it stays light (no zarr): every command's dispatch does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.errors import ImzarrError, RunInterruptedError
from schemas.output_paths import check_output_location, local_file_url_to_path, refuse_process_bound_output
from schemas.remote_storage import open_store_group, translate_remote_error
from schemas.suggestions import did_you_mean
from schemas.storage_options import StorageOptionsError, apply_storage_options, parse_storage_options, remote_protocols

if TYPE_CHECKING:
    from schemas.store_integrity import Damage, VerifyResult

__all__ = [
    "ImzarrError", "RunInterruptedError", "StorageOptionsError", "StoreInfo", "StoreVerification", "apply_storage_options",
    "check_output_location", "did_you_mean", "local_file_url_to_path", "open_store_group", "parse_storage_options",
    "refuse_process_bound_output", "remote_protocols", "store_info", "translate_remote_error", "verify_store_files",
]  # fmt: skip


@dataclass(frozen=True)
class StoreInfo:
    """`imzarr info`'s answer: the summary, its data-file lines, and the damage found (None: not checked)."""

    url: str
    summary: str
    damage: list[Damage] | None

    @property
    def text(self) -> str:
        from schemas.store_integrity import read_checksum_record

        if self.damage is None:
            lines = ["data files   not checked: the store is unfinished"]
        elif self.damage:
            lines = [f"damaged      {d}" for d in self.damage]
        elif read_checksum_record(self.url) is None:
            lines = ["data files   sizes possible; no checksum record (made before imzarr recorded one), so a missing file cannot be told from one zarr left out as all fill"]
        else:
            lines = ["data files   all present, each of its expected size (`imzarr verify` reads their bytes)"]
        return self.summary + "\n" + "\n".join(lines)

    def check(self) -> None:
        """Raise DamagedStoreError (a failed run) when a data file is missing or short."""
        from schemas.store_integrity import DamagedStoreError

        if self.damage:
            n = len(self.damage)
            raise DamagedStoreError(f"{self.url}: not valid: {n} data file{'s' if n > 1 else ''} missing or short, first {self.damage[0]}")


def store_info(url: str) -> StoreInfo:
    """Validate a store of either kind, list its data files (no reads) and summarise it."""
    from schemas.info import describe_store, store_damage

    return StoreInfo(url, describe_store(url), store_damage(url))


@dataclass(frozen=True)
class StoreVerification:
    """`imzarr verify`'s answer: one line per damaged file, a note when no checksums were recorded, the summary."""

    url: str
    result: VerifyResult

    @property
    def damage_lines(self) -> list[str]:
        return [str(d) for d in self.result.damage]

    @property
    def note(self) -> str | None:
        if self.result.recorded:
            return None
        return f"{self.url}: no checksum record (written before imzarr recorded checksums): checked presence and sizes only"

    @property
    def summary(self) -> str:
        if self.result.recorded:
            return f"{self.url}: ok ({self._read}, every crc32c as recorded)"
        return f"{self.url}: ok (presence and sizes)"

    @property
    def _read(self) -> str:
        return f"{self.result.files} files, {self.result.bytes_read / 1e6:,.1f} MB read"

    def check(self) -> None:
        """Raise DamagedStoreError (a failed run) when any data file is damaged."""
        from schemas.store_integrity import DamagedStoreError

        n = len(self.result.damage)
        if n:
            raise DamagedStoreError(f"{self.url}: {n} damaged data file{'s' if n > 1 else ''} ({self._read})")


def verify_store_files(url: str) -> StoreVerification:
    """Read every data file of a store against its recorded crc32c (progress on stderr); an unfinished store is
    refused (UnfinishedStoreError, a failed run): it has no record yet, and its missing files are expected."""
    from schemas.verify import verify

    return StoreVerification(url, verify(url))


"""The CRC-32 of a zip member whose rows are read in place, checked from the pieces the conversion's tasks read.

A stored (uncompressed) `.npz` member is read where it lies, each output shard's task reading its own rows, so no
one reads the member from end to end as zipfile or `np.load` would, checking its CRC-32 on the way. Each task
therefore returns the CRC-32 of every run of rows it read; at the end the pieces are put together in file order
(the bytes no task of this run read, converted by an earlier run that was killed, are read again for it) and
compared with the CRC-32 the zip's central directory records. A flipped bit fails the run instead of becoming a
wrong pixel in a store marked complete.

Putting CRCs together (zlib's crc32_combine, which Python's zlib does not expose): CRC-32 is linear over GF(2),
so crc(A·B) = shift(crc(A), |B|) ⊕ crc(B), where shift applies the CRC register's update for |B| zero bytes,
a 32×32 bit matrix raised to the power |B|: a product of the cached matrices for the set bits of |B|.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

try:  # ISA-L's CRC-32 runs ~8× zlib's (18 against 2.3 GB/s here): the check costs the conversion next to nothing
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency, zlib is the fallback
    from zlib import crc32
try:  # ISA-L's combine takes 0.3 µs, this module's own ~7-80 µs: a shuffled run has a piece per row
    from isal.isal_zlib import crc32_combine as _isal_combine
except ImportError:  # pragma: no cover - older isal releases lack it
    _isal_combine = None

# The reflected CRC-32 polynomial (zip, PNG, zlib).
POLYNOMIAL = 0xEDB88320
READ_BLOCK = 8 << 20


@dataclass(frozen=True)
class MemberChecksum:
    """What a RowFile's rows must check against: the zip member's name and recorded CRC-32, and the CRC-32 of
    the member's bytes before the first row (its .npy header, `head_len` bytes)."""

    name: str
    crc: int
    head_crc: int
    head_len: int


def _times(matrix: list[int], vector: int) -> int:
    """matrix · vector over GF(2); the matrix as 32 column bit masks."""
    total, column = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[column]
        vector >>= 1
        column += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, column) for column in matrix]


def _zero_byte_operators() -> list[list[int]]:
    """Operator k shifts a CRC register by 2**k zero bytes, for k < 64."""
    one_bit = [POLYNOMIAL] + [1 << n for n in range(31)]
    operator = _square(_square(_square(one_bit)))  # 8 zero bits: one zero byte
    operators = [operator]
    for _ in range(63):
        operator = _square(operator)
        operators.append(operator)
    return operators


_OPERATORS: list[list[int]] | None = None


def crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-32 of A followed by B, from crc32(A), crc32(B) and the length of B in bytes."""
    if _isal_combine is not None:
        return _isal_combine(crc_a, crc_b, len_b)
    return crc32_combine_here(crc_a, crc_b, len_b)


def crc32_combine_here(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32_combine by the GF(2) operators above (where isal lacks its own)."""
    global _OPERATORS
    if _OPERATORS is None:
        _OPERATORS = _zero_byte_operators()
    k = 0
    while len_b:
        if len_b & 1:
            crc_a = _times(_OPERATORS[k], crc_a)
        len_b >>= 1
        k += 1
    return crc_a ^ crc_b


Pieces = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # (part, first rows, row counts, CRC-32s): compact receipts


def row_run_checksums(part: int, rows: np.ndarray, row_bytes_of: Callable[[int, int], np.ndarray]) -> Pieces:
    """The CRC-32 of each run of consecutive rows among `rows` (ascending), the bytes of rows [a, a + n) as
    `row_bytes_of(a, n)` gives them (as they lie in the file)."""
    if rows.size == 0:
        return part, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint32)
    starts = np.r_[0, np.flatnonzero(np.diff(rows) != 1) + 1]
    counts = np.diff(np.r_[starts, rows.size])
    crcs = np.array([crc32(row_bytes_of(int(a), int(n))) for a, n in zip(starts, counts)], dtype=np.uint32)
    return part, rows[starts].astype(np.int64), counts.astype(np.int64), crcs


def checked_member_crc(checksum: MemberChecksum, num_rows: int, row_bytes: int, pieces: list[Pieces], read_rows: Callable[[int, int], Iterable[bytes]]) -> bool:
    """Whether the member's CRC-32 holds: its head, then every row, from the pieces (of one part), reading
    (`read_rows(first, count)`, in blocks) the rows no piece covers."""
    firsts = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
    counts = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, np.int64)
    crcs = np.concatenate([p[3] for p in pieces]) if pieces else np.zeros(0, np.uint32)
    order = np.argsort(firsts, kind="stable")
    crc = checksum.head_crc
    at = 0
    # Each row belongs to one output shard, so pieces never overlap.
    for first, count, piece in zip(firsts[order].tolist(), counts[order].tolist(), crcs[order].tolist()):
        if first > at:
            crc = _crc_of_rows(crc, read_rows(at, first - at))
        crc = crc32_combine(crc, piece, count * row_bytes)
        at = first + count
    if at < num_rows:
        crc = _crc_of_rows(crc, read_rows(at, num_rows - at))
    return crc == checksum.crc


def _crc_of_rows(crc: int, blocks: Iterable[bytes]) -> int:
    for block in blocks:
        crc = crc32(block, crc)
    return crc

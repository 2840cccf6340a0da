"""The one atomic writer: a file appears whole or not at all, under one temporary-name pattern."""

import re

import pytest

from schemas.atomic_files import PARTIAL_SUFFIX, AtomicFile, remove_stale_temporaries, write_atomically


def test_written_whole_under_a_temporary_name_then_renamed(tmp_path):
    dest = tmp_path / "part-000000.raw"
    with AtomicFile(dest) as file:
        file.write_at(4, b"5678")
        file.write_at(0, b"1234")
        assert not dest.exists()  # nothing under the destination's name until commit
        assert re.fullmatch(r"part-000000\.raw\.[0-9a-f]{32}\.partial", file.temp.rsplit("/", 1)[-1])
    assert dest.read_bytes() == b"12345678"
    assert [p.name for p in tmp_path.iterdir()] == ["part-000000.raw"]


def test_a_failing_source_leaves_neither_file_nor_temporary(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")

    def chunks():
        yield b"new bytes"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_atomically(dest, chunks())
    assert dest.read_bytes() == b"old"  # the previous file stays whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_stale_temporaries_of_one_file_only_are_removed(tmp_path):
    hex32 = "0123456789abcdef" * 2
    ours = tmp_path / f"c.0.{hex32}{PARTIAL_SUFFIX}"
    neighbour = tmp_path / f"c.0.1.{hex32}{PARTIAL_SUFFIX}"  # the chunk key c.0.1 (dot-separated keys)
    not_a_temporary = tmp_path / "c.0.notes.partial"
    for path in (ours, neighbour, not_a_temporary):
        path.write_bytes(b"x")
    remove_stale_temporaries(tmp_path / "c.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([neighbour.name, not_a_temporary.name])

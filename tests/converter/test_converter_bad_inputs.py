"""Bad NPZ, JPEG and option inputs through the real command line: one line naming the file or option and the
reason, the right exit code, no traceback, nothing marked complete, no scratch left, inputs untouched."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zarr
from PIL import Image

from converter.convert import ConvertOptions, convert, remove_own_scratch, validate_convert_options
from converter.sources.base import ConvertOptionError
from schemas.atomic_files import write_atomically
from converter.sources.jpeg import open_jpeg_source
from converter.sources.npz import open_npz_source
from schemas.classes import class_table
from schemas.image_store import validate_image_store
from tests.support.synthetic import photo_like, write_npz_shard

TENCH, KIT_FOX = "n01440764", "n02119789"
ROW_16 = 3 * 16 * 16  # bytes of one 16×16 image row
BAD_INPUT, RUN_FAILED = 2, 1


# --- building inputs ------------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray, declared_shape: tuple[int, ...] | None = None) -> bytes:
    """A .npy file's bytes; `declared_shape` puts another shape in the header than the data has."""
    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    if declared_shape is not None:
        header["shape"] = declared_shape
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(np.ascontiguousarray(array).tobytes())
    return buf.getvalue()


def deflate(raw: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(raw) + packer.flush()


@dataclass
class RawMember:
    """A zip member written exactly as given, so its declared sizes and CRC may lie."""

    name: str
    payload: bytes  # the bytes in the file (deflated already when `deflated`)
    size: int  # declared uncompressed size
    crc: int
    deflated: bool = False


def member(name: str, raw: bytes, deflated: bool = False, size: int | None = None, crc: int | None = None) -> RawMember:
    """A member holding `raw` (deflated or stored), with true size and CRC unless told otherwise."""
    return RawMember(name, deflate(raw) if deflated else raw, len(raw) if size is None else size, zlib.crc32(raw) if crc is None else crc, deflated)


def write_raw_zip(path: Path, members: list[RawMember]) -> Path:
    """A zip built byte by byte (local headers, central directory, end record), as numpy's np.savez lays it out."""
    body, central = bytearray(), bytearray()
    for m in members:
        name, method, offset = m.name.encode(), 8 if m.deflated else 0, len(body)
        body += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 33, m.crc, len(m.payload), m.size, len(name), 0)
        body += name + m.payload
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 33, m.crc, len(m.payload), m.size, len(name), 0, 0, 0, 0, 0, offset)
        central += name
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + end))
    return path


def images_16(n: int) -> np.ndarray:
    return photo_like(n, 16).reshape(n, ROW_16)


def jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (40, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


# --- the table ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadCase:
    make: Callable[[Path], list[str]]  # builds inputs under the folder given; returns the CLI arguments
    expected: tuple[str, ...]  # what the one line must name: the file or option, and the reason
    exit_code: int = BAD_INPUT
    limit_file_bytes: int | None = None  # run under RLIMIT_FSIZE, as a disk that fills up


def stored_rows_past_member(d: Path) -> list[str]:
    """(6) The .npy header declares 12 rows; the member holds 10: rows 10-11 would be the labels' bytes."""
    write_raw_zip(d / "val_data.npz", [member("data.npy", npy_bytes(images_16(10), (12, ROW_16))), member("labels.npy", npy_bytes(np.ones(12, np.int64)))])
    return ["npz", str(d / "val_data.npz")]


def deflate_bomb(d: Path) -> list[str]:
    """(11) Declares 10 rows; the stream inflates to 40 MB of zeros."""
    raw = npy_bytes(images_16(10))
    bomb = deflate(raw + bytes(40 << 20))  # ~40 KB in the file
    write_raw_zip(
        d / "val_data.npz",
        [RawMember("data.npy", bomb, len(raw), zlib.crc32(raw), True), member("labels.npy", npy_bytes(np.ones(10, np.int64)))],
    )
    return ["npz", str(d / "val_data.npz")]


def labels_declare_1e11(d: Path) -> list[str]:
    """(11) The labels header declares 10¹¹ entries (800 GB) in an 80-byte member."""
    labels = npy_bytes(np.ones(10, np.int64), (10**11,))
    write_raw_zip(d / "val_data.npz", [member("data.npy", npy_bytes(images_16(10))), member("labels.npy", labels)])
    return ["npz", str(d / "val_data.npz")]


def size_past_deflate_ratio(d: Path) -> list[str]:
    """The central directory declares 3.9 GB from a few hundred deflated bytes."""
    raw = npy_bytes(images_16(10))
    write_raw_zip(d / "val_data.npz", [member("data.npy", raw, deflated=True, size=3_900_000_000), member("labels.npy", npy_bytes(np.ones(10, np.int64)))])
    return ["npz", str(d / "val_data.npz")]


def crc_mismatch(d: Path) -> list[str]:
    raw = npy_bytes(images_16(10))
    write_raw_zip(d / "val_data.npz", [member("data.npy", raw, deflated=True, crc=zlib.crc32(raw) ^ 1), member("labels.npy", npy_bytes(np.ones(10, np.int64)))])
    return ["npz", str(d / "val_data.npz")]


def npz_with(**arrays: np.ndarray) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        np.savez(d / "val_data.npz", **arrays)
        return ["npz", str(d / "val_data.npz")]

    return make


def npz_option(*option: str) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        write_npz_shard(d / "val_data.npz", photo_like(10, 16), np.ones(10, int), compressed=True)
        return ["npz", str(d / "val_data.npz"), *option]

    return make


def jpeg_tree(*option: str, folders: tuple[str, ...] = (TENCH, KIT_FOX)) -> Callable[[Path], list[str]]:
    def make(d: Path) -> list[str]:
        for i, name in enumerate(folders):
            jpeg(d / "tree" / name / f"{i}.JPEG", seed=i)
        return ["jpeg", str(d / "tree"), *option]

    return make


def flat_val_bad_line(d: Path) -> list[str]:
    jpeg(d / "val" / "ILSVRC2012_val_00000001.JPEG")
    (d / "gt.txt").write_text("fish\n")
    return ["jpeg", str(d / "val"), "--val-labels", str(d / "gt.txt")]


def deflated_shard(d: Path) -> list[str]:
    """600 KB of pixels to inflate into scratch."""
    write_npz_shard(d / "val_data.npz", photo_like(200, 32), np.ones(200, int), compressed=True)
    return ["npz", str(d / "val_data.npz")]


def output_inside_input(d: Path) -> list[str]:
    write_npz_shard(d / "val_data.npz", photo_like(10, 16), np.ones(10, int))
    return ["npz", str(d), "-o", str(d / "inside.zarr")]


def shard_given_twice(d: Path) -> list[str]:
    (d / "src").mkdir()
    write_npz_shard(d / "src" / "val_data.npz", photo_like(10, 16), np.ones(10, int))
    return ["npz", str(d / "src"), str(d / "src" / "val_data.npz")]


def shard_hard_linked(d: Path) -> list[str]:
    """The same file under two names (a hard link): realpath cannot tell, the inode can."""
    write_npz_shard(d / "train_data_batch_1.npz", photo_like(10, 16), np.ones(10, int))
    os.link(d / "train_data_batch_1.npz", d / "train_data_batch_2.npz")
    return ["npz", str(d)]


def shard_copied(d: Path) -> list[str]:
    write_npz_shard(d / "train_data_batch_1.npz", photo_like(10, 16), np.arange(1, 11))
    shutil.copyfile(d / "train_data_batch_1.npz", d / "train_data_batch_1 (copy).npz")
    return ["npz", str(d)]


def shard_link_to_nothing(d: Path) -> list[str]:
    """A shard on a disk that is not mounted: the others must not be converted without it."""
    write_npz_shard(d / "train_data_batch_1.npz", photo_like(10, 16), np.ones(10, int))
    (d / "train_data_batch_2.npz").symlink_to(d / "unmounted" / "train_data_batch_2.npz")
    return ["npz", str(d)]


def folder_named_like_a_shard(d: Path) -> list[str]:
    write_npz_shard(d / "train_data_batch_1.npz", photo_like(10, 16), np.ones(10, int))
    (d / "train_data_batch_2.npz").mkdir()
    return ["npz", str(d)]


def scratch_in_the_input(d: Path) -> list[str]:
    write_npz_shard(d / "val_data.npz", photo_like(10, 16), np.ones(10, int))
    return ["npz", str(d), "--shuffle-seed", "1", "--scratch-dir", str(d / "scratch")]


def scratch_in_the_output(d: Path) -> list[str]:
    write_npz_shard(d / "val_data.npz", photo_like(10, 16), np.ones(10, int))
    return ["npz", str(d), "-o", str(d.parent / "o.zarr"), "--shuffle-seed", "1", "--scratch-dir", str(d.parent / "o.zarr")]


def read_only_output(d: Path) -> list[str]:
    write_npz_shard(d / "val_data.npz", photo_like(10, 16), np.ones(10, int))
    return ["npz", str(d / "val_data.npz"), "-o", "/sys/imzarr-test-output.zarr"]


BAD_CASES: dict[str, BadCase] = {
    "stored member shorter than its header": BadCase(stored_rows_past_member, ("val_data.npz", "data.npy", "declares shape (12, 768)", "holds 7680 bytes")),
    "deflate bomb": BadCase(deflate_bomb, ("val_data.npz", "data.npy", "inflates past its declared size")),
    "labels header declaring 1e11": BadCase(labels_declare_1e11, ("val_data.npz", "labels.npy", "declares shape (100000000000,)")),
    "size beyond deflate ratio": BadCase(size_past_deflate_ratio, ("val_data.npz", "data.npy", "more than deflate can produce")),
    "crc mismatch": BadCase(crc_mismatch, ("val_data.npz", "data.npy", "CRC-32")),
    "labels (N, 2)": BadCase(npz_with(data=images_16(10), labels=np.ones((10, 2), np.int64)), ("val_data.npz", "labels has shape (10, 2)")),
    "fractional labels": BadCase(npz_with(data=images_16(3), labels=np.array([1.0, 2.5, 3.0])), ("val_data.npz", "labels[1] is 2.5", "not a whole class number")),
    "NaN labels": BadCase(npz_with(data=images_16(2), labels=np.array([1.0, np.nan])), ("val_data.npz", "labels[1]", "not a whole class number")),
    "string labels": BadCase(npz_with(data=images_16(2), labels=np.array(["1", "2"])), ("val_data.npz", "labels has dtype <U1", "expected integers")),
    "label 0 in 1-based order": BadCase(npz_with(data=images_16(2), labels=np.array([0, 1])), ("val_data.npz", "label 0 outside 1..1000", "if the file's labels are 0-based sorted-WNID indices, pass --label-order sorted")),
    "no rows at all": BadCase(npz_with(data=np.zeros((0, ROW_16), np.uint8), labels=np.zeros(0, np.int64)), ("val_data.npz: no usable images", "val_data.npz holds no rows")),
    "float image data": BadCase(npz_with(data=np.zeros((2, ROW_16)), labels=np.ones(2, np.int64)), ("val_data.npz", "dtype float64, expected uint8")),
    "--shard-size -4": BadCase(npz_option("--shard-size", "-4"), ("--shard-size", "-4")),
    "--inner-chunk 0": BadCase(npz_option("--inner-chunk", "0"), ("--inner-chunk", "0")),
    "--workers 0": BadCase(npz_option("--workers", "0"), ("--workers", "0")),
    "--shuffle-seed -1": BadCase(npz_option("--shuffle-seed", "-1"), ("--shuffle-seed", "-1")),
    "--shard-size not a multiple of --inner-chunk": BadCase(npz_option("--shard-size", "100", "--inner-chunk", "64"), ("--shard-size 100", "multiple of --inner-chunk")),
    "--size 0": BadCase(jpeg_tree("--size", "0"), ("--size", "0")),
    "--shard-size too big for memory": BadCase(jpeg_tree("--size", "1024", "--shard-size", "2048", "--inner-chunk", "2048", folders=(TENCH,)), ("--shard-size 2048", "GiB")),
    "non-WNID folders": BadCase(jpeg_tree(folders=("cats", "dogs")), ("cats", "not an ImageNet-1k WNID")),
    "flat val, bad label line": BadCase(flat_val_bad_line, ("gt.txt", "line 1 is 'fish'")),
    "output inside the input folder": BadCase(output_inside_input, ("inside.zarr", "input")),
    "a shard given twice": BadCase(shard_given_twice, ("val_data.npz", "given twice", "converted twice")),
    "a shard hard-linked under another name": BadCase(shard_hard_linked, ("train_data_batch_2.npz", "same file as", "train_data_batch_1.npz", "hard link")),
    "a shard copied under another name": BadCase(shard_copied, ("train_data_batch_1.npz", "same images and labels as", "(copy)", "converted twice")),
    "a shard's name linking to nothing": BadCase(shard_link_to_nothing, ("train_data_batch_2.npz", "named like a shard but a link to nothing")),
    "a folder named like a shard": BadCase(folder_named_like_a_shard, ("train_data_batch_2.npz", "named like a shard but a folder")),
    "scratch inside the input": BadCase(scratch_in_the_input, ("scratch", "the scratch folder lies inside the input")),
    "scratch as the output": BadCase(scratch_in_the_output, ("o.zarr: the scratch folder is the output",)),
    "read-only output": BadCase(read_only_output, ("/sys/imzarr-test-output.zarr",), exit_code=RUN_FAILED),
    "disk full while inflating": BadCase(deflated_shard, ("part-000000.raw: cannot write (File too large)",), exit_code=RUN_FAILED, limit_file_bytes=256 << 10),
}


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, by relative path (links not followed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _limits(file_bytes: int | None) -> Callable[[], None]:
    """Run the command with at most 2 GiB of data memory (a check that fails must not take the machine down),
    and optionally with a file size limit standing in for a full disk."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))
        if file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))

    return apply


def error_lines(stderr: str) -> list[str]:
    """stderr's lines, less the usage block argparse prints before its own one-line errors (values it refuses
    while parsing, such as --shard-size -4, never reach the converter)."""
    lines = stderr.strip().splitlines()
    if lines and lines[0].startswith("usage: "):
        lines = lines[1:]
        while lines and lines[0].startswith(" "):
            lines = lines[1:]
    return lines


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    case = BAD_CASES[kind]
    inputs = tmp_path / "in"
    inputs.mkdir()
    args = case.make(inputs)
    if kind == "read-only output" and os.access("/sys", os.W_OK) and not Path("/sys/kernel").is_dir():
        pytest.skip("/sys is not a read-only system folder here")
    out = tmp_path / "o.zarr"
    if "-o" not in args:
        args += ["-o", str(out)]
    before = snapshot(inputs)
    proc = subprocess.run(
        [sys.executable, "-m", "converter", *args], capture_output=True, text=True, timeout=120, preexec_fn=_limits(case.limit_file_bytes)
    )
    lines = error_lines(proc.stderr)
    assert proc.returncode == case.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and ": error: " in lines[0], proc.stderr
    for part in case.expected:
        assert part in lines[0], (part, lines[0])
    if (out / "zarr.json").exists():
        assert zarr.open_group(str(out), mode="r", use_consolidated=False).attrs.get("complete") is not True
    assert snapshot(inputs) == before  # byte for byte
    assert not list(tmp_path.rglob("*.partial")), "partial file left behind"
    if case.exit_code == BAD_INPUT:  # bad input: no rerun can reuse scratch; a failed write keeps it to resume
        assert not list(tmp_path.glob("*.scratch-*")), "scratch left behind"


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"shard_size": -4}, "--shard-size -4"),
        ({"shard_size": 0}, "--shard-size 0"),
        ({"inner_chunk": 0}, "--inner-chunk 0"),
        ({"workers": 0}, "--workers 0"),
        ({"shuffle_seed": -1}, "--shuffle-seed -1"),
        ({"shard_size": 100, "inner_chunk": 64}, "--shard-size 100"),
        ({"shard_size": 2.5}, "--shard-size 2.5"),
        ({"output": ""}, "--output ''"),
    ],
)
def test_option_validation_names_the_option(tmp_path: Path, changes: dict, option: str) -> None:
    """The converter's own check, whatever the command line already refused (whole numbers when the options are
    made, the rest when they are validated)."""
    with pytest.raises(ConvertOptionError) as info:
        validate_convert_options(dataclasses.replace(ConvertOptions(str(tmp_path / "o.zarr")), **changes))
    assert str(info.value).startswith(option + ": ")
    assert not any(tmp_path.iterdir())


def test_shard_memory_bound_counts_the_store_and_the_inner_chunk(tmp_path: Path) -> None:
    out = str(tmp_path / "o.zarr")
    validate_convert_options(ConvertOptions(out, shard_size=1 << 20), resolution=64, num_samples=1000)  # 1000 images
    with pytest.raises(ConvertOptionError, match="--shard-size 1048576"):
        validate_convert_options(ConvertOptions(out, shard_size=1 << 20), resolution=64, num_samples=1 << 20)
    with pytest.raises(ConvertOptionError, match="--inner-chunk 4096"):
        validate_convert_options(ConvertOptions(out, shard_size=4096, inner_chunk=4096), resolution=1024, num_samples=1)


def test_float_labels_holding_whole_numbers_are_accepted(tmp_path: Path) -> None:
    np.savez(tmp_path / "val_data.npz", data=images_16(3), labels=np.array([449.0, 1.0, 1000.0]))
    source = open_npz_source([tmp_path / "val_data.npz"])
    expected = class_table().from_downsampled(np.array([449, 1, 1000]))
    assert source.parts[0].labels().tolist() == expected.tolist() and expected[0] == 0  # NPZ 449 is tench


# --- per-file problems in a JPEG tree: rejected one by one, never a crash ---------------------------------------


def test_file_symlink_loop_is_rejected_with_its_reason(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    jpeg(root / TENCH / "a.JPEG")
    jpeg(root / KIT_FOX / "b.JPEG", seed=1)
    os.symlink("loop.JPEG", root / TENCH / "loop.JPEG")  # a link to itself
    os.symlink("missing.JPEG", root / KIT_FOX / "dangling.JPEG")
    os.mkfifo(root / KIT_FOX / "pipe.JPEG")  # never opened: reading it would block forever
    out = tmp_path / "o.zarr"
    proc = subprocess.run([sys.executable, "-m", "converter", "jpeg", str(root), "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    store = validate_image_store(str(out))
    assert list(store.coordinate("source_file")) == [f"{TENCH}/a.JPEG", f"{KIT_FOX}/b.JPEG"]
    rejected = dict(map(tuple, store.attrs["rejected"]))
    assert rejected == {
        f"{TENCH}/loop.JPEG": "cannot read file (Too many levels of symbolic links)",
        f"{KIT_FOX}/dangling.JPEG": "cannot read file (No such file or directory)",
    }
    assert store.attrs["ignored_files"] == [f"{KIT_FOX}/pipe.JPEG"]


def test_non_utf8_file_names_convert_with_escaped_names(tmp_path: Path) -> None:
    """Names that are not UTF-8 are read as they are and stored with `\\xNN` escapes (valid UTF-8 strings)."""
    root = tmp_path / "tree"
    odd = os.fsdecode(b"caf\xe9.JPEG")
    jpeg(root / TENCH / odd)
    jpeg(root / TENCH / "plain.JPEG", seed=1)
    (root / TENCH / os.fsdecode(b"notes-\xff.txt")).write_text("not an image")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_npz_shard(shards / os.fsdecode(b"train_data_batch_\xe91.npz"), photo_like(5, 16), np.ones(5, int))
    for args, out in (
        (["jpeg", str(root)], tmp_path / "j.zarr"),
        (["npz", str(shards)], tmp_path / "n.zarr"),
    ):
        proc = subprocess.run([sys.executable, "-m", "converter", *args, "-o", str(out)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    j = validate_image_store(str(tmp_path / "j.zarr"))
    assert list(j.coordinate("source_file")) == [f"{TENCH}/caf\\xe9.JPEG", f"{TENCH}/plain.JPEG"]
    assert j.attrs["ignored_files"] == [f"{TENCH}/notes-\\xff.txt"]
    n = validate_image_store(str(tmp_path / "n.zarr"))
    assert set(n.coordinate("source_file")) == {"train_data_batch_\\xe91.npz"}
    assert n.attrs["sources"][0]["path"] == "train_data_batch_\\xe91.npz"
    np.testing.assert_array_equal(n.image[:], photo_like(5, 16))


# --- what decides resume: labels numbering and file contents ----------------------------------------------------


def test_added_class_folder_is_refused_not_resumed(tmp_path: Path) -> None:
    """(5) An empty folder added between runs renumbers every class; the store must not be confirmed or resumed."""
    root = tmp_path / "tree"
    for i, name in enumerate(("cats", "dogs")):
        jpeg(root / name / f"{i}.jpg", seed=i)
    out = str(tmp_path / "o.zarr")
    first = convert(open_jpeg_source(root, label_from_folders=True), ConvertOptions(out))
    assert first.num_samples == 2
    (root / "aardvarks").mkdir()  # sorts first: cats 0 → 1, dogs 1 → 2
    renumbered = open_jpeg_source(root, label_from_folders=True)
    with pytest.raises(Exception, match="other inputs or options") as complete_refused:
        convert(renumbered, ConvertOptions(out))
    group = zarr.open_group(out, mode="r+", use_consolidated=False)
    group.attrs["complete"] = False  # as an interrupted run leaves it
    with pytest.raises(type(complete_refused.value), match="other inputs or options"):
        convert(renumbered, ConvertOptions(out))
    redone = convert(renumbered, ConvertOptions(out, overwrite=True))
    assert redone.num_samples == 2
    store = validate_image_store(out)
    assert list(store.coordinate("label")) == [1, 2] and store.attrs["folder_classes"] == ["aardvarks", "cats", "dogs"]


def test_edit_in_the_middle_of_a_shard_changes_its_fingerprint(tmp_path: Path) -> None:
    """(9) Same size, same first and last MiB, other bytes in the middle: a rerun must not call the store complete."""
    shard = write_npz_shard(tmp_path / "val_data.npz", photo_like(600, 64), np.ones(600, int), mean=False)  # 7 MiB
    out = str(tmp_path / "o.zarr")
    convert(open_npz_source([shard]), ConvertOptions(out))
    before = open_npz_source([shard]).files[0].fingerprint
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(16)
    with open(shard, "r+b") as f:  # rewritten in place: size unchanged
        f.write(raw)
    assert open_npz_source([shard]).files[0].fingerprint != before
    with pytest.raises(Exception, match="other inputs or options"):
        convert(open_npz_source([shard]), ConvertOptions(out))


def test_edit_in_the_middle_of_a_jpeg_changes_the_tree_fingerprint(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    path = jpeg(root / TENCH / "a.JPEG", size=(400, 500))
    before = open_jpeg_source(root).files[0].fingerprint
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert open_jpeg_source(root).files[0].fingerprint != before


# --- leftovers -------------------------------------------------------------------------------------------------


def test_rerun_of_complete_store_removes_only_its_own_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(12) A kill right after `complete` leaves scratch folders; the rerun removes those it made, nothing else."""
    shard = write_npz_shard(tmp_path / "val_data.npz", photo_like(50, 16), np.ones(50, int), compressed=True)
    out = str(tmp_path / "o.zarr")
    import converter.convert as convert_module

    monkeypatch.setattr(convert_module, "remove_own_scratch", lambda options: None)  # the kill: no tidy-up
    convert(open_npz_source([shard]), ConvertOptions(out))
    monkeypatch.undo()
    left = list(tmp_path.glob("o.zarr.scratch-*"))
    assert len(left) == 1 and (left[0] / "imzarr-scratch.json").exists()
    foreign = tmp_path / "o.zarr.scratch-0123456789abcdef"  # same pattern, no marker: not ours
    foreign.mkdir()
    (foreign / "keep.txt").write_text("someone else's")
    other_store = tmp_path / "o.zarr.scratch-fedcba9876543210"  # a marker naming another store
    other_store.mkdir()
    (other_store / "imzarr-scratch.json").write_text('{"made_by": "imzarr convert", "store": "/elsewhere/x.zarr"}')
    in_use = tmp_path / "o.zarr.scratch-00000000000000ff"  # ours, but a live run (the test's parent) is using it
    in_use.mkdir()
    marker = {"made_by": "imzarr convert", "store": out, "pid": os.getppid(), "host": socket.gethostname()}
    (in_use / "imzarr-scratch.json").write_text(json.dumps(marker))
    again = convert(open_npz_source([shard]), ConvertOptions(out))
    assert again.already_complete
    assert sorted(p.name for p in tmp_path.glob("o.zarr.scratch-*")) == sorted([foreign.name, other_store.name, in_use.name])
    assert (foreign / "keep.txt").read_text() == "someone else's"
    remove_own_scratch(ConvertOptions(out))  # idempotent, and still touches only its own
    assert foreign.exists() and other_store.exists() and in_use.exists()


def test_two_writers_of_one_scratch_file_never_mix(tmp_path: Path) -> None:
    """Two runs materializing the same part at once each write their own temporary file; one whole result wins."""
    dest = str(tmp_path / "part-000000.raw")
    both_started = threading.Barrier(2)

    def blocks(fill: int):
        for i in range(8):
            if i == 1:
                both_started.wait(timeout=10)  # interleave the two writers
            yield bytes([fill]) * 4096

    writers = [threading.Thread(target=write_atomically, args=(dest, blocks(fill))) for fill in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    data = Path(dest).read_bytes()
    assert len(data) == 8 * 4096 and len(set(data)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["part-000000.raw"]


def test_scratch_folder_not_made_by_us_is_never_used(tmp_path: Path) -> None:
    shard = write_npz_shard(tmp_path / "val_data.npz", photo_like(20, 16), np.ones(20, int), compressed=True)
    out = str(tmp_path / "o.zarr")
    scratch = tmp_path / "scratch"
    source = open_npz_source([shard])
    from converter.convert import _scratch_dir

    squatter = _scratch_dir(ConvertOptions(out, scratch_dir=str(scratch)), ConvertOptions(out, scratch_dir=str(scratch)).to_dict(source))
    squatter.mkdir(parents=True)
    (squatter / "part-000000.raw").write_bytes(b"not ours")
    with pytest.raises(Exception, match="not an imzarr scratch folder"):
        convert(source, ConvertOptions(out, scratch_dir=str(scratch)))
    assert (squatter / "part-000000.raw").read_bytes() == b"not ours"


def test_a_refused_output_leaves_its_folder_untouched(tmp_path: Path) -> None:
    """An output that names an input's neighbour file is refused before anything is made in that folder (not
    even the empty file that tests whether a new output's folder takes files)."""
    folder = tmp_path / "train"
    folder.mkdir()
    write_npz_shard(folder / "train_data_batch_1.npz", photo_like(10, 16), np.ones(10, int))
    write_npz_shard(folder / "train_data_batch_2.npz", photo_like(10, 16), np.ones(10, int))
    os.utime(folder, ns=(10**18, 10**18))
    proc = subprocess.run([sys.executable, "-m", "converter", "npz", str(folder / "train_data_batch_1.npz"), "-o", str(folder / "train_data_batch_2.npz")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "exists and is not an imzarr store" in proc.stderr
    assert folder.stat().st_mtime_ns == 10**18 and sorted(p.name for p in folder.iterdir()) == ["train_data_batch_1.npz", "train_data_batch_2.npz"]

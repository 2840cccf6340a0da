"""Direct shard files: read back through zarr-python exactly as zarr-python's own writes, and never half-visible."""

import os

import numpy as np
import pytest
import zarr

from extractor.activation_writer import create_activation_arrays
from schemas.atomic_files import PARTIAL_SUFFIX
from schemas.shard_writer import ChunkOwnershipError, ShardFileWriter, ShardOutput, ShardWriteError, direct_layout, write_with_zarr

COORDS = ("label", "synset", "class_name", "global_index", "source_file", "source_sample")


def _coords(start: int, n: int) -> dict[str, np.ndarray]:
    idx = np.arange(start, start + n)
    return {
        "label": (idx % 7).astype(np.int16),
        "synset": np.array([f"n{i:08d}" for i in idx], dtype=object),
        "class_name": np.array([f"class {i}" for i in idx], dtype=object),
        "global_index": idx.astype(np.int64),
        "source_file": np.full(n, "", dtype=object),
        "source_sample": idx.astype(np.int64),
    }


def _store(url: str, n: int, shard: int, shapes: dict, dtype: str, recon: bool) -> None:
    group = zarr.open_group(url, mode="w", zarr_format=3)
    create_activation_arrays(group, n, shapes, dtype, shard, (3, 8, 8) if recon else None, {"a": {"long_name": "layer a"}})


@pytest.mark.parametrize(
    "n,shard,dtype",
    [(200, 64, "float16"), (130, 32, "float32"), (64, 64, "float16"), (5, 64, "float16")],
)
def test_direct_shards_read_like_zarr_written_ones(tmp_path, n, shard, dtype):
    shapes = {"a": (6, 4, 4), "pooled": (11,)}
    rng = np.random.default_rng(n)
    data = {name: rng.standard_normal((n, *s)).astype(dtype) for name, s in shapes.items()}
    data["a"][3] = 0  # an all-zero sample: zarr must still read it from the file, not as fill
    data["reconstruction"] = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    ours, theirs = str(tmp_path / "ours.zarr"), str(tmp_path / "theirs.zarr")
    for url in (ours, theirs):
        _store(url, n, shard, shapes, dtype, recon=True)
    for k, start in enumerate(range(0, n, shard)):
        part = {name: v[start : start + shard] for name, v in data.items()}
        coords = {c: v for c, v in _coords(start, len(part["a"])).items()}
        write_with_zarr(theirs, start, part, coords)
        output = ShardOutput(ours, k, start, {name: np.ascontiguousarray(v) for name, v in part.items()})
        assert set(output.files) == set(part)  # every variable goes the direct way
        half = len(part["a"]) // 2
        output.ready(0, half)
        output.ready(half, len(part["a"]))
        output.commit(coords)
    a, b = zarr.open_group(ours, mode="r"), zarr.open_group(theirs, mode="r")
    assert dict(a["a"].attrs)["long_name"] == "layer a" and "coordinates" in dict(a["a"].attrs)
    for name in [*data, *COORDS]:
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
        if name in data:
            np.testing.assert_array_equal(a[name][:], data[name], err_msg=name)
            for k in range((n + shard - 1) // shard):
                key = f"{name}/c/{k}/" + "/".join("0" * (data[name].ndim - 1))
                with open(os.path.join(ours, key), "rb") as f, open(os.path.join(theirs, key), "rb") as g:
                    assert f.read() == g.read(), key  # byte for byte what zarr-python writes
        if name in COORDS and name != "source_file":  # all-"" chunks zarr-python skips writing: same values read
            for k in range((n + shard - 1) // shard):
                with open(os.path.join(ours, name, "c", str(k)), "rb") as f, open(os.path.join(theirs, name, "c", str(k)), "rb") as g:
                    assert f.read() == g.read(), (name, k)  # coordinates too: written directly, byte for byte
    assert not list(tmp_path.rglob(f"*{PARTIAL_SUFFIX}"))


def test_uncommitted_shard_is_invisible_and_cleaned(tmp_path):
    url = str(tmp_path / "s.zarr")
    _store(url, 128, 64, {"a": (2, 2, 2)}, "float16", recon=False)
    layout = direct_layout(url, "a")
    writer = ShardFileWriter(tmp_path / "s.zarr" / "a", layout, 1, np.dtype("float16"))
    writer.write(0, np.ones((32, 2, 2, 2), dtype=np.float16))  # then "killed": never committed
    writer.file.close()
    assert list((tmp_path / "s.zarr" / "a").rglob(f"*{PARTIAL_SUFFIX}"))
    np.testing.assert_array_equal(zarr.open_array(url, path="a", mode="r")[64:], 0)  # fill value, not data
    output = ShardOutput(url, 1, 64, {"a": np.full((64, 2, 2, 2), 2, dtype=np.float16)})  # the rerun's write
    assert set(output.files) == {"a"}
    output.ready(0, 64)
    output.commit({})
    assert not list((tmp_path / "s.zarr" / "a").rglob(f"*{PARTIAL_SUFFIX}"))
    np.testing.assert_array_equal(zarr.open_array(url, path="a", mode="r")[64:], 2)


def test_wrong_pieces_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    _store(url, 100, 64, {"a": (2,)}, "float16", recon=False)
    writer = ShardFileWriter(tmp_path / "s.zarr" / "a", direct_layout(url, "a"), 1, np.dtype("float16"))
    with pytest.raises(ShardWriteError, match="shard holds 36"):
        writer.write(0, np.zeros((37, 2), dtype=np.float16))
    with pytest.raises(ShardWriteError, match="float32"):
        writer.write(0, np.zeros((3, 2), dtype=np.float32))
    writer.abort()
    with pytest.raises(ShardWriteError, match="outside"):
        ShardFileWriter(tmp_path / "s.zarr" / "a", direct_layout(url, "a"), 2, np.dtype("float16"))


def test_compressed_arrays_go_through_zarr(tmp_path):
    url = str(tmp_path / "z.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    group.create_array("a", shape=(10, 3), dtype="float32", chunks=(5, 3), shards=(10, 3), fill_value=0.0)  # default zstd
    assert direct_layout(url, "a") is None
    output = ShardOutput(url, 0, 0, {"a": np.arange(30, dtype=np.float32).reshape(10, 3)})
    assert not output.files
    output.ready(0, 10)
    output.commit({})
    np.testing.assert_array_equal(zarr.open_array(url, path="a", mode="r")[:], np.arange(30).reshape(10, 3))


def test_numeric_coordinates_written_whole_are_never_written_by_a_shard_task(tmp_path):
    url = str(tmp_path / "whole.zarr")
    n, shard = 40, 16
    group = zarr.open_group(url, mode="w", zarr_format=3)
    numeric = {name: values for name, values in _coords(0, n).items() if name in ("label", "global_index", "source_sample")}
    create_activation_arrays(group, n, {"a": (3,)}, "float32", shard, None, coordinates=numeric)
    assert group["label"].chunks == (n,) and group["synset"].chunks == (shard,)
    np.testing.assert_array_equal(group["global_index"][:], numeric["global_index"])
    values = np.ones((shard, 3), dtype=np.float32)
    output = ShardOutput(url, 1, shard, {"a": values})
    output.ready(0, shard)
    with pytest.raises(ChunkOwnershipError, match=r"label is stored in chunks of 40 samples"):
        output.commit({"label": numeric["label"][shard : 2 * shard]})
    assert not zarr.open_group(url, mode="r")["a"][shard : 2 * shard].any()  # nothing of the shard became visible
    assert not list((tmp_path / "whole.zarr").rglob(f"*{PARTIAL_SUFFIX}"))
    output = ShardOutput(url, 1, shard, {"a": values})
    output.ready(0, shard)
    text = {name: values for name, values in _coords(shard, shard).items() if name in ("synset", "class_name", "source_file")}
    output.commit(text)
    np.testing.assert_array_equal(zarr.open_group(url, mode="r")["synset"][shard : 2 * shard], text["synset"])


def test_a_task_of_a_run_whose_store_was_rebuilt_writes_nothing(tmp_path):
    """A task that outlived its run (Ctrl-C, a lost scheduler: it goes on computing on a worker) commits into the
    store only while it is the generation its run prepared; a store rebuilt at that path by another run is left
    as that run made it."""
    from schemas.store_identity import OutputReplacedError, check_output_generation
    from schemas.store_lifecycle import prepare_store

    url = str(tmp_path / "s.zarr")
    create = lambda group: create_activation_arrays(group, 128, {"a": (2, 2, 2)}, "float16", 64, None, {"a": {"long_name": "layer a"}})  # noqa: E731
    first = prepare_store(url, "imzarr.test/1", {"run": 1}, 2, create, False)
    rebuilt = prepare_store(url, "imzarr.test/1", {"run": 2}, 2, create, True)  # another run's --overwrite
    assert first.generation and rebuilt.generation and first.generation != rebuilt.generation
    check_output_generation(url, rebuilt.generation)
    stale = ShardOutput(url, 1, 64, {"a": np.full((64, 2, 2, 2), 2, dtype=np.float16)}, first.generation)
    stale.ready(0, 64)
    with pytest.raises(OutputReplacedError, match=rf"s\.zarr: the store was replaced since this task's run prepared it \(generation {first.generation}, now {rebuilt.generation}\)"):
        stale.commit({"synset": np.array(["n00000000"] * 64, dtype=object)})
    np.testing.assert_array_equal(zarr.open_array(url, path="a", mode="r")[64:], 0)  # nothing of the stale task's
    assert zarr.open_array(url, path="synset", mode="r")[64:].tolist() == [""] * 64
    assert not list((tmp_path / "s.zarr").rglob(f"*{PARTIAL_SUFFIX}"))
    ours = ShardOutput(url, 1, 64, {"a": np.full((64, 2, 2, 2), 3, dtype=np.float16)}, rebuilt.generation)
    ours.ready(0, 64)
    ours.commit({})
    np.testing.assert_array_equal(zarr.open_array(url, path="a", mode="r")[64:], 3)

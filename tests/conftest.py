"""Fixtures made once per test process (session scope: once per pytest-xdist worker) or once per module where a
test may change what it gets. Tests copy a shared store before damaging it. Plain helpers live in tests/support/."""

import os
from pathlib import Path

import pytest

from tests.support.locations import EDM_REFERENCE


@pytest.fixture(autouse=True)
def environment_as_it_was():
    """Every test leaves the process environment as it found it. dask.distributed's LocalCluster sets
    OMP_NUM_THREADS=1 (and MKL_…, OPENBLAS_…, MALLOC_TRIM_THRESHOLD_) in it for its workers and never takes them
    back: the child processes of later tests (a reference run, say) then ran torch on one thread, whose float32
    sums differ in their last bits from this process's two (README "What values depend on")."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def edm_reference() -> dict:
    """The EDM reference fixture (../shared/fixtures/README.md): config, state dict, inputs and expected outputs."""
    import torch

    return torch.load(EDM_REFERENCE, weights_only=True)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server per test process, on a free 127.0.0.1 port (tests/support/s3_server.py), stopped at the end."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from tests.support.s3_server import local_s3

    with local_s3() as server:
        yield server


@pytest.fixture(scope="module")
def s3(s3_server, request):
    """The S3 server with a bucket of the test module's own (named after it), so modules never see each other's keys."""
    from tests.support.s3_server import with_bucket

    return with_bucket(s3_server, "imzarr-" + request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:50])


@pytest.fixture()
def edm_modules(monkeypatch: pytest.MonkeyPatch):
    """Importable stand-ins for torch_utils.persistence and dnnlib.util (EDM's pickles name them); the
    reconstructor runs the pickle's module_src, as the real one does (tests/support/edm_pickles.py builds such pickles)."""
    import sys
    import types

    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})  # what the real one does
        return meta["class_name"]

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence = persistence

    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    util.EasyDict = EasyDict
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.util = util
    for name, module in [("torch_utils", torch_utils), ("torch_utils.persistence", persistence),
                         ("dnnlib", dnnlib), ("dnnlib.util", util)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    return _reconstruct_persistent_obj, EasyDict


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """The embedded sample's NPZ shards (converter/sample.py): train/ holds 2 files of 60 images (64 px, 10
    classes), val/ 10 images. Read only: a test that changes them copies them first."""
    from converter.sample import write_sample_shards

    root = tmp_path_factory.mktemp("sample-shards")
    write_sample_shards(root, per_shard=60, train_shards=2, val_size=10)
    return root


@pytest.fixture(scope="session")
def image_store(sample_shards, tmp_path_factory) -> str:
    """The sample's 120 training images converted with a shuffle (seed 5; 32-image shards, 8-image inner chunks).
    Read only: a test that damages or rewrites it copies it first."""
    from converter.convert import ConvertOptions, convert
    from converter.sources.npz import open_npz_source

    url = str(tmp_path_factory.mktemp("images") / "images.zarr")
    convert(open_npz_source([sample_shards / "train"]), ConvertOptions(url, shuffle_seed=5, shard_size=32, inner_chunk=8))
    return url

from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.support.commands import run_imzarr  # noqa: F401  (also a plain import for tests)
from tests.support.locations import EDM_REFERENCE, REPO  # noqa: F401


@pytest.fixture(scope="session")
def edm_reference() -> dict:
    """The EDM reference fixture (../shared/fixtures/README.md): config, state dict, inputs and expected outputs."""
    import torch

    return torch.load(EDM_REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free 127.0.0.1 port for one test module (tests/support/s3_server.py), stopped after it."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from tests.support.s3_server import local_s3

    with local_s3() as server:
        yield server


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


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> str:
    """A small shuffled image store of the embedded sample (120 images, 32-image shards, 8-image inner chunks)."""
    from converter.convert import ConvertOptions, convert
    from converter.sample import write_sample_shards
    from converter.sources.npz import open_npz_source

    root = tmp_path_factory.mktemp("images")
    write_sample_shards(root / "npz", per_shard=60, train_shards=2, val_size=10)
    url = str(root / "images.zarr")
    convert(open_npz_source([root / "npz" / "train"]), ConvertOptions(url, shuffle_seed=5, shard_size=32, inner_chunk=8))
    return url

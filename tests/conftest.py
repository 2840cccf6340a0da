from pathlib import Path

import numpy as np
import pytest
import zarr

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def stores_identical(a: str, b: str, ignore_attrs: tuple[str, ...] = ()) -> None:
    """Assert two stores hold the same arrays (values, dtypes, chunking) and the same group attributes (but
    `ignore_attrs`, and `generation`: an id drawn at random each time a store is created, so that a rewrite is
    told apart from the store a reader opened — schemas/store_identity.py)."""
    ignore_attrs = (*ignore_attrs, "generation")
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert {k: v for k, v in ga.attrs.items() if k not in ignore_attrs} == {k: v for k, v in gb.attrs.items() if k not in ignore_attrs}
    names_a, names_b = sorted(k for k, _ in ga.arrays()), sorted(k for k, _ in gb.arrays())
    assert names_a == names_b
    for name in names_a:
        x, y = ga[name], gb[name]
        assert x.shape == y.shape and x.dtype == y.dtype and x.chunks == y.chunks, name
        np.testing.assert_array_equal(x[:], y[:], err_msg=name)
    assert sorted(k for k, _ in ga.groups()) == sorted(k for k, _ in gb.groups())


EDM_REFERENCE = FIXTURES / "edm_small_A.pt"


@pytest.fixture(scope="session")
def edm_reference() -> dict:
    """The EDM reference fixture (../shared/fixtures/README.md): config, state dict, inputs and expected outputs."""
    import torch

    return torch.load(EDM_REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free 127.0.0.1 port for one test module (tests/s3_server.py), stopped after it."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from tests.s3_server import local_s3

    with local_s3() as server:
        yield server

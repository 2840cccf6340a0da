import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def stores_identical(a: str, b: str) -> None:
    """Assert two stores hold the same arrays (values, dtypes, chunking) and the same group attributes."""
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert dict(ga.attrs) == dict(gb.attrs)
    names_a, names_b = sorted(k for k, _ in ga.arrays()), sorted(k for k, _ in gb.arrays())
    assert names_a == names_b
    for name in names_a:
        x, y = ga[name], gb[name]
        assert x.shape == y.shape and x.dtype == y.dtype and x.chunks == y.chunks, name
        np.testing.assert_array_equal(x[:], y[:], err_msg=name)
    assert sorted(k for k, _ in ga.groups()) == sorted(k for k, _ in gb.groups())


@pytest.fixture
def python_exe() -> str:
    return sys.executable

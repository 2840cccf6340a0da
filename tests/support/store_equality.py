"""Two stores hold the same data: the check behind every "a rerun gives an identical store" test."""

import numpy as np
import zarr


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

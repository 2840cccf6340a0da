"""Test and benchmark data made at run time: photo-like images and shard files in the real formats."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from extractor.activation_writer import create_activation_arrays
from schemas.activation_store import ACTIVATION_SCHEMA, RECONSTRUCTION_VAR, activation_array_attrs, activation_group_attrs
from schemas.classes import class_table
from schemas.store_identity import GENERATION_ATTR, new_generation


def photo_like(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 3, S, S) smooth gradients, blobs and mild noise: compresses like photos, unlike random bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    step = 256
    for a in range(0, n, step):
        b = min(n, a + step)
        m = b - a
        coef = rng.uniform(-1, 1, (m, 3, 4, 1, 1)).astype(np.float32)
        img = 0.5 + 0.25 * (coef[:, :, 0] * yy + coef[:, :, 1] * xx + coef[:, :, 2] * np.sin(6 * yy * (1 + coef[:, :, 3])))
        cy, cx, r = rng.uniform(0.2, 0.8, (3, m, 1, 1, 1)).astype(np.float32)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
        img += 0.3 * blob * rng.uniform(-1, 1, (m, 3, 1, 1)).astype(np.float32)
        img += rng.normal(0, 0.03, img.shape).astype(np.float32)
        out[a:b] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


# Three classes of a JPEG tree: tench 0, kit fox 278, volcano 980.
TREE_WNIDS = ("n01440764", "n02119789", "n09472597")


def write_mixed_jpeg_tree(root: Path, sizes: tuple[tuple[int, int], ...], photo: Callable[[int, int, int], np.ndarray]) -> Path:
    """Class folders of TREE_WNIDS holding what real ImageNet trees hold: an RGB JPEG, a CMYK JPEG, a grayscale
    JPEG, a PNG named .JPEG and a small image, of the five (height, width) `sizes`, drawn by `photo(h, w, seed)`."""
    from PIL import Image

    for wnid in TREE_WNIDS:
        (root / wnid).mkdir(parents=True, exist_ok=True)
    plain, cmyk, gray, png, small = (photo(h, w, seed) for seed, (h, w) in enumerate(sizes, start=1))
    Image.fromarray(plain).save(root / TREE_WNIDS[0] / "a_plain.JPEG", quality=90)
    Image.fromarray(cmyk).convert("CMYK").save(root / TREE_WNIDS[0] / "b_cmyk.JPEG", quality=90)
    Image.fromarray(gray).convert("L").save(root / TREE_WNIDS[1] / "c_gray.JPEG", quality=90)
    Image.fromarray(png).save(root / TREE_WNIDS[1] / "d_png.JPEG", format="PNG")
    Image.fromarray(small).save(root / TREE_WNIDS[2] / "e_small.JPEG", quality=90)
    return root


def write_npz_shard(path: Path, images: np.ndarray, labels: np.ndarray, compressed: bool = False, mean: bool = True) -> Path:
    """A downsampled-ImageNet shard: data (N, 3·S·S) planes, labels int64, mean float64 (train files)."""
    data = images.reshape(images.shape[0], int(np.prod(images.shape[1:])))
    arrays = {"data": data, "labels": labels.astype(np.int64)}
    if mean:
        arrays["mean"] = data.mean(axis=0)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def write_adm_samples(path: Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    """An ADM/guided-diffusion sample file: arr_0 uint8 NHWC, optional arr_1 sorted-order labels."""
    arrays = {"arr_0": np.ascontiguousarray(images.transpose(0, 2, 3, 1))}
    if labels is not None:
        arrays["arr_1"] = labels.astype(np.int64)
    np.savez(path, **arrays)
    return path


def write_pickle_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A legacy extension-less batch: a pickled dict with data and a list of labels."""
    with open(path, "wb") as f:
        pickle.dump({"data": images.reshape(images.shape[0], -1), "labels": labels.tolist()}, f, protocol=4)
    return path


def write_activation_store(
    url: str,
    labels: np.ndarray,
    make_block: Callable[[int, int], np.ndarray],
    per_sample_shape: tuple[int, ...],
    layer: str = "features",
    dtype: str = "float16",
    shard: int = 4096,
    pooling: str | None = None,
    reconstructions: np.ndarray | None = None,
    sigma: float = 80.0,
    model: dict | None = None,
    described: bool = True,
    source: dict | None = None,
) -> str:
    """A complete, valid activation store with one layer (and optional uint8 reconstructions); values come
    from make_block(start, stop), one shard at a time. `described`: with the per-array attributes and
    `Conventions`, as stores are written now; False makes a store as written before them. `source`: the image
    store the samples come from (its `url`), sample i being its image i; default: none ("synthetic")."""
    n = int(labels.size)
    pooling = pooling or ("mean" if len(per_sample_shape) == 1 else "none")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    rec_shape = None if reconstructions is None else tuple(reconstructions.shape[1:])
    create_activation_arrays(group, n, {layer: tuple(per_sample_shape)}, dtype, shard, rec_shape)
    if described:
        layers = {layer: f"synthetic.{layer}"}
        for name, attrs in activation_array_attrs(layers, pooling, sigma, dtype, reconstructions is not None).items():
            group[name].update_attributes(attrs)
    for a in range(0, n, shard):  # whole shards per write: partial-shard writes are read-modify-write
        b = min(n, a + shard)
        group[layer][a:b] = np.asarray(make_block(a, b)).astype(dtype)
        if reconstructions is not None:
            group[RECONSTRUCTION_VAR][a:b] = reconstructions[a:b]
    table = class_table()
    positions = np.arange(n, dtype=np.int64)
    group["label"][:] = labels.astype(np.int16)
    group["synset"][:] = table.synsets_of(labels)
    group["class_name"][:] = table.names_of(labels)
    group["global_index"][:] = positions
    group["source_file"][:] = np.full(n, "synthetic", dtype=object)
    group["source_sample"][:] = positions
    group.attrs.update(
        {
            "schema": ACTIVATION_SCHEMA,
            "complete": True,
            "model": model or {"name": "synthetic", "trained": False},
            "layers": {layer: f"synthetic.{layer}"},
            "sigma": sigma,
            "noise": None,
            "pooling": pooling,
            "dtypes": {"storage": dtype, "compute": "fp32"},
            "selection": {"count": n},
            "source": source or {"url": "synthetic", "schema": None, "fingerprint": None, "source_format": None},
            "versions": {},
            "device": "cpu",
            GENERATION_ATTR: new_generation(),  # as every writer's store has (schemas/store_lifecycle.py)
            **(activation_group_attrs(labels) if described else {}),
        }
    )
    with warnings.catch_warnings():
        # As the extractor does: v3 stores open in xarray without warnings only with consolidated metadata.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(url)
    return url


def read_shard_rows(paths) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, S, S) and sorted-WNID labels of downsampled-ImageNet shards in the given order, decoded
    from the R, G, B planes of each row: what a store made from those shards must hold."""
    from schemas.classes import class_table

    table = class_table()
    images, labels = [], []
    for path in paths:
        with np.load(path) as shard:
            size = int(round((shard["data"].shape[1] / 3) ** 0.5))
            images.append(shard["data"].reshape(-1, 3, size, size))
            labels.append(table.from_downsampled(shard["labels"]))
    return np.concatenate(images), np.concatenate(labels)


def image_features(images: np.ndarray) -> np.ndarray:
    """Small stand-in features of uint8 (n, 3, S, S) images: per-channel means and spreads and the channel means
    of each image quarter, in [0, 1] (18 values: similar images get similar features)."""
    x = images.astype(np.float32) / 255.0
    n, _, s, _ = x.shape
    h = s // 2
    quarters = [x[:, :, a : a + h, b : b + h].mean(axis=(2, 3)) for a in (0, h) for b in (0, h)]
    return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3)), *quarters], axis=1)


def write_compare_run(root: Path, num_classes: int, per_class: int, size: int = 64, trained: bool = False, copies: int = 1) -> dict[str, str]:
    """A whole compare run made at test time: real and generated image stores (`per_class` photo-like images of
    each of the first `num_classes` classes), their activation stores of `image_features` that name the image
    stores as their source, and the compare report. The first `copies` generated images of every class are exact
    copies of real images of that class (what the report's nearest-neighbour check must find).
    Returns the urls: real_images, fake_images, real_acts, fake_acts, compare."""
    from converter.convert import ConvertOptions, convert
    from converter.sources.npz import open_npz_source
    from extractor.analysis.compare import compare_stores
    from schemas.image_store import validate_image_store

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = class_table()
    classes = np.repeat(np.arange(num_classes), per_class)
    ds_labels = np.array([table.downsampled_labels[c] for c in range(num_classes)], dtype=np.int64)[classes]
    real = photo_like(classes.size, size, seed=1)
    fake = photo_like(classes.size, size, seed=2)
    for k in range(min(copies, per_class)):
        fake[k::per_class] = real[per_class - 1 - k :: per_class]  # the last real images of each class, copied
    model = {"name": "synthetic", "preset": "synthetic", "sha256": "5e" * 32, "trained": trained}
    urls: dict[str, str] = {}
    for role, images in (("real", real), ("fake", fake)):
        shard = write_npz_shard(root / f"{role}_data.npz", images, ds_labels, mean=False)
        url = str(root / f"{role}_images.zarr")
        convert(open_npz_source([shard]), ConvertOptions(url, shard_size=4096, inner_chunk=64))
        store = validate_image_store(url)
        labels = np.asarray(store.coordinate("label")).astype(np.int64)
        feats = image_features(store.read(0, store.num_samples))
        acts = str(root / f"{role}_acts.zarr")
        source = {"url": url, "schema": store.attrs.get("schema"), "fingerprint": store.attrs.get("settings_fingerprint"), "source_format": "npz"}
        write_activation_store(acts, labels, lambda a, b, f=feats: f[a:b], (feats.shape[1],), layer="feat", dtype="float32", model=model, source=source, sigma=0.5)
        urls[f"{role}_images"], urls[f"{role}_acts"] = url, acts
    urls["compare"] = str(root / "compare.zarr")
    compare_stores(urls["real_acts"], urls["fake_acts"], "feat", k=3, output=urls["compare"])
    return urls

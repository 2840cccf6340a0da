"""`ds.imzarr`: class-aware selection, grouping and provenance on datasets opened with `xr.open_zarr`.

Works on image stores and activation stores (dim `sample`, int16 `label`) and on compare reports (one row per
class along `label`, or along `class` in reports written before issue 26). Registered with xarray when the
`extractor` package is imported (extractor/__init__.py); importing it never imports torch.

Classes are named as `--classes` names them (extractor.selection.resolve_class: WNID, class name, or 0-based
label); a store's own folder-named classes are taken as the store's `classes` attribute records them.

Why an accessor: the plain idioms stop where xarray does. `ds.sel(synset=…)` needs an index on `synset`, which
costs decoding every string at open (1.3–2 s at 1.28 M samples); `ds.where(…)` masks every data variable with
NaN, which numpy's StringDType (`synset`, `class_name`, `source_file`) cannot hold; grouping needs the labels in
memory. The accessor loads only the int16 `label` array (2.5 MB at 1.28 M samples) and indexes by position.
"""

from __future__ import annotations

import os
from typing import Any, Hashable, Iterable

import numpy as np
import xarray as xr

from extractor.selection import CLASS_ENTRIES_HINT, SelectionError, class_wnids, listed_entries
from schemas.classes import class_table
from schemas.compare_report import REPORT_DIMS
from schemas.errors import ImzarrError
from schemas.image_store import SAMPLE_DIM
from schemas.output_paths import is_relative_path, local_path
from schemas.variable_attrs import TEXT_VARIABLES, classes_lookup

ACCESSOR_NAME = "imzarr"
LABEL = "label"
ClassNames = str | int | Iterable[str | int]


class AccessorError(ImzarrError):
    """A dataset or request the imzarr accessor cannot serve (not an imzarr store, no such class, no provenance)."""


class ProvenanceError(AccessorError):
    """The image store an activation store was computed from is not found, or is not the one at its recorded URL."""


class ImzarrAccessor:
    """`ds.imzarr`: see the module docstring. Results keep xarray's laziness: only `label` is ever loaded."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds
        # The labels read, and the variable they were read from: xarray keeps one accessor per dataset object,
        # and `ds.coords["label"] = …` changes that object in place (a new variable under the old name).
        self._sample_labels: np.ndarray | None = None
        self._labels_from: Any = None

    # ------------------------------------------------------------ what the dataset is

    @property
    def class_dim(self) -> str:
        """`sample` for stores (one row per sample), `label` (or `class`) for compare reports."""
        if SAMPLE_DIM in self._ds.dims:
            return SAMPLE_DIM
        for dim in REPORT_DIMS:
            if dim in self._ds.dims:
                return dim
        raise AccessorError(f"dataset has dims {sorted(map(str, self._ds.dims))}: not an imzarr store or compare report (no 'sample', 'label' or 'class' dim)")

    def labels(self) -> np.ndarray:
        """The label of every row, int64, in memory (read once per label variable; never the text arrays)."""
        dim = self.class_dim
        name = LABEL if dim == SAMPLE_DIM else dim
        if name not in self._ds.variables:
            raise AccessorError(f"dataset has no {name!r} variable to take classes from")
        variable = self._ds.variables[name]
        if self._sample_labels is None or self._labels_from is not variable:
            self._sample_labels = np.asarray(variable.values, dtype=np.int64)
            self._labels_from = variable
        return self._sample_labels

    def class_table(self) -> dict[int, tuple[str, str]]:
        """{label: (WNID, class name)} of the labels this dataset records (its `classes` attribute, else the
        ImageNet-1k table for the labels present). A label present but not recorded (a dataset concatenated from
        stores of other classes keeps the first one's attribute) is named by its rows' own `synset` and
        `class_name` where the dataset has them (one row read per such label), else by the ImageNet-1k table."""
        recorded = classes_lookup(dict(self._ds.attrs))
        table = class_table()
        present = np.unique(self.labels())
        if not recorded:  # a store written before the attribute: its labels are ImageNet-1k's, read from the table
            return {int(i): (table.wnids[i], table.names[i]) for i in present if 0 <= i < len(table.wnids)}
        missing = [int(i) for i in present if int(i) not in recorded and i >= 0]
        if not missing:
            return recorded
        found = dict(recorded)
        if self.class_dim == SAMPLE_DIM and {"synset", "class_name"} <= set(self._ds.variables):
            first_rows = [int(np.argmax(self.labels() == label)) for label in missing]
            picked = self._ds[["synset", "class_name"]].isel({SAMPLE_DIM: first_rows}).compute()
            found.update({label: (str(w), str(n)) for label, w, n in zip(missing, picked.synset.values, picked.class_name.values)})
        else:
            found.update({i: (table.wnids[i], table.names[i]) for i in missing if i < len(table.wnids)})
        return found

    # ------------------------------------------------------------ selection

    def label_of(self, classes: ClassNames) -> list[int]:
        """Labels of classes given by WNID, class name or label, in the given order; with `--classes`' rules: a
        comma-separated string or a sequence, no empty list or entry, no class named twice (`tench, 0`)."""
        entries = listed_entries(classes, "classes", CLASS_ENTRIES_HINT)
        if entries is None:
            raise SelectionError(f"classes: none given; {CLASS_ENTRIES_HINT}")
        table = self.class_table()
        by_wnid = {wnid: label for label, (wnid, _) in table.items()}
        wnids = class_wnids(entries, table)
        return [by_wnid.get(wnid, class_table().index_of_wnid(wnid) if class_table().is_wnid(wnid) else -1) for wnid in wnids]

    def mask(self, classes: ClassNames) -> xr.DataArray:
        """In-memory boolean along the row dim: True where the row belongs to one of `classes`."""
        wanted = self.label_of(classes)
        rows = np.isin(self.labels(), wanted)
        missing = [label for label in wanted if label not in set(self.labels()[rows].tolist())]
        if missing:
            table, imagenet = self.class_table(), class_table()
            named = [
                "{} ({})".format(*table[m]) if m in table else f"{imagenet.wnids[m]} ({imagenet.names[m]})" if 0 <= m < len(imagenet.wnids) else str(m)
                for m in missing
            ]
            raise SelectionError(f"classes {named} have no rows in this dataset")
        return xr.DataArray(rows, dims=(self.class_dim,))

    def sel(self, classes: ClassNames) -> xr.Dataset:
        """The rows of the named classes, in dataset order (lazy: an isel by position; the stored dtypes kept for
        `to_zarr`, the store's chunk layout not: see `rows_selected`)."""
        return rows_selected(self._ds.isel({self.class_dim: np.flatnonzero(self.mask(classes).values)}))

    def where(self, cond: xr.DataArray, drop: bool = False) -> xr.Dataset:
        """`Dataset.where` that the text variables do not break: numeric variables are masked with NaN, and keep
        their stored encoding but the chunk layout (float16 stays float16 in `to_zarr`); the text variables (synset, class_name,
        source_file) describe the row as the `label` coordinate does, and stay as they are. `cond` may be lazy:
        it is computed first (one value per row for the usual `ds.label == 278`). With `drop`, rows (and other
        positions) where `cond` is all False go, as in `sel`."""
        # The store's chunk layout goes either way: a store opened whole is chunked by its inner chunks, not its
        # shards, so writing it with the shard layout recorded would be refused too.
        ds = rows_selected(self._ds)
        cond = cond.compute()
        if drop:
            keep = {dim: np.flatnonzero(cond.any([d for d in cond.dims if d != dim]).values) for dim in cond.dims}
            ds, cond = ds.isel(keep), cond.isel(keep)
            if bool(cond.all()):
                return ds  # nothing left to mask (a condition per row)
        masked = {}
        for name, var in ds.data_vars.items():
            if name in TEXT_VARIABLES or var.dtype.kind in "TUSO" or not set(cond.dims) <= set(var.dims):
                continue
            masked[name] = var.where(cond)
            masked[name].encoding = dict(var.encoding)
        return ds.assign(masked)

    # ------------------------------------------------------------ per class

    def with_class_names(self, obj: xr.Dataset | xr.DataArray) -> Any:
        """`obj` (with a `label` dim, e.g. a groupby result) with `synset` and `class_name` coordinates on it."""
        table = self.class_table()
        labels = np.asarray(obj[LABEL].values, dtype=np.int64)
        return obj.assign_coords(
            synset=(LABEL, np.array([table.get(int(i), ("", ""))[0] for i in labels], dtype=object)),
            class_name=(LABEL, np.array([table.get(int(i), ("", ""))[1] for i in labels], dtype=object)),
        )

    def groupby_class(self) -> Any:
        """`groupby("label")` over the numeric variables, with the labels in memory (so flox reduces the dask
        chunks in one pass). Name the result with `with_class_names`."""
        self._refuse_report("groupby_class")
        numeric = self._ds.drop_vars([name for name in TEXT_VARIABLES if name in self._ds.data_vars])
        return numeric.assign_coords({LABEL: (SAMPLE_DIM, self.labels().astype(np.int16))}).groupby(LABEL)

    def _refuse_report(self, method: str) -> None:
        if self.class_dim != SAMPLE_DIM:
            raise AccessorError(f"{method}(): a compare report already has one row per class (its counts are n_real and n_fake); use it as it is")

    def _per_class(self, var: Hashable, how: str, **kwargs: Any) -> xr.DataArray:
        self._refuse_report(f"class_{how}")
        if var not in self._ds.data_vars:
            raise AccessorError(f"no variable {var!r}; variables: {sorted(map(str, self._ds.data_vars))}")
        if self._ds[var].dtype.kind not in "biuf":
            numeric = sorted(str(name) for name, v in self._ds.data_vars.items() if v.dtype.kind in "biuf")
            raise AccessorError(f"class_{how}({var!r}): {var} holds {self._ds[var].dtype} values, not numbers; numeric variables: {numeric}")
        if self.labels().size == 0:
            raise AccessorError(f"class_{how}({var!r}): the dataset has no rows (an empty selection)")
        grouped = self._ds[var].assign_coords({LABEL: (SAMPLE_DIM, self.labels().astype(np.int16))}).groupby(LABEL)
        return self.with_class_names(getattr(grouped, how)(**kwargs))

    def class_mean(self, var: Hashable) -> xr.DataArray:
        """Per-class mean of `var` along `sample` (dims `label`, …), with `synset` and `class_name`; lazy."""
        return self._per_class(var, "mean")

    def class_std(self, var: Hashable, ddof: int = 0) -> xr.DataArray:
        """Per-class standard deviation of `var` along `sample` (ddof as numpy's), with names; lazy."""
        return self._per_class(var, "std", ddof=ddof)

    def class_count(self) -> xr.DataArray:
        """Rows per class (dim `label`), with `synset` and `class_name`; in memory."""
        self._refuse_report("class_count")
        labels, counts = np.unique(self.labels(), return_counts=True)
        return self.with_class_names(xr.DataArray(counts, dims=(LABEL,), coords={LABEL: labels.astype(np.int16)}, name="count"))

    # ------------------------------------------------------------ dtypes and provenance

    def as_float32(self) -> xr.Dataset:
        """The dataset with every float64 variable as float32, lazily: float16 layers then take twice their
        stored size in memory instead of four times (xarray decodes their CF `scale_factor` to float64)."""
        return self._ds.assign({name: var.astype(np.float32) for name, var in self._ds.data_vars.items() if var.dtype == np.float64})

    def images(self, store: str | None = None, **open_kwargs: Any) -> xr.Dataset:
        """The image-store rows these rows were computed from, aligned row for row (lazy). An activation store
        finds its images through its `source` attribute and `source_sample` coordinate (`store` overrides the
        recorded URL, e.g. after moving it); an image store returns itself. `open_kwargs` go to xr.open_zarr."""
        ds = self._ds
        if self.class_dim != SAMPLE_DIM:
            raise AccessorError("a compare report has no samples; use images() on the activation stores it compared")
        if "source_sample" not in ds.variables:
            return ds  # an image store: its rows are the images
        source = dict(ds.attrs.get("source") or {})
        url = store or source.get("url")
        if not url:
            raise ProvenanceError("this activation store records no source image store; pass images(store=URL)")
        where = local_path(url)
        if where is not None and not os.path.exists(where):
            if store:
                raise ProvenanceError(f"{url}: no image store there")
            # Stores written before provenance was recorded as absolute paths hold the path as it was typed.
            relative = " (recorded relative to the folder the store was made from)" if is_relative_path(url) else ""
            raise ProvenanceError(f"{url}: the image store these activations were computed from is not there{relative}; pass images(store=PATH) where it is now")
        images = xr.open_zarr(url, **open_kwargs)
        recorded = source.get("fingerprint")
        if recorded is not None and images.attrs.get("settings_fingerprint") != recorded:
            raise ProvenanceError(f"{url}: not the image store these activations were computed from (its settings fingerprint differs from the recorded one)")
        positions = np.asarray(ds.variables["source_sample"].values, dtype=np.int64)
        picked = images.isel({SAMPLE_DIM: positions})
        # The rows' own record of their images: a dataset concatenated from stores of different image stores keeps
        # only the first one's `source`, and its other rows would be read from the wrong store. Unshuffled stores
        # all have global_index = position, so the label is compared too (one int per row, both in memory already).
        for name in ("global_index", LABEL):
            if name not in ds.variables or name not in picked.variables:
                continue
            ours, theirs = np.asarray(ds.variables[name].values), np.asarray(picked.variables[name].values)
            wrong = np.flatnonzero(ours != theirs)
            if wrong.size:
                raise ProvenanceError(
                    f"{url}: {wrong.size} of {positions.size} rows are not this image store's ({name} {int(ours[wrong[0]])} at row "
                    f"{int(wrong[0])}, the image store has {int(theirs[wrong[0]])} there): rows computed from another image store, "
                    "as in a concatenation of activation stores? Take each store's images() before concatenating"
                )
        return picked


# Encoding that describes the whole store's layout: a selection of its rows no longer fits it, and `to_zarr`
# would refuse the result (its dask chunks straddle the recorded chunks), or with safe_chunks=False let two
# tasks write one shard at once and lose rows. Dropped, the output is chunked as the selection is.
LAYOUT_ENCODING = ("chunks", "shards", "preferred_chunks")


def rows_selected(ds: xr.Dataset) -> xr.Dataset:
    """A selection of a store's rows with each variable's encoding minus the store's chunk layout (dtype, scale
    factor and fill value kept). A variable stored without a CF `_FillValue` is written without one again: xarray
    would add NaN, and a float16 layer with both `_FillValue` and `scale_factor` then reopens as float16, whose
    reductions accumulate in float16 (a mean of 0.0 for -0.015, nan for a sum), where the store's own layer
    reopens as float64."""
    out = ds.copy()
    for var in out.variables.values():
        encoding = {k: v for k, v in var.encoding.items() if k not in LAYOUT_ENCODING}
        if "dtype" in encoding and "_FillValue" not in encoding:
            encoding["_FillValue"] = None
        var.encoding = encoding
    return out


def register() -> None:
    """Register `ds.imzarr` with xarray (again is harmless)."""
    if not hasattr(xr.Dataset, ACCESSOR_NAME):
        xr.register_dataset_accessor(ACCESSOR_NAME)(ImzarrAccessor)


register()  # where this module is the first to import xarray (`from extractor.accessor import …` first thing)

"""The extractor's front door, for Python (a notebook) and for the `imzarr` commands alike: each command has one
entry here that takes its options as keywords and applies every default and refusal: `extract` (and `dry_run`),
`generate`, `layer_table`, `compare`, `stats`, `report_site`, `show`; `features` runs an in-memory batch through
the same forward path and returns a labelled `xr.Dataset`.

Importing this module stays light (no torch, no xarray): the command line builds its parsers from the choices
below, and each entry imports what it runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from extractor.preset_layers import check_preset_layers
from extractor.selection import SelectionError, class_entries, layer_entries, resolve_class
from schemas.vocabulary import COMPUTE_DTYPE_NAMES, POOL_MODES, PRESET_NAMES, STORAGE_DTYPES
from schemas.classes import NUM_CLASSES, class_table
from schemas.errors import ImzarrError, PathError
from schemas.keywords import keyword_names, refuse_unknown_keywords, takes_keywords_of
from schemas.option_values import whole_numbers
from schemas.output_paths import OutputOverlapsInputError, absolute_url, check_output_location, check_png_output, local_file_url_to_path

if TYPE_CHECKING:
    import xarray as xr

    from extractor.analysis.compare import CompareOptions
    from extractor.analysis.reference_statistics import StatisticsResult
    from extractor.analysis.report import SiteResult
    from extractor.extraction import ExtractOptions, ExtractResult
    from extractor.forward import PreparedForward, RunOptions
    from extractor.generation import GenerateOptions, GenerateResult
    from extractor.models import ModelSpec

__all__ = [
    "COMPUTE_DTYPE_NAMES", "POOL_MODES", "PRESET_NAMES", "STORAGE_DTYPES", "CompareRun", "FeatureInputError", "LayerTable", "SheetOutputError",
    "compare", "compare_options", "dry_run", "extract", "extract_options", "features", "generate", "generate_options", "layer_table",
    "report_site", "show", "statistics_options", "stats",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    # The options builders of compare and stats, imported on first use (they import torch).
    if name == "compare_options":
        from extractor.analysis.compare import compare_options

        return compare_options
    if name == "statistics_options":
        from extractor.analysis.reference_statistics import statistics_options

        return statistics_options
    raise AttributeError(f"module 'extractor.api' has no attribute {name!r}")


class SheetOutputError(PathError):
    """A contact sheet's output that is not a PNG file name (an existing folder, another format's suffix)."""


class GenerateOutputError(PathError):
    """generate's two outputs overlapping: the activation store given as, inside or around the image store."""


class LayersNeededError(ImzarrError):
    """An extraction or features call that names no layer to capture."""


class FeatureInputError(ImzarrError, ValueError):
    """`features` was handed images or labels of the wrong shape (a ValueError too, as numpy's shape errors are)."""


class ModelChoiceError(ImzarrError, ValueError):
    """Neither or both of a preset and a checkpoint name the network."""


def model_spec(preset: str | None = None, checkpoint: str | None = None) -> ModelSpec:
    """The network a command names: a preset or a checkpoint, exactly one (refused before torch is imported)."""
    if preset is None and checkpoint is None:
        raise ModelChoiceError("name the network: preset=NAME (--preset) or checkpoint=PATH (--checkpoint)")
    if preset is not None and checkpoint is not None:
        raise ModelChoiceError(f"preset={preset!r} and checkpoint={os.fspath(checkpoint)!r} both name a network: give one of them")
    from extractor.models import ModelSpec

    return ModelSpec(preset=preset) if checkpoint is None else ModelSpec(checkpoint=str(checkpoint))


def as_model_spec(model: str | ModelSpec) -> ModelSpec:
    """A preset name (`tiny-random`, `fid-inception`, …), a checkpoint path, or a ModelSpec."""
    if not isinstance(model, str):
        return model
    return model_spec(preset=model) if model in PRESET_NAMES else model_spec(checkpoint=model)


# What `features` passes on to ForwardSettings (the rest of it is fixed there, or its own parameters).
FEATURE_FORWARD_KEYWORDS = ("sigma", "noise_seed", "noise", "class_free", "compute_dtype")


def run_options(
    batch_size: int | None = None,
    device: str = "auto",
    scheduler: str | None = None,
    workers: int = 2,
    resources: str | None = None,
    overwrite: bool = False,
    shard_size: int | None = None,
    compile: bool = False,
) -> RunOptions:
    """How an extraction or generation runs (values checked here, before anything is read or written)."""
    from extractor.forward import RunOptions
    from schemas.task_runner import SchedulerSpec, parse_resources

    scheduled = SchedulerSpec(scheduler, workers, parse_resources(resources))
    return RunOptions(batch_size=batch_size, device=device, scheduler=scheduled, overwrite=overwrite, shard_size=shard_size, compile=compile)


def _positions(indices: Sequence[int] | np.ndarray) -> tuple[Any, ...]:
    """Store positions given in Python, as given (checked as a file's are, by selection.checked_positions)."""
    listed = np.asarray(indices)
    if listed.ndim != 1:
        raise SelectionError(f"indices: expected a file of store positions or a 1-d sequence of them, got shape {listed.shape}")
    return tuple(listed.tolist())


def extract_options(
    store: str,
    output: str,
    *,
    layers: str | Sequence[str] | None = None,  # required: checked after the keywords, so that `layer=` is named
    preset: str | None = None,
    checkpoint: str | None = None,
    sigma: float | None = None,
    seed: int | None = None,
    noise: bool = True,
    class_free: bool = False,
    pool: str = "none",
    dtype: str = "float16",
    compute_dtype: str = "auto",
    reconstructions: bool = False,
    num_samples: int | None = None,
    indices: str | os.PathLike[str] | Sequence[int] | np.ndarray | None = None,
    classes: str | int | Sequence[str | int] | None = None,
    per_class: int | None = None,
    **run: Any,
) -> ExtractOptions:
    """One extraction's options from `imzarr extract`'s options as keywords (`run`: run_options' keywords), checked
    before anything is read. One `seed` serves the noise and --per-class sampling. `indices`: a file of store
    positions (as --indices), or the positions themselves (a sequence or array)."""
    refuse_unknown_keywords(run, keyword_names(extract_options) + keyword_names(run_options), "extract")
    positions = None
    if indices is not None and not isinstance(indices, (str, os.PathLike)):
        positions, indices = _positions(indices), None
    store, output, checkpoint, indices = local_file_url_to_path([str(store), str(output), checkpoint, indices])  # file:// URLs as local paths
    if run.get("scheduler"):  # tasks run on workers, whose working folders are their own: paths that mean the same there
        store, output, checkpoint = (absolute_url(path) for path in (store, output, checkpoint))
    layers = layer_entries(layers)
    if not layers:
        raise LayersNeededError("extract() needs layers=[…] (--layers): layer names or module paths, e.g. layers=['midblock']; `imzarr layers` lists them")
    check_preset_layers(preset, layers)  # before torch is imported: a typo answers at once
    check_output_location(output, [store])
    from extractor.extraction import ExtractOptions
    from extractor.forward import ForwardSettings
    from extractor.selection import SelectionSpec

    forward = ForwardSettings(
        model=model_spec(preset, checkpoint), layers=layers, sigma=sigma, noise_seed=seed, noise=noise,
        class_free=class_free, pool=pool, storage_dtype=dtype, compute_dtype=compute_dtype, reconstructions=reconstructions,
    )  # fmt: skip
    selection = SelectionSpec(num_samples=num_samples, indices_file=indices, positions=positions, classes=class_entries(classes), per_class=per_class, seed=seed or 0)
    return ExtractOptions(str(store), str(output), forward, selection, run_options(**run))


def extract(store: str, output: str, **options: Any) -> ExtractResult:
    """Image store → activation store of the named layers; keywords and defaults as `imzarr extract`'s options
    (`extract_options` lists them: layers=[…] is required)."""
    built = extract_options(store, output, **options)  # its refusals come before torch is imported
    from extractor.extraction import extract as run_extraction

    return run_extraction(built)


def dry_run(store: str, output: str, **options: Any) -> str:
    """One batch of `extract` through the hooks: a table of shapes, sizes and memory; writes nothing."""
    built = extract_options(store, output, **options)
    from extractor.dry_run import dry_run_table

    return dry_run_table(built)


def generate_options(
    output: str,
    *,
    preset: str | None = None,
    checkpoint: str | None = None,
    per_class: int | None = None,
    num_samples: int | None = None,
    classes: str | int | Sequence[str | int] | None = None,
    seed: int | None = None,
    sigma: float | None = None,
    layers: str | Sequence[str] | None = None,
    activations_out: str | None = None,
    pool: str = "none",
    dtype: str = "float16",
    compute_dtype: str = "auto",
    **run: Any,
) -> GenerateOptions:
    """One generation's options from `imzarr generate`'s options as keywords (`run`: run_options' keywords).
    `classes`: WNIDs, class names or 0-based indices (default: every class)."""
    refuse_unknown_keywords(run, keyword_names(generate_options) + keyword_names(run_options), "generate")
    output, activations_out, checkpoint = local_file_url_to_path([str(output), activations_out, checkpoint])
    if run.get("scheduler"):  # tasks run on workers, whose working folders are their own
        output, activations_out, checkpoint = (absolute_url(path) for path in (output, activations_out, checkpoint))
    layers = layer_entries(layers)
    check_preset_layers(preset, layers)  # before torch is imported: a typo answers at once
    check_output_location(output)
    if activations_out:
        try:
            check_output_location(activations_out, [output])
        except OutputOverlapsInputError:
            raise GenerateOutputError(activations_out, f"--activations-out must be a store apart from -o {output} (not the same path, nor inside or around it)") from None
    from extractor.forward import ForwardSettings
    from extractor.generation import GenerateOptions

    forward = ForwardSettings(
        model=model_spec(preset, checkpoint), layers=layers, sigma=sigma, noise_seed=seed, pool=pool,
        storage_dtype=dtype, compute_dtype=compute_dtype,
    )  # fmt: skip
    return GenerateOptions(output, forward, per_class, num_samples, class_entries(classes), activations_out, run_options(**run))


def generate(output: str, **options: Any) -> GenerateResult:
    """Sample the one-step generator into an image store at `output`; keywords and defaults as `imzarr generate`'s
    options (`generate_options` lists them: per_class=K or num_samples=N is required)."""
    built = generate_options(output, **options)
    from extractor.generation import generate as run_generation

    return run_generation(built)


for _builder in (extract_options, generate_options):
    takes_keywords_of(_builder, run_options)
takes_keywords_of(extract, extract_options)
takes_keywords_of(dry_run, extract_options)
takes_keywords_of(generate, generate_options)


@dataclass(frozen=True)
class LayerTable:
    """A network's layers: (name or alias, module path, output shape per sample), and whether it was trained."""

    model: str
    trained: bool
    rows: list[tuple[str, str, tuple[int, ...]]]


def layer_table(preset: str | None = None, checkpoint: str | None = None) -> LayerTable:
    """Every layer name (module paths and aliases) of a network with its output shape for one sample (on the CPU)."""
    from extractor.models import cached_model, describe_layers, resolve_layer
    from extractor.models.registry import preset_architecture

    spec = model_spec(preset, checkpoint)
    if spec.preset is not None:
        # Names and shapes need no weights: a preset's seeded weights took 15 s to draw for dmd2-imagenet64.
        module, name, trained = preset_architecture(spec.preset), spec.preset, False
    else:
        loaded = cached_model(spec, "cpu")
        module, name, trained = loaded.module, loaded.name, loaded.trained
    rows = [(layer, resolve_layer(module, layer), tuple(shape[1:])) for layer, shape in describe_layers(module)]
    return LayerTable(name, trained, rows)


@dataclass(frozen=True)
class CompareRun:
    """A comparison's report (written to its `output` when given) and the report site written with it, if any."""

    report: xr.Dataset
    options: CompareOptions
    site: SiteResult | None


def compare(
    stores: str | Sequence[str], *, report: str | None = None, per_class_thumbnails: int | None = None, log: TextIO | None = None, **options: Any
) -> CompareRun:
    """`imzarr compare`: REAL GENERATED activation stores (or GENERATED with reference=…) compared on one layer;
    keywords as `compare_options` takes them. Every output (output, plot, the `report` site folder) is claimed
    before anything is read."""
    from extractor.analysis.compare import compare as run_compare
    from extractor.analysis.compare import compare_options
    from extractor.analysis.report import claim_site_output, write_report_site

    refuse_unknown_keywords(options, [*keyword_names(compare_options), "report", "per_class_thumbnails", "log"], "compare")
    stores = [stores] if isinstance(stores, str) else list(stores)
    report = local_file_url_to_path(report)
    if report is not None and options.get("reference") is not None:
        from extractor.analysis.compare import CompareError

        raise CompareError("--report shows real and generated samples side by side; saved statistics (--reference) have no samples to show")
    inputs = stores + [p for p in (options.get("reference"), options.get("output"), options.get("plot")) if p]
    claim_site_output(report, inputs, per_class_thumbnails)
    checked = compare_options(stores, **options)
    result = run_compare(checked, log=log)
    site = None if report is None else write_report_site(checked.output or result, report, per_class=per_class_thumbnails, log=log or sys.stderr)
    return CompareRun(result, checked, site)


def format_report_table(report: xr.Dataset) -> str:
    """The overall figures and the worst classes of a compare report, as a text table."""
    from extractor.analysis.compare import format_report_table as table

    return table(report)


def report_site(compare: str | xr.Dataset, output: str, *, per_class_thumbnails: int | None = None, log: TextIO | None = None, **unknown: Any) -> SiteResult:
    """`imzarr report`: a compare report (its store, or the Dataset) → a static web site in the folder `output`;
    `per_class_thumbnails` real and generated samples per class (default 16)."""
    refuse_unknown_keywords(unknown, keyword_names(report_site), "report_site")
    from extractor.analysis.report import write_report_site

    return write_report_site(local_file_url_to_path(compare), local_file_url_to_path(output), per_class=per_class_thumbnails, log=log)


def stats(store: str, *, log: TextIO | None = None, **options: Any) -> StatisticsResult:
    """`imzarr stats`: reference statistics (mu, sigma) of a layer and/or the store's Inception Score; keywords as
    `statistics_options` takes them."""
    from extractor.analysis.reference_statistics import run_statistics, statistics_options

    refuse_unknown_keywords(options, keyword_names(statistics_options), "stats")
    return run_statistics(statistics_options(store, **options), log=log)


def show(store: str, output: str = "grid.png", *, classes: str | Sequence[str | int] | None = None, per_class: int = 8, max_classes: int = 10, **unknown: Any) -> str:
    """A contact sheet (PNG) of a store's images, one row per class: an image store's images, or an activation
    store's reconstructions. The output is a file, never an input or inside one."""
    refuse_unknown_keywords(unknown, keyword_names(show), "show")
    from extractor.analysis.contact_sheet import sheet_counts, write_contact_sheet

    sheet_counts(per_class, max_classes)  # before any store is opened
    store, output = local_file_url_to_path([store, output])
    check_output_location(output, [store])
    check_png_output(output, "a contact sheet", "grid.png", SheetOutputError)
    from schemas.activation_store import RECONSTRUCTION_VAR
    from schemas.remote_storage import open_store_group

    variable = RECONSTRUCTION_VAR if RECONSTRUCTION_VAR in open_store_group(store) else "image"
    return write_contact_sheet(store, output, classes=classes, per_class=per_class, max_classes=max_classes, variable=variable)


def class_labels(labels: np.ndarray | Sequence[int | str]) -> np.ndarray:
    """Labels as 0-based class indices (int64): ints as given (-1: unknown), or WNIDs / class names / index text."""
    listed = labels if isinstance(labels, np.ndarray) else list(labels)
    if isinstance(listed, np.ndarray) and listed.dtype.kind in "iu":
        return listed.astype(np.int64)
    table = class_table()
    resolved = [int(v) if isinstance(v, (int, np.integer)) else table.index_of_wnid(resolve_class(str(v))) for v in listed]
    return np.asarray(resolved, dtype=np.int64)


def features(
    images: np.ndarray,
    labels: np.ndarray | Sequence[int | str] | None = None,
    *,
    layers: Sequence[str] | None = None,  # required, as `model`: checked after the keywords, so that a typo is named
    model: str | ModelSpec | None = None,
    pool: str = "none",
    device: str = "auto",
    batch_size: int = 64,
    global_index: np.ndarray | Sequence[int] | None = None,
    **forward: Any,
) -> xr.Dataset:
    """uint8 images (N, 3, S, S) → {layer: activations} (float32) as an xr.Dataset on dim `sample`, labelled
    like a store. `model`: a preset name, a checkpoint path or a ModelSpec; `forward`: sigma, noise_seed, noise,
    class_free, compute_dtype as ForwardSettings takes them (None/unset: the same defaults as `extract`).

    Each image gets the noise of its `global_index` (the image store's coordinate; default 0..N-1), as its row of a
    store does through `extract`: the same images give the same values here and there, any rows of a store too."""
    import xarray as xr

    from extractor.forward import ForwardSettings, PreparedForward
    from extractor.store_attrs import class_conditioning
    from schemas.activation_store import layer_dims

    refuse_unknown_keywords(forward, FEATURE_FORWARD_KEYWORDS + tuple(keyword_names(features)), "features")
    if not layer_entries(layers) or model is None:
        raise LayersNeededError("features() needs layers=[…] and model= (a preset name, a checkpoint path or a ModelSpec), e.g. layers=['midblock'], model='tiny-random'")
    batch_size = whole_numbers({"batch_size": (batch_size, 1)}, FeatureInputError)["batch_size"]
    given = np.asarray(images)
    if given.dtype != np.uint8 or given.ndim != 4 or given.shape[1] != 3:
        # A cast would turn [0, 1] floats (ImageStoreDataset(output="float")) into 0s and 1s without a word.
        raise FeatureInputError(f"images must be uint8 (N, 3, S, S) with values 0..255, as the image store holds them, got {given.dtype} of shape {given.shape}")
    images = np.ascontiguousarray(given)
    n = images.shape[0]
    labels = np.full(n, -1, dtype=np.int64) if labels is None else class_labels(labels)
    if labels.shape != (n,):
        raise FeatureInputError(f"labels must hold one label per image ({n}), got shape {labels.shape}")
    outside = labels[(labels < -1) | (labels >= NUM_CLASSES)]
    if outside.size:
        raise FeatureInputError(f"labels: label index {int(outside[0])} is outside 0..{NUM_CLASSES - 1} (-1: unknown)")
    index = np.arange(n, dtype=np.int64) if global_index is None else np.asarray(global_index)
    if index.shape != (n,) or index.dtype.kind not in "iu" or (index < 0).any():
        raise FeatureInputError(f"global_index must hold one non-negative integer per image ({n}), got {index.dtype} of shape {index.shape}")
    settings = ForwardSettings(model=as_model_spec(model), layers=layer_entries(layers), pool=pool, storage_dtype="float32", **forward)
    with PreparedForward(settings, device, images.shape[-1], batch_size=batch_size) as prepared:
        values = _run_features(prepared, images, labels, index.astype(np.int64))
        fwd, loaded, shapes, paths, pooling = prepared.settings, prepared.loaded, prepared.layer_shapes, prepared.paths, prepared.layer_pooling
    table = class_table()
    known = labels >= 0
    synsets = np.where(known, table.synsets_of(np.maximum(labels, 0)), "")
    names = np.where(known, table.names_of(np.maximum(labels, 0)), "")
    data_vars = {
        name: (layer_dims(name, pooled=len(shapes[name]) == 1), values[name], {"module_path": paths[name], "pooling": pooling[name]})
        for name in fwd.layers
    }
    coords = {"label": ("sample", labels.astype(np.int16)), "synset": ("sample", synsets), "class_name": ("sample", names), "global_index": ("sample", index.astype(np.int64))}
    attrs = {"model": loaded.name, "trained": loaded.trained, "sha256": loaded.sha256, "sigma": fwd.sigma, "noise_seed": fwd.noise_seed,
             "class_conditioning": class_conditioning(fwd, loaded, int((labels < 0).sum())), "unknown_labels": int((labels < 0).sum())}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _run_features(prepared: PreparedForward, images: np.ndarray, labels: np.ndarray, global_index: np.ndarray) -> dict[str, np.ndarray]:
    """Every image through the prepared forward, batch by batch, each with the noise of its global index."""
    import torch

    from extractor.shard_forward import ShardForward

    n = images.shape[0]
    runner = ShardForward(prepared, n, output_name=None)
    try:
        for a in range(0, n, prepared.batch_size):
            b = min(n, a + prepared.batch_size)
            runner.run(a, torch.from_numpy(images[a:b]), labels[a:b], global_index[a:b])
        runner.finish()
        return {name: np.array(runner.buffers[name]) for name in prepared.settings.layers}
    finally:
        runner.release()

"""Streams an image store's samples through a model and writes the activations of named layers.

Each task owns one output shard of every variable: it reads its samples from the image store, runs them through
the one forward path (`extractor.forward`: one model per worker process, the per-device lock held around the
forward only), streams the shard to disk from a writer thread, and records itself done once it is written.
Values depend only on the sample (noise is a function of (seed, global_index), `extractor.noise`), never on
batch size, chunking, order, device or worker count. Diffusion networks get the image scaled to [-1, 1] plus
σ·noise and the one-hot label; feature networks (`fid-inception`, `dinov2-*`) get the clean image and
preprocess it as their protocol says, so σ, noise, class labels and reconstructions are refused for them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import dask
import numpy as np
import torch
import zarr

from extractor.activation_writer import TEXT_COORDINATES, create_activation_arrays, default_shard_size
from schemas.shard_writer import ShardOutput
from extractor.forward import (
    MAX_AUTO_BATCH,
    MAX_AUTO_FEATURE_BATCH,
    ExtractionError,
    ForwardSettings,
    RunOptions,
    ShardForward,
    auto_batch_size,
    check_compute_on_device,
    check_forward_settings,
    forward_batch,
    measured_bytes_per_sample,
    per_sample_bytes,
    pinned_images,
    prepare_module,
    resolve_device,
    resolve_forward,
)
from extractor.models import LoadedModel, cached_model, resolve_layer
from extractor.noise import NOISE_RECIPE, noise_attrs, recorded_noise_recipe
from extractor.selection import SelectionSpec, describe_selection, select_samples
from schemas.activation_store import (
    ACTIVATION_LAYOUT_VERSION,
    ACTIVATION_SCHEMA,
    FEATURE_KIND,
    RECONSTRUCTION_VAR,
    activation_array_attrs,
    activation_group_attrs,
)
from schemas.errors import ImzarrError, RunFailedError, output_write_errors
from schemas.image_store import ImageStore, validate_image_store
from schemas.progress_report import ProgressReport
from schemas.remote_storage import remote_storage_errors
from schemas.store_identity import GENERATION_ATTR, StoreIdentity, check_unchanged, reader_lease
from schemas.store_integrity import record_checksums, record_unit_checksums
from schemas.store_lifecycle import finalize_store, inspect_existing, mark_done, path_state, prepare_store, read_done
from schemas.task_runner import check_scheduler_reachable, run_tasks


class NoiseRecipeError(ImzarrError):
    """An existing store's noise was made with another recipe than this version's."""


@dataclass(frozen=True)
class ExtractOptions:
    """One extraction: input image store, output activation store, what decides the values, how it runs."""

    store: str
    output: str
    forward: ForwardSettings
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    run: RunOptions = field(default_factory=RunOptions)


@dataclass(frozen=True)
class ExtractResult:
    url: str
    num_samples: int
    already_complete: bool
    seconds: float
    trained: bool


def load_forward(settings: ForwardSettings, device: str, seed_picks_samples: bool = False) -> tuple[LoadedModel, ForwardSettings]:
    """The network on `device` (once per process) and the settings that run on it: defaults filled in for its
    kind, options it cannot take refused, the rest checked (`seed_picks_samples`: see resolve_forward)."""
    loaded = cached_model(settings.model, device)
    fwd = resolve_forward(settings, loaded, device, seed_picks_samples)
    check_forward_settings(fwd)
    return loaded, fwd


def check_resolution(loaded: LoadedModel, resolution: int, where: str) -> None:
    """A diffusion network takes one image side only; feature networks resize every input to their own."""
    if loaded.kind != FEATURE_KIND and loaded.resolution != resolution:
        raise ExtractionError(f"{where}: images are {resolution}×{resolution}, the model takes {loaded.resolution}×{loaded.resolution}")


def probe_layers(loaded: LoadedModel, fwd: ForwardSettings, device: str, resolution: int, batch: int = 1) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Per-sample output shape and module path of every requested layer, from one real forward on `batch`
    images of side `resolution` (the image store's: feature networks resize any side to their own)."""
    paths = {name: resolve_layer(loaded.module, name) for name in fwd.layers}  # UnknownLayerError lists valid names
    x = torch.zeros(batch, 3, resolution, resolution, device=device)
    acts, _ = forward_batch(loaded.module, x, None, fwd, device, need_output=False)
    return {name: tuple(a.shape[1:]) for name, a in acts.items()}, paths


def choose_batch_size(loaded: LoadedModel, fwd: ForwardSettings, shapes: dict[str, tuple[int, ...]], device: str, resolution: int, compile_blocks: bool = False) -> int:
    """The batch when none is given: 64 on CPU; on CUDA from free memory and a measured forward of a few samples
    (at most MAX_AUTO_FEATURE_BATCH for feature networks)."""
    if not device.startswith("cuda"):
        return auto_batch_size(0, device)
    module = prepare_module(loaded.module, device, compile_blocks)
    planned = measured_bytes_per_sample(module, fwd, resolution, loaded.label_dim, device) + per_sample_bytes(shapes, resolution, fwd.storage_dtype)
    return auto_batch_size(planned, device, MAX_AUTO_FEATURE_BATCH if loaded.kind == FEATURE_KIND else MAX_AUTO_BATCH)


def check_noise_recipe(url: str, noise_seed: int | None, overwrite: bool) -> None:
    """Refuse to resume or confirm a store whose noise another recipe made (its values could not be matched)."""
    if overwrite or noise_seed is None or path_state(url) != "store":
        return
    recorded = recorded_noise_recipe(dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs))
    if recorded is not None and recorded != NOISE_RECIPE:
        raise NoiseRecipeError(
            f"{url}: its noise was made with {recorded!r}, this version makes {NOISE_RECIPE!r}; "
            "it cannot be resumed or confirmed: pass --overwrite to replace it"
        )


def extraction_settings(options: ExtractOptions, fwd: ForwardSettings, image_attrs: dict, selection: dict, model_sha: str) -> dict[str, Any]:
    """What decides a store's values and layout (its fingerprint): a feature network's store has no σ."""
    settings = {
        "schema": ACTIVATION_SCHEMA,
        "layout": ACTIVATION_LAYOUT_VERSION,
        "model_sha256": model_sha,
        "layers": list(fwd.layers),
        "noise_seed": fwd.noise_seed,
        "class_free": fwd.class_free,
        "pool": fwd.pool,
        "storage_dtype": fwd.storage_dtype,
        "compute_dtype": fwd.compute_dtype,
        "reconstructions": fwd.reconstructions,
        "selection": selection,
        "source_fingerprint": image_attrs.get("settings_fingerprint"),
        "shard_size": options.run.shard_size,
    }
    if fwd.sigma is not None:
        settings["sigma"] = fwd.sigma
    if fwd.noised:  # only then: stores made without noise keep their fingerprint
        settings["noise_recipe"] = NOISE_RECIPE
    return settings


def network_input(loaded: LoadedModel, fwd: ForwardSettings) -> str:
    """What the network was fed, as schemas.activation_store.NETWORK_INPUTS names it (extraction)."""
    if loaded.kind == FEATURE_KIND:
        return "feature"
    return "noised" if fwd.noised else "clean"


def extract(options: ExtractOptions) -> ExtractResult:
    """Run (or resume, or confirm) one extraction; idempotent for the same inputs and settings.

    The input store is leased while the run reads it, and each task and the finish check it is still the store
    that was opened (schemas/store_identity.py): one rewritten meanwhile fails the run, never completing it."""
    # A full disk names the store (a shard's write names no file); a stalled object store names its URL.
    with output_write_errors(options.output), remote_storage_errors(), reader_lease(options.store):
        return _extract(options)


def _extract(options: ExtractOptions) -> ExtractResult:
    started = time.monotonic()
    run = options.run
    device = resolve_device(run.device)
    check_compute_on_device(options.forward, device)
    check_scheduler_reachable(run.scheduler)  # before a model is built or any output exists
    if not options.forward.layers:
        raise ExtractionError("no layers requested (--layers L1,L2)")
    images = validate_image_store(options.store)
    source = StoreIdentity.of(options.store, images.attrs)
    labels, synsets = images.coordinate("label"), images.coordinate("synset")
    chosen = select_samples(options.selection, labels, synsets)  # before the network is built: a bad selection is quick
    loaded, fwd = load_forward(options.forward, device, options.selection.per_class is not None)
    check_resolution(loaded, images.resolution, options.store)
    shapes, paths = probe_layers(loaded, fwd, device, images.resolution)
    selection = describe_selection(options.selection, chosen)
    settings = extraction_settings(options, fwd, images.attrs, selection, loaded.sha256)
    if source.generation is not None:  # only then: stores made from inputs without one keep their fingerprint
        settings["source_generation"] = source.generation
    check_noise_recipe(options.output, fwd.noise_seed, run.overwrite)
    if inspect_existing(options.output, ACTIVATION_SCHEMA, settings, run.overwrite) == "complete":
        return ExtractResult(options.output, int(chosen.size), True, time.monotonic() - started, loaded.trained)
    shard = run.shard_size or default_shard_size(shapes, fwd.storage_dtype)
    n = int(chosen.size)
    num_shards = -(-n // shard)
    rec_shape = (3, images.resolution, images.resolution) if fwd.reconstructions else None
    coords = {
        "label": labels[chosen].astype(np.int16),
        "synset": synsets[chosen],
        "class_name": images.coordinate("class_name")[chosen],
        "global_index": images.coordinate("global_index")[chosen],
        "source_file": images.coordinate("source_file")[chosen],
        "source_sample": chosen,
    }
    array_attrs = activation_array_attrs(paths, fwd.pool, fwd.sigma, fwd.storage_dtype, fwd.reconstructions, network_input(loaded, fwd))
    state = prepare_store(
        options.output,
        ACTIVATION_SCHEMA,
        settings,
        num_shards,
        # The numeric coordinates are known for the whole selection: written once, whole, with the arrays.
        lambda g: create_activation_arrays(g, n, shapes, fwd.storage_dtype, shard, rec_shape, array_attrs, coordinates=coords),
        run.overwrite,
        initial_attrs={**extraction_attrs(options, fwd, images, loaded, paths, selection, device), **activation_group_attrs(coords["label"])},
    )
    if state.already_complete:  # another run finished it while this one started: nothing to do, nothing to finish
        return ExtractResult(options.output, n, True, time.monotonic() - started, loaded.trained)
    batch = run.batch_size or choose_batch_size(loaded, fwd, shapes, device, images.resolution, run.compile)
    tasks = [
        dask.delayed(extract_shard, pure=False)(
            ShardTask(options.store, options.output, k, k * shard, {c: v[k * shard : (k + 1) * shard] for c, v in coords.items()},
                      fwd, shapes, batch, run.device, run.compile, images.resolution, source)
        )
        for k in state.pending
    ]
    done = n - sum(min(shard, n - k * shard) for k in state.pending)
    receipts = run_tasks(tasks, run.scheduler, ProgressReport(n, f"extracting {options.output}"), done)
    integrity_pass(options.output, num_shards, receipts)
    check_unchanged(source)  # what was read at the start (labels, coordinates) is still the store's too
    record_checksums(options.output)
    finalize_store(options.output, {})
    return ExtractResult(options.output, n, False, time.monotonic() - started, loaded.trained)


def nonfinite_summary(receipts: list[dict]) -> str | None:
    """'first bad sample i; name: samples [...]; …' over every task's NaN/Inf rows, or None when there are none."""
    found: dict[str, list[int]] = {}
    for receipt in receipts:
        for name, samples in ((receipt or {}).get("nonfinite") or {}).items():
            found.setdefault(name, []).extend(samples)
    if not found:
        return None
    first = min(min(samples) for samples in found.values())
    parts = [f"{name}: samples {sorted(samples)[:10]}{' …' if len(samples) > 10 else ''}" for name, samples in found.items()]
    return f"first bad sample {first}; " + "; ".join(parts[:5])


class IntegrityError(RunFailedError):
    """A run that produced NaN/Inf values or left shards unwritten: the store stays incomplete; exit code 1."""


def integrity_pass(url: str, num_shards: int, receipts: list[dict], what: str = "the activations") -> None:
    """Refuse to finish a store whose tasks found NaN/Inf, or whose shards are not all recorded done."""
    summary = nonfinite_summary(receipts)
    if summary:
        raise IntegrityError(f"{url}: NaN/Inf in {what}, store left incomplete (nothing marked complete) — {summary}")
    done = read_done(url, num_shards)
    if not done.all():
        raise IntegrityError(f"{url}: shards {np.flatnonzero(~done)[:10].tolist()} were not written; re-run to finish")


def model_attrs(fwd: ForwardSettings, loaded: LoadedModel) -> dict[str, Any]:
    """How a store records the network that made its values (schemas/activation_store.py, "The network")."""
    return {
        "name": loaded.name,
        "family": loaded.family,
        "kind": loaded.kind,
        "preset": loaded.preset,
        "checkpoint": fwd.model.checkpoint,
        "sha256": loaded.sha256,
        "config": {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in loaded.config.items()},
        "trained": loaded.trained,
        "preprocessing": loaded.preprocessing,
        "resolution": loaded.resolution,
    }


def versions() -> dict[str, str]:
    return {"imzarr": version("imzarr"), "torch": torch.__version__, "zarr": zarr.__version__, "numpy": np.__version__}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def run_attrs(fwd: ForwardSettings, loaded: LoadedModel, paths: dict[str, str], device: str) -> dict[str, Any]:
    """Attributes every activation store carries: model, layers, σ, noise, pooling, dtypes, versions, device."""
    if loaded.kind == FEATURE_KIND:
        conditioning = "none (a feature network)"
    else:
        conditioning = "none (zero labels)" if fwd.class_free else "one-hot of label"
    return {
        "model": model_attrs(fwd, loaded),
        "layers": paths,
        "sigma": fwd.sigma,
        "noise": noise_attrs(fwd.noise_seed) if fwd.noised else None,
        "class_conditioning": conditioning,
        "pooling": fwd.pool,
        "dtypes": {"storage": fwd.storage_dtype, "compute": fwd.compute_dtype},
        "versions": versions(),
        "device": device_name(device),
    }


def extraction_attrs(options: ExtractOptions, fwd: ForwardSettings, images: ImageStore, loaded: LoadedModel, paths: dict[str, str], selection: dict, device: str) -> dict[str, Any]:
    """An extraction store's group attributes: the run's, how images became the network's input, selection, source."""
    if loaded.kind == FEATURE_KIND:
        scaling = loaded.preprocessing
    else:
        scaling = "uint8 / 127.5 - 1, then + sigma * noise" if fwd.noised else "uint8 / 127.5 - 1 (no noise)"
    return {
        **run_attrs(fwd, loaded, paths, device),
        "input_scaling": scaling,
        "selection": selection,
        "source": {"url": options.store, "schema": images.attrs.get("schema"), "fingerprint": images.attrs.get("settings_fingerprint"),
                   "generation": images.attrs.get(GENERATION_ATTR), "source_format": images.attrs.get("source_format")},
    }


@dataclass(frozen=True)
class ShardTask:
    """One unit of work, cheap to pickle: the model is named, never shipped."""

    store: str
    output: str
    shard: int
    start: int
    coords: dict[str, np.ndarray]
    forward: ForwardSettings  # compute dtype resolved
    layer_shapes: dict[str, tuple[int, ...]]
    batch_size: int
    device: str
    compile: bool = False
    resolution: int = 64  # side of the image store's images
    source: StoreIdentity | None = None  # the image store as the run opened it: checked before and after reading


# The input stores this process has opened: zarr's open_group reads metadata through its event loop, which cost
# every task a few milliseconds that the other worker waited on (~5 % of a CPU extraction's worker time,
# measured), and each task read the shard indexes again. Keyed by the store's generation (else its settings
# fingerprint) as well, so a store converted anew in this process is opened anew.
# A store with neither (not made by imzarr) is opened per task; a forked process opens its own; the last few stay
# open.
_OPENED_IMAGE_STORES: dict[tuple[int, str, str], ImageStore] = {}
_KEPT_OPEN = 4


def opened_image_store(url: str, identity: StoreIdentity | None) -> ImageStore:
    """The image store at `url`, opened once per process and generation (its reads are thread-safe)."""
    which = None if identity is None else identity.generation or identity.fingerprint
    if which is None:
        return ImageStore(url, zarr.open_group(url, mode="r"))
    key = (os.getpid(), url, which)
    store = _OPENED_IMAGE_STORES.get(key)
    if store is None:
        store = _OPENED_IMAGE_STORES[key] = ImageStore(url, zarr.open_group(url, mode="r"))
        for stale in list(_OPENED_IMAGE_STORES)[:-_KEPT_OPEN]:
            _OPENED_IMAGE_STORES.pop(stale, None)
    return store


def extract_shard(task: ShardTask) -> dict:
    """Read one output shard's samples, run them in batches, write the shard (streamed), record it done."""
    device = resolve_device(task.device)
    loaded = cached_model(task.forward.model, device)
    prepare_module(loaded.module, device, task.compile)
    if task.source is not None:
        check_unchanged(task.source)
    store = opened_image_store(task.store, task.source)
    coords = task.coords
    images = pinned_images(store.take(coords["source_sample"]), device)
    if task.source is not None:
        check_unchanged(task.source)  # the rows just read are the opened store's: only then may they be marked done
    labels, gidx = coords["label"], coords["global_index"]
    n = images.shape[0]
    runner = ShardForward(loaded, task.forward, device, n, task.layer_shapes, RECONSTRUCTION_VAR if task.forward.reconstructions else None,
                          resolution=task.resolution)
    output = ShardOutput(task.output, task.shard, task.start, runner.buffers)
    runner.on_ready = output.ready
    try:
        for a in range(0, n, task.batch_size):
            b = min(n, a + task.batch_size)
            runner.run(a, images[a:b], labels[a:b], gidx[a:b])
        runner.finish()
        nonfinite = runner.nonfinite(task.start)
        if nonfinite:
            output.abort()
            return {"images": int(n), "nonfinite": nonfinite}
        output.commit({name: coords[name] for name in TEXT_COORDINATES})  # the numeric ones were written whole
    except BaseException:
        output.abort()
        raise
    finally:
        runner.release()  # the writer thread is done with the buffers either way
    record_unit_checksums(task.output, task.shard, output.checksums)
    mark_done(task.output, task.shard)
    return {"images": int(n)}

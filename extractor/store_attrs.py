"""What an activation or generated image store records about the run that made it (group attributes), and the
check that an existing store's noise is this version's recipe (schemas/activation_store.py, "The network")."""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
import zarr

from extractor.forward import ForwardSettings
from extractor.models import LoadedModel
from extractor.models.checkpoints import resolve_checkpoint_file
from extractor.noise import NOISE_RECIPE, noise_attrs, recorded_noise_recipe
from schemas.activation_store import FEATURE_KIND
from schemas.errors import ImzarrError
from schemas.classes import NUM_CLASSES
from schemas.image_store import FOLDER_LABEL_ORDER, ImageStore
from schemas.output_paths import absolute_url, is_remote_url
from schemas.store_identity import GENERATION_ATTR
from schemas.store_lifecycle import path_state


class NoiseRecipeError(ImzarrError):
    """An existing store's noise was made with another recipe than this version's."""


def check_noise_recipe(url: str, noise_seed: int | None, overwrite: bool, recipe: str = NOISE_RECIPE) -> None:
    """Refuse to resume or confirm a store whose noise another recipe made (its values could not be matched)."""
    if overwrite or noise_seed is None or path_state(url) != "store":
        return
    recorded = recorded_noise_recipe(dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs))
    if recorded is not None and recorded != recipe:
        raise NoiseRecipeError(
            f"{url}: its noise was made with {recorded!r}, this version makes {recipe!r}; "
            "it cannot be resumed or confirmed: pass --overwrite to replace it"
        )


def record_batch_size(url: str, batch_size: int) -> None:
    """Add the batch size this run computes with to the store's `batch_sizes` (once each). Not a setting: values
    depend on it only through float rounding (CPU kernels sum in other orders), so a resume may use another, and
    the store says which it was made with; on CUDA it is chosen from the free memory, and known only here."""
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    sizes = [int(size) for size in group.attrs.get("batch_sizes") or []]
    if int(batch_size) not in sizes:
        group.update_attributes({"batch_sizes": [*sizes, int(batch_size)]})


def model_attrs(fwd: ForwardSettings, loaded: LoadedModel) -> dict[str, Any]:
    """How a store records the network that made its values (schemas/activation_store.py, "The network")."""
    return {
        "name": loaded.name,
        "family": loaded.family,
        "kind": loaded.kind,
        "preset": loaded.preset,
        "checkpoint": absolute_url(fwd.model.checkpoint),  # as typed it would name another file from another folder
        "sha256": loaded.sha256,
        "config": {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in loaded.config.items()},
        "trained": loaded.trained,
        "preprocessing": loaded.preprocessing,
        "resolution": loaded.resolution,
    }


def model_source(fwd: ForwardSettings, loaded: LoadedModel) -> dict[str, Any]:
    """A generated store's one source, the network: for a checkpoint the file whose sha256 is recorded (inside a
    checkpoint folder, the generator's file), absolute, with its size; for a preset its name (no file, size 0)."""
    fingerprint = "sha256:" + loaded.sha256
    if fwd.model.checkpoint is None:
        return {"path": loaded.name, "size": 0, "fingerprint": fingerprint}
    file = resolve_checkpoint_file(fwd.model.checkpoint)
    if is_remote_url(str(file)):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(file))
        return {"path": str(file), "size": int(fs.info(path).get("size") or 0), "fingerprint": fingerprint}
    return {"path": str(absolute_url(str(file))), "size": os.path.getsize(file), "fingerprint": fingerprint}


def versions() -> dict[str, str]:
    """The versions of imzarr and of the libraries that decide the values."""
    return {"imzarr": version("imzarr"), "torch": torch.__version__, "zarr": zarr.__version__, "numpy": np.__version__}


def device_name(device: str) -> str:
    """The card a run computed on (its CUDA name), or cpu."""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def class_conditioning(fwd: ForwardSettings, loaded: LoadedModel, unlabelled: int = 0) -> str:
    """What the network was given as class labels (a label of -1, unknown, as zeros: said where any sample had one)."""
    if loaded.kind == FEATURE_KIND:
        return "none (a feature network)"
    if not loaded.label_dim:
        return "none (an unconditional network)"
    if fwd.class_free:
        return "none (zero labels)"
    return f"one-hot of label; zeros for the {unlabelled:,} samples without a label (-1)" if unlabelled else "one-hot of label"


def takes_class_labels(fwd: ForwardSettings, loaded: LoadedModel) -> bool:
    """Whether this run gives the network class labels: a class-conditional diffusion network, not run class-free."""
    return loaded.kind != FEATURE_KIND and bool(loaded.label_dim) and not fwd.class_free


class FolderLabelsError(ImzarrError):
    """An ImageNet-conditioned network asked to run on a store whose labels number its folders, not ImageNet classes."""


class LabelRangeError(ImzarrError):
    """Selected samples whose labels lie beyond the classes the network is conditioned on (its `label_dim`)."""


def refuse_unfit_labels(store: str, images: ImageStore, fwd: ForwardSettings, loaded: LoadedModel, labels: np.ndarray) -> None:
    """Refuse labels the class-conditional network would take for other classes, before any output exists
    (`class_free` runs every sample without a class, so anything goes then):

    - a store whose labels number its own folders (`convert jpeg --label-from-folders`) with a network of the
      1000 ImageNet classes, which would take folder k for ImageNet class k (folder 0 as tench); a network of
      other classes (trained on these folders, say) takes them as they are;
    - a label at or beyond the network's `label_dim` (a 10-class checkpoint given ImageNet's kit fox, 278), which
      has no one-hot column."""
    if not takes_class_labels(fwd, loaded):
        return
    if images.attrs.get("source_label_order") == FOLDER_LABEL_ORDER and loaded.label_dim == NUM_CLASSES:
        raise FolderLabelsError(
            f"{store}: its labels number its folders (convert jpeg --label-from-folders), not ImageNet classes, and this "
            "network is conditioned on the 1000 ImageNet classes, so it would take label k as ImageNet class k; pass "
            "--class-free (class_free=True) to run every sample without a class, or convert a tree of WNID class folders "
            "without --label-from-folders"
        )
    refuse_labels_beyond_network(f"{store}: label", fwd, loaded, labels)


def refuse_labels_beyond_network(what: str, fwd: ForwardSettings, loaded: LoadedModel, labels: np.ndarray, class_free_hint: bool = True) -> None:
    """Refuse a label at or beyond a class-conditional network's `label_dim` (no one-hot column for it), before any
    output exists; `what` begins the message ("STORE: label", "generate: ImageNet class")."""
    if not takes_class_labels(fwd, loaded):
        return
    known = np.asarray(labels)[np.asarray(labels) >= 0]
    if known.size and int(known.max()) >= loaded.label_dim:
        raise LabelRangeError(
            f"{what} {int(known.max())} is beyond the {loaded.label_dim} classes this network is conditioned on "
            f"(labels 0..{loaded.label_dim - 1}); select classes within them (--classes)"
            + (", or pass --class-free (class_free=True) to run every sample without a class" if class_free_hint else "")
        )


def unlabelled_note(fwd: ForwardSettings, loaded: LoadedModel, labels: np.ndarray) -> str | None:
    """A note when a class-conditional network runs samples without a label (-1: e.g. generated samples saved
    without their classes), which it gets as zero class vectors, unlike the labelled samples it is compared with."""
    unlabelled = int((np.asarray(labels) < 0).sum())
    if not unlabelled or not takes_class_labels(fwd, loaded):
        return None
    return (f"{unlabelled:,} of {np.asarray(labels).size:,} samples have no label (-1): the class-conditional network gets "
            "zeros for their class (recorded in class_conditioning); give the store its labels, or pass --class-free for every sample")


def run_attrs(fwd: ForwardSettings, loaded: LoadedModel, paths: dict[str, str], device: str, unlabelled: int = 0) -> dict[str, Any]:
    """Attributes every activation store carries: model, layers, σ, noise, pooling, dtypes, versions, device."""
    return {
        "model": model_attrs(fwd, loaded),
        "layers": paths,
        "sigma": fwd.sigma,
        "noise": noise_attrs(fwd.noise_seed) if fwd.noised else None,
        "class_conditioning": class_conditioning(fwd, loaded, unlabelled),
        "pooling": fwd.pool,
        "dtypes": {"storage": fwd.storage_dtype, "compute": fwd.compute_dtype},
        "versions": versions(),
        "device": device_name(device),
    }


def extraction_attrs(
    store: str, fwd: ForwardSettings, images: ImageStore, loaded: LoadedModel, paths: dict[str, str], selection: dict, device: str, unlabelled: int = 0
) -> dict[str, Any]:
    """An extraction store's group attributes: the run's, how images became the network's input, selection, source
    (`unlabelled`: how many selected samples have label -1)."""
    if loaded.kind == FEATURE_KIND:
        scaling = loaded.preprocessing
    else:
        scaling = "uint8 / 127.5 - 1, then + sigma * noise" if fwd.noised else "uint8 / 127.5 - 1 (no noise)"
    return {
        **run_attrs(fwd, loaded, paths, device, unlabelled),
        "input_scaling": scaling,
        "selection": selection,
        "source": {"url": absolute_url(store), "schema": images.attrs.get("schema"), "fingerprint": images.attrs.get("settings_fingerprint"),
                   "generation": images.attrs.get(GENERATION_ATTR), "source_format": images.attrs.get("source_format")},
    }

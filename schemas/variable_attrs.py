"""Per-array attributes of both store contracts: what every array means, in CF/xarray terms.

Every array of a store written with these attributes carries `long_name` and `description` (CF's `units` only
where the values have a physical unit: none of ours do, so there is none), and the group carries
`Conventions` (the CF global attribute) to say so. Validators require the per-array attributes only where
`Conventions` is present, so stores written before them still open.

Coordinates, as xarray sees them: only the numeric per-sample arrays (`label`, `global_index`, `source_row` or
`source_sample`) are named in each data variable's `coordinates` attribute. The text arrays (`synset`,
`class_name`, `source_file`) open as ordinary variables on `sample`: a DataArray drags every coordinate along,
so `ds.label.load()` would otherwise decode 1.28 M strings three times (1.3–1.6 s measured, against 0.02 s).
The group attribute `classes` maps each label present to its WNID and name, so readers without the
variable-length string extension (TensorStore's zarr3 driver) recover both from the int16 `label`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas.classes import NUM_CLASSES as NUM_IMAGENET
from schemas.classes import class_table

CONVENTIONS = "CF-1.11"
REQUIRED_ARRAY_ATTRS = ("long_name", "description")
# Text arrays on `sample`: kept out of `coordinates` (see the module docstring); read as plain variables.
TEXT_VARIABLES = ("synset", "class_name", "source_file")

_COORDINATE_ATTRS: dict[str, dict[str, str]] = {
    "label": {
        "long_name": "ImageNet-1k class index",
        "description": (
            "0-based index of the class in sorted-WNID order (what EDM, ADM, DMD2 and torchvision models are "
            "conditioned on); -1 = unknown. The group attribute `classes` maps each label to its WNID and name."
        ),
    },
    "synset": {
        "long_name": "WordNet ID of the class",
        "description": "WNID such as n01440764; empty where the class is unknown. Equals classes.synset[label] for known labels.",
    },
    "class_name": {
        "long_name": "class name",
        "description": "ImageNet-1k class name from the packaged class table; empty where the class is unknown.",
    },
    "global_index": {
        "long_name": "position in the source's canonical order",
        "description": (
            "index of the sample in its source: shards in natural order and rows in file order, or sorted "
            "relative paths for JPEG trees; seeds the per-sample noise of extraction"
        ),
    },
    "source_file": {
        "long_name": "source file",
        "description": "path of the shard or image file the sample was read from, relative to the source root",
    },
    "source_row": {
        "long_name": "row in the source file",
        "description": "0-based row of the sample in its source file (0 for one-image files)",
    },
    "source_sample": {
        "long_name": "position in the source image store",
        "description": "0-based index along `sample` of the image store the activations were computed from",
    },
}


def coordinate_attrs(names: tuple[str, ...] | list[str] | None = None) -> dict[str, dict[str, str]]:
    """{array name: attributes} of the per-sample coordinate arrays (all known ones, or those named)."""
    chosen = list(_COORDINATE_ATTRS) if names is None else list(names)
    return {name: dict(_COORDINATE_ATTRS[name]) for name in chosen}


def coordinates_attribute(coordinate_names: tuple[str, ...] | list[str]) -> str:
    """The CF `coordinates` value of a data variable: its numeric per-sample coordinates, space-separated."""
    return " ".join(name for name in coordinate_names if name not in TEXT_VARIABLES)


def image_store_array_attrs(coordinate_names: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """{array name: attributes} of every array of an image store (`image` and its coordinates)."""
    image = {
        "long_name": "RGB image",
        "description": "uint8 pixel values 0..255, channel-first (channel = R, G, B), rows top to bottom",
        "coordinates": coordinates_attribute(coordinate_names),
    }
    return {"image": image, **coordinate_attrs(coordinate_names)}


def class_table_attrs(
    labels: np.ndarray, synsets: Sequence[str] | None = None, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Group attribute `classes`: WNID and name of every known label present, so `label` alone names the class.

    `classes = {"label": [l0, l1, …], "synset": [...], "class_name": [...]}`, sorted by label; unknown (-1) left out.
    Labels that are not ImageNet-1k classes (numbered folder names) are named by `synsets`/`class_names`, indexed
    by label; by default both come from the packaged ImageNet-1k table.
    """
    present = np.unique(np.asarray(labels, dtype=np.int64))
    present = present[present >= 0].tolist()
    table = class_table()
    synsets = table.wnids if synsets is None else synsets
    class_names = table.names if class_names is None else class_names
    return {
        "classes": {
            "label": present,
            "synset": [str(synsets[i]) for i in present],
            "class_name": [str(class_names[i]) for i in present],
        }
    }


def sample_class_attrs(labels: np.ndarray, synsets: np.ndarray, class_names: np.ndarray) -> dict[str, Any]:
    """Group attribute `classes` (as class_table_attrs) from per-sample columns: each label named as its samples
    are, so classes of a store's own (numbered folders) keep their names in every store made from it."""
    labels = np.asarray(labels, dtype=np.int64)
    present, first = np.unique(labels, return_index=True)
    known = present >= 0
    present, first = present[known].tolist(), first[known]
    return {"classes": {"label": present, "synset": [str(synsets[i]) for i in first], "class_name": [str(class_names[i]) for i in first]}}


def classes_lookup(group_attrs: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """{label: (WNID, name)} from a store's `classes` attribute (empty when the store predates it)."""
    classes = group_attrs.get("classes") or {}
    return {int(label): (wnid, name) for label, wnid, name in zip(classes.get("label", ()), classes.get("synset", ()), classes.get("class_name", ()))}


def label_names(labels: np.ndarray, recorded: dict[int, tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(WNIDs, class names) of labels as object arrays: as a store's `classes` attribute records them
    (classes_lookup), else from the ImageNet-1k table; '' for -1 (unknown)."""
    table = class_table()
    labels = np.asarray(labels, dtype=np.int64)
    imagenet = np.where(labels < NUM_IMAGENET, labels, -1)  # a store's own label past 999 has no ImageNet name
    synsets, names = table.synsets_of(imagenet), table.names_of(imagenet)
    for i, label in enumerate(labels.tolist()):
        if label in recorded:
            synsets[i], names[i] = recorded[label]
    return synsets, names


def missing_array_attrs(array_attrs: dict[str, dict[str, Any]], required: tuple[str, ...] = REQUIRED_ARRAY_ATTRS) -> list[str]:
    """`name.attr` for every required attribute absent from an {array name: attributes} mapping."""
    return [f"{name}.{key}" for name, attrs in array_attrs.items() for key in required if key not in attrs]

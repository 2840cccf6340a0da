"""Which samples of an image store to run: first N, an index file, some classes, or K per class.

Classes may be named by WNID (n01440764), by class name (`tench`, `Great White Shark`: case-insensitive, exact,
or a prefix that only one class has) or by 0-based label index (`0`); all resolve to WNIDs. The one parser of
extract, generate, show, `features` and the torch Dataset: an empty list, an empty entry, or two entries naming
the same class (or position, or layer) are refused, never read as "everything" or silently merged.
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from schemas.classes import NUM_CLASSES, class_table
from schemas.errors import ImzarrError
from schemas.option_values import SEED_64, whole_numbers


class SelectionError(ImzarrError):
    """A selection that cannot be made from this store."""


class UnknownClassNameError(SelectionError):
    """A --classes entry that names no ImageNet-1k class (or more than one); the message lists candidates."""


class RepeatedEntryError(SelectionError):
    """A list (classes, layers, sample positions) that names one thing twice."""


CLASS_ENTRIES_HINT = "give WNIDs, class names or 0-based label indices, comma-separated"


def listed_entries(value: str | int | Iterable[str | int] | None, option: str, hint: str = "") -> tuple[str, ...] | None:
    """`'a, b'` or a sequence of entries → ('a', 'b'); None stays None. An empty list, an empty entry or one given
    twice (case-insensitively) is refused naming `option`; one int or str alone is one entry, not its letters."""
    if value is None:
        return None
    if isinstance(value, str):
        entries = [item.strip() for item in value.split(",")]
        shown = value
    else:
        items = [value] if isinstance(value, (int, np.integer)) else list(value)
        entries = [str(item).strip() for item in items]
        shown = ",".join(entries)
    hint = f"; {hint}" if hint else ""
    if not any(entries):
        raise SelectionError(f"{option} {shown!r}: names nothing{hint}")
    if "" in entries:
        raise SelectionError(f"{option} {shown!r}: entry {entries.index('') + 1} is empty{hint}")
    seen: dict[str, str] = {}
    for entry in entries:
        key = entry.casefold()
        if key in seen:
            raise RepeatedEntryError(f"{option} {shown!r}: {entry!r} is given twice")
        seen[key] = entry
    return tuple(entries)


def layer_entries(layers: str | Iterable[str] | None) -> tuple[str, ...]:
    """`'a,b'` or a list of layer names → ('a', 'b'); an empty entry or a layer given twice is refused."""
    return listed_entries(layers, "--layers", "`imzarr layers` lists the layer names") or ()


def class_entries(classes: str | int | Iterable[str | int] | None) -> tuple[str, ...] | None:
    """`classes` (`'tench,0'`, a list of names, WNIDs or indices) as the checked entries SelectionSpec takes."""
    return listed_entries(classes, "--classes", CLASS_ENTRIES_HINT)


def refuse_repeated_classes(entries: Iterable[str], wnids: Iterable[str]) -> None:
    """Two entries that name one class (`tench,0`) are refused, naming both."""
    first: dict[str, str] = {}
    for entry, wnid in zip(entries, wnids):
        if wnid in first:
            raise RepeatedEntryError(f"--classes: {first[wnid]!r} and {entry!r} both name {wnid} ({_class_name(wnid)})")
        first[wnid] = entry


def resolve_class(name: str) -> str:
    """One class given by WNID, label index or (case-insensitive, exact or uniquely prefixing) name → its WNID."""
    table = class_table()
    text = name.strip()
    if table.is_wnid(text):
        return text
    if text.isdigit():
        index = int(text)
        if index >= NUM_CLASSES:
            raise UnknownClassNameError(f"--classes {name!r}: label index {index} is outside 0..{NUM_CLASSES - 1}")
        return table.wnids[index]
    key = text.casefold()
    by_name = _names_casefolded()
    exact = by_name.get(key, [])
    if len(exact) == 1:
        return table.wnids[exact[0]]
    if len(exact) > 1:
        raise UnknownClassNameError(f"--classes {name!r}: {len(exact)} classes have that name; give the WNID: {_listing(exact)}")
    prefixed = sorted(i for folded, indices in by_name.items() if folded.startswith(key) for i in indices)
    if len(prefixed) == 1:
        return table.wnids[prefixed[0]]
    if len(prefixed) > 1:
        raise UnknownClassNameError(f"--classes {name!r} begins {len(prefixed)} class names; say more or give a WNID: {_listing(prefixed[:8])}")
    close = difflib.get_close_matches(key, list(by_name), n=5, cutoff=0.6)
    hint = f"; close matches: {_listing([i for c in close for i in by_name[c]])}" if close else ""
    raise UnknownClassNameError(f"--classes {name!r} is not an ImageNet-1k WNID, label index or class name{hint}")


def names_imagenet_classes(table: dict[int, tuple[str, str]]) -> bool:
    """Whether every label of a {label: (WNID, name)} table is the ImageNet-1k class of that index (not a
    store's own numbered folders, `--label-from-folders`)."""
    imagenet = class_table()
    return all(0 <= label < len(imagenet.wnids) and imagenet.wnids[label] == wnid for label, (wnid, _) in table.items())


def own_class(entry: str, table: dict[int, tuple[str, str]]) -> str:
    """The WNID (folder name) of one entry naming a store's own class by folder name, name (any case) or label."""
    text = entry.strip()
    for label, (wnid, name) in table.items():
        if text in (wnid, str(label)) or text.casefold() == name.casefold():
            return wnid
    listed = ", ".join(f"{label} {wnid}" + (f" ({name})" if name != wnid else "") for label, (wnid, name) in list(table.items())[:8])
    raise UnknownClassNameError(f"classes {entry!r}: not a class of this store, whose classes are its own (not ImageNet-1k): {listed}{' …' if len(table) > 8 else ''}")


def class_wnids(entries: Iterable[str], table: dict[int, tuple[str, str]], present: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """WNIDs of class entries for a store whose classes are `table` ({label: (WNID, name)}): its own numbered
    folders by folder name, name or label (ImageNet-1k names would pick other classes' rows); else as
    resolve_class takes them. A WNID the store records (`table`'s, or one of `present`: folders of samples without
    a label) is taken as given. A class named twice is refused."""
    entries = tuple(entries)
    recorded = {wnid for wnid, _ in table.values()} | present
    if not names_imagenet_classes(table):
        wnids = tuple(entry if entry in recorded else own_class(entry, table) for entry in entries)
    else:
        wnids = tuple(entry if entry in recorded else resolve_class(entry) for entry in entries)
    refuse_repeated_classes(entries, wnids)
    return wnids


def present_class_wnids(entries: Iterable[str], labels: np.ndarray, synsets: np.ndarray, among: str = "this store") -> tuple[str, ...]:
    """WNIDs of class entries among samples with these labels and synsets (class_wnids: a store's own numbered
    folders by folder name or label, else ImageNet-1k names too); a class without samples here is refused
    (`among`: what the samples are, for the message)."""
    known = set(synsets.tolist())
    present, first = np.unique(labels, return_index=True)
    # A store's own classes are named by folder: their WNID and name are the folder name.
    table = {int(label): (str(synsets[i]),) * 2 for label, i in zip(present.tolist(), first.tolist()) if label >= 0}
    wnids = class_wnids(entries, table, frozenset(known))
    unknown = [w for w in wnids if w not in known]
    if unknown:
        named = ", ".join(f"{w} ({_class_name(w)})" for w in unknown)
        held = sorted(known - {""})
        raise SelectionError(f"classes {named} have no samples in {among} ({len(held)} class{'' if len(held) == 1 else 'es'} there, e.g. {', '.join(held[:5])})")
    return wnids


def resolve_classes(names: str | int | Iterable[str | int]) -> tuple[str, ...]:
    """WNIDs of every entry (see resolve_class and class_entries), in the given order; repeats refused."""
    entries = class_entries(names) or ()
    wnids = [resolve_class(n) for n in entries]
    refuse_repeated_classes(entries, wnids)
    return tuple(wnids)


def _class_name(wnid: str) -> str:
    table = class_table()
    return table.names[table.index_of_wnid(wnid)] if table.is_wnid(wnid) else "a class of this store"


@lru_cache(maxsize=1)
def _names_casefolded() -> dict[str, list[int]]:
    """Case-folded class name → indices (a few names, such as crane and maillot, belong to two classes)."""
    found: dict[str, list[int]] = {}
    for index, class_name in enumerate(class_table().names):
        found.setdefault(class_name.casefold(), []).append(index)
    return found


def _listing(indices: list[int]) -> str:
    table = class_table()
    return ", ".join(f"{table.wnids[i]} ({table.names[i]}, {i})" for i in indices)


@dataclass(frozen=True)
class SelectionSpec:
    num_samples: int | None = None
    indices_file: str | None = None
    positions: tuple[Any, ...] | None = None  # store positions given in Python (extract(indices=[…])), as a file's
    classes: tuple[str, ...] | None = None  # WNIDs, class names or label indices (resolve_classes)
    per_class: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # Recorded in JSON: numpy integers from a notebook become ints here.
        counts = whole_numbers({"--num-samples": (self.num_samples, 1), "--per-class": (self.per_class, 1), "--seed": (self.seed, *SEED_64)}, SelectionError)
        for name, value in zip(("num_samples", "per_class", "seed"), counts.values()):
            object.__setattr__(self, name, value)


def select_samples(spec: SelectionSpec, labels: np.ndarray, synsets: np.ndarray) -> np.ndarray:
    """Store positions to run, ascending (so reads are sequential and shards fill in store order)."""
    n = labels.size
    chosen = np.arange(n, dtype=np.int64)
    if spec.indices_file is not None:
        chosen = _read_indices(spec.indices_file, n)
    if spec.positions is not None:
        chosen = checked_positions(np.asarray(spec.positions), n, "indices")
    if spec.classes:
        chosen_synsets = synsets[chosen]  # taken once: a copy of every candidate's text (1.28 M at full scale)
        among = "this store" if chosen.size == n else f"the {chosen.size:,} samples the indices select"
        wnids = present_class_wnids(spec.classes, labels[chosen], chosen_synsets, among)
        chosen = chosen[np.isin(chosen_synsets, np.array(wnids, dtype=object))]
    if spec.per_class is not None:
        rng = np.random.default_rng(spec.seed)
        picked = []
        for label in np.unique(labels[chosen]):
            members = chosen[labels[chosen] == label]
            picked.append(rng.choice(members, size=min(spec.per_class, members.size), replace=False))
        chosen = np.sort(np.concatenate(picked)) if picked else chosen[:0]
    if spec.num_samples is not None:
        if spec.num_samples > chosen.size:
            narrowed = "" if chosen.size == n else f"; the selection before it has {chosen.size:,}"
            raise SelectionError(f"--num-samples {spec.num_samples:,}: the store holds {n:,} samples{narrowed}")
        chosen = chosen[: spec.num_samples]
    if chosen.size == 0:
        raise SelectionError("the selection is empty")
    return chosen


def per_class_shortfall(spec: SelectionSpec, labels: np.ndarray, synsets: np.ndarray) -> str | None:
    """A note when `--per-class K` found fewer than K samples in some classes (all of theirs were taken), else None:
    counted among the candidates the per-class draw had (before any --num-samples cut)."""
    if spec.per_class is None:
        return None
    candidates = select_samples(replace(spec, per_class=None, num_samples=None), labels, synsets)
    present, counts = np.unique(labels[candidates], return_counts=True)
    short = counts < spec.per_class
    if not short.any():
        return None
    shown = ", ".join(f"{label}: {count}" for label, count in zip(present[short][:8].tolist(), counts[short][:8].tolist()))
    more = " …" if short.sum() > 8 else ""
    return f"--per-class {spec.per_class}: {int(short.sum())} of {present.size} classes have fewer samples, all of theirs taken (label: count {shown}{more})"


def _read_indices(path: str, n: int) -> np.ndarray:
    p = Path(path)
    try:
        with warnings.catch_warnings():  # numpy warns of an empty file; checked_positions says so in one line
            warnings.simplefilter("ignore", UserWarning)
            raw = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as exc:
        raise SelectionError(f"{path}: cannot read sample indices ({exc})") from None
    return checked_positions(raw, n, path)


def checked_positions(positions: Any, n: int, where: str) -> np.ndarray:
    """Store positions, ascending: each a whole number in 0..n-1, none twice (`where` names the list's source)."""
    listed = np.asarray(positions)
    if listed.size and not (np.issubdtype(listed.dtype, np.integer) or (np.issubdtype(listed.dtype, np.floating) and np.all(np.mod(listed, 1) == 0))):
        raise SelectionError(f"{where}: sample positions must be whole numbers, got dtype {listed.dtype}")
    if listed.ndim > 1:
        raise SelectionError(f"{where}: sample positions must be a 1-d list, got an array of shape {listed.shape}")
    if listed.size and (listed.min() < 0 or listed.max() >= n):  # before the cast: uint64 2**64-1 is not -1
        first = listed[(listed < 0) | (listed >= n)][0]
        raise SelectionError(f"{where}: index {first.item() if hasattr(first, 'item') else first} outside 0..{n - 1}")
    idx = listed.astype(np.int64).reshape(-1)
    if idx.size == 0:
        raise SelectionError(f"{where}: lists no sample positions")
    unique, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1]
        raise RepeatedEntryError(f"{where}: position {repeated[0]} is listed {counts[counts > 1][0]} times ({repeated.size} positions repeat); each sample may be listed once")
    return unique


def _recorded_class(name: str) -> str:
    """The WNID of an ImageNet-1k class; a store's own folder-named class (select_samples checked it) as given."""
    try:
        return resolve_class(name)
    except UnknownClassNameError:
        return name


def describe_selection(spec: SelectionSpec, chosen: np.ndarray) -> dict[str, Any]:
    """What the store records about its selection (the positions themselves are the source_sample coordinate)."""
    return {
        "num_samples": spec.num_samples,
        "indices_file": spec.indices_file,
        # As WNIDs: `--classes tench` and `--classes n01440764` are the same selection (and settings).
        "classes": [_recorded_class(c) for c in dict.fromkeys(spec.classes)] if spec.classes else None,
        "per_class": spec.per_class,
        "seed": spec.seed if spec.per_class is not None else None,
        "count": int(chosen.size),
        "sha256": hashlib.sha256(chosen.astype("<i8").tobytes()).hexdigest(),
    } | ({"indices": "given in Python (their sha256 is the selection's)"} if spec.positions is not None else {})

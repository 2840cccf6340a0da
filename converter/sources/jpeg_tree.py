"""Discovering the image files of an ImageNet JPEG tree and the 1000-class label of each.

Two layouts are understood:

- ``train-folders``: ``ROOT/<wnid>/**/<file>`` (the train split, Kaggle's ``ILSVRC/Data/CLS-LOC/train``, or
  val reorganised into class folders); labels come from the folder names.
- ``val-flat``: ``ROOT/ILSVRC2012_val_%08d.JPEG``; labels come from the devkit's ground-truth text file or
  Kaggle's ``LOC_val_solution.csv``.

The canonical order of a tree is its sorted relative POSIX paths; an image's global index is its position.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import numpy as np

from converter.sources import source_files
from converter.sources.source_files import IMAGE_EXTENSIONS, is_remote
from schemas.classes import UnknownClassError, class_table
from schemas.errors import PathError
from schemas.image_store import FOLDER_LABEL_ORDER

_KAGGLE_CLS_LOC = Path("ILSVRC", "Data", "CLS-LOC")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)")


class JpegTreeError(PathError):
    """A JPEG tree or label file that cannot be read as a labelled ImageNet split."""


@dataclass(frozen=True, eq=False)
class JpegTree:
    root: Path | str  # a URL for a tree in object storage
    layout: str  # "train-folders" | "val-flat"
    files: tuple[str, ...]  # sorted relative POSIX paths; the canonical order
    labels: np.ndarray  # int16, one per file
    label_source: str  # "wnid-folders" | FOLDER_LABEL_ORDER | "devkit-ground-truth" | "kaggle-loc-val-solution"
    folder_classes: tuple[str, ...] | None
    ignored: tuple[str, ...]  # relative paths of non-image and hidden files
    # Remote trees: (size, fingerprint) of each file, from the one listing (saves a request per file).
    stamps: tuple[tuple[int, str], ...] | None = None

    def __len__(self) -> int:
        return len(self.files)


def scan_jpeg_tree(
    root: str | os.PathLike[str],
    val_labels: str | os.PathLike[str] | None = None,
    label_from_folders: bool = False,
) -> JpegTree:
    """Find every image under `root` (a path or a URL), sort them canonically and label each with its class index."""
    if is_remote(os.fspath(root)):
        return _scan_remote_tree(os.fspath(root), val_labels, label_from_folders)
    root = _resolve_root(Path(root), want_val=val_labels is not None)
    top_images, top_ignored, folders = _scan_top(root)
    if not top_images and not label_from_folders:
        _refuse_class_archives(root, top_ignored, folders)
    if top_images and folders:
        raise JpegTreeError(
            root,
            f"mixed layout: image files at the top level (e.g. {sorted(top_images)[0]!r}) "
            f"and folders (e.g. {folders[0]!r})",
        )
    if folders:
        root_key = frozenset({_dir_key(root)})
        class_folders = _class_folders(root, folders)

        def walk(name: str, files: list[str], ignored: list[str]) -> None:
            _walk_images(root / name, name, files, ignored, root_key, class_folders)

        return _scan_folders(root, folders, top_ignored, val_labels, label_from_folders, walk)
    if not top_images:
        raise JpegTreeError(root, "no image files found" + source_files.other_format_hint(root, "jpeg"))
    return _label_flat(root, sorted(top_images), top_ignored, val_labels, label_from_folders)


def _scan_remote_tree(url: str, val_labels: str | os.PathLike[str] | None, label_from_folders: bool) -> JpegTree:
    """A tree in object storage, listed once: the same files, order, labels and errors as the same tree on disk.

    Object stores have no empty folders (unless a folder marker object exists), links or special files."""
    root = _resolve_remote_root(url.rstrip("/"), want_val=val_labels is not None)
    try:
        entries = source_files.find_below(root)
    except OSError as exc:
        raise JpegTreeError(root, f"cannot list directory ({exc.strerror or exc})") from None
    top_images: list[str] = []
    top_ignored: list[str] = []
    folders: set[str] = set()
    below: dict[str, tuple[list[str], list[str]]] = {}  # folder → (images, ignored) below it
    hidden_listed: set[str] = set()

    def skip_hidden(folder_parts: list[str]) -> bool:
        """Skip what lies in a hidden folder, listing that folder once (as a walk on disk does); False if none."""
        first = next((k for k, part in enumerate(folder_parts) if part.startswith(".")), None)
        if first is None:
            return False
        hidden = "/".join(folder_parts[: first + 1]) + "/"
        if hidden not in hidden_listed:
            hidden_listed.add(hidden)
            if first == 0:
                top_ignored.append(hidden)
            else:
                folders.add(folder_parts[0])
                below.setdefault(folder_parts[0], ([], []))[1].append(hidden)
        return True

    for rel in sorted(entries):
        parts = rel.split("/")
        if "" in parts:
            continue
        if entries[rel].get("type") == "directory":
            if not skip_hidden(parts) and len(parts) == 1:
                folders.add(parts[0])
            continue
        name = parts[-1]
        is_ignored = name.startswith(".") or not _is_image(name)
        if len(parts) == 1:
            (top_ignored if is_ignored else top_images).append(name)
            continue
        if skip_hidden(parts[:-1]):
            continue
        folders.add(parts[0])
        images, ignored = below.setdefault(parts[0], ([], []))
        (ignored if is_ignored else images).append(rel)
    ordered = sorted(folders)
    if not top_images and not label_from_folders:
        _refuse_class_archives(root, top_ignored, ordered)
    if top_images and ordered:
        raise JpegTreeError(
            root,
            f"mixed layout: image files at the top level (e.g. {sorted(top_images)[0]!r}) "
            f"and folders (e.g. {ordered[0]!r})",
        )

    def walk(name: str, files: list[str], ignored: list[str]) -> None:
        images, others = below.get(name, ([], []))
        files.extend(images)
        ignored.extend(others)

    if ordered:
        tree = _scan_folders(root, ordered, top_ignored, val_labels, label_from_folders, walk)
    elif not top_images:
        raise JpegTreeError(root, "no image files found")
    else:
        tree = _label_flat(root, sorted(top_images), top_ignored, val_labels, label_from_folders)
    stamps = tuple(
        (int(entries[rel].get("size") or 0), source_files.remote_stamp(entries[rel])) for rel in tree.files
    )
    return dataclasses.replace(tree, stamps=stamps)


_CLASS_ARCHIVE = re.compile(r"(n\d{8})\.(tar|tar\.gz|tgz|zip)$", re.IGNORECASE)


def _refuse_class_archives(root: Path | str, top_ignored: list[str], folders: list[str]) -> None:
    """An archive named by a WNID at the top (ILSVRC2012_img_train.tar holds one per class) with no folder of
    that class beside it: a class not extracted yet. Converting without it would leave the whole class out, with
    nothing but a line among the ignored files to say so."""
    present = set(folders)
    archives = [name for name in sorted(top_ignored) if (m := _CLASS_ARCHIVE.match(name)) and class_table().is_wnid(m.group(1).lower()) and m.group(1).lower() not in present]
    if archives:
        more = f" and {len(archives) - 1} more" if len(archives) > 1 else ""
        first = _CLASS_ARCHIVE.match(archives[0]).group(1).lower()  # type: ignore[union-attr]
        raise JpegTreeError(
            source_files.join(root, archives[0]) if isinstance(root, str) else root / archives[0],
            f"a class archive not extracted{more}: its images would be missing from the store; extract each into "
            f"its class folder (mkdir {first} && tar -xf {archives[0]} -C {first}) or move the archives out",
        )


def _resolve_remote_root(url: str, want_val: bool) -> str:
    try:
        entry = source_files.info(url)
    except OSError as exc:
        raise JpegTreeError(url, f"cannot read ({exc.strerror or exc})") from None
    if entry is None:
        raise JpegTreeError(url, "does not exist")
    if entry.get("type") != "directory":
        raise JpegTreeError(url, "not a directory")
    split = "val" if want_val else "train"
    for base in (f"{url}/{_KAGGLE_CLS_LOC.as_posix()}", url):
        if base.rsplit("/", 1)[-1] == "CLS-LOC" and (source_files.info(f"{base}/{split}") or {}).get("type") == "directory":
            return f"{base}/{split}"
    return url


def _resolve_root(root: Path, want_val: bool) -> Path:
    if not root.is_dir():
        raise JpegTreeError(root, "not a directory" if root.exists() else "does not exist")
    split = "val" if want_val else "train"
    # Kaggle's download nests the splits: descend from the archive root or from CLS-LOC itself.
    for base in (root / _KAGGLE_CLS_LOC, root):
        if base.name == "CLS-LOC" and (base / split).is_dir():
            return base / split
    return root


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError as exc:
        raise JpegTreeError(directory, f"cannot list directory ({exc.strerror or exc})") from None


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """'dir', 'file', 'unreadable' (a link that cannot be followed: a loop, or dangling) or 'other' (a FIFO,
    socket or device, which must never be opened: reading a FIFO blocks forever)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:  # ELOOP and friends: is_dir() swallows only "no such file"
        return "unreadable"
    return "unreadable" if entry.is_symlink() and not os.path.exists(entry.path) else "other"


def _scan_top(root: Path) -> tuple[list[str], list[str], list[str]]:
    images: list[str] = []
    ignored: list[str] = []
    folders: list[str] = []
    for entry in _entries(root):
        kind = _entry_kind(entry)
        if kind == "dir":
            if entry.name.startswith("."):
                ignored.append(f"{entry.name}/")  # a hidden folder is skipped whole, and listed
            else:
                folders.append(entry.name)
        elif kind == "other" or entry.name.startswith(".") or not _is_image(entry.name):
            ignored.append(entry.name)
        else:
            # An image name whose link cannot be followed is kept: decoding rejects it, with the reason.
            images.append(entry.name)
    folders.sort()
    return images, ignored, folders


def _dir_key(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def _walk_images(
    folder: Path,
    prefix: str,
    images: list[str],
    ignored: list[str],
    above: frozenset[tuple[int, int]],
    class_folders: dict[str, str] | None = None,
) -> None:
    """Append the relative paths of images below `folder`, recursively, following directory links (refused into
    another of `class_folders`, {real path: folder name})."""
    stack = [(folder, prefix, above | {_dir_key(folder)})]
    while stack:
        directory, rel, ancestors = stack.pop()
        for entry in _entries(directory):
            name = entry.name
            kind = _entry_kind(entry)
            if kind == "dir":
                if name.startswith("."):
                    ignored.append(f"{rel}/{name}/")  # a hidden folder is skipped whole, and listed
                    continue
                # One stat per directory (never per file): a link back to an ancestor would loop forever.
                info = entry.stat()
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    ignored.append(f"{rel}/{name}/")  # a link back to a folder above: its images are listed once
                    continue
                if class_folders and entry.is_symlink():
                    _refuse_link_within_the_tree(Path(entry.path), class_folders)
                stack.append((Path(entry.path), f"{rel}/{name}", ancestors | {key}))
            elif kind == "other" or name.startswith(".") or not _is_image(name):
                ignored.append(f"{rel}/{name}")
            else:
                if class_folders and entry.is_symlink() and os.path.isfile(entry.path):  # a file it leads to (not a loop, not missing)
                    _refuse_link_within_the_tree(Path(entry.path), class_folders)
                # An image name whose link cannot be followed is kept: decoding rejects it, with the reason.
                images.append(f"{rel}/{name}")


def _class_folders(root: Path, folders: list[str]) -> dict[str, str]:
    """{real path: folder name} of the class folders; two names for one folder (a link beside what it names) are
    refused: its images would be stored once per name, under two labels."""
    found: dict[str, str] = {}
    for name in folders:
        real = os.path.realpath(root / name)
        if real in found:
            raise JpegTreeError(root / name, f"is the same folder as {found[real]} (a link): its images would be stored twice, under two labels")
        found[real] = name
    return found


def _refuse_link_within_the_tree(link: Path, class_folders: dict[str, str]) -> None:
    """A link inside a class folder to something the tree holds already (a file or folder of any class folder,
    this one's included) or to a folder that holds class folders: its images would be stored twice, the second time
    perhaps with another label. Links out of the tree (a shared cache of files) are followed."""
    target = os.path.realpath(link)
    for folder, name in class_folders.items():
        inside = target == folder or target.startswith(folder + os.sep)
        if inside or folder.startswith(target.rstrip(os.sep) + os.sep):
            where = f"into the class folder {name}" if inside else f"to {target}, which holds the class folder {name}"
            raise JpegTreeError(link, f"a link {where}: its images would be stored a second time; remove the link")


def _scan_folders(
    root: Path | str,
    folders: list[str],
    top_ignored: list[str],
    val_labels: str | os.PathLike[str] | None,
    label_from_folders: bool,
    walk: Callable[[str, list[str], list[str]], None],
) -> JpegTree:
    if val_labels is not None:
        raise JpegTreeError(
            root, "is organised in class folders, so its labels come from the folder names; drop val_labels"
        )
    table = class_table()
    if label_from_folders:
        if len(folders) > np.iinfo(np.int16).max + 1:
            raise JpegTreeError(root, f"{len(folders)} folders do not fit int16 labels")
        folder_index = {name: i for i, name in enumerate(folders)}
        source, folder_classes = FOLDER_LABEL_ORDER, tuple(folders)
    else:
        for name in folders:
            if not table.is_wnid(name):
                raise JpegTreeError(
                    source_files.join(root, name) if isinstance(root, str) else root / name,
                    "folder name is not an ImageNet-1k WNID (use --label-from-folders, label_from_folders=True in Python, to number sorted folders)",
                )
        # The 1000-class index, never a numbering of whichever folders happen to exist.
        folder_index = {name: table.index_of_wnid(name) for name in folders}
        source, folder_classes = "wnid-folders", None

    files: list[str] = []
    labels: list[int] = []
    ignored = list(top_ignored)
    empty = []
    for name in folders:
        start = len(files)
        walk(name, files, ignored)
        labels.extend([folder_index[name]] * (len(files) - start))
        if len(files) == start:
            empty.append(name)
    if not label_from_folders:  # a class folder made for an archive that was never extracted into it
        _refuse_class_archives(root, top_ignored, [name for name in folders if name not in empty])
    if not files:
        raise JpegTreeError(root, "no image files found in its folders" + source_files.other_format_hint(root, "jpeg"))
    order = sorted(range(len(files)), key=files.__getitem__)
    return JpegTree(
        root=root,
        layout="train-folders",
        files=tuple(files[i] for i in order),
        labels=_frozen(np.asarray(labels, dtype=np.int16)[order]),
        label_source=source,
        folder_classes=folder_classes,
        ignored=tuple(sorted(ignored)),
    )


def _label_flat(
    root: Path | str,
    files: list[str],
    ignored: list[str],
    val_labels: str | os.PathLike[str] | None,
    label_from_folders: bool,
) -> JpegTree:
    if label_from_folders:
        raise JpegTreeError(root, "is a flat folder of images: --label-from-folders (label_from_folders) needs class folders")
    if val_labels is None:
        raise JpegTreeError(
            root,
            "is a flat folder of images without class folders: pass --val-labels FILE (val_labels= in Python): "
            "ILSVRC2012_validation_ground_truth.txt or LOC_val_solution.csv",
        )
    label_path = os.fspath(val_labels) if is_remote(os.fspath(val_labels)) else Path(val_labels)
    try:
        text = source_files.read_text(label_path, encoding="utf-8-sig")
    except OSError as exc:
        raise JpegTreeError(label_path, f"cannot read label file ({exc.strerror or exc})") from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.replace(" ", "").startswith("ImageId,"):
        labels, source = _kaggle_labels(label_path, text, files), "kaggle-loc-val-solution"
    else:
        labels, source = _devkit_labels(label_path, text, files), "devkit-ground-truth"
    return JpegTree(
        root=root,
        layout="val-flat",
        files=tuple(files),
        labels=_frozen(labels),
        label_source=source,
        folder_classes=None,
        ignored=tuple(sorted(ignored)),
    )


def _image_id(name: str) -> str:
    return os.path.splitext(name)[0]


def _devkit_labels(label_path: Path | str, text: str, files: list[str]) -> np.ndarray:
    """Line i of the devkit ground truth is the 1-based ILSVRC2012_ID of ILSVRC2012_val_{i+1:08d}."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    ids = np.empty(len(lines), dtype=np.int64)
    for i, line in enumerate(lines):
        try:
            ids[i] = int(line.strip())
        except ValueError:
            raise JpegTreeError(
                label_path,
                f"line {i + 1} is {line.strip()!r}, not an ILSVRC2012_ID "
                "(expected the devkit ground truth or a CSV with header ImageId,PredictionString)",
            ) from None
    numbers = []
    for name in files:
        match = _VAL_NAME.fullmatch(_image_id(name))
        if match is None:
            raise JpegTreeError(
                label_path, f"cannot label {name!r}: the devkit ground truth only labels ILSVRC2012_val_NNNNNNNN files"
            )
        number = int(match.group(1))
        if not 1 <= number <= len(ids):
            raise JpegTreeError(
                label_path, f"has {len(ids)} lines but {name!r} is image number {number}"
            )
        numbers.append(number)
    chosen = ids[np.asarray(numbers, dtype=np.int64) - 1]
    try:
        return class_table().from_downsampled(chosen).astype(np.int16)
    except UnknownClassError:
        bad = int(np.flatnonzero((chosen < 1) | (chosen > 1000))[0])
        raise JpegTreeError(
            label_path, f"line {numbers[bad]} holds {chosen[bad]}, outside the ILSVRC2012_ID range 1..1000"
        ) from None


def _kaggle_labels(label_path: Path | str, text: str, files: list[str]) -> np.ndarray:
    """Kaggle rows are keyed by ImageId (any order); the class is PredictionString's first token, a WNID."""
    table = class_table()
    reader = csv.reader(text.splitlines())
    header = [column.strip() for column in next(reader)]
    try:
        id_col, pred_col = header.index("ImageId"), header.index("PredictionString")
    except ValueError:
        raise JpegTreeError(label_path, f"header {header} lacks ImageId or PredictionString") from None
    by_id: dict[str, int] = {}
    for row_number, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        try:
            image_id, tokens = row[id_col].strip(), row[pred_col].split()
        except IndexError:
            raise JpegTreeError(label_path, f"row {row_number} has too few columns") from None
        if not tokens or not table.is_wnid(tokens[0]):
            raise JpegTreeError(
                label_path, f"row {row_number} ({image_id}): PredictionString does not start with an ImageNet-1k WNID"
            )
        label = table.index_of_wnid(tokens[0])
        if by_id.setdefault(image_id, label) != label:
            raise JpegTreeError(label_path, f"row {row_number}: {image_id} is listed with two different classes")
    labels = np.empty(len(files), dtype=np.int16)
    for i, name in enumerate(files):
        try:
            labels[i] = by_id[_image_id(name)]
        except KeyError:
            raise JpegTreeError(label_path, f"has no row for image {name!r}") from None
    return labels


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array

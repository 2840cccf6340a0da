"""JPEG trees as an image source: blocks of files decoded and resized by a recipe in stage-1 tasks."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL

from converter.sources.base import (
    ConvertOptionError,
    ImageSource,
    MaterializedPart,
    RowFile,
    SourceFile,
)
from converter.sources import source_files
from converter.sources.source_files import is_remote
from schemas.atomic_files import write_atomically
from schemas.errors import printable_path
from schemas.image_store import FOLDER_LABEL_ORDER
from schemas.option_values import shown, whole_number
from converter.sources.jpeg_recipes import DEFAULT_RECIPE, DRAFT_GEOMETRY, ImageDecodeError, get_recipe, load_and_resize, truncated_images_rejected
from converter.sources.jpeg_tree import scan_jpeg_tree

FILES_PER_BLOCK = 128  # ~0.4 s of decoding per task: coarse for Dask (~1 ms a task), fine enough to end evenly


@dataclass(frozen=True)
class JpegBlock:
    """A run of consecutive files of the tree (canonical order)."""

    root: str
    files: tuple[str, ...]
    label_values: np.ndarray
    recipe: str
    resolution: int
    fast_draft: bool

    @property
    def relpath(self) -> str:
        return self.files[0]

    @property
    def num_rows(self) -> int:
        return len(self.files)

    def labels(self) -> np.ndarray:
        return self.label_values

    def row_sources(self) -> tuple[np.ndarray, np.ndarray]:
        names = np.empty(self.num_rows, dtype=object)
        names[:] = [printable_path(rel) for rel in self.files]  # file names need not be UTF-8; the store's strings must
        return names, np.zeros(self.num_rows, dtype=np.int64)

    def row_file(self) -> RowFile | None:
        return None

    def materialize(self, dest: str) -> MaterializedPart:
        """Decode and resize every file; undecodable ones keep a zero slot and are reported, never dropped silently."""
        kept = np.ones(self.num_rows, dtype=bool)
        rejected: list[tuple[str, str]] = []
        blank = np.zeros((3, self.resolution, self.resolution), dtype=np.uint8)

        fetched = self._fetch() if is_remote(self.root) else None

        def rows():
            for i, rel in enumerate(self.files):
                try:
                    if fetched is None:
                        path, data = os.path.join(self.root, rel), None
                    else:
                        path, data = source_files.join(self.root, rel), fetched[i]
                        if isinstance(data, Exception):
                            raise ImageDecodeError(path, f"cannot read file ({getattr(data, 'strerror', None) or data})")
                    yield load_and_resize(path, self.recipe, self.resolution, fast_draft=self.fast_draft, data=data).data
                except ImageDecodeError as exc:
                    kept[i] = False
                    rejected.append((printable_path(rel), exc.reason))
                    yield blank.data

        with truncated_images_rejected():  # in this part's process, whichever it is
            write_atomically(dest, rows())
        return MaterializedPart(RowFile(dest, 0, self.num_rows, self.resolution), kept, rejected)

    def _fetch(self) -> list[bytes | Exception]:
        """Every file of the block from object storage in one concurrent batch (a block is ~128 files, ~15 MB)."""
        urls = [source_files.join(self.root, rel) for rel in self.files]
        got = source_files.read_files(urls)
        return [got[url] for url in urls]


def _tree_fingerprint(root: Path | str, files: tuple[str, ...], stamps: tuple[tuple[int, str], ...] | None = None) -> SourceFile:
    """One entry for the whole tree: file count, total bytes, and a hash of every (path, size, mtime).

    Any write to a file changes its mtime, so an edit between an interrupted run and its resume is seen at the
    cost of the one stat per file the scan already needs. Limit: a same-size rewrite whose mtime is then set
    back (`touch -d`, `cp -p` of other content) goes unnoticed; hashing contents would read the whole tree.
    A tree in object storage (`stamps` from its listing) hashes every (path, size, ETag) instead."""
    if stamps is not None:
        remote = hashlib.sha256()
        for rel, (size, stamp) in zip(files, stamps):
            remote.update(rel.encode("utf-8", "surrogateescape") + f"\0{stamp}\n".encode())
        total = sum(size for size, _ in stamps)
        return SourceFile(f". ({len(files)} image files)", total, "sha256-paths-etags:" + remote.hexdigest())
    digest = hashlib.sha256()
    total = 0
    root_str = str(root)  # os.path.join on strings: pathlib objects per file cost ~10 µs each, 13 s per 1.28 M
    for rel in files:
        try:
            info = os.stat(os.path.join(root_str, rel))
            size, stamp = info.st_size, f"{info.st_size}\0{info.st_mtime_ns}"
        except OSError as exc:  # a link that cannot be followed: decoding rejects the file, the scan goes on
            size, stamp = 0, f"unreadable:{exc.errno}"
        total += size
        digest.update(os.fsencode(rel) + f"\0{stamp}\n".encode())
    return SourceFile(f". ({len(files)} image files)", total, "sha256-paths-sizes-mtimes:" + digest.hexdigest())


def open_jpeg_source(
    root: str | Path,
    recipe: str | None = None,
    size: int = 64,
    val_labels: str | Path | None = None,
    label_from_folders: bool = False,
    fast_draft: bool = False,
) -> ImageSource:
    """Scan the tree and split it into blocks; decoding happens later, in parallel processes."""
    recipe = recipe or DEFAULT_RECIPE
    get_recipe(recipe)  # unknown names fail now, naming the valid ones
    try:
        size = whole_number(size, 1)
    except ValueError as exc:
        raise ConvertOptionError("--size", shown(size), f"{exc} (pixels)") from None
    tree = scan_jpeg_tree(root, val_labels=val_labels, label_from_folders=label_from_folders)
    files = [_tree_fingerprint(tree.root, tree.files, tree.stamps)]
    if val_labels is not None:
        name = source_files.basename(val_labels)
        files.append(SourceFile(printable_path(name), source_files.file_size(val_labels), source_files.fingerprint(val_labels)))
    parts = [
        JpegBlock(str(tree.root), tree.files[a : a + FILES_PER_BLOCK], tree.labels[a : a + FILES_PER_BLOCK], recipe, size, fast_draft)
        for a in range(0, len(tree.files), FILES_PER_BLOCK)
    ]
    folder_classes = [printable_path(name) for name in tree.folder_classes] if tree.folder_classes else None
    attrs = {
        "recipe": recipe,
        "fast_draft": fast_draft,
        "pillow_version": PIL.__version__,
        "layout": tree.layout,
        "label_source": tree.label_source,
        "folder_classes": folder_classes,
        "image_files_found": len(tree.files),
    }
    return ImageSource(
        format="jpeg",
        label_order=FOLDER_LABEL_ORDER if label_from_folders else "sorted",
        resolution=size,
        parts=parts,
        files=files,
        attrs=attrs,
        settings={
            "recipe": recipe,
            "fast_draft": DRAFT_GEOMETRY if fast_draft else False,
            "label_source": tree.label_source,
            "pillow": PIL.__version__,
            # The numbering itself: an added or removed class folder (even an empty one) renumbers every class.
            "folder_classes": folder_classes,
        },
        ignored=[printable_path(rel) for rel in tree.ignored],
        label_synsets=tuple(folder_classes) if label_from_folders else None,
        input_paths=(str(root),) if val_labels is None else (str(root), str(val_labels)),
        # The tree's files are not stamped again (a second listing of 1.28 M files): each image's label comes from
        # its folder, so a JPEG rewritten during a run cannot pair with another image's label.
        input_stamps=() if val_labels is None else ((str(val_labels), source_files.fingerprint(val_labels)),),
    )

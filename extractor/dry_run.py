"""`imzarr extract --dry-run`: one batch through the hooks, then shapes, sizes and memory — nothing written."""

from __future__ import annotations

import os

import numpy as np
import torch

from extractor.activation_writer import default_shard_size
from extractor.extraction import ExtractOptions, output_state
from extractor.forward import PreparedForward
from extractor.selection import select_samples
from schemas.image_store import validate_image_store
from schemas.store_identity import StoreIdentity
from schemas.store_lifecycle import path_state


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    return ""


def dry_run_table(options: ExtractOptions) -> str:
    """One batch through the hooks at the batch size the run would use, then a table of shapes, sizes and memory."""
    run = options.run
    images = validate_image_store(options.store)
    res = images.resolution
    chosen = select_samples(options.selection, images.coordinate("label"), images.coordinate("synset"))
    with PreparedForward(options.forward, run.device, res, run.compile, run.batch_size,
                                 seed_picks_samples=options.selection.per_class is not None, where=options.store) as forward:
        # The real run's refusals (labels the network cannot take, an output made otherwise) are the dry run's too.
        state, _, _ = output_state(options, forward, images, StoreIdentity.of(options.store, images.attrs), chosen, tidy=False)
        if state == "new" and run.overwrite and path_state(options.output) == "store":
            state = "replace"  # --overwrite over a store made otherwise: the one outcome a dry run must not hide
        batch = max(1, min(forward.batch_size, int(chosen.size)))  # the automatic choice probes one sample first
        device = forward.device
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        shapes, paths = forward.probe(batch), forward.paths
        return _table(options, forward, shapes, paths, batch, int(chosen.size), res, state)


OUTPUT_STATES = {
    "new": "the run would write a new store",
    "resume": "the run would resume the unfinished store there",
    "complete": "the store there is complete: the run would find nothing to do",
    "replace": "the run would delete the store there and write it anew (--overwrite)",
}


def _table(options: ExtractOptions, forward: PreparedForward, shapes: dict, paths: dict, batch: int, n: int, res: int, state: str) -> str:
    run, fwd, loaded, device = options.run, forward.settings, forward.loaded, forward.device
    itemsize = np.dtype(fwd.storage_dtype).itemsize
    rows = [("layer", "module", "shape / sample", "bytes / sample", f"store for {n:,} samples")]
    total = 0
    for name, shape in shapes.items():
        per = int(np.prod(shape)) * itemsize
        total += per
        rows.append((name, paths[name], str(shape), f"{per:,}", _size(per * n)))
    if fwd.reconstructions:
        per = 3 * res**2
        total += per
        rows.append(("reconstruction", "D(x) as uint8", str((3, res, res)), f"{per:,}", _size(per * n)))
    rows.append(("total", "", "", f"{total:,}", _size(total * n)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    shard = run.shard_size or default_shard_size(shapes, fwd.storage_dtype)
    tasks = -(-n // shard)
    params = sum(p.numel() * p.element_size() for p in loaded.module.parameters())
    workers = run.scheduler.workers or os.cpu_count() or 1
    host = (3 * res**2 + total) * shard * 2 * workers  # inputs + outputs, twice while writing
    lines.append("")
    lines.append(f"batch {batch}, compute {fwd.compute_dtype}")
    lines.append(f"model {loaded.name} ({'trained' if loaded.trained else 'UNTRAINED preset'}), {_size(params)} of weights on {device}")
    lines.append(f"output shards of {shard} samples: {tasks} {'task' if tasks == 1 else 'tasks'}; host memory ≈ {_size(host + params)} with {workers} local workers")
    if device.startswith("cuda"):
        lines.append(f"device memory at batch {batch}: peak {_size(torch.cuda.max_memory_allocated())}")
    lines.append(f"dry run: nothing written; {OUTPUT_STATES[state]} ({options.output})")
    return "\n".join(lines)

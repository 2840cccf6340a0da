"""Image store → network → labeled activation store. From Python: `extract` (to a store) and `features` (an
in-memory batch to an xr.Dataset), `report_site` (a compare report as a static web site);
`extractor.image_dataset.ImageStoreDataset` for PyTorch."""

from __future__ import annotations

from typing import Any

__all__ = ["extract", "features", "report_site"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import extractor` (and every `imzarr` command) stays free of torch.
    if name == "report_site":  # no torch: the site reads stores only
        from extractor.analysis.report import write_report_site

        return write_report_site
    if name in __all__:
        from extractor import api

        return getattr(api, name)
    raise AttributeError(f"module 'extractor' has no attribute {name!r}")
